"""One orbax CheckpointManager per run: the latest k checkpoints plus the best one.

A checkpoint holds the TrainState and a small JSON item (`meta`: run
signature, best/last top-1). The data position is not saved: every global
batch is a pure function of (seed, step), so a resumed run starts its loader
at the restored step, and may do so with another process or device count
(the state is replicated, and orbax lays it out on the new mesh). Checkpoints
saved after an evaluation also carry that evaluation's `eval/top1` as orbax
metrics; the preservation policy keeps the newest `keep_checkpoints` and,
besides them, the one with the best `eval/top1`. (Checkpoints of earlier
versions also hold a per-process `data` item; it is ignored.)
"""

from __future__ import annotations

import os

from absl import logging
import jax
import orbax.checkpoint as ocp

from ega_jax import config as config_lib

BEST_METRIC = "eval/top1"
# What a workdir holds besides checkpoints; `overwrite_workdir` deletes these
# ("best" is where versions before the one-manager layout kept the best step).
RUN_OUTPUTS = (
  "checkpoints",
  "best",
  "metrics.jsonl",
  "summary.json",
  "graphs",
  "config.json",
  "labelled.json",
)


def workdir_path(workdir: str):
  """The workdir as an etils Path: local (made absolute) or a bucket (gs://...)."""
  from etils import epath

  if "://" not in str(workdir):
    workdir = os.path.abspath(workdir)
  return epath.Path(workdir)


def prepare_workdir(workdir) -> None:
  """Creates the workdir and checks it is writable; a UserInputError sentence if not."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_check_{jax.process_index()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as error:
    raise config_lib.UserInputError(
      f"--workdir={str(workdir)!r} is not writable ({config_lib.one_line(error)}); give a "
      "directory this user can write to."
    ) from error


def check_free_space(workdir, state) -> None:
  """Refuses a local workdir without room for two checkpoints of `state` (a save writes the
  new one before the oldest goes), before any training step is spent."""
  import shutil

  if "://" in str(workdir):
    return  # An object store has no free-space figure to check.
  needed = 2 * sum(leaf.nbytes for leaf in jax.tree.leaves(state))
  free = shutil.disk_usage(str(workdir)).free
  if free < needed:
    raise config_lib.UserInputError(
      f"--workdir={str(workdir)!r} has {free / 2**20:.0f} MiB free; checkpoints of this run "
      f"need about {needed / 2**20:.0f} MiB (two of {needed / 2**21:.0f} MiB). Free space or "
      "use another directory."
    )


def best_metric(metrics) -> float:
  """The number a checkpoint is ranked by (its eval/top1)."""
  return float(metrics[BEST_METRIC])


def create_checkpoint_manager(
  workdir, keep_checkpoints: int, asynchronous: bool = True
) -> ocp.CheckpointManager:
  """Latest `keep_checkpoints` + the best by eval/top1, in workdir/checkpoints.

  `asynchronous`: `save` returns once the state is copied off the devices and
  writes it in a background thread. Either way a checkpoint is written to a
  temporary directory and renamed when complete, so a reader (or a restart
  after kill -9) only ever sees whole checkpoints.
  """
  policy = ocp.checkpoint_managers.AnyPreservationPolicy(
    [
      ocp.checkpoint_managers.LatestN(n=keep_checkpoints),
      ocp.checkpoint_managers.BestN(
        get_metric_fn=best_metric, n=1, keep_checkpoints_without_metrics=False
      ),
    ]
  )
  return ocp.CheckpointManager(
    workdir / "checkpoints",
    options=ocp.CheckpointManagerOptions(
      preservation_policy=policy,
      best_fn=best_metric,
      best_mode="max",
      create=True,
      enable_async_checkpointing=asynchronous,
    ),
  )


def save(manager, step: int, state, meta: dict, eval_top1: float | None):
  """Saves state and meta; `eval_top1` ranks it for the best."""
  metrics = None if eval_top1 is None else {BEST_METRIC: float(eval_top1)}
  manager.save(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    metrics=metrics,
    force=True,
  )


def restore(manager, step: int, state):
  """(state, meta) of checkpoint `step`, laid out like `state` (any mesh)."""
  abstract_state = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
    ),
  )
  return restored["state"], restored["meta"]


def check_workdir(workdir, signature: dict, overwrite: bool) -> None:
  """Refuses to resume checkpoints of another run, unless told to overwrite them.

  Reads only the small JSON item of the newest complete checkpoint, before any
  restore is attempted (a different student would not even fit the state).
  """
  directory = workdir / "checkpoints"
  if not directory.is_dir():
    return
  with ocp.CheckpointManager(
    directory, options=ocp.CheckpointManagerOptions(create=False, read_only=True)
  ) as manager:
    step = manager.latest_step()
    if step is None:
      return
    saved = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
  saved_signature = saved["meta"].get("signature")
  if saved_signature == signature:
    return
  if not overwrite:
    raise config_lib.ConfigError(
      f"workdir {str(workdir)!r} holds checkpoints of another run ({saved_signature}) than "
      f"this one ({signature}); use a new --workdir or set "
      "--config.overwrite_workdir=True to delete them."
    )
  if jax.process_index() == 0:
    logging.warning("Deleting the checkpoints of another run in %s (overwrite_workdir).", workdir)
    for name in RUN_OUTPUTS:
      path = workdir / name
      if path.is_dir():
        path.rmtree()
      elif path.exists():
        path.unlink()
