"""A record source over two in-memory arrays (images, labels), loaded on first use.

Shared by the sources that read whole files without TensorFlow (Fashion-MNIST's
idx files, torchvision's CIFAR pickles).
"""

import numpy as np


class LazyArraySource:
  """Random access to {'image': uint8 (H, W, C), 'label': uint8} records of two arrays.

  Subclasses implement `_read() -> (images, labels)`. The arrays load on first
  access and are not pickled (grain workers reload them), so handing the source
  to worker processes stays cheap.
  """

  _arrays = None

  def _read(self) -> tuple[np.ndarray, np.ndarray]:
    raise NotImplementedError

  def _load(self) -> tuple[np.ndarray, np.ndarray]:
    if self._arrays is None:
      self._arrays = self._read()
    return self._arrays

  def _image(self, images: np.ndarray, record_key: int) -> np.ndarray:
    return images[record_key]

  @property
  def labels(self) -> np.ndarray:
    """uint8 (num_examples,)."""
    return self._load()[1]

  def __len__(self) -> int:
    return len(self._load()[1])

  def __getitem__(self, record_key: int) -> dict[str, np.ndarray]:
    images, labels = self._load()
    return {"image": self._image(images, record_key), "label": labels[record_key]}

  def __getstate__(self):
    return dict(self.__dict__, _arrays=None)
