"""Setting a run up: the teacher, the loaders, the teacher cache, what gets logged once."""

from __future__ import annotations

import contextlib
import json
import os

from absl import logging
import jax
import numpy as np

from ega_jax import config as config_lib
from ega_jax import data as data_lib
from ega_jax import models as models_lib
from ega_jax.train import run as run_lib


def load_teacher(config):
  """(module, host variables, meta) of config.teacher.checkpoint, checked against the config."""
  try:
    module, variables, meta = models_lib.load_teacher(config.teacher.checkpoint)
  except (FileNotFoundError, ValueError, OSError) as error:
    raise config_lib.UserInputError(
      f"config.teacher.checkpoint={config.teacher.checkpoint!r} cannot be loaded: "
      f"{config_lib.one_line(error)}"
    ) from error
  if meta.get("arch") != config.teacher.arch:
    raise config_lib.ConfigError(
      f"config.teacher.arch={config.teacher.arch!r} does not match "
      f"{os.path.join(config.teacher.checkpoint, 'teacher.json')}, which holds "
      f"arch {meta.get('arch')!r}; set config.teacher.arch to it or "
      "convert the right checkpoint."
    )
  return module, variables, meta


@contextlib.contextmanager
def as_user_error(what: str):
  """Context: FileNotFoundError/ValueError from data or models -> UserInputError."""
  try:
    yield
  except config_lib.UserInputError:
    raise
  except (FileNotFoundError, ValueError) as error:
    raise config_lib.UserInputError(f"{what}: {config_lib.one_line(error)}") from error


def labelled_subset(config):
  """None (every label known), or the sorted train indices whose labels a
  label-efficient run uses (config.dataset.num_labelled > 0)."""
  if config.dataset.num_labelled <= 0:
    return None
  from ega_jax.data import labelled

  info = data_lib.get_dataset_info(config.dataset)
  labels = data_lib.train_labels(
    config.dataset.name, config.dataset.data_dir, config.dataset.max_train_examples
  )
  try:
    return labelled.choose_labelled(
      labels, config.dataset.num_labelled, config.seed, info.num_classes
    )
  except ValueError as error:
    raise config_lib.ConfigError(f"config.dataset.num_labelled: {error}") from error


def labelled_share(config) -> float:
  """The share of each batch drawn from the labelled images.

  A run without distillation uses nothing but labels, so it trains on the
  labelled images alone (share 1): the CE-only baseline of a label-efficient
  run. A distillation run uses config.dataset.labelled_share.
  """
  return config.dataset.labelled_share if config_lib.uses_teacher(config) else 1.0


def record_labelled_subset(directory, config, indices) -> None:
  """Writes `labelled.json` (the subset and its layout) into the workdir (process 0).

  A resumed run recomputes the subset from the seed; a different one (another
  seed or num_labelled in the same workdir) is refused.
  """
  if jax.process_index() != 0:
    return
  path = os.path.join(directory, "labelled.json")
  record = {
    "num_labelled": len(indices),
    "labelled_share": labelled_share(config),
    "seed": config.seed,
    "indices": [int(i) for i in indices],
  }
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    if previous.get("indices") != record["indices"]:
      raise config_lib.ConfigError(
        f"{path} records another labelled subset ({previous.get('num_labelled')} images, seed "
        f"{previous.get('seed')}); config.dataset.num_labelled={config.dataset.num_labelled} "
        f"with config.seed={config.seed} chooses a different one. Use a new workdir."
      )
    return
  with open(path + ".tmp", "w") as f:
    json.dump(record, f)
  os.replace(path + ".tmp", path)


def create_loaders(
  config, train_cache: str | None, eval_cache: str | None, labelled=None, start_step: int = 0
):
  """This process's train and eval loaders; `*_cache` (a cache directory) makes
  their batches carry cached teacher embeddings; `labelled` (train indices)
  makes the train loader label-efficient; the train loader starts at global
  step `start_step`."""
  process_index, process_count = jax.process_index(), jax.process_count()
  image_size = data_lib.get_dataset_info(config.dataset).image_size
  train_loader = data_lib.create_train_loader(
    config.dataset.name,
    config.dataset.data_dir,
    global_batch_size=config.batch_size,
    seed=config.seed,
    process_index=process_index,
    process_count=process_count,
    teacher_view=config.teacher_view,
    worker_count=config.dataset.worker_count,
    max_examples=config.dataset.max_train_examples,
    teacher_cache_dir=train_cache,
    labelled_indices=labelled,
    labelled_share=labelled_share(config),
    start_step=start_step,
    image_size=image_size,
  )
  eval_batch_size = config_lib.eval_batch_size_for(config, jax.device_count())
  if eval_batch_size != config.eval_batch_size:
    logging.info(
      "config.eval_batch_size=%d rounded up to %d, a multiple of the %d devices "
      "(evaluation batches are padded and masked, so no score changes).",
      config.eval_batch_size,
      eval_batch_size,
      jax.device_count(),
    )
  eval_loader = data_lib.create_eval_loader(
    config.dataset.name,
    config.dataset.data_dir,
    global_batch_size=eval_batch_size,
    process_index=process_index,
    process_count=process_count,
    max_examples=config.dataset.max_eval_examples,
    teacher_cache_dir=eval_cache,
    image_size=image_size,
  )
  return train_loader, eval_loader


