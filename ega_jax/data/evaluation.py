"""The evaluation loader: padded, re-iterable eval batches, each process a contiguous shard.

Split from `pipeline` (the training stream); both share its per-process batch check.
"""

from absl import logging
import grain
import math

import numpy as np

from ega_jax.data import info as info_lib
from ega_jax.data import sources
from ega_jax.data import teacher_cache as teacher_cache_lib
from ega_jax.data.pipeline import _per_process_batch_size


def even_shard_bounds(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
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

  def __init__(
    self,
    source: sources.ExampleSource,
    batch_size: int,
    process_index: int,
    process_count: int,
    read_options: grain.ReadOptions | None = None,
    teacher_cache: teacher_cache_lib.CachedFeatures | None = None,
  ):
    self.source = source
    self.teacher_cache = teacher_cache
    self.batch_size = batch_size
    self.num_examples = len(source)
    self.start, self.end = even_shard_bounds(self.num_examples, process_index, process_count)
    largest_shard = math.ceil(self.num_examples / process_count)
    self.num_batches = math.ceil(largest_shard / batch_size)
    self.read_options = read_options
    size = source.image_size
    self._padding_image = np.zeros((size, size, 3), np.uint8)
    if teacher_cache is not None:
      self._padding_feature = np.zeros((teacher_cache.feature_dim,), np.float16)

  def __len__(self) -> int:
    return self.num_batches

  def _read_slot(self, slot: int) -> dict[str, np.ndarray]:
    record_key = self.start + slot
    if record_key < self.end:
      record = self.source[record_key]
      example = {"image": record["image"], "label": record["label"], "mask": np.bool_(True)}
      if self.teacher_cache is not None:
        example["teacher_feature"] = self.teacher_cache.feature(record_key, 0)
    else:
      example = {"image": self._padding_image, "label": np.int32(0), "mask": np.bool_(False)}
      if self.teacher_cache is not None:
        example["teacher_feature"] = self._padding_feature
    return example

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
  teacher_cache_dir: str | None = None,
  image_size: int | None = None,
) -> EvalLoader:
  """Unaugmented, padded and masked evaluation batches for this process.

  The evaluation split (test; validation for tiny_imagenet) is split evenly
  and contiguously across processes. `max_examples` > 0 evaluates on the
  first that many examples only. With `teacher_cache_dir` (a cache whose
  'eval' split exists), batches also carry the teacher's cached embedding of
  each unaugmented image. `image_size`: see `create_train_loader`.

  Returns:
    an `EvalLoader`; each iteration yields `len(loader)` dicts with
    b = global_batch_size // process_count:
      'image': uint8 (b, S, S, 3), 'label': int32 (b,), 'mask': bool (b,),
      with a cache also 'teacher_feature': float16 (b, D) (zeros where
      masked).
  """
  image_size = info_lib.record_image_size(name, image_size)
  batch_size = _per_process_batch_size(global_batch_size, process_index, process_count)
  source = sources.open_split(name, "eval", data_dir, max_examples, image_size)
  cache = None
  if teacher_cache_dir:
    cache = teacher_cache_lib.CachedFeatures(teacher_cache_dir, "eval")
    if cache.num_examples != len(source):
      raise ValueError(
        f"teacher cache {teacher_cache_dir!r} holds {cache.num_examples} eval examples; "
        f"this run reads {len(source)}. Rebuild it with ega-cache with the same "
        "config.dataset.max_eval_examples."
      )
  loader = EvalLoader(source, batch_size, process_index, process_count, teacher_cache=cache)
  logging.info(
    "%s eval: process %d/%d reads examples [%d, %d) of %d in %d batches.",
    name,
    process_index,
    process_count,
    loader.start,
    loader.end,
    loader.num_examples,
    loader.num_batches,
  )
  return loader
