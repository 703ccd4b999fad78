"""The idx file format and where Fashion-MNIST's idx files live.

NumPy only: the PyTorch demo teacher (experiments/pretrain_demo_teacher.py)
reads the same files as the input pipelines, and must not pull TensorFlow in.
"""

import gzip
import os

import numpy as np

# Where Debian's `dataset-fashion-mnist` package installs the idx files.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# split -> (images file, labels file).
FASHION_MNIST_FILES = {
  "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# idx type codes (third magic byte) -> NumPy dtype, from the idx format spec.
_IDX_DTYPES = {
  0x08: np.dtype(np.uint8),
  0x09: np.dtype(np.int8),
  0x0B: np.dtype(">i2"),
  0x0C: np.dtype(">i4"),
  0x0D: np.dtype(">f4"),
  0x0E: np.dtype(">f8"),
}


def read_idx(path: str) -> np.ndarray:
  """Reads one (optionally gzip-compressed) idx file into an array.

  Format: 2 zero bytes, a type byte, a rank byte, `rank` big-endian uint32
  dimensions, then the data in C order.

  Returns:
    array of the stored shape, e.g. uint8 (60000, 28, 28) for images. It
    views the file's bytes, so it is read-only.
  """
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as stream:
    raw = stream.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(f"{path} is not an idx file (bad magic number).")
  dtype = _IDX_DTYPES[raw[2]]
  rank = raw[3]
  header_size = 4 + 4 * rank
  shape = tuple(int(dim) for dim in np.frombuffer(raw, ">u4", count=rank, offset=4))
  expected_bytes = int(np.prod(shape)) * dtype.itemsize
  if len(raw) - header_size != expected_bytes:
    raise ValueError(
      f"{path} is truncated or corrupt: header says shape {shape} "
      f"({expected_bytes} bytes) but {len(raw) - header_size} bytes follow."
    )
  data = np.frombuffer(raw, dtype, offset=header_size).reshape(shape)
  return data.astype(dtype.newbyteorder("="), copy=False)


def read_fashion_mnist(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """One Fashion-MNIST split from the idx files in `directory`.

  Args:
    directory: a folder holding the files of `FASHION_MNIST_FILES[split]`.
    split: 'train' or 'test'.

  Returns:
    (images uint8 (N, 28, 28), labels uint8 (N,)), both read-only.

  Raises:
    ValueError: unknown split, or files that are not idx, are truncated, or
      disagree with each other.
    FileNotFoundError: a file of the split is missing.
  """
  if split not in FASHION_MNIST_FILES:
    raise ValueError(
      f"Unknown Fashion-MNIST split {split!r}; valid splits are {', '.join(FASHION_MNIST_FILES)}."
    )
  paths = [os.path.join(directory, name) for name in FASHION_MNIST_FILES[split]]
  missing = [path for path in paths if not os.path.isfile(path)]
  if missing:
    raise FileNotFoundError(
      f"Fashion-MNIST file {missing[0]} does not exist; the folder must hold "
      f"{sorted(f for files in FASHION_MNIST_FILES.values() for f in files)}."
    )
  images, labels = (read_idx(path) for path in paths)
  if (
    images.ndim != 3
    or labels.shape != images.shape[:1]
    or images.dtype != np.uint8
    or labels.dtype != np.uint8
  ):
    raise ValueError(
      f"Fashion-MNIST {split} files in {directory} disagree: "
      f"images {images.dtype} {images.shape}, labels {labels.dtype} "
      f"{labels.shape}."
    )
  return images, labels
