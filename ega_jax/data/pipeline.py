"""grain train/eval loaders over the record sources in `sources`.

Per process: each JAX process reads only its own shard of the split and
yields batches of `global_batch_size // process_count` examples; the caller
assembles global arrays (`jax.make_array_from_process_local_data`).
"""

from absl import logging
import math
import numbers

import grain
import numpy as np

from ega_jax.data import augment
from ega_jax.data import info as info_lib
from ega_jax.data import sources


def _per_process_batch_size(global_batch_size: int, process_index: int,
                            process_count: int) -> int:
  """Checks the process layout; returns global_batch_size // process_count."""
  if not isinstance(process_count, numbers.Integral) or process_count < 1:
    raise ValueError(
        f'process_count must be a positive integer, got {process_count!r}.')
  if not isinstance(process_index, numbers.Integral) or not (
      0 <= process_index < process_count):
    raise ValueError(
        f'process_index must be in [0, {process_count - 1}] for process_count='
        f'{process_count}, got {process_index!r}.')
  if not isinstance(global_batch_size, numbers.Integral) or (
      global_batch_size < 1):
    raise ValueError(
        f'global_batch_size must be a positive integer, got '
        f'{global_batch_size!r}.')
  if global_batch_size % process_count:
    raise ValueError(
        f'global_batch_size={global_batch_size} is not divisible by '
        f'process_count={process_count}; every process needs the same batch '
        f'size.')
  return int(global_batch_size) // int(process_count)


def create_train_loader(
    name: str,
    data_dir: str | None,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    teacher_view: str = 'independent',
    num_epochs: int | None = None,
    worker_count: int = 0,
    read_options: grain.ReadOptions | None = None,
    max_examples: int | None = None,
) -> grain.DataLoader:
  """Shuffled, augmented training batches for this process.

  Order: each process owns a contiguous, equal-sized shard of the train split
  (the `process_count - 1` or fewer leftover examples are dropped), shuffled
  with a permutation that is a pure function of (seed, epoch, shard).
  Augmentation: a pure function of (seed, position in the sampler stream).

  Args:
    name: a key of `DATASETS`.
    data_dir: TFDS data directory (for Fashion-MNIST also searched for
      `fashion-mnist/*.gz`); None means TFDS's default.
    global_batch_size: examples per step over all processes.
    seed: non-negative 32-bit integer.
    process_index: this process, in [0, process_count).
    process_count: number of processes reading the split.
    teacher_view: 'independent' (a second random crop/flip) or 'same'.
    num_epochs: passes over the shard; None repeats forever.
    worker_count: grain worker processes (0 reads in this process).
    read_options: grain read threads/prefetch (None: grain's defaults).
    max_examples: > 0 trains on the first that many examples of the split
      only (quick runs and tests); None or <= 0 uses all of it.

  Returns:
    a `grain.DataLoader`; `iter()` gives a `grain.DataLoaderIterator` with
    `get_state()`/`set_state()`, yielding dicts with b = global_batch_size //
    process_count:
      'image': uint8 (b, S, S, 3) student view (pad S//8, random crop, flip),
      'teacher_image': uint8 (b, S, S, 3) teacher view,
      'label': int32 (b,),
      'index': int32 (b,) position of each example in the train split.
  """
  info = info_lib.get_dataset_info(name)
  batch_size = _per_process_batch_size(
      global_batch_size, process_index, process_count)
  if teacher_view not in augment.TEACHER_VIEWS:
    raise ValueError(
        f'Unknown teacher_view {teacher_view!r}; valid values are '
        f'{", ".join(augment.TEACHER_VIEWS)}.')
  if not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
    raise ValueError(f'seed must be an integer in [0, 2**32), got {seed!r}.')
  if num_epochs is not None and (
      not isinstance(num_epochs, numbers.Integral) or num_epochs < 1):
    raise ValueError(
        f'num_epochs must be a positive integer or None (repeat forever), '
        f'got {num_epochs!r}.')
  # grain insists on Python ints (config values may be NumPy integers).
  seed, process_index, process_count = (
      int(seed), int(process_index), int(process_count))
  num_epochs = None if num_epochs is None else int(num_epochs)

  source = sources.open_split(name, 'train', data_dir, max_examples)
  shard_size = len(source) // process_count
  if batch_size > shard_size:
    raise ValueError(
        f'global_batch_size={global_batch_size} gives {batch_size} examples '
        f'per process, more than the {shard_size} examples in each of the '
        f'{process_count} shards of {name} train.')
  # The same ShardOptions go to the sampler (which picks this shard's records)
  # and to the loader (which picks this shard's positions in the stream).
  shard_options = grain.sharding.ShardOptions(
      shard_index=process_index, shard_count=process_count,
      drop_remainder=True)
  sampler = grain.samplers.IndexSampler(
      num_records=len(source), shard_options=shard_options, shuffle=True,
      num_epochs=num_epochs, seed=seed)
  operations = [
      augment.StudentTeacherViews(
          padding=augment.crop_padding(info.image_size),
          teacher_view=teacher_view),
      grain.transforms.Batch(batch_size=batch_size, drop_remainder=True),
  ]
  if teacher_view == 'same':
    operations.append(augment.ShareStudentView())
  logging.info(
      '%s train: process %d/%d reads %d of %d examples, %d per batch.',
      name, process_index, process_count, shard_size, len(source), batch_size)
  return grain.DataLoader(
      data_source=source, sampler=sampler, operations=operations,
      worker_count=worker_count, shard_options=shard_options,
      read_options=read_options)