def num_train_examples(config, info) -> int:
  if config.dataset.max_train_examples > 0:
    return min(info.num_train, config.dataset.max_train_examples)
  return info.num_train


def crd_labels(config, labelled=None):
  """CRD's class of every train image; with a labelled subset, unlabelled images
  are classes of their own (`labelled.instance_labels`)."""
  if config.distill.method != "crd":
    return None
  labels = data_lib.train_labels(
    config.dataset.name, config.dataset.data_dir, config.dataset.max_train_examples
  )
  if labelled is None:
    return labels
  from ega_jax.data import labelled as labelled_lib

  known = np.full(len(labels), -1, labels.dtype)
  known[labelled] = labels[labelled]
  num_classes = data_lib.get_dataset_info(config.dataset).num_classes
  return labelled_lib.instance_labels(known, np.arange(len(labels)), num_classes)


def teacher_cache_splits(config, teacher_meta) -> tuple[str | None, str | None]:
  """(train cache, eval cache): config.teacher.cache for the splits it holds.

  The cache must come from the loaded teacher and the configured dataset; a
  train run needs its train split, and evaluation uses its eval split when
  complete (else the live teacher).
  """
  from ega_jax.data import augment, teacher_cache

  directory = config.teacher.get("cache", "")
  if not directory or not config_lib.uses_teacher(config):
    return None, None
  try:
    manifest = teacher_cache.read_manifest(directory)
    teacher_cache.check_matches(
      manifest,
      directory=directory,
      teacher_meta=teacher_meta,
      dataset=config.dataset.name,
      padding=augment.crop_padding(data_lib.get_dataset_info(config.dataset).image_size),
    )
  except (FileNotFoundError, ValueError) as error:
    raise config_lib.ConfigError(
      f"config.teacher.cache={directory!r}: {config_lib.one_line(error)}"
    ) from error
  splits = manifest.get("splits", {})
  if not splits.get("train", {}).get("complete"):
    raise config_lib.ConfigError(
      f"config.teacher.cache={directory!r} has no complete train split; run "
      "ega-cache again to finish it."
    )
  eval_cache = directory if splits.get("eval", {}).get("complete") else None
  logging.info(
    "Teacher embeddings for training from the cache %s (%d views per image%s); evaluation uses %s.",
    directory,
    splits["train"]["num_views"],
    ", all of them" if splits["train"]["all_views"] else "",
    "its centre views" if eval_cache else "the live teacher",
  )
  return directory, eval_cache


def sync_processes(name: str) -> None:
  """Barrier over processes: nobody creates checkpoint directories before every
  process has looked at the workdir (orbax's managers synchronise in their
  constructors, and the processes must take the same branch)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def flat_hparams(config) -> dict:
  """Every config field as a dotted name -> scalar (TensorBoard drops nested dicts)."""
  flat = {}

  def walk(prefix, value):
    if isinstance(value, dict):
      for key, item in value.items():
        walk(f"{prefix}{key}.", item)
    elif isinstance(value, (int, float, str, bool)):
      flat[prefix[:-1]] = value
    else:  # None, tuples: TensorBoard's hparams take scalars and strings
      flat[prefix[:-1]] = str(value)

  walk("", config.to_dict())
  return flat


def build(config, mesh, record_dir=None, start_step: int = 0):
  """(run, train loader, eval loader, number of train examples) for a validated config.

  Loads the teacher, checks the teacher cache, opens the data and calls
  build_run; a user mistake on the way becomes one UserInputError sentence.
  A label-efficient run records its labelled subset in `record_dir` (the workdir).
  The train loader starts at global step `start_step` (a resumed run's step).
  """
  logging.info(
    "Devices: %d (%s), processes: %d, mesh: %s",
    mesh.size,
    mesh.devices.flat[0].platform,
    jax.process_count(),
    dict(mesh.shape),
  )
  teacher_module, teacher_host_variables, teacher_meta = load_teacher(config)
  info = data_lib.get_dataset_info(config.dataset)
  train_cache, eval_cache = teacher_cache_splits(config, teacher_meta)
  with as_user_error(f"config.dataset.name={config.dataset.name!r}"):
    labelled = labelled_subset(config)
    train_loader, eval_loader = create_loaders(
      config, train_cache, eval_cache, labelled, start_step
    )
  if labelled is not None and record_dir is not None:
    record_labelled_subset(record_dir, config, labelled)
  num_train = num_train_examples(config, info)
  with as_user_error(
    f"config.student.arch={config.student.arch!r} on "
    f"{info.image_size}x{info.image_size} {config.dataset.name} images"
  ):
    run = run_lib.build_run(
      config,
      mesh,
      teacher_module=teacher_module,
      teacher_variables=teacher_host_variables,
      teacher_meta=teacher_meta,
      num_classes=info.num_classes,
      num_train_examples=num_train,
      image_shape=(info.image_size, info.image_size, 3),
      crd_train_labels=crd_labels(config, labelled),
      # With every teacher embedding cached the teacher never runs on device.
      place_teacher=not (train_cache and eval_cache),
    )
  return run, train_loader, eval_loader, num_train
