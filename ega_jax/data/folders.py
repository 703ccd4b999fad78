"""Bring-your-own images: `config.dataset.name = "image_folder"`.

Layout of `config.dataset.data_dir` (torchvision ImageFolder's, one folder per split):

  <data_dir>/train/<class name>/<any sub-folders>/<image>
  <data_dir>/test/<class name>/<any sub-folders>/<image>

Classes are the sub-folders of train/, sorted by name: label k is the k-th
name, in both splits. A class may be absent from test/; a test class that
train/ lacks is refused. Every file whose extension PIL registers is an image
(hidden files and folders are skipped); each is decoded when its record is
read (nothing is loaded up front), converted to RGB and resized to
`image_size` x `image_size` (bilinear, aspect ratio not kept), so records are
{'image': uint8 (S, S, 3), 'label': int32}. Record order is class, then path.

The normalisation statistics are `config.dataset.mean`/`std` when given, else
computed once over the train split (at the configured size) and cached in
`<data_dir>/ega_jax_stats.json`, or, when the data folder is read-only, in
`$XDG_CACHE_HOME/ega_jax/image_folder_stats/` (default ~/.cache). A cached
entry is keyed by image size and by a digest of the file list, so adding or
removing images recomputes it.
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os

from absl import logging
import numpy as np
from PIL import Image

from ega_jax.data import info as info_lib
from ega_jax.data import preparation

IMAGE_FOLDER = info_lib.IMAGE_FOLDER
DEFAULT_IMAGE_SIZE = info_lib.DEFAULT_IMAGE_SIZE
# Split role -> folder.
SPLIT_DIRS = {"train": "train", "eval": "test"}
STATS_FILE = "ega_jax_stats.json"
LAYOUT = "<data_dir>/train/<class>/<images> and <data_dir>/test/<class>/<images>"


@functools.lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
  """Lower-case file extensions PIL can open ('.png', '.jpg', ...)."""
  Image.init()
  return frozenset(ext.lower() for ext in Image.registered_extensions())


def _visible_subdirs(directory: str) -> list[str]:
  return sorted(
    entry.name
    for entry in os.scandir(directory)
    if entry.is_dir() and not entry.name.startswith(".")
  )


def _images_under(directory: str) -> list[str]:
  """Image paths below `directory`, relative to it, in sorted walk order."""
  extensions = image_extensions()
  found = []
  for current, dirs, files in os.walk(directory, followlinks=True):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    relative = os.path.relpath(current, directory)
    for name in sorted(files):
      if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions:
        found.append(os.path.normpath(os.path.join(relative, name)))
  return found


def _has_images(directory: str) -> bool:
  extensions = image_extensions()
  return any(
    os.path.splitext(entry.name)[1].lower() in extensions
    for entry in os.scandir(directory)
    if entry.is_file()
  )


def check_root(data_dir: str | None) -> str:
  """`data_dir` as a path when it holds train/ and test/; else one sentence on what is wrong."""
  if not data_dir:
    raise preparation.config_error(
      f"config.dataset.data_dir is unset, but image_folder reads its images from it ({LAYOUT})."
    )
  root = os.fspath(data_dir)
  if not os.path.isdir(root):
    raise preparation.user_error(
      f"image_folder: config.dataset.data_dir={root} does not exist; it must hold {LAYOUT}."
    )
  for split_dir in ("train", "test"):
    if os.path.isdir(os.path.join(root, split_dir)):
      continue
    subdirs = _visible_subdirs(root)
    if split_dir == "test" and ({"val", "validation"} & set(subdirs)):
      hint = "rename (or symlink) its val/ folder to test/"
    elif subdirs and any(_has_images(os.path.join(root, d)) for d in subdirs):
      hint = (
        "its sub-folders hold images, so it looks like one split's folder: point "
        "config.dataset.data_dir at the folder above that holds train/ and test/"
      )
    elif len(subdirs) == 1 and os.path.isdir(os.path.join(root, subdirs[0], split_dir)):
      hint = f"set config.dataset.data_dir={os.path.join(root, subdirs[0])}"
    else:
      hint = f"it must hold {LAYOUT}"
    raise preparation.user_error(
      f"image_folder: config.dataset.data_dir={root} has no {split_dir}/ folder; {hint}."
    )
  return root


@dataclasses.dataclass(frozen=True)
class SplitListing:
  """The files of one split: `files[k]` (relative to `root`) has label `labels[k]`.

  Attributes:
    root: the data folder.
    split_dir: 'train' or 'test'.
    classes: the sorted train class names (label k is classes[k]).
    files: paths relative to `root`, in record order.
    labels: int32 (num_files,).
  """

  root: str
  split_dir: str
  classes: tuple[str, ...]
  files: tuple[str, ...]
  labels: np.ndarray = dataclasses.field(compare=False)

  def digest(self) -> str:
    """sha256 of the class names and the (label, path) list: what the statistics depend on."""
    text = (
      "\n".join(self.classes)
      + "\0"
      + "\n".join(f"{label}\t{path}" for label, path in zip(self.labels.tolist(), self.files))
    )
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def _train_classes(root: str) -> tuple[str, ...]:
  train_dir = os.path.join(root, "train")
  classes = tuple(_visible_subdirs(train_dir))
  if not classes:
    problem = "holds images directly" if _has_images(train_dir) else "holds no class folders"
    raise preparation.user_error(
      f"image_folder: {train_dir} {problem}; put each class's images in "
      f"{train_dir}/<class name>/ ({LAYOUT})."
    )
  return classes


@functools.lru_cache(maxsize=16)
def list_split(root: str, split_dir: str) -> SplitListing:
  """The images of `<root>/<split_dir>` (listed once per process: the folder must not
  change during a run)."""
  classes = _train_classes(root)
  directory = os.path.join(root, split_dir)
  present = _visible_subdirs(directory)
  unknown = sorted(set(present) - set(classes))
  if unknown:
    raise preparation.user_error(
      f"image_folder: {directory}/{unknown[0]} is not a class of {os.path.join(root, 'train')} "
      f"({len(unknown)} such folders); every {split_dir} class must also be a train class."
    )
  files, labels = [], []
  for label, name in enumerate(classes):
    if name not in present:
      continue
    images = _images_under(os.path.join(directory, name))
    if not images and split_dir == "train":
      raise preparation.user_error(
        f"image_folder: class folder {os.path.join(directory, name)} holds no images "
        f"(extensions PIL reads, e.g. .png, .jpg); remove it or add its images."
      )
    files.extend(os.path.join(split_dir, name, image) for image in images)
    labels.extend([label] * len(images))
  if not files:
    raise preparation.user_error(
      f"image_folder: {directory} holds no images in class folders ({LAYOUT})."
    )
  return SplitListing(root, split_dir, classes, tuple(files), np.asarray(labels, np.int32))


def decode_image(path: str, image_size: int) -> np.ndarray:
  """uint8 (image_size, image_size, 3): the file as RGB, resized bilinearly when needed."""
  try:
    with Image.open(path) as image:
      image = image.convert("RGB")
      if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
      return np.asarray(image, np.uint8)
  except (OSError, ValueError, Image.DecompressionBombError) as error:
    raise preparation.user_error(
      f"image_folder: {path} cannot be read as an image ({error}); remove or replace it."
    ) from error


class ImageFolderSource:
  """One split of an image folder, decoded per record: {'image': uint8 (S, S, 3), 'label': int32}."""

  def __init__(self, listing: SplitListing, image_size: int):
    self.listing = listing
    self.image_size = int(image_size)

  @property
  def labels(self) -> np.ndarray:
    """int32 (num_examples,)."""
    return self.listing.labels

  def __len__(self) -> int:
    return len(self.listing.files)

  def __getitem__(self, record_key: int) -> dict[str, np.ndarray]:
    path = os.path.join(self.listing.root, self.listing.files[record_key])
    return {
      "image": decode_image(path, self.image_size),
      "label": self.listing.labels[record_key],
    }

  def __repr__(self) -> str:
    return (
      f"ImageFolderSource(root={self.listing.root!r}, split={self.listing.split_dir!r}, "
      f"image_size={self.image_size}, num_files={len(self)})"
    )


def check_image_size(image_size) -> int:
  """`image_size` (None: the default) as an int, or a ConfigError naming the field."""
  if image_size is None:
    return DEFAULT_IMAGE_SIZE
  if (
    isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1
  ):
    raise preparation.config_error(
      f"config.dataset.image_size={image_size!r} must be a positive integer (pixels per side "
      "the image_folder images are resized to)."
    )
  return int(image_size)


def open_folder_split(data_dir: str | None, role: str, image_size=None) -> ImageFolderSource:
  """The 'train' (train/) or 'eval' (test/) split of the image folder `data_dir`."""
  root = check_root(data_dir)
  return ImageFolderSource(list_split(root, SPLIT_DIRS[role]), check_image_size(image_size))


# ------------------------------------------------------------------ statistics


def compute_stats(source: ImageFolderSource, threads: int | None = None) -> tuple[list, list]:
  """(mean, std) per RGB channel on a 0..1 scale over every pixel of `source`.

  Exact and order-independent (integer histograms), so every process and
  thread count gets the same numbers.
  """
  threads = threads or max(1, min(8, os.cpu_count() or 1))
  chunks = [range(start, min(start + 256, len(source))) for start in range(0, len(source), 256)]

  def histogram(keys):
    counts = np.zeros((3, 256), np.int64)
    for key in keys:
      image = source[key]["image"]
      for channel in range(3):
        counts[channel] += np.bincount(image[..., channel].ravel(), minlength=256)
    return counts

  # PIL releases the GIL while decoding, so threads speed this pass up.
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    counts = sum(pool.map(histogram, chunks), np.zeros((3, 256), np.int64))
  values = np.arange(256, dtype=np.float64) / 255.0
  total = counts.sum(axis=1)
  mean = (counts * values).sum(axis=1) / total
  var = (counts * (values[None, :] - mean[:, None]) ** 2).sum(axis=1) / total
  return mean.tolist(), np.sqrt(var).tolist()


def user_cache_path(root: str) -> str:
  """Where the statistics of a read-only folder `root` are cached instead."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
  key = hashlib.sha256(os.path.abspath(root).encode("utf-8", "surrogateescape")).hexdigest()
  return os.path.join(base, "ega_jax", "image_folder_stats", f"{key[:16]}.json")


