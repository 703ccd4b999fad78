"""grain train/eval loaders over the record sources in `sources`.

Per process: each JAX process yields batches of
`global_batch_size // process_count` examples, its rows of every global
batch; the caller assembles global arrays
(`jax.make_array_from_process_local_data`). The training stream is a
function of (seed, epoch, position in the epoch) only, so it is the same at
every process count.
"""

from absl import logging
import functools
import numbers
import os

import grain
import numpy as np

from ega_jax.data import augment
from ega_jax.data import info as info_lib
from ega_jax.data import labelled as labelled_lib
from ega_jax.data import sources
from ega_jax.data import teacher_cache as teacher_cache_lib


def _per_process_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
  """Checks the process layout; returns global_batch_size // process_count."""
  if not isinstance(process_count, numbers.Integral) or process_count < 1:
    raise ValueError(f"process_count must be a positive integer, got {process_count!r}.")
  if not isinstance(process_index, numbers.Integral) or not (0 <= process_index < process_count):
    raise ValueError(
      f"process_index must be in [0, {process_count - 1}] for process_count="
      f"{process_count}, got {process_index!r}."
    )
  if not isinstance(global_batch_size, numbers.Integral) or (global_batch_size < 1):
    raise ValueError(f"global_batch_size must be a positive integer, got {global_batch_size!r}.")
  if global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size={global_batch_size} is not divisible by "
      f"process_count={process_count}; every process needs the same batch "
      f"size."
    )
  return int(global_batch_size) // int(process_count)


# First entropy word of the order permutations (see augment.VIEW_STREAM).
ORDER_STREAM = 0x6F726472  # 'ordr'


def default_train_read_options(cpu_count: int | None = None) -> grain.ReadOptions:
  """Reader threads (each builds whole batches) and prefetch buffer (batches).

  Half the host's cores, at most 16, and two buffered batches per thread:
  enough to overlap reading with the step on an accelerator host, a buffer
  that stays small and cheap to refill after `set_state`. On a small CPU-only
  machine the threads compete with XLA for the same cores; 16 threads made
  the demo's steps 10-25 % slower on 2 cores than 1 thread
  (docs/performance.md).
  """
  cpu_count = cpu_count or os.cpu_count() or 1
  threads = max(1, min(16, cpu_count // 2))
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)


# An "infinite" stream is a MapDataset this many examples long per process
# (rounded down to whole epochs): far beyond any run, still a valid Python
# length.
_ENDLESS_SLOTS = 2**62


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_records: int) -> np.ndarray:
  """int64 (num_records,): the order of epoch `epoch`, a pure function of
  (seed, epoch, num_records). Read-only; cached (a few epochs at a time,
  since reader threads may straddle an epoch boundary)."""
  order = np.random.default_rng([ORDER_STREAM, seed, epoch]).permutation(num_records)
  order.flags.writeable = False
  return order


