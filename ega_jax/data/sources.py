"""Random-access record sources, and which one a dataset is read from.

`_raw_split` picks, for a dataset name and `data_dir`:
  image_folder          its folder (`ega_jax.data.folders`), always;
  cifar10 / cifar100    torchvision's python-version files when
                        `<data_dir>/cifar-10-batches-py/` or `cifar-100-python/` exists
                        (`ega_jax.data.cifar_files`), else TFDS;
  fashion_mnist         the idx files in `<data_dir>/fashion-mnist/` or Debian's folder
                        (`ega_jax.data.idx`), else TFDS;
  stl10, tiny_imagenet  TFDS ArrayRecord (`tfds.data_source`).
Data that are missing, half-prepared or in the wrong folder raise one
`UserInputError` sentence saying what to do (`ega_jax.data.preparation`).

Every source here is wrapped in `ExampleSource`, which gives grain the same
record for every dataset: {'image': uint8 (S, S, 3), 'label': int32,
'index': int32 (the record's position in its split)}.

TensorFlow Datasets is imported lazily, inside the functions that need it:
importing it is slow, and tensorflow must not be imported before
torchvision in one process.
"""

from absl import logging
import os
from typing import Any, Protocol, Sequence

import numpy as np

from ega_jax.data import arrays
from ega_jax.data import cifar_files
from ega_jax.data import folders
from ega_jax.data import info as info_lib
from ega_jax.data import preparation

# The idx reader and the Fashion-MNIST file locations live in `idx` (NumPy
# only, shared with the PyTorch demo teacher); re-exported here for callers.
from ega_jax.data.idx import DEBIAN_FASHION_MNIST_DIR
from ega_jax.data.idx import FASHION_MNIST_FILES
from ega_jax.data.idx import read_fashion_mnist
from ega_jax.data.idx import read_idx  # noqa: F401  (tests monkeypatch sources.read_idx)