def even_shard_bounds(num_examples: int, process_index: int,
                      process_count: int) -> tuple[int, int]:
  """[start, end) of this process's contiguous shard; sizes differ by <= 1."""
  base, remainder = divmod(num_examples, process_count)
  start = base * process_index + min(process_index, remainder)
  end = start + base + (1 if process_index < remainder else 0)
  return start, end


class EvalLoader:
  """Re-iterable padded evaluation batches for one process.

  Every process yields `len(self)` batches (the collective eval step needs
  the same count everywhere); slots past the end of a shard hold a zero
  image, label 0 and mask False, so each example of the split is counted by
  exactly one process exactly once.
  """

  def __init__(self, source: sources.ExampleSource, batch_size: int,
               process_index: int, process_count: int,
               read_options: grain.ReadOptions | None = None):
    self.source = source
    self.batch_size = batch_size
    self.num_examples = len(source)
    self.start, self.end = even_shard_bounds(
        self.num_examples, process_index, process_count)
    largest_shard = math.ceil(self.num_examples / process_count)
    self.num_batches = math.ceil(largest_shard / batch_size)
    self.read_options = read_options
    size = source.image_size
    self._padding_image = np.zeros((size, size, 3), np.uint8)

  def __len__(self) -> int:
    return self.num_batches

  def _read_slot(self, slot: int) -> dict[str, np.ndarray]:
    record_key = self.start + slot
    if record_key < self.end:
      record = self.source[record_key]
      return {'image': record['image'], 'label': record['label'],
              'mask': np.bool_(True)}
    return {'image': self._padding_image, 'label': np.int32(0),
            'mask': np.bool_(False)}

  def __iter__(self):
    slots = grain.MapDataset.range(self.num_batches * self.batch_size)
    batches = slots.map(self._read_slot).batch(self.batch_size)
    return iter(batches.to_iter_dataset(self.read_options))


def create_eval_loader(
    name: str,
    data_dir: str | None,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    max_examples: int | None = None,
) -> EvalLoader:
  """Unaugmented, padded and masked evaluation batches for this process.

  The evaluation split (test; validation for tiny_imagenet) is split evenly
  and contiguously across processes. `max_examples` > 0 evaluates on the
  first that many examples only.

  Returns:
    an `EvalLoader`; each iteration yields `len(loader)` dicts with
    b = global_batch_size // process_count:
      'image': uint8 (b, S, S, 3), 'label': int32 (b,), 'mask': bool (b,).
  """
  info_lib.get_dataset_info(name)
  batch_size = _per_process_batch_size(
      global_batch_size, process_index, process_count)
  source = sources.open_split(name, 'eval', data_dir, max_examples)
  loader = EvalLoader(source, batch_size, process_index, process_count)
  logging.info(
      '%s eval: process %d/%d reads examples [%d, %d) of %d in %d batches.',
      name, process_index, process_count, loader.start, loader.end,
      loader.num_examples, loader.num_batches)
  return loader


def train_labels(name: str, data_dir: str | None,
                 max_examples: int | None = None) -> np.ndarray:
  """int32 (num_train,): the class of every train-split index (for CRD)."""
  return sources.read_train_labels(name, data_dir, max_examples)
