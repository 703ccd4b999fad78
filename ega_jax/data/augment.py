"""Host-side uint8 augmentation: zero-pad, random crop, horizontal flip.

Everything here is NumPy on uint8 images; normalisation happens on device.
Each training example gets its own generator, `view_generator(seed, epoch,
position)`, keyed by where the example sits in the global order (see
`pipeline.create_train_loader`), so a view does not depend on which process
reads it, on how many processes there are, or on grain's worker layout.
"""

import dataclasses

import grain
import numpy as np

from ega_jax.data import teacher_cache

TEACHER_VIEWS = ("independent", "same")

# First entropy word of the augmentation generators. numpy's SeedSequence
# pads short entropy with zeros, so keys of different lengths can collide
# ([a, b] == [a, b, 0]); a distinct leading word per use keeps this stream
# apart from the order permutations, whatever the other words are.
VIEW_STREAM = 0x76696577  # 'view'


def crop_padding(image_size: int) -> int:
  """Zero padding on each side before cropping back: image_size // 8.

  4 for CIFAR (32), 8 for Tiny ImageNet (64), 12 for STL-10 (96), 3 for
  Fashion-MNIST (28).
  """
  return image_size // 8


def view_generator(seed: int, epoch: int, position: int) -> np.random.Generator:
  """The generator for the example at `position` of epoch `epoch`'s order.

  A pure function of its arguments (non-negative integers).
  """
  return np.random.default_rng([VIEW_STREAM, seed, epoch, position])


def draw_view(rng: np.random.Generator, padding: int) -> tuple[int, int, bool]:
  """(top, left, flip) of one random view: two offsets in [0, 2p], then a coin."""
  top, left = rng.integers(0, 2 * padding + 1, size=2)
  flip = rng.random() < 0.5
  return int(top), int(left), bool(flip)


def crop_flip(image: np.ndarray, top: int, left: int, flip: bool, padding: int) -> np.ndarray:
  """The view (top, left, flip) of `image`: zero-pad, crop, maybe mirror.

  Args:
    image: uint8 (H, W, C).
    top, left: offset of the crop in the padded image, in [0, 2 * padding].
    flip: mirror left-right after cropping.
    padding: pixels of zero padding on each side.

  Returns:
    uint8 (H, W, C), C-contiguous.
  """
  height, width = image.shape[:2]
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  view = padded[top : top + height, left : left + width]
  if flip:
    view = view[:, ::-1]
  return np.ascontiguousarray(view)


def random_crop_flip(image: np.ndarray, rng: np.random.Generator, padding: int) -> np.ndarray:
  """One random view of `image`.

  Zero-pads `padding` pixels on each side, crops a window of the original
  size at a uniformly random offset, then flips it left-right with
  probability 1/2 (`draw_view`, then `crop_flip`).

  Args:
    image: uint8 (H, W, C).
    rng: the per-example generator; draws two offsets, then one flip coin.
    padding: pixels of zero padding on each side.

  Returns:
    uint8 (H, W, C), C-contiguous.
  """
  return crop_flip(image, *draw_view(rng, padding), padding)


def student_teacher_views(
  example: dict[str, np.ndarray], rng: np.random.Generator, padding: int, teacher_view: str
) -> dict[str, np.ndarray]:
  """Adds the student's crop/flip view and, if independent, the teacher's.

  Args:
    example: {'image': uint8 (H, W, 3), 'label': int32, 'index': int32}.
    rng: the example's generator; the student view draws first, then the
      teacher view.
    padding: zero padding on each side (`crop_padding`).
    teacher_view: 'independent' or 'same'.

  Returns:
    the same keys with 'image' replaced by the student view, plus
    'teacher_image' (a second, independent view) when
    `teacher_view == 'independent'`. For 'same' the teacher view is attached
    after batching (`ShareStudentView`), so the crop is not copied per
    example.
  """
  original = example["image"]
  views = dict(example)
  views["image"] = random_crop_flip(original, rng, padding)
  if teacher_view == "independent":
    views["teacher_image"] = random_crop_flip(original, rng, padding)
  return views


def student_view_cached_teacher(
  example: dict[str, np.ndarray], rng: np.random.Generator, padding: int, teacher_view: str, cache
) -> dict[str, np.ndarray]:
  """The student's view and the teacher's cached embedding of its own view.

  With every view cached (`cache.all_views`) the draws are exactly those of
  `student_teacher_views`: the student view, then (independent) a second
  view, whose cached embedding replaces the teacher image. So a cached run
  sees the same teacher views as a live one. With K < V cached views, the
  teacher view is one of the example's K columns, uniformly ('independent'),
  and for 'same' the student is cropped to that cached view.

  Args:
    example: {'image': uint8 (H, W, 3), 'label', 'index'}; 'index' is the
      example's position in the split, the cache's row.
    cache: a `teacher_cache.CachedFeatures` of the train split.

  Returns:
    'image' (student view), 'label', 'index', 'teacher_feature' float16 (D,).
  """
  original = example["image"]
  row = int(example["index"])
  views = dict(example)
  if cache.all_views:
    student = draw_view(rng, padding)
    teacher = draw_view(rng, padding) if teacher_view == "independent" else student
    column = teacher_cache.view_id(*teacher, padding)
  elif teacher_view == "independent":
    student = draw_view(rng, padding)
    column = int(rng.integers(cache.num_views))
  else:
    column = int(rng.integers(cache.num_views))
    student = teacher_cache.view_params(cache.view_ids[row, column], padding)
  views["image"] = crop_flip(original, *student, padding)
  views["teacher_feature"] = cache.feature(row, column)
  return views


@dataclasses.dataclass(frozen=True)
class ShareStudentView(grain.transforms.Map):
  """Batch-level: the teacher sees exactly the student's view (same array)."""

  def map(self, element):
    batch = dict(element)
    batch["teacher_image"] = batch["image"]
    return batch
