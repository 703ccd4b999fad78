"""Random-access record sources: TFDS ArrayRecord data sources and the
offline Fashion-MNIST idx files (read by `ega_jax.data.idx`).

Every source here is wrapped in `ExampleSource`, which gives grain the same
record for every dataset: {'image': uint8 (S, S, 3), 'label': int32,
'index': int32 (the record's position in its split)}.

TensorFlow Datasets is imported lazily, inside the functions that need it:
importing it is slow, and tensorflow must not be imported before
torchvision in one process.
"""

import glob
from absl import logging
import os
from typing import Any, Protocol, Sequence

import numpy as np

from ega_jax.data import info as info_lib

# The idx reader and the Fashion-MNIST file locations live in `idx` (NumPy
# only, shared with the PyTorch demo teacher); re-exported here for callers.
from ega_jax.data.idx import DEBIAN_FASHION_MNIST_DIR
from ega_jax.data.idx import FASHION_MNIST_FILES
from ega_jax.data.idx import read_fashion_mnist
from ega_jax.data.idx import read_idx  # noqa: F401  (tests monkeypatch sources.read_idx)

# name -> (TFDS name, train split, evaluation split).
TFDS_SPLITS = {
  "cifar100": ("cifar100", "train", "test"),
  "stl10": ("stl10", "train", "test"),
  "tiny_imagenet": ("tiny_imagenet", "train", "validation"),
  "fashion_mnist": ("fashion_mnist", "train", "test"),
}
SPLIT_ROLES = ("train", "eval")


class RecordSource(Protocol):
  """What grain needs: random access by record key."""

  def __len__(self) -> int: ...

  def __getitem__(self, record_key: int) -> Any: ...


def find_fashion_mnist_dir(data_dir: str | None) -> str | None:
  """The first directory holding all four Fashion-MNIST idx files, or None.

  Looked up in `<data_dir>/fashion-mnist`, then `DEBIAN_FASHION_MNIST_DIR`.
  """
  candidates = []
  if data_dir:
    candidates.append(os.path.join(os.fspath(data_dir), "fashion-mnist"))
  candidates.append(DEBIAN_FASHION_MNIST_DIR)
  needed = [f for files in FASHION_MNIST_FILES.values() for f in files]
  for directory in candidates:
    if all(os.path.isfile(os.path.join(directory, f)) for f in needed):
      return directory
  return None


class FashionMnistIdxSource:
  """Fashion-MNIST split read from idx files, no TensorFlow involved.

  Records are {'image': uint8 (28, 28, 1), 'label': uint8}, like TFDS's.
  Arrays load on first access and are not pickled (grain workers reload
  them), so handing the source to worker processes stays cheap.
  """

  def __init__(self, directory: str, split: str):
    if split not in FASHION_MNIST_FILES:
      raise ValueError(
        f"Unknown Fashion-MNIST split {split!r}; valid splits are {', '.join(FASHION_MNIST_FILES)}."
      )
    self.directory = directory
    self.split = split
    self._arrays = None

  def _load(self) -> tuple[np.ndarray, np.ndarray]:
    if self._arrays is None:
      self._arrays = read_fashion_mnist(self.directory, self.split)
    return self._arrays

  @property
  def labels(self) -> np.ndarray:
    """uint8 (num_examples,)."""
    return self._load()[1]

  def __len__(self) -> int:
    return len(self._load()[1])

  def __getitem__(self, record_key: int) -> dict[str, np.ndarray]:
    images, labels = self._load()
    return {"image": images[record_key][..., None], "label": labels[record_key]}

  def __getstate__(self):
    return {"directory": self.directory, "split": self.split, "_arrays": None}

  def __repr__(self) -> str:
    return f"FashionMnistIdxSource(directory={self.directory!r}, split={self.split!r})"


class ExampleSource:
  """Uniform view of one split for the pipelines.

  Record `k` is {'image': uint8 (S, S, 3), 'label': int32, 'index': int32 k}.
  Single-channel images are replicated to 3 channels.
  """

  def __init__(self, source: RecordSource, name: str, split: str, max_examples: int | None = None):
    self.source = source
    self.name = name
    self.split = split
    self.image_size = info_lib.get_dataset_info(name).image_size
    # A prefix of the split (quick runs and tests); None or <= 0: all of it.
    self.num_records = len(source)
    if max_examples is not None and max_examples > 0:
      self.num_records = min(self.num_records, int(max_examples))

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, record_key: int) -> dict[str, np.ndarray]:
    record = self.source[record_key]
    image = np.asarray(record["image"], dtype=np.uint8)
    if image.ndim == 3 and image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    expected_shape = (self.image_size, self.image_size, 3)
    if image.shape != expected_shape:
      raise ValueError(
        f"{self.name} {self.split} record {record_key} has image shape "
        f"{image.shape}, expected {expected_shape}."
      )
    return {
      "image": image,
      "label": np.int32(record["label"]),
      "index": np.int32(record_key),
    }

  def __repr__(self) -> str:
    # grain compares this string when restoring an iterator state.
    return (
      f"ExampleSource(name={self.name}, split={self.split}, "
      f"num_records={len(self)}, source={self.source!r})"
    )


