"""The training loop: `train_and_evaluate(config, workdir)`.

It reads top to bottom: load the teacher, open the data, build the run,
resume, then train; periodic work (logging, evaluation, checkpoints) is
decided by one `_due` helper. Everything it calls lives in the other modules
of this package.
"""

from __future__ import annotations

import json
import time

from absl import logging
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ega_jax import config as config_lib
from ega_jax import losses
from ega_jax.train import checkpointing
from ega_jax.train import preemption as preemption_lib
from ega_jax.train import run_record
from ega_jax.train import setup
from ega_jax.train import state as state_lib

# Global batches kept in flight to the devices ahead of the step.
DEVICE_PREFETCH = 2


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs a distillation job in `workdir`, resuming from its latest checkpoint.

  Returns:
    The final summary: best and last student top-1, teacher-head top-1,
    steps, wall time (or, when stopped by a signal, 'preempted': True).
  """
  from ega_jax.train import metric_writers  # Imports tensorflow (clu): after torch, if any.

  start_time = time.time()
  mesh = state_lib.data_mesh()
  config_lib.validate_config(config, mesh.size)
  workdir = checkpointing.workdir_path(workdir)
  checkpointing.prepare_workdir(workdir)
  manager, start_step = _open_checkpoints(config, workdir)
  run, train_loader, eval_loader, num_train = setup.build(
    config, mesh, record_dir=str(workdir), start_step=start_step
  )
  checkpointing.check_free_space(workdir, run.state)
  num_steps = state_lib.total_train_steps(config, num_train)
  spe = state_lib.steps_per_epoch(config, num_train)
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else spe
  checkpoint_every = config.checkpoint_every_steps if config.checkpoint_every_steps > 0 else spe
  record = run_record.build_record(
    config,
    run,
    image_size=eval_loader.source.image_size,
    num_train_examples=num_train,
    steps_per_epoch=spe,
    num_steps=num_steps,
  )
  batches = _device_batches(train_loader, mesh)
  state, meta = _resume(config, manager, start_step, run.state, workdir)
  run_record.write_record(workdir, record)
  writer = metric_writers.create_metric_writer(workdir)
  _start_reporting(config, writer, state, record, num_steps, spe)
  picture_batch = (
    state_lib.global_batch_from_local(mesh, next(iter(eval_loader)))
    if config.graph_pictures
    else None
  )

  step = int(jax.device_get(state.step))
  progress = run_record.ProgressMeter(step, num_steps)
  stop_vote = None
  if jax.process_count() > 1:
    stop_vote = preemption_lib.StopVote(mesh, config.batch_size // jax.process_count())
  # SIGTERM in a multi-process job: jax.distributed's preemption sync where it
  # runs; any other stop signal: this process's flag, shared by the StopVote.
  jax_sync = preemption_lib.jax_preemption_sync_available()
  signals = ("SIGINT",) if jax_sync else preemption_lib.PreemptionRequested.SIGNALS
  history, last_eval, preempted, stopped_by = [], {}, False, None
  try:
    with preemption_lib.PreemptionRequested(signals) as preemption:
      while step < num_steps:
        call_start = time.perf_counter()
        batch = next(batches)
        if stop_vote is not None:
          batch = stop_vote.attach(batch, preemption.signalled)
        state, metrics = run.train_step(state, run.teacher_variables, batch, run.crd_tables)
        vote = metrics.pop("stop", None)
        if not history and step == progress.first_step:
          progress.pause(time.perf_counter() - call_start)  # compilation is not throughput
        step += 1
        history.append(metrics)
        eval_top1 = None
        if _due(step, config.log_every_steps, num_steps):
          means = _write_train_metrics(writer, config, run, state, step, progress, history)
          _stop_if_nonfinite(config, means, state, step, history, manager, workdir)
          history = []
        if _due(step, eval_every, num_steps):
          jax.block_until_ready(state)  # the queued steps are training time, not evaluation
          eval_start = time.perf_counter()
          last_eval = _evaluate(run, state, eval_loader)
          is_best = _record_eval(writer, config, meta, step, last_eval)
          if picture_batch is not None:
            _write_graph_picture(
              writer, workdir, run, state, picture_batch, step, config.graph_picture_batch
            )
          eval_top1 = last_eval["eval/top1"]
          if is_best:
            checkpointing.save(manager, step, state, dict(meta), eval_top1)
          progress.pause(time.perf_counter() - eval_start)
        preempted = stop_vote.agreed(vote) if stop_vote is not None else preemption.signalled
        stopped_by = preemption.signal_name or ("a peer process" if preempted else None)
        if jax_sync and preemption_lib.reached_jax_preemption_sync_point(step):
          preempted, stopped_by = True, "SIGTERM (jax.distributed's preemption sync point)"
        if (_due(step, checkpoint_every, num_steps) or preempted) and (
          manager.latest_step() != step
        ):
          jax.block_until_ready(state)
          save_start = time.perf_counter()
          checkpointing.save(manager, step, state, dict(meta), eval_top1)
          progress.pause(time.perf_counter() - save_start)
        writer.flush()
        if preempted:
          break
  except BaseException:
    # An asynchronous save still in flight is finished (and published) even
    # when the loop ends by an exception, except in a multi-process run: its
    # peers may be gone, and the save's barriers would wait for them; the
    # previous complete checkpoint is what a restart resumes from.
    if jax.process_count() == 1:
      manager.wait_until_finished()
    raise
  manager.wait_until_finished()

  if preempted:
    summary = _stopped_by_signal(stopped_by, step, num_steps, workdir, start_time)
  else:
    if not last_eval:
      # Nothing left to train (a finished workdir): still report its accuracy.
      last_eval = _evaluate(run, state, eval_loader)
      meta["last_top1"] = last_eval["eval/top1"]
    summary = _summary(config, meta, last_eval, state, step, start_time)
    if jax.process_index() == 0:
      (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  writer.close()
  return summary


def _due(step: int, every: int, num_steps: int) -> bool:
  """Whether periodic work of period `every` runs after `step` (always after the last)."""
  return step % every == 0 or step == num_steps


def _device_batches(train_loader, mesh):
  """Global batches on the mesh, DEVICE_PREFETCH of them in flight ahead of the step.

  grain's prefetch records each batch's iterator state with it, so a
  checkpoint holds the position of the batches consumed, not prefetched.
  """
  return iter(
    grain.experimental.ThreadPrefetchIterDataset(
      train_loader.map(lambda local: state_lib.global_batch_from_local(mesh, local)),
      prefetch_buffer_size=DEVICE_PREFETCH,
    )
  )


def _open_checkpoints(config, workdir):
  """(manager, step to start at): the workdir checked, the newest complete checkpoint's step."""
  checkpointing.check_workdir(workdir, config_lib.run_signature(config), config.overwrite_workdir)
  setup.sync_processes("ega_jax workdir checked")
  manager = checkpointing.create_checkpoint_manager(
    workdir, config.keep_checkpoints, asynchronous=config.get("async_checkpoints", True)
  )
  return manager, int(manager.latest_step() or 0)