# name -> (TFDS name, train split, evaluation split).
TFDS_SPLITS = {
  "cifar10": ("cifar10", "train", "test"),
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

  Raises:
    UserInputError: `<data_dir>/fashion-mnist` exists but lacks some of the files.
  """
  candidates = []
  needed = [f for files in FASHION_MNIST_FILES.values() for f in files]
  if data_dir:
    own = os.path.join(os.fspath(data_dir), "fashion-mnist")
    missing = [f for f in needed if not os.path.isfile(os.path.join(own, f))]
    if os.path.isdir(own) and missing:
      raise preparation.user_error(
        f"fashion_mnist: {own} lacks {', '.join(missing)}; it must hold all four idx files "
        f"({', '.join(needed)}), e.g. copied from Debian's dataset-fashion-mnist package."
      )
    candidates.append(own)
  candidates.append(DEBIAN_FASHION_MNIST_DIR)
  for directory in candidates:
    if all(os.path.isfile(os.path.join(directory, f)) for f in needed):
      return directory
  return None


class FashionMnistIdxSource(arrays.LazyArraySource):
  """Fashion-MNIST split read from idx files, no TensorFlow involved.

  Records are {'image': uint8 (28, 28, 1), 'label': uint8}, like TFDS's.
  """

  def __init__(self, directory: str, split: str):
    if split not in FASHION_MNIST_FILES:
      raise ValueError(
        f"Unknown Fashion-MNIST split {split!r}; valid splits are {', '.join(FASHION_MNIST_FILES)}."
      )
    self.directory = directory
    self.split = split

  def _read(self) -> tuple[np.ndarray, np.ndarray]:
    return read_fashion_mnist(self.directory, self.split)

  def _image(self, images: np.ndarray, record_key: int) -> np.ndarray:
    return images[record_key][..., None]

  def __repr__(self) -> str:
    return f"FashionMnistIdxSource(directory={self.directory!r}, split={self.split!r})"


class ExampleSource:
  """Uniform view of one split for the pipelines.

  Record `k` is {'image': uint8 (S, S, 3), 'label': int32, 'index': int32 k}.
  Single-channel images are replicated to 3 channels.
  """

  def __init__(
    self,
    source: RecordSource,
    name: str,
    split: str,
    max_examples: int | None = None,
    image_size: int | None = None,
  ):
    self.source = source
    self.name = name
    self.split = split
    self.image_size = info_lib.record_image_size(name, image_size)
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


def _tfds_version(tfds: Any, tfds_name: str) -> str | None:
  """The version this tensorflow-datasets reads for `tfds_name` (None if unknown)."""
  try:
    return str(tfds.builder_cls(tfds_name).VERSION)
  except Exception:  # pylint: disable=broad-except  (only refines an error message)
    return None


def _missing_shard(data_source: Any) -> str | None:
  """The first local shard file a TFDS ArrayRecord source lists but lacks, else None.

  TFDS opens shards only at the first read, so a half-copied build would
  otherwise fail later inside a reader thread.
  """
  from tensorflow_datasets.core.data_sources import base  # pylint: disable=g-import-not-at-top

  dataset_info = getattr(data_source, "dataset_info", None)
  reader = type(getattr(data_source, "data_source", None)).__name__
  if dataset_info is None or reader != "ArrayRecordDataSource":
    return None  # not read from files (tfds.testing.mock_data patches the reader)
  for instruction in base.file_instructions(dataset_info, data_source.split):
    filename = os.fspath(instruction.filename)
    if "://" not in filename and not os.path.isfile(filename):
      return filename
  return None


def open_tfds(
  name: str, split: str, data_dir: str | None, decoders: Any = None, alternative: str = ""
) -> Sequence[Any]:
  """`tfds.data_source` for one split, or a one-sentence UserInputError saying what to do.

  `alternative` (", or ...") is appended to the advice (another way to provide the
  data). Works under `tfds.testing.mock_data`, which patches the builder's
  `as_data_source` (it then ignores `data_dir`).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if name == "tiny_imagenet":
    # Importing the module registers the project's TFDS builder.
    # pylint: disable-next=g-import-not-at-top,unused-import
    from ega_jax.data import tiny_imagenet  # noqa: F401
  tfds_name = TFDS_SPLITS[name][0]
  try:
    source = tfds.data_source(
      tfds_name, split=split, data_dir=data_dir, download=False, decoders=decoders
    )
  except Exception as error:  # pylint: disable=broad-except
    # TFDS reports an unprepared dataset as a KeyError ("`splits` is empty"),
    # "random access for TFRECORD is not supported", a DatasetInfoFileError, ...;
    # the directory itself says what is wrong.
    diagnosis = preparation.diagnose_tfds(name, split, data_dir, _tfds_version(tfds, tfds_name))
    if diagnosis is None:
      if not isinstance(error, (NotImplementedError, FileNotFoundError, AssertionError, KeyError)):
        raise
      diagnosis = (
        "it is not prepared",
        f"prepare it with: {preparation.preparation_command(name, data_dir)}",
      )
    raise preparation.tfds_error(name, split, data_dir, *diagnosis, alternative) from error
  missing = _missing_shard(source)
  if missing is not None:
    location = os.path.dirname(missing)
    raise preparation.tfds_error(
      name,
      split,
      data_dir,
      f"{location} is incomplete ({os.path.basename(missing)} is missing)",
      f"delete {location} and prepare it again with: "
      f"{preparation.preparation_command(name, data_dir)}",
      alternative,
    )
  return source


def _raw_split(
  name: str, role: str, data_dir: str | None, decoders: Any = None, image_size: int | None = None
) -> tuple[RecordSource, str]:
  """(record source, split name) for `role` in ('train', 'eval'); see the module docstring."""
  if role not in SPLIT_ROLES:
    raise ValueError(f"Unknown split role {role!r}; valid roles are {', '.join(SPLIT_ROLES)}.")
  if name == folders.IMAGE_FOLDER:
    source = folders.open_folder_split(data_dir, role, image_size)
    return source, source.listing.split_dir
  info_lib.get_dataset_info(name)
  _, train_split, eval_split = TFDS_SPLITS[name]
  split = train_split if role == "train" else eval_split
  alternative = ""
  if name in cifar_files.CIFAR_LAYOUTS:
    directory = cifar_files.find_cifar_dir(name, data_dir)
    if directory is not None:
      return cifar_files.CifarPickleSource(directory, name, split), split
    alternative = cifar_files.alternative_hint(name, data_dir)
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
    alternative = (
      f", or put the four idx .gz files in {searched[0]} (or install Debian's "
      "dataset-fashion-mnist)"
    )
  return open_tfds(name, split, data_dir, decoders=decoders, alternative=alternative), split


def open_split(
  name: str,
  role: str,
  data_dir: str | None,
  max_examples: int | None = None,
  image_size: int | None = None,
) -> ExampleSource:
  """The train ('train') or evaluation ('eval') split of dataset `name`.

  `max_examples` > 0 keeps only the first that many records. `image_size`:
  see `info.record_image_size` (image_folder resizes to it; None: 32).
  """
  source, split = _raw_split(name, role, data_dir, image_size=image_size)
  return ExampleSource(source, name, split, max_examples, image_size)


def _has_labels_array(name: str, data_dir: str | None) -> bool:
  """Whether the train split comes from files whose labels load without images."""
  if name == folders.IMAGE_FOLDER:
    return True
  if name in cifar_files.CIFAR_LAYOUTS:
    return cifar_files.find_cifar_dir(name, data_dir) is not None
  return name == "fashion_mnist" and find_fashion_mnist_dir(data_dir) is not None


def read_train_labels(
  name: str, data_dir: str | None, max_examples: int | None = None
) -> np.ndarray:
  """int32 (num_train,): label of every train record, in record order.

  `max_examples` > 0 keeps only the first that many records.
  """
  decoders = None
  if not _has_labels_array(name, data_dir):
    info_lib.get_dataset_info(name)
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    # Labels only: skip the image decode, which is >99% of the read cost.
    decoders = {"image": tfds.decode.SkipDecoding()}
  source, _ = _raw_split(name, "train", data_dir, decoders=decoders)
  count = len(source)
  if max_examples is not None and max_examples > 0:
    count = min(count, int(max_examples))
  if hasattr(source, "labels"):
    return np.asarray(source.labels[:count], np.int32)
  labels = np.empty(count, np.int32)
  for key in range(count):
    labels[key] = source[key]["label"]
  return labels