class TrainExamples:
  """Slot of one process's stream -> augmented example (picklable for
  grain worker processes).

  The global order: epoch e is `epoch_permutation(seed, e, N)`; global batch
  j of the epoch holds its positions [j*B, (j+1)*B) (the last N % B positions
  are dropped). Process p of P reads rows [p*b, (p+1)*b) of every global
  batch, b = B // P: slot s of process p is row s % b of its part of global
  step s // b. Views come from `augment.view_generator(seed, epoch,
  position)`. Hence the concatenation of all processes' batches of a step, in
  process order, is the single-process batch of that step.

  With a labelled subset (`labelled`, sorted train indices) the global batch
  of step t is instead L = `labelled_rows` rows from the endless labelled
  stream (positions t*L ...) followed by B - L rows from the endless stream
  of all images (positions t*(B-L) ...); see `ega_jax.data.labelled`. A row
  whose image is not in the subset gets label -1.
  """

  def __init__(
    self,
    source: sources.ExampleSource,
    *,
    seed: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    padding: int,
    teacher_view: str,
    teacher_cache: teacher_cache_lib.CachedFeatures | None = None,
    labelled: np.ndarray | None = None,
    labelled_rows: int = 0,
  ):
    self.source = source
    self.labelled = labelled
    self.labelled_rows = labelled_rows
    if labelled is not None:
      self.is_labelled = np.zeros(len(source), bool)
      self.is_labelled[labelled] = True
    self.teacher_cache = teacher_cache
    self.seed = seed
    self.num_records = len(source)
    self.global_batch_size = global_batch_size
    self.batch_size = global_batch_size // process_count
    self.process_index = process_index
    self.steps_per_epoch = self.num_records // global_batch_size
    self.padding = padding
    self.teacher_view = teacher_view

  def locate(self, slot: int) -> tuple[int, int]:
    """(epoch, position in the epoch's order) of this process's `slot`."""
    step, row = divmod(int(slot), self.batch_size)
    epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
    position = step_in_epoch * self.global_batch_size + self.process_index * self.batch_size + row
    return epoch, position

  def _mixed_stream_example(self, slot: int) -> tuple[dict[str, np.ndarray], np.random.Generator]:
    """(example with label -1 unless labelled, view generator) in label-efficient mode."""
    step, row = divmod(int(slot), self.batch_size)
    global_row = self.process_index * self.batch_size + row
    if global_row < self.labelled_rows:
      num_labelled = len(self.labelled)
      epoch, position = divmod(step * self.labelled_rows + global_row, num_labelled)
      order = labelled_lib.labelled_permutation(self.seed, epoch, num_labelled)
      record_key = self.labelled[order[position]]
      rng = labelled_lib.labelled_view_generator(self.seed, epoch, position)
    else:
      other_rows = self.global_batch_size - self.labelled_rows
      epoch, position = divmod(
        step * other_rows + global_row - self.labelled_rows, self.num_records
      )
      record_key = epoch_permutation(self.seed, epoch, self.num_records)[position]
      rng = augment.view_generator(self.seed, epoch, position)
    example = self.source[int(record_key)]
    if not self.is_labelled[record_key]:
      example = dict(example, label=np.int32(-1))
    return example, rng

  def __call__(self, slot: int) -> dict[str, np.ndarray]:
    if self.labelled is not None:
      example, rng = self._mixed_stream_example(slot)
    else:
      epoch, position = self.locate(slot)
      record_key = epoch_permutation(self.seed, epoch, self.num_records)[position]
      example = self.source[int(record_key)]
      rng = augment.view_generator(self.seed, epoch, position)
    if self.teacher_cache is not None:
      return augment.student_view_cached_teacher(
        example, rng, self.padding, self.teacher_view, self.teacher_cache
      )
    return augment.student_teacher_views(example, rng, self.padding, self.teacher_view)


