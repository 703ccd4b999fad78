"""Host-side uint8 augmentation: zero-pad, random crop, horizontal flip.

Everything here is NumPy on uint8 images; normalisation happens on device.
The randomness comes from the `np.random.Generator` that grain hands to each
record (seeded from the loader seed and the record's position in the sampler
stream), so a view is a pure function of (seed, epoch, shard, position).
"""

import dataclasses

import grain
import numpy as np

TEACHER_VIEWS = ('independent', 'same')


def crop_padding(image_size: int) -> int:
  """Zero padding on each side before cropping back: image_size // 8.

  4 for CIFAR (32), 8 for Tiny ImageNet (64), 12 for STL-10 (96), 3 for
  Fashion-MNIST (28).
  """
  return image_size // 8


def random_crop_flip(image: np.ndarray, rng: np.random.Generator,
                     padding: int) -> np.ndarray:
  """One random view of `image`.

  Zero-pads `padding` pixels on each side, crops a window of the original
  size at a uniformly random offset, then flips it left-right with
  probability 1/2.

  Args:
    image: uint8 (H, W, C).
    rng: the per-record generator; draws two offsets, then one flip coin.
    padding: pixels of zero padding on each side.

  Returns:
    uint8 (H, W, C), C-contiguous.
  """
  height, width = image.shape[:2]
  top, left = rng.integers(0, 2 * padding + 1, size=2)
  flip = rng.random() < 0.5
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  view = padded[top:top + height, left:left + width]
  if flip:
    view = view[:, ::-1]
  return np.ascontiguousarray(view)


@dataclasses.dataclass(frozen=True)
class StudentTeacherViews(grain.transforms.RandomMap):
  """Adds the student's crop/flip view and, if independent, the teacher's.

  Input record: {'image': uint8 (H, W, 3), 'label': int32, 'index': int32}.
  Output: the same keys with 'image' replaced by the student view, plus
  'teacher_image' (a second, independent view) when
  `teacher_view == 'independent'`. For 'same' the teacher view is attached
  after batching (`ShareStudentView`), so the crop is not copied per record.
  """
  padding: int
  teacher_view: str = 'independent'

  def random_map(self, element, rng):
    original = element['image']
    views = dict(element)
    views['image'] = random_crop_flip(original, rng, self.padding)
    if self.teacher_view == 'independent':
      views['teacher_image'] = random_crop_flip(original, rng, self.padding)
    return views


@dataclasses.dataclass(frozen=True)
class ShareStudentView(grain.transforms.Map):
  """Batch-level: the teacher sees exactly the student's view (same array)."""

  def map(self, element):
    batch = dict(element)
    batch['teacher_image'] = batch['image']
    return batch