def _resume(config, manager, start_step: int, state, workdir):
  """(state, meta): checkpoint `start_step` restored onto this run's mesh, or the fresh state."""
  meta = {
    "signature": config_lib.run_signature(config),
    "best_top1": -1.0,
    "best_step": 0,
    "last_top1": -1.0,
  }
  if start_step:
    state, saved_meta = checkpointing.restore(manager, start_step, state)
    meta.update(saved_meta)
    # The loader was started at start_step: the state must be that step's.
    restored_step = int(jax.device_get(state.step))
    if restored_step != start_step:
      raise RuntimeError(f"checkpoint {start_step} holds the state of step {restored_step}.")
    logging.info(
      "Resumed from %s at step %d on %d processes x %d devices.",
      workdir,
      start_step,
      jax.process_count(),
      jax.local_device_count(),
    )
  return state, meta


def _start_reporting(config, writer, state, record, num_steps: int, steps_per_epoch: int):
  """Logs what is trained and its parameter counts; hparams and the parameter overview
  go to TensorBoard on a fresh run."""
  from clu import parameter_overview

  if int(jax.device_get(state.step)) == 0:
    writer.write_hparams(setup.flat_hparams(config))
    if jax.process_index() == 0:
      parameter_overview.log_parameter_overview(
        jax.device_get(state.student_params), msg="Student parameters"
      )
  logging.info(
    "Training %s -> %s with %s on %s: %d steps (%d per epoch), global batch %d.",
    config.teacher.arch,
    config.student.arch,
    config.distill.method,
    config.dataset.name,
    num_steps,
    steps_per_epoch,
    config.batch_size,
  )
  logging.info(
    "Parameters: %s.",
    ", ".join(f"{name} {count:,}" for name, count in record["parameter_counts"].items()),
  )


def _stopped_by_signal(signal_name, step: int, num_steps: int, workdir, start_time) -> dict:
  message = (
    f"Stopped by {signal_name} after step {step} of "
    f"{num_steps}; checkpoint saved in {workdir / 'checkpoints'}. "
    "Run the same command again to resume."
  )
  logging.warning(message)
  return {
    "preempted": True,
    "steps": step,
    "message": message,
    "wall_time_s": time.time() - start_time,
  }


# ---------------------------------------------------------------------------
# Periodic work.


def _mean_metrics(history: list[dict[str, jnp.ndarray]]) -> dict[str, float]:
  host = jax.device_get(history)
  return {key: float(np.mean([h[key] for h in host])) for key in host[0]}