def _preparation_command(name: str, data_dir: str | None) -> str:
  """The shell command that prepares `name` as ArrayRecord in `data_dir`."""
  target = os.fspath(data_dir) if data_dir else "~/tensorflow_datasets"
  if name == "tiny_imagenet":
    return (
      "python -m ega_jax.data.tiny_imagenet "
      "--manual_dir=<dir with tiny-imagenet-200.zip> "
      f"--data_dir={target}"
    )
  return f"tfds build {TFDS_SPLITS[name][0]} --data_dir={target} --file_format=array_record"


def open_tfds(name: str, split: str, data_dir: str | None, decoders: Any = None) -> Sequence[Any]:
  """`tfds.data_source` for one split, with a one-line hint if it is missing.

  Works under `tfds.testing.mock_data`, which patches the builder's
  `as_data_source` (it then ignores `data_dir`).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if name == "tiny_imagenet":
    # Importing the module registers the project's TFDS builder.
    # pylint: disable-next=g-import-not-at-top,unused-import
    from ega_jax.data import tiny_imagenet  # noqa: F401
  tfds_name = TFDS_SPLITS[name][0]
  try:
    return tfds.data_source(
      tfds_name, split=split, data_dir=data_dir, download=False, decoders=decoders
    )
  except (NotImplementedError, FileNotFoundError, AssertionError) as error:
    # TFDS reports a missing dataset as "random access for TFRECORD is not
    # supported" (the default format of an unprepared builder); say what to
    # run instead.
    location = os.fspath(data_dir) if data_dir else "~/tensorflow_datasets"
    dataset_dir = os.path.join(os.path.expanduser(location), tfds_name)
    if glob.glob(os.path.join(dataset_dir, "**", "*.tfrecord*"), recursive=True):
      message = (
        f"{name} under {location} is in TFRecord format, but random access "
        "needs ArrayRecord; rebuild it in a new data_dir with: "
        f"{_preparation_command(name, '<new data_dir>')}"
      )
    else:
      message = (
        f"{name} ({split} split) is not prepared under {location}; "
        f"prepare it with: {_preparation_command(name, data_dir)}"
      )
    raise FileNotFoundError(message) from error


def _raw_split(
  name: str, role: str, data_dir: str | None, decoders: Any = None
) -> tuple[RecordSource, str]:
  """(record source, split name) for `role` in ('train', 'eval')."""
  info_lib.get_dataset_info(name)
  if role not in SPLIT_ROLES:
    raise ValueError(f"Unknown split role {role!r}; valid roles are {', '.join(SPLIT_ROLES)}.")
  _, train_split, eval_split = TFDS_SPLITS[name]
  split = train_split if role == "train" else eval_split
  if name == "fashion_mnist":
    directory = find_fashion_mnist_dir(data_dir)
    if directory is not None:
      return FashionMnistIdxSource(directory, split), split
    searched = ([os.path.join(os.fspath(data_dir), "fashion-mnist")] if data_dir else []) + [
      DEBIAN_FASHION_MNIST_DIR
    ]
    logging.warning(
      "Fashion-MNIST idx files not found in %s; falling back to TFDS "
      '"fashion_mnist" in %s (install Debian\'s dataset-fashion-mnist to '
      "read them offline).",
      " or ".join(searched),
      data_dir or "~/tensorflow_datasets",
    )
  return open_tfds(name, split, data_dir, decoders=decoders), split


def open_split(
  name: str, role: str, data_dir: str | None, max_examples: int | None = None
) -> ExampleSource:
  """The train ('train') or evaluation ('eval') split of dataset `name`.

  `max_examples` > 0 keeps only the first that many records.
  """
  source, split = _raw_split(name, role, data_dir)
  return ExampleSource(source, name, split, max_examples)


def read_train_labels(
  name: str, data_dir: str | None, max_examples: int | None = None
) -> np.ndarray:
  """int32 (num_train,): label of every train record, in record order.

  `max_examples` > 0 keeps only the first that many records.
  """
  info_lib.get_dataset_info(name)
  decoders = None
  if name != "fashion_mnist" or find_fashion_mnist_dir(data_dir) is None:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    # Labels only: skip the image decode, which is >99% of the read cost.
    decoders = {"image": tfds.decode.SkipDecoding()}
  source, _ = _raw_split(name, "train", data_dir, decoders=decoders)
  count = len(source)
  if max_examples is not None and max_examples > 0:
    count = min(count, int(max_examples))
  if isinstance(source, FashionMnistIdxSource):
    return source.labels[:count].astype(np.int32)
  labels = np.empty(count, np.int32)
  for key in range(count):
    labels[key] = source[key]["label"]
  return labels
