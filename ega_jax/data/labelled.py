"""Label-efficient training: a class-balanced labelled subset and batches that mix it with all images.

With `config.dataset.num_labelled = M > 0` only M training labels are known.
Every training image still goes through the student and the teacher (the
distillation loss counts every row); the cross-entropy counts only rows whose
image is labelled. Each global batch of B rows takes its first
L = round(labelled_share * B) rows from an endless shuffled stream of the M
labelled images and the other B - L rows from an endless shuffled stream of
all N images, so the cross-entropy sees labelled images at a fixed rate
whatever M is (M = 1,000 drawn uniformly from 60,000 would give ~2 per batch
of 128). A row's label is -1 when its image is not labelled: no code after the
loader can use a label it should not know.

Both streams are pure functions of (seed, position): stream position q of the
labelled stream is image `labelled[perm_e[q % M]]` of epoch e = q // M, and
likewise for all images, so batches do not depend on the process count.
"""

from __future__ import annotations

import functools

from absl import logging
import numpy as np

# First entropy words of this module's generators (see augment.VIEW_STREAM).
SUBSET_STREAM = 0x6C61626C  # 'labl': which images are labelled
LABELLED_ORDER_STREAM = 0x6C6F7264  # 'lord': order of the labelled stream
LABELLED_VIEW_STREAM = 0x6C766965  # 'lvie': crops/flips of the labelled stream


def choose_labelled(
  train_labels: np.ndarray, num_labelled: int, seed: int, num_classes: int
) -> np.ndarray:
  """The labelled subset: int64 (num_labelled,) sorted train-split indices.

  Class-balanced: each class gets num_labelled // num_classes images and the
  remainder goes one each to classes chosen by the seed. Within a class the
  images are a seeded uniform draw. A pure function of its arguments.

  Args:
    train_labels: (N,) integer class of every train image.
    num_labelled: how many labels to keep, in [num_classes, N].
    seed: non-negative integer (config.seed).
    num_classes: number of classes.

  Raises:
    ValueError: num_labelled out of range, or a class has too few images.
  """
  labels = np.asarray(train_labels)
  if not num_classes <= num_labelled <= len(labels):
    raise ValueError(
      f"num_labelled={num_labelled} must be between the number of classes ({num_classes}) "
      f"and the number of train images ({len(labels)})."
    )
  rng = np.random.default_rng([SUBSET_STREAM, seed])
  per_class = np.full(num_classes, num_labelled // num_classes)
  per_class[rng.permutation(num_classes)[: num_labelled % num_classes]] += 1
  chosen = []
  for label in range(num_classes):
    members = np.flatnonzero(labels == label)
    if len(members) < per_class[label]:
      raise ValueError(
        f"num_labelled={num_labelled} asks for {per_class[label]} images of class {label}, "
        f"which has only {len(members)}."
      )
    chosen.append(rng.choice(members, size=per_class[label], replace=False))
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def labelled_rows(global_batch_size: int, labelled_share: float) -> int:
  """L: how many rows of each global batch come from the labelled stream (1..B)."""
  return int(min(global_batch_size, max(1, round(labelled_share * global_batch_size))))


def check_subset(
  indices, num_records: int, global_batch_size: int, labelled_share: float
) -> tuple[np.ndarray, int]:
  """(indices as int64, L) for a loader over `num_records` train examples; logs the layout.

  Raises:
    ValueError: indices empty or out of range, or labelled_share outside (0, 1].
  """
  indices = np.asarray(indices, np.int64)
  if indices.size == 0 or indices.max() >= num_records:
    raise ValueError(
      f"labelled_indices must be non-empty indices below {num_records} (the train examples)."
    )
  if not 0 < labelled_share <= 1:
    raise ValueError(f"labelled_share must be in (0, 1], got {labelled_share!r}.")
  rows = labelled_rows(global_batch_size, labelled_share)
  logging.info(
    "Label-efficient: %d labelled train images; rows [0, %d) of each global batch of %d "
    "come from them, the rest from all %d images.",
    len(indices),
    rows,
    global_batch_size,
    num_records,
  )
  return indices, rows


@functools.lru_cache(maxsize=4)
def labelled_permutation(seed: int, epoch: int, num_labelled: int) -> np.ndarray:
  """int64 (num_labelled,): the order of the labelled stream's epoch `epoch` (read-only)."""
  order = np.random.default_rng([LABELLED_ORDER_STREAM, seed, epoch]).permutation(num_labelled)
  order.flags.writeable = False
  return order


def labelled_view_generator(seed: int, epoch: int, position: int) -> np.random.Generator:
  """The crop/flip generator of the labelled stream's example at (epoch, position)."""
  return np.random.default_rng([LABELLED_VIEW_STREAM, seed, epoch, position])


def instance_labels(labels, indices, num_classes: int):
  """Labels for label-based distillers: the class where known, else a class of its own.

  NCE and CCL take rows with equal labels as positives, and CRD draws its
  negatives from other classes. An unlabelled row (label -1) becomes the
  instance class num_classes + its train index, so its only positive is
  itself (another view of the same image included) and every other image may
  be its negative: the instance-level rule of unsupervised contrastive
  learning. Works on NumPy and JAX arrays alike.

  Args:
    labels: (B,) int, -1 where unlabelled.
    indices: (B,) int, the rows' train-split indices.
  """
  return (labels >= 0) * labels + (labels < 0) * (num_classes + indices)
