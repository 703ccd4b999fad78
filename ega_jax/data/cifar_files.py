"""CIFAR-10/100 read from the "python version" files torchvision and RepDistiller use.

Layout, inside `config.dataset.data_dir` (what `tar xzf cifar-100-python.tar.gz`
or torchvision's `download=True` leaves there):

  cifar-100-python/{train,test,meta}                     CIFAR-100, labels 'fine_labels'
  cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}   CIFAR-10, 'labels'

Each data file is a pickled dict: 'data' uint8 (N, 3072) (the R, G, B planes of
a 32x32 image, row-major) and the labels as a list of N ints. Labels index the
classes as TFDS's do; the record order is the files' (TFDS's differs).

The pickles are read with an unpickler that only rebuilds NumPy arrays and
plain containers, so a foreign file cannot run code.
"""

import os
import pickle

import numpy as np

from ega_jax.data import arrays
from ega_jax.data import preparation

# name -> (folder, {split: data files}, label key, metadata file).
CIFAR_LAYOUTS = {
  "cifar100": ("cifar-100-python", {"train": ("train",), "test": ("test",)}, "fine_labels", "meta"),
  "cifar10": (
    "cifar-10-batches-py",
    {"train": tuple(f"data_batch_{k}" for k in range(1, 6)), "test": ("test_batch",)},
    "labels",
    "batches.meta",
  ),
}
ARCHIVES = {"cifar100": "cifar-100-python.tar.gz", "cifar10": "cifar-10-python.tar.gz"}
_IMAGE_SIZE = 32

# What a CIFAR pickle may reference: NumPy's array reconstruction, nothing else.
_ALLOWED_GLOBALS = {
  ("numpy", "ndarray"),
  ("numpy", "dtype"),
  ("numpy.core.multiarray", "_reconstruct"),
  ("numpy._core.multiarray", "_reconstruct"),
  ("numpy.core.multiarray", "scalar"),
  ("numpy._core.multiarray", "scalar"),
  # Protocol 2 writes bytes through _codecs.encode; protocol 5 stores contiguous
  # arrays through _frombuffer.
  ("_codecs", "encode"),
  ("numpy.core.numeric", "_frombuffer"),
  ("numpy._core.numeric", "_frombuffer"),
}


class _ArrayUnpickler(pickle.Unpickler):
  def find_class(self, module, name):
    if (module, name) not in _ALLOWED_GLOBALS:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
    return super().find_class(module, name)


def needed_files(name: str) -> list[str]:
  """The files the folder of `name` must hold (the metadata file is optional)."""
  return [f for files in CIFAR_LAYOUTS[name][1].values() for f in files]


def find_cifar_dir(name: str, data_dir: str | None) -> str | None:
  """`<data_dir>/<cifar folder>` when it holds every data file; None when it is absent.

  Raises:
    UserInputError: the folder exists but misses files (a partial copy or extraction).
  """
  if not data_dir or "://" in os.fspath(data_dir):
    return None
  directory = os.path.join(os.fspath(data_dir), CIFAR_LAYOUTS[name][0])
  if not os.path.isdir(directory):
    return None
  missing = [f for f in needed_files(name) if not os.path.isfile(os.path.join(directory, f))]
  if missing:
    raise preparation.user_error(
      f"{name}: {directory} lacks {', '.join(missing)} (it must hold "
      f"{', '.join(needed_files(name))}); extract {ARCHIVES[name]} into {data_dir} again."
    )
  return directory


def alternative_hint(name: str, data_dir: str | None) -> str:
  """How `data_dir` could hold torchvision's files instead of a TFDS build (appended to
  the TFDS error): names a folder pointed at by mistake or an archive left packed."""
  folder = CIFAR_LAYOUTS[name][0]
  if not data_dir:
    return f", or set config.dataset.data_dir to a folder holding torchvision's {folder}/"
  data_dir = os.fspath(data_dir)
  if os.path.basename(os.path.normpath(data_dir)) == folder or all(
    os.path.isfile(os.path.join(data_dir, f)) for f in needed_files(name)
  ):
    parent = os.path.dirname(os.path.normpath(data_dir))
    return (
      f"; it looks like torchvision's {folder}/ itself, so set config.dataset.data_dir={parent}"
    )
  archive = os.path.join(data_dir, ARCHIVES[name])
  if os.path.isfile(archive):
    return f"; or unpack torchvision's archive with: tar xzf {archive} -C {data_dir}"
  return f", or put torchvision's {folder}/ ({', '.join(needed_files(name))}) in it"


def _load_pickle(path: str) -> dict:
  try:
    with open(path, "rb") as stream:
      # latin1: the files are Python 2 pickles (byte strings become str keys).
      content = _ArrayUnpickler(stream, encoding="latin1").load()
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
    raise preparation.user_error(
      f"{path} is not a CIFAR python-version pickle ({error}); extract the archive again."
    ) from error
  if not isinstance(content, dict):
    raise preparation.user_error(f"{path} holds a {type(content).__name__}, not a CIFAR dict.")
  # Keys may be bytes when a file was written with protocol 0/2 from bytes names.
  return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in content.items()}


def read_cifar(directory: str, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """One split of `name` from torchvision's files in `directory`.

  Returns:
    (images uint8 (N, 32, 32, 3), labels uint8 (N,)), in file order.
  """
  _, split_files, label_key, _ = CIFAR_LAYOUTS[name]
  images, labels = [], []
  for file_name in split_files[split]:
    path = os.path.join(directory, file_name)
    content = _load_pickle(path)
    if "data" not in content or label_key not in content:
      raise preparation.user_error(
        f"{path} has no {label_key!r} or 'data' entry (keys: {', '.join(map(str, content))}); "
        f"{name} needs the {CIFAR_LAYOUTS[name][0]} files."
      )
    data = np.asarray(content["data"])
    file_labels = np.asarray(content[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * _IMAGE_SIZE**2:
      raise preparation.user_error(
        f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)."
      )
    if file_labels.shape != (len(data),):
      raise preparation.user_error(f"{path}: {len(file_labels)} labels for {len(data)} images.")
    images.append(data.reshape(-1, 3, _IMAGE_SIZE, _IMAGE_SIZE).transpose(0, 2, 3, 1))
    labels.append(file_labels.astype(np.uint8))
  return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


class CifarPickleSource(arrays.LazyArraySource):
  """One CIFAR split from torchvision's files: {'image': uint8 (32, 32, 3), 'label': uint8}."""

  def __init__(self, directory: str, name: str, split: str):
    self.directory = directory
    self.name = name
    self.split = split

  def _read(self) -> tuple[np.ndarray, np.ndarray]:
    return read_cifar(self.directory, self.name, self.split)

  def __repr__(self) -> str:
    return f"CifarPickleSource(directory={self.directory!r}, split={self.split!r})"