def _write_train_metrics(writer, config, run, state, step, progress, history) -> dict:
  """Writes and returns the means of the train metrics since the last log, with the
  training steps per second since then; the log line ends with the ETA."""
  summary = _mean_metrics(history)
  scalars = {f"train/{k}": v for k, v in summary.items() if k != "finite"}
  scalars["train/top1"] *= 100.0
  scalars["train/teacher_top1"] *= 100.0
  if not config_lib.uses_teacher(config):
    del scalars["train/teacher_top1"], scalars["train/teacher_ce"]
  scalars["train/skipped_steps"] = float(jax.device_get(state.skipped_steps))
  scalars["train/learning_rate"] = float(run.learning_rate(step - 1))
  steps_per_sec, eta = progress.tick(step)
  scalars["train/steps_per_sec"] = steps_per_sec
  writer.write_scalars(step, scalars)
  logging.info(
    "step %d/%d: loss %.4f ce %.4f distill %.4f top1 %.2f%% | %.2f steps/s, ETA %s",
    step,
    progress.num_steps,
    summary["loss"],
    summary["ce"],
    summary["distill"],
    scalars["train/top1"],
    steps_per_sec,
    run_record.format_duration(eta),
  )
  return summary


def _stop_if_nonfinite(config, means, state, step, history, manager, workdir) -> None:
  """Under nonfinite_policy='stop', raises NonFiniteError naming the first bad step.

  `means` are the logged means of `history`: a mean 'finite' below 1 means some
  step of the window was not finite.
  """
  if config.nonfinite_policy != "stop" or means["finite"] >= 1.0:
    return
  bad_step = int(jax.device_get(state.first_nonfinite_step))
  position = bad_step - 1 - (step - len(history))
  bad = jax.device_get(history[position] if 0 <= position < len(history) else history[-1])
  raise config_lib.NonFiniteError(
    f"Non-finite loss or gradient at step {bad_step} (loss {float(bad['loss'])}, "
    f"ce {float(bad['ce'])}, distill {float(bad['distill'])}, kd "
    f"{float(bad['kd'])}); its update was not applied and training stopped. Last "
    f"good checkpoint: step {manager.latest_step()} in {workdir / 'checkpoints'}."
  )


def _evaluate(run, state, eval_loader) -> dict[str, float]:
  """Runs the padded, masked evaluation over the whole eval split."""
  totals = None
  for local_batch in eval_loader:
    sums = run.eval_step(
      state, run.teacher_variables, state_lib.global_batch_from_local(run.mesh, local_batch)
    )
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = max(float(totals["count"]), 1.0)
  return {
    "eval/top1": 100.0 * float(totals["top1"]) / count,
    "eval/top5": 100.0 * float(totals["top5"]) / count,
    "eval/teacher_top1": 100.0 * float(totals["teacher_top1"]) / count,
    "eval/ce": float(totals["ce"]) / count,
    "eval/count": count,
  }


def _record_eval(writer, config, meta, step, last_eval) -> bool:
  """Updates best/last top-1 in `meta`, writes the eval scalars; True if a new best."""
  is_best = last_eval["eval/top1"] > meta["best_top1"]
  if is_best:
    meta["best_top1"], meta["best_step"] = last_eval["eval/top1"], step
  meta["last_top1"] = last_eval["eval/top1"]
  scalars = dict(last_eval)
  scalars["eval/best_top1"] = meta["best_top1"]
  if not config_lib.uses_teacher(config):
    del scalars["eval/teacher_top1"]
  writer.write_scalars(step, scalars)
  logging.info(
    "eval at step %d: top1 %.2f%% top5 %.2f%% teacher %.2f%% (best %.2f%%)",
    step,
    last_eval["eval/top1"],
    last_eval["eval/top5"],
    last_eval["eval/teacher_top1"],
    meta["best_top1"],
  )
  return is_best


def _write_graph_picture(writer, workdir, run, state, picture_batch, step, num_rows) -> None:
  """Renders E_t, E_s and N of the fixed picture batch to graphs/ and TensorBoard."""
  from ega_jax import viz

  teacher_emb, student_emb, labels = jax.device_get(
    run.embed_step(state, run.teacher_variables, picture_batch)
  )
  teacher_emb, student_emb, labels = (
    teacher_emb[:num_rows],
    student_emb[:num_rows],
    labels[:num_rows],
  )
  teacher_graph, student_graph, node_matrix = jax.device_get(
    losses.ega_graph_blocks(jnp.asarray(teacher_emb), jnp.asarray(student_emb))
  )
  image = viz.plot_ega_graphs(
    teacher_graph, student_graph, node_matrix, labels, path=None, title=f"step {step}"
  )
  if jax.process_index() == 0:
    import matplotlib.image

    (workdir / "graphs").mkdir(parents=True, exist_ok=True)
    with (workdir / "graphs" / f"graphs_{step:08d}.png").open("wb") as f:
      matplotlib.image.imsave(f, image, format="png")
  writer.write_images(step, {"graphs": image[None, ..., :3]})


def _summary(config, meta, last_eval, state, step, start_time) -> dict:
  return {
    "best_top1": meta["best_top1"],
    "best_step": meta["best_step"],
    "last_top1": meta["last_top1"],
    "teacher_top1": (
      last_eval.get("eval/teacher_top1", float("nan"))
      if config_lib.uses_teacher(config)
      else float("nan")
    ),
    "steps": step,
    "skipped_steps": int(jax.device_get(state.skipped_steps)),
    "wall_time_s": time.time() - start_time,
  }
