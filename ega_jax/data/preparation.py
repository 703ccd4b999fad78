"""What to tell a user whose data are missing, half-prepared or in the wrong folder.

Every message is one sentence naming the dataset, the directory looked in and
what to do (the command that prepares it, or the layout expected), raised as
`ega_jax.config.UserInputError` so the CLI prints it without a traceback.

TFDS failures are diagnosed here from the directory itself: TensorFlow
Datasets reports an unprepared dataset in several ways (a `KeyError` about
empty `splits`, "random access for TFRECORD is not supported", a missing
`dataset_info.json`, or an `open()` failure at the first read), none of which
says what to run.
"""

import glob
import json
import os

# name -> TFDS builder name (the datasets read through tfds.data_source).
TFDS_NAMES = {
  "cifar10": "cifar10",
  "cifar100": "cifar100",
  "stl10": "stl10",
  "tiny_imagenet": "tiny_imagenet",
  "fashion_mnist": "fashion_mnist",
}
# TFDS writes a build into `<name>/incomplete.<random>_<version>/` and renames it at the end.
_INCOMPLETE_PREFIX = "incomplete."


def user_error(message: str) -> Exception:
  """A `UserInputError` (imported lazily: `ega_jax.config` imports `ega_jax.data`)."""
  from ega_jax import config as config_lib  # pylint: disable=g-import-not-at-top

  return config_lib.UserInputError(message)


def config_error(message: str) -> Exception:
  """A `ConfigError` (a config field that cannot work; the message names it)."""
  from ega_jax import config as config_lib  # pylint: disable=g-import-not-at-top

  return config_lib.ConfigError(message)


def tfds_location(data_dir: str | None) -> str:
  """The directory TFDS reads: `data_dir`, else its default ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
  if data_dir:
    return os.fspath(data_dir)
  from tensorflow_datasets.core import constants  # pylint: disable=g-import-not-at-top

  return os.path.expanduser(os.fspath(constants.DATA_DIR))


def preparation_command(name: str, data_dir: str | None) -> str:
  """The shell command that prepares `name` as ArrayRecord in `data_dir`."""
  target = tfds_location(data_dir)
  if name == "tiny_imagenet":
    return (
      "python -m ega_jax.data.tiny_imagenet "
      "--manual_dir=<dir with tiny-imagenet-200.zip> "
      f"--data_dir={target}"
    )
  return f"tfds build {TFDS_NAMES[name]} --data_dir={target} --file_format=array_record"


def _is_dir(path: str) -> bool:
  return os.path.isdir(path)


def _subdirs(path: str) -> list[str]:
  try:
    return sorted(e.name for e in os.scandir(path) if e.is_dir())
  except OSError:
    return []


def _split_shards(version_dir: str, split: str) -> list[str] | None:
  """The shard files dataset_info.json promises for `split` (None: no json or no such split).

  An empty list when the file name template is one this check does not know.
  """
  try:
    with open(os.path.join(version_dir, "dataset_info.json")) as stream:
      info = json.load(stream)
  except (OSError, ValueError):
    return None
  for entry in info.get("splits", []):
    if entry.get("name") != split:
      continue
    count = len(entry.get("shardLengths", []))
    template = entry.get("filepathTemplate", "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}")
    fields = {
      "DATASET": info.get("name", ""),
      "SPLIT": split,
      "FILEFORMAT": info.get("fileFormat", "array_record"),
    }
    try:
      return [
        template.format(**fields, SHARD_X_OF_Y=f"{k:05d}-of-{count:05d}", SHARD_INDEX=f"{k:05d}")
        for k in range(count)
      ]
    except (KeyError, IndexError, ValueError):
      return []
  return None


def diagnose_tfds(
  name: str, split: str, data_dir: str | None, version: str | None
) -> tuple[str, str] | None:
  """(what is wrong, what to do) with the TFDS build of `name` in `data_dir`, or None.

  None means the directory looks complete (the caller then re-raises TFDS's own
  error) or cannot be inspected here (a remote path such as gs://).
  """
  location = tfds_location(data_dir)
  tfds_name = TFDS_NAMES[name]
  command = preparation_command(name, data_dir)
  if "://" in location:
    return None
  if not _is_dir(location):
    return "that directory does not exist", f"prepare it with: {command}"
  dataset_dir = os.path.join(location, tfds_name)
  if not _is_dir(dataset_dir):
    parent = os.path.dirname(os.path.normpath(location))
    if os.path.isfile(os.path.join(location, "dataset_info.json")):
      # data_dir points at <root>/<name>/<version>.
      root = os.path.dirname(parent)
      return (
        "it is the version folder of a build, not a TFDS data_dir",
        f"set config.dataset.data_dir={root}",
      )
    if os.path.basename(os.path.normpath(location)) == tfds_name or glob.glob(
      os.path.join(location, "*", "dataset_info.json")
    ):
      return (
        f"it is the {tfds_name}/ folder itself, not the TFDS data_dir above it",
        f"set config.dataset.data_dir={parent}",
      )
    return f"it has no {tfds_name}/ folder", f"prepare it with: {command}"
  entries = _subdirs(dataset_dir)
  versions = [v for v in entries if not v.startswith(_INCOMPLETE_PREFIX)]
  complete = [
    v for v in versions if os.path.isfile(os.path.join(dataset_dir, v, "dataset_info.json"))
  ]
  rebuild = f"delete {dataset_dir} and prepare it again with: {command}"
  if glob.glob(os.path.join(dataset_dir, "**", "*.tfrecord*"), recursive=True):
    return (
      "it is in TFRecord format, but random access needs ArrayRecord",
      f"rebuild it in a new data_dir with: {preparation_command(name, '<new data_dir>')}",
    )
  if version is not None and version in versions and version not in complete:
    return f"{tfds_name}/{version} has no dataset_info.json (an unfinished build)", rebuild
  if not complete:
    if len(entries) > len(versions):
      return f"{tfds_name}/ holds only an interrupted build ({entries[0]})", rebuild
    return f"{tfds_name}/ holds no finished build", rebuild
  if version is not None and version not in complete:
    return (
      f"{tfds_name}/ holds version {', '.join(complete)}, but this tensorflow-datasets "
      f"reads version {version}",
      f"prepare it again with: {command}",
    )
  version_dir = os.path.join(dataset_dir, version or complete[-1])
  shards = _split_shards(version_dir, split)
  if shards is None:
    return f"{version_dir} has no {split!r} split", rebuild
  missing = [s for s in shards if not os.path.isfile(os.path.join(version_dir, s))]
  if missing:
    return (
      f"{version_dir} is incomplete ({len(missing)} of {len(shards)} {split} files missing, "
      f"e.g. {missing[0]})",
      rebuild,
    )
  return None


def tfds_error(
  name: str, split: str, data_dir: str | None, problem: str, action: str, alternative: str = ""
) -> Exception:
  """The one-sentence UserInputError for a TFDS dataset that cannot be read."""
  location = tfds_location(data_dir)
  where = location if data_dir else f"{location} (TFDS's default; config.dataset.data_dir is unset)"
  return user_error(
    f"{name} ({split} split) is not ready in {where}: {problem}; {action}{alternative}."
  )