def create_train_loader(
  name: str,
  data_dir: str | None,
  *,
  global_batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  teacher_view: str = "independent",
  num_epochs: int | None = None,
  worker_count: int = 0,
  read_options: grain.ReadOptions | None = None,
  max_examples: int | None = None,
  teacher_cache_dir: str | None = None,
  labelled_indices: np.ndarray | None = None,
  labelled_share: float = 1.0,
  image_size: int | None = None,
  start_step: int = 0,
) -> grain.IterDataset:
  """Shuffled, augmented training batches for this process.

  The global stream does not depend on the number of processes: epoch e is a
  permutation of all N train examples that is a pure function of (seed, e);
  global batch j of the epoch is its positions [j*B, (j+1)*B) with
  B = global_batch_size (N // B steps per epoch; the last N % B positions are
  dropped, and differ every epoch). Process p of P yields rows [p*b, (p+1)*b)
  of each global batch, b = B // P, which is how
  `jax.make_array_from_process_local_data` lays out a batch sharded over the
  devices of all processes. Each view is a pure function of (seed, epoch,
  position), so concatenating the processes' batches of a step in process
  order gives the one-process batch, pixel for pixel.

  Args:
    name: a name of `info.DATASET_NAMES`.
    data_dir: TFDS data directory, also searched for torchvision's CIFAR
      folders and `fashion-mnist/*.gz` (None means TFDS's default); for
      image_folder the folder holding train/ and test/ (see `sources`).
    global_batch_size: examples per step over all processes.
    seed: non-negative 32-bit integer.
    process_index: this process, in [0, process_count).
    process_count: number of processes reading the split.
    teacher_view: 'independent' (a second random crop/flip) or 'same'.
    num_epochs: passes over the split; None repeats forever.
    worker_count: grain worker processes (0 reads in this process with
      threads); the batches do not depend on it.
    read_options: grain reader threads (each builds whole batches) and
      prefetch buffer size in batches (None: `default_train_read_options()`).
    max_examples: > 0 trains on the first that many examples of the split
      only (quick runs and tests); None or <= 0 uses all of it.
    teacher_cache_dir: a directory written by ega-cache; the
      batches then carry the teacher's cached embedding of its view
      ('teacher_feature') instead of the teacher image.
    labelled_indices: None (every label known), or the sorted train indices
      whose labels are known (`labelled.choose_labelled`): label-efficient
      mode, with round(labelled_share * global_batch_size) rows of every
      global batch drawn from them (see `TrainExamples`).
    labelled_share: in (0, 1]; only read with labelled_indices.
    image_size: S, the side image_folder resizes its images to (None: 32); a
      registered dataset's own size, if given (`info.record_image_size`).
    start_step: the first global step to yield. A batch is a pure function of
      its step, so a run resumed at step t starts its loader at t, at any
      process count: nothing per process needs to be checkpointed.

  Returns:
    a `grain.IterDataset`; `iter()` gives a `grain.DatasetIterator` (its
    `get_state()`/`set_state()` work too, but training resumes by
    `start_step`), yielding dicts with
    b = global_batch_size // process_count:
      'image': uint8 (b, S, S, 3) student view (pad S//8, random crop, flip),
      'teacher_image': uint8 (b, S, S, 3) teacher view (without a cache),
      'teacher_feature': float16 (b, D) cached teacher embedding (with one),
      'label': int32 (b,), -1 for an unlabelled image,
      'index': int32 (b,) position of each example in the train split.
  """
  image_size = info_lib.record_image_size(name, image_size)
  batch_size = _per_process_batch_size(global_batch_size, process_index, process_count)
  if teacher_view not in augment.TEACHER_VIEWS:
    raise ValueError(
      f"Unknown teacher_view {teacher_view!r}; valid values are {', '.join(augment.TEACHER_VIEWS)}."
    )
  if not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
    raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}.")
  if num_epochs is not None and (not isinstance(num_epochs, numbers.Integral) or num_epochs < 1):
    raise ValueError(
      f"num_epochs must be a positive integer or None (repeat forever), got {num_epochs!r}."
    )
  if not isinstance(start_step, numbers.Integral) or start_step < 0:
    raise ValueError(f"start_step must be a non-negative integer, got {start_step!r}.")
  if not isinstance(worker_count, numbers.Integral) or worker_count < 0:
    raise ValueError(f"worker_count must be a non-negative integer, got {worker_count!r}.")
  # Python ints throughout: config values may be NumPy integers, and the
  # iterator state must stay JSON-serialisable.
  seed, process_index, process_count = (int(seed), int(process_index), int(process_count))
  global_batch_size, worker_count = int(global_batch_size), int(worker_count)

  source = sources.open_split(name, "train", data_dir, max_examples, image_size)
  if global_batch_size > len(source):
    raise ValueError(
      f"global_batch_size={global_batch_size} is larger than the "
      f"{len(source)} examples of {name} train; an epoch needs at least one "
      f"full batch."
    )
  padding = augment.crop_padding(image_size)
  cache = None
  if teacher_cache_dir:
    cache = teacher_cache_lib.CachedFeatures(teacher_cache_dir, "train")
    if cache.num_examples != len(source) or cache.padding != padding:
      raise ValueError(
        f"teacher cache {teacher_cache_dir!r} holds {cache.num_examples} train examples "
        f"with crop padding {cache.padding}; this run reads {len(source)} with padding "
        f"{padding}. Rebuild it with ega-cache with the same "
        "config.dataset.max_train_examples."
      )
  rows_from_labelled = 0
  if labelled_indices is not None:
    labelled_indices, rows_from_labelled = labelled_lib.check_subset(
      labelled_indices, len(source), global_batch_size, labelled_share
    )
  examples = TrainExamples(
    source,
    seed=seed,
    global_batch_size=global_batch_size,
    process_index=process_index,
    process_count=process_count,
    padding=padding,
    teacher_view=teacher_view,
    teacher_cache=cache,
    labelled=labelled_indices,
    labelled_rows=rows_from_labelled,
  )
  slots_per_epoch = examples.steps_per_epoch * batch_size
  if num_epochs is None:
    num_slots = (_ENDLESS_SLOTS // slots_per_epoch) * slots_per_epoch
  else:
    num_slots = int(num_epochs) * slots_per_epoch
  # Batching in the MapDataset (before any prefetch) keeps every batch a
  # function of its step alone: grain's worker processes then each build
  # whole batches (worker w: steps w, w + W, ...), interleaved back in order.
  batches = grain.MapDataset.range(num_slots).map(examples).batch(batch_size)[int(start_step) :]
  if teacher_view == "same" and cache is None:
    batches = batches.map(augment.ShareStudentView())
  stream = batches.to_iter_dataset(read_options or default_train_read_options())
  if worker_count > 0:
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  logging.info(
    "%s train: process %d/%d reads rows [%d, %d) of each global batch of "
    "%d; %d steps per epoch over %d examples.",
    name,
    process_index,
    process_count,
    process_index * batch_size,
    (process_index + 1) * batch_size,
    global_batch_size,
    examples.steps_per_epoch,
    len(source),
  )
  return stream


def train_labels(name: str, data_dir: str | None, max_examples: int | None = None) -> np.ndarray:
  """int32 (num_train,): the class of every train-split index (for CRD)."""
  return sources.read_train_labels(name, data_dir, max_examples)