def _read_json(path: str) -> dict:
  try:
    with open(path) as stream:
      content = json.load(stream)
    return content if isinstance(content, dict) else {}
  except (OSError, ValueError):
    return {}


def _write_json(path: str, content: dict) -> None:
  """Atomic write (a unique temporary file renamed): concurrent processes may race."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  temporary = f"{path}.{os.getpid()}.tmp"
  try:
    with open(temporary, "w") as stream:
      json.dump(content, stream, indent=1, sort_keys=True)
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def cached_stats(root: str, image_size: int) -> tuple[list, list]:
  """(mean, std) of `<root>/train` at `image_size`: read from a cache, else computed and cached."""
  listing = list_split(root, "train")
  digest = listing.digest()
  paths = [os.path.join(root, STATS_FILE), user_cache_path(root)]
  for path in paths:
    entry = _read_json(path).get(str(image_size), {})
    if entry.get("listing_sha256") == digest:
      return list(entry["mean"]), list(entry["std"])
  logging.info(
    "image_folder: computing the mean/std of %d train images at %dx%d in %s (once; cached).",
    len(listing.files),
    image_size,
    image_size,
    root,
  )
  mean, std = compute_stats(ImageFolderSource(listing, image_size))
  entry = {"mean": mean, "std": std, "num_train": len(listing.files), "listing_sha256": digest}
  for path in paths:
    try:
      _write_json(path, dict(_read_json(path), **{str(image_size): entry}))
      logging.info("image_folder: statistics cached in %s.", path)
      break
    except OSError as error:
      logging.info("image_folder: cannot write %s (%s).", path, error)
  else:
    logging.warning("image_folder: statistics not cached (no writable location).")
  return mean, std


def _check_channels(field: str, value, positive: bool) -> tuple[float, float, float] | None:
  if value is None or (hasattr(value, "__len__") and len(value) == 0):
    return None
  try:
    numbers = tuple(float(v) for v in value)
  except (TypeError, ValueError):
    numbers = ()
  if len(numbers) != 3 or (positive and min(numbers) <= 0):
    raise preparation.config_error(
      f"config.dataset.{field}={value!r} must be three numbers (R, G, B on a 0..1 scale"
      f"{', each > 0' if positive else ''}), or unset to compute them from the train images."
    )
  return numbers


def folder_info(data_dir: str | None, image_size=None, mean=None, std=None) -> info_lib.DatasetInfo:
  """The `DatasetInfo` of an image folder: classes and counts from its files, statistics
  from `mean`/`std` or the (cached) train images."""
  size = check_image_size(image_size)
  mean, std = _check_channels("mean", mean, False), _check_channels("std", std, True)
  root = check_root(data_dir)
  train, test = list_split(root, "train"), list_split(root, "test")
  if mean is None or std is None:
    computed_mean, computed_std = cached_stats(root, size)
    mean = mean or tuple(computed_mean)
    std = std or tuple(computed_std)
  return info_lib.DatasetInfo(
    name=IMAGE_FOLDER,
    num_classes=len(train.classes),
    image_size=size,
    num_train=len(train.files),
    num_test=len(test.files),
    mean=mean,
    std=std,
  )
