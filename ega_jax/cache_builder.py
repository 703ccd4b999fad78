"""Builds the teacher-embedding cache: the frozen teacher run once over K views per image.

`ega-cache` is the command line; the format is described in
`ega_jax.data.teacher_cache`. The build is resumable: examples are written in
order, the memory map is flushed and `{split}_progress.json` records how many
examples are done, so an interrupted build continues where it stopped.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np

from ega_jax import data as data_lib
from ega_jax import models as models_lib
from ega_jax import config as config_lib
from ega_jax.data import augment
from ega_jax.data import sources
from ega_jax.data import teacher_cache
from ega_jax.models import preprocess
from ega_jax.train.state import AXIS

ALL_VIEWS = "all"


def resolve_num_views(views: int | str, padding: int) -> int:
  """K for `views` ('all' or a count in [1, V]); ValueError names the flag otherwise."""
  total = teacher_cache.num_views(padding)
  if isinstance(views, str) and views.strip().lower() == ALL_VIEWS:
    return total
  try:
    count = int(views)
  except (TypeError, ValueError):
    count = 0
  if not 1 <= count <= total:
    raise ValueError(
      f"--views={views!r} is not valid: use 'all' or a number of views in [1, {total}] "
      f"(an image with crop padding {padding} has {total} crop x flip views)."
    )
  return count


def _identity(
  teacher_meta: dict[str, Any],
  config,
  padding: int,
  feature_dim: int,
  seed: int,
  compute_dtype: str,
) -> dict[str, Any]:
  """The fields that must agree for a partial cache to be continued."""
  return {
    "format_version": teacher_cache.FORMAT_VERSION,
    "teacher": {
      key: teacher_meta[key] for key in ("arch", "variables_sha256", "image_size", "mean", "std")
    },
    "dataset": {
      "name": config.dataset.name,
      "image_size": data_lib.get_dataset_info(config.dataset).image_size,
      "padding": padding,
    },
    "feature_dim": int(feature_dim),
    "seed": int(seed),
    "compute_dtype": compute_dtype,
    "storage_dtype": "float16",
  }


def _teacher_forward(module, teacher_meta, dtype, mesh: Mesh) -> Callable:
  """jit: uint8 (B, S, S, 3) views sharded over `mesh` -> float16 (B, D) embeddings."""
  image_size = int(teacher_meta["image_size"])
  mean, std = tuple(teacher_meta["mean"]), tuple(teacher_meta["std"])

  def forward(variables, images_uint8):
    # Exactly what the live train step runs.
    return preprocess.teacher_embedding(
      module, variables, images_uint8, image_size, mean, std, dtype
    ).astype(jnp.float16)

  sharded = NamedSharding(mesh, P(AXIS))
  return jax.jit(forward, in_shardings=(NamedSharding(mesh, P()), sharded), out_shardings=sharded)


def _fill_split(
  directory: str,
  split: str,
  source,
  view_ids: np.ndarray,
  forward,
  variables,
  batch_size: int,
  padding: int,
  log_every_s: float,
  progress: Callable[[str], None],
) -> None:
  """Computes the missing examples of one split, in order, flushing as it goes.

  Views are fed in fixed batches of `batch_size` (the last one zero-padded),
  so the teacher compiles once. The host crops the next batch while the
  device runs the current one.
  """
  num_examples, num_columns = view_ids.shape
  start = teacher_cache.rows_done(directory, split)
  if start >= num_examples:
    return
  features = teacher_cache.open_features(directory, split, mode="r+")
  size = source.image_size
  # Whole examples per batch where they fit; otherwise one example's views
  # spread over several batches (ceil(K / batch_size) of them).
  rows_per_chunk = max(1, batch_size // num_columns)
  total_views = (num_examples - start) * num_columns
  done_views = 0
  began = last_log = time.time()
  progress(
    f"{split}: {num_examples} examples x {num_columns} views, starting at example "
    f"{start} ({start * num_columns} of {num_examples * num_columns} views on disk)."
  )

  def chunk_views(first_row: int, last_row: int) -> np.ndarray:
    views = np.empty(((last_row - first_row) * num_columns, size, size, 3), np.uint8)
    position = 0
    for row in range(first_row, last_row):
      image = source[row]["image"]
      for view in view_ids[row]:
        views[position] = augment.crop_flip(
          image, *teacher_cache.view_params(view, padding), padding
        )
        position += 1
    return views

  def dispatch(views: np.ndarray) -> list:
    outputs = []
    for offset in range(0, len(views), batch_size):
      batch = views[offset : offset + batch_size]
      if len(batch) < batch_size:
        batch = np.concatenate(
          [batch, np.zeros((batch_size - len(batch), *batch.shape[1:]), np.uint8)]
        )
      outputs.append(forward(variables, batch))  # Asynchronous: returns at once.
    return outputs

  row = start
  pending = None  # (first_row, last_row, device outputs) in flight
  while row < num_examples or pending is not None:
    next_pending = None
    if row < num_examples:
      last = min(num_examples, row + rows_per_chunk)
      next_pending = (row, last, dispatch(chunk_views(row, last)))
      row = last
    if pending is not None:
      first_row, last_row, outputs = pending
      count = (last_row - first_row) * num_columns
      embeddings = np.concatenate([np.asarray(out) for out in outputs])[:count]
      features[first_row:last_row] = embeddings.reshape(last_row - first_row, num_columns, -1)
      done_views += count
      now = time.time()
      if now - last_log >= log_every_s or last_row == num_examples:
        features.flush()
        teacher_cache.mark_rows_done(directory, split, last_row)
        rate = done_views / max(now - began, 1e-9)
        remaining = (total_views - done_views) / max(rate, 1e-9)
        progress(
          f"{split}: {last_row}/{num_examples} examples ({done_views}/{total_views} "
          f"views this run, {rate:.1f} views/s, about {remaining / 60:.1f} min left)."
        )
        last_log = now
    pending = next_pending
  features.flush()
  teacher_cache.mark_rows_done(directory, split, num_examples)


def build_teacher_cache(
  config,
  directory: str,
  *,
  views: int | str = ALL_VIEWS,
  splits: Sequence[str] = teacher_cache.SPLITS,
  batch_size: int = 256,
  seed: int = 0,
  compute_dtype: str = "float32",
  overwrite: bool = False,
  log_every_s: float = 30.0,
  progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
  """Writes (or completes) a teacher-embedding cache for `config`'s teacher and dataset.

  Args:
    config: a training config: teacher.arch/checkpoint and dataset.* are used
      (max_train_examples / max_eval_examples included).
    directory: the cache directory (created).
    views: 'all' (every crop x flip view: exact for teacher_view='independent')
      or K, the number of views per train example (drawn per example from
      `seed`). The eval split always holds the one unaugmented view.
    splits: subset of ('train', 'eval').
    batch_size: views per teacher call (rounded up to the local device count).
    compute_dtype: 'float32' or 'bfloat16' for the teacher's forward pass;
      storage is float16 either way.
    overwrite: delete a cache of another teacher/dataset/K instead of refusing.
    progress: called with one line per progress report (default: logging).

  Returns:
    the manifest as written.

  Raises:
    ValueError: a flag or file that cannot work, in one sentence.
  """
  progress = progress or logging.info
  unknown = [split for split in splits if split not in teacher_cache.SPLITS]
  if unknown or not splits:
    raise ValueError(
      f"--splits={','.join(splits)!r} is not valid; use a comma-separated subset "
      f"of {', '.join(teacher_cache.SPLITS)}."
    )
  if compute_dtype not in config_lib.DTYPES:
    raise ValueError(
      f"--dtype={compute_dtype!r} is not valid; valid: {', '.join(config_lib.DTYPES)}."
    )
  if batch_size < 1:
    raise ValueError(f"--batch_size={batch_size} must be positive.")
  if not config.teacher.checkpoint:
    raise ValueError(
      "config.teacher.checkpoint is empty; set it to a directory written by ega-convert."
    )
  module, variables, meta = models_lib.load_teacher(config.teacher.checkpoint)
  if meta["arch"] != config.teacher.arch:
    raise ValueError(
      f"config.teacher.arch={config.teacher.arch!r} does not match "
      f"{os.path.join(config.teacher.checkpoint, 'teacher.json')} (arch {meta['arch']!r})."
    )
  dtype = config_lib.DTYPES[compute_dtype]
  if dtype != jnp.float32 and hasattr(module, "dtype"):
    module = module.clone(dtype=dtype)
  info = data_lib.get_dataset_info(config.dataset)
  padding = augment.crop_padding(info.image_size)
  num_columns = resolve_num_views(views, padding)

  mesh = Mesh(np.array(jax.local_devices()), (AXIS,))
  devices = mesh.size
  batch_size = -(-batch_size // devices) * devices
  forward = _teacher_forward(module, meta, dtype, mesh)
  variables = jax.device_put(variables, NamedSharding(mesh, P()))
  feature_dim = int(
    jax.eval_shape(
      forward,
      variables,
      jax.ShapeDtypeStruct((batch_size, info.image_size, info.image_size, 3), jnp.uint8),
    ).shape[-1]
  )

  identity = _identity(meta, config, padding, feature_dim, seed, compute_dtype)
  opened = {
    split: sources.open_split(
      config.dataset.name,
      split,
      config.dataset.data_dir,
      config.dataset.max_train_examples if split == "train" else config.dataset.max_eval_examples,
      info.image_size,
    )
    for split in splits
  }
  wanted = {
    split: {
      "num_examples": len(opened[split]),
      "num_views": num_columns if split == "train" else 1,
      "all_views": (num_columns == teacher_cache.num_views(padding) if split == "train" else False),
    }
    for split in splits
  }

  os.makedirs(directory, exist_ok=True)
  manifest = None
  if os.path.exists(os.path.join(directory, teacher_cache.MANIFEST_FILE)):
    manifest = teacher_cache.read_manifest(directory)
    existing = {key: manifest.get(key) for key in identity}
    clashes = [key for key in identity if existing[key] != identity[key]]
    clashes += [
      f"splits.{split}"
      for split, entry in wanted.items()
      if split in manifest.get("splits", {})
      and any(manifest["splits"][split][key] != value for key, value in entry.items())
    ]
    if clashes and not overwrite:
      raise ValueError(
        f"{directory!r} holds a cache built with other settings ({', '.join(clashes)} "
        "differ); use another directory or --overwrite to replace it."
      )
    if clashes:
      progress(f"Replacing the cache in {directory} (--overwrite; {', '.join(clashes)} differ).")
      for name in os.listdir(directory):
        os.remove(os.path.join(directory, name))
      manifest = None
  if manifest is None:
    manifest = dict(identity, splits={})
  for split in splits:
    if split not in manifest["splits"]:
      manifest["splits"][split] = dict(wanted[split], complete=False)
  teacher_cache.write_manifest(directory, manifest)

  for split in splits:
    entry = manifest["splits"][split]
    if entry["complete"]:
      if "files" not in entry:  # Completed before the manifest recorded checksums.
        entry["files"] = teacher_cache.split_file_records(directory, split)
        teacher_cache.write_manifest(directory, manifest)
      progress(f"{split}: already complete in {directory}.")
      continue
    source = opened[split]
    if teacher_cache.split_arrays_exist(directory, split):  # resuming
      view_ids = teacher_cache.load_view_ids(directory, split)
    else:
      if split == "train":
        view_ids = np.stack(
          [
            teacher_cache.cached_view_ids(seed, index, num_columns, padding)
            for index in range(len(source))
          ]
        )
      else:
        view_ids = np.full((len(source), 1), teacher_cache.centre_view(padding), np.int16)
      teacher_cache.create_split_arrays(directory, split, view_ids, feature_dim)
    _fill_split(
      directory,
      split,
      source,
      view_ids,
      forward,
      variables,
      batch_size,
      padding,
      log_every_s,
      progress,
    )
    manifest["splits"][split]["files"] = teacher_cache.split_file_records(directory, split)
    manifest["splits"][split]["complete"] = True
    teacher_cache.write_manifest(directory, manifest)
    progress(f"{split}: complete.")
  return manifest
