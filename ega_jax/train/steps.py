"""The per-device SPMD train step and the helpers the eval steps share.

The steps are written as per-device code with named-axis collectives over a
1-D ('data',) mesh of all devices and compiled with
`jax.jit(jax.shard_map(...))`, which is what `jax.pmap` itself runs on since
JAX 0.8. Embeddings (and logits, labels, indices) are all-gathered, so every
graph loss sees the global batch; BatchNorm statistics are cross-replica; the
gradient equals the single-device gradient of the same global batch:

* a term computed from a per-device slice (cross-entropy) is written as its
  local sum divided by the *global* batch size, so its sum over devices is the
  global mean;
* a term computed from all-gathered values (the graph losses) has the same
  value on every device; it is divided by the number of devices;
* the gradient of replicated parameters is summed over devices by shard_map's
  transpose of the implicit broadcast, which turns both kinds into the exact
  global gradient. tests/test_train.py checks 1 device against 8.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import optax

from ega_jax import config as config_lib
from ega_jax import losses
from ega_jax.data import labelled as labelled_lib
from ega_jax.models import preprocess
from ega_jax.train.state import AXIS, DistillModels, TrainState


def cross_entropy_sum(logits, labels, mask=None):
  """Sum over the rows of the softmax cross-entropy. (B, C), (B,) -> ()."""
  # At least float32 (bfloat16 logits are promoted); float64 stays float64 so
  # the float64 parity tests are not cut to float32 here.
  per_example = optax.softmax_cross_entropy_with_integer_labels(
    logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), labels
  )
  if mask is not None:
    per_example = per_example * mask
  return jnp.sum(per_example)


def correct_topk(logits, labels, k):
  """(B, C), (B,) -> (B,) float32: 1 where the label is among the top-k logits."""
  topk = jax.lax.top_k(logits.astype(jnp.float32), k)[1]
  return jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)


def all_gather(x):
  return jax.lax.all_gather(x, AXIS, axis=0, tiled=True)


def _tree_all_finite(tree) -> jnp.ndarray:
  leaves = [
    jnp.all(jnp.isfinite(leaf))
    for leaf in jax.tree.leaves(tree)
    if jnp.issubdtype(leaf.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def live_teacher_embedding(models: DistillModels, variables, images_uint8) -> jnp.ndarray:
  return preprocess.teacher_embedding(
    models.teacher,
    variables,
    images_uint8,
    models.teacher_image_size,
    models.teacher_mean,
    models.teacher_std,
    models.dtype,
  )


def _teacher_feature(models: DistillModels, config, teacher_variables, batch) -> jnp.ndarray:
  """(b, D_t) frozen teacher features: cached in the batch, else the teacher runs."""
  if "teacher_feature" in batch:
    return batch["teacher_feature"].astype(jnp.float32)
  source = batch["image"] if config.teacher_view == "same" else batch["teacher_image"]
  return jax.lax.stop_gradient(live_teacher_embedding(models, teacher_variables, source))


def _distillation_term(
  models: DistillModels,
  config,
  hparams,
  state: TrainState,
  student_params,
  batch,
  crd_tables,
  global_labels,
  embeddings,
  step_rng,
):
  """L_distill on the global batch and the new CRD memory.

  Args:
    embeddings: dict of 'student_emb', 'teacher_emb' (local, (b, F)) and the
      gathered 'global_student_emb', 'global_teacher_emb', 'global_student_logits',
      'global_teacher_logits'.
  """
  method = config.distill.method
  if method == "none":
    return jnp.zeros((), jnp.float32), state.crd_memory
  if method == "crd":
    student_proj = models.crd_projection.apply(
      {"params": student_params["crd_student"]}, embeddings["student_emb"]
    )
    teacher_proj = models.crd_projection.apply(
      {"params": student_params["crd_teacher"]}, embeddings["teacher_emb"]
    )
    global_indices = all_gather(batch["index"])
    contrast_indices = losses.sample_crd_negatives(
      jax.random.fold_in(step_rng, 1),
      global_labels,
      global_indices,
      crd_tables,
      config.distill.crd_num_negatives,
    )
    return losses.crd_loss(
      all_gather(student_proj.astype(jnp.float32)),
      all_gather(teacher_proj.astype(jnp.float32)),
      global_indices,
      contrast_indices,
      state.crd_memory,
      temperature=config.distill.crd_temperature,
      momentum=config.distill.crd_momentum,
    )
  # Graph losses split their rows over the devices (each computes B/n rows
  # of the graph, `psum`med) unless config.distill.graph_rows says otherwise.
  rows = config.distill.graph_rows
  split_rows = method in losses.GRAPH_METHODS and (
    rows == "sharded" or (rows == "auto" and jax.lax.axis_size(AXIS) > 1)
  )
  distill = losses.distill_loss(
    method,
    student_emb=embeddings["global_student_emb"],
    teacher_emb=embeddings["global_teacher_emb"],
    labels=global_labels,
    student_logits=embeddings["global_student_logits"],
    teacher_logits=embeddings["global_teacher_logits"],
    hparams=hparams,
    axis_name=AXIS if split_rows else None,
  )
  return distill, state.crd_memory


def _objective(
  student_params,
  teacher_head_params,
  *,
  state: TrainState,
  models: DistillModels,
  config,
  hparams,
  batch,
  crd_tables,
  teacher_feature,
  step_rng,
):
  """This device's share of the total loss, and what the step needs besides it."""
  # Label -1 marks an unlabelled row (label-efficient mode): the
  # cross-entropies and accuracies count labelled rows only, the distillation
  # loss every row. With every label known this is the plain global mean.
  labels = batch["label"]
  labelled = labels >= 0
  known_labels = jnp.maximum(labels, 0)
  num_labelled = jnp.maximum(jax.lax.psum(jnp.sum(labelled.astype(jnp.float32)), AXIS), 1.0)
  global_labels = all_gather(
    labelled_lib.instance_labels(labels, batch["index"], models.student_head.num_classes)
  )
  student_images = preprocess.normalize_images(batch["image"], models.data_mean, models.data_std)
  (_, student_features), new_model_state = models.student.apply(
    {"params": student_params["backbone"], "batch_stats": state.student_batch_stats},
    student_images.astype(models.dtype),
    train=True,
    mutable=["batch_stats"],
  )
  student_emb, student_logits = models.student_head.apply(
    {"params": student_params["head"]}, student_features["penultimate"]
  )
  # Losses run in float32 whatever the computation dtype (bfloat16 included);
  # the float64 test worker keeps float64.
  loss_dtype = jnp.promote_types(models.dtype, jnp.float32)
  student_emb = student_emb.astype(loss_dtype)
  student_logits = student_logits.astype(loss_dtype)

  # Local terms: local sum / global count (their sum over devices is the mean).
  weights = labelled.astype(loss_dtype)
  ce_student = cross_entropy_sum(student_logits, known_labels, weights) / num_labelled
  ce_teacher = jnp.zeros((), jnp.float32)
  teacher_correct = jnp.zeros((), jnp.float32)
  embeddings = {
    "student_emb": student_emb,
    "teacher_emb": None,
    "global_teacher_emb": None,
    "global_teacher_logits": None,
  }
  if teacher_feature is not None:
    teacher_emb, teacher_logits = models.teacher_head.apply(
      {"params": teacher_head_params}, teacher_feature
    )
    teacher_emb = teacher_emb.astype(loss_dtype)
    teacher_logits = teacher_logits.astype(loss_dtype)
    ce_teacher = cross_entropy_sum(teacher_logits, known_labels, weights) / num_labelled
    teacher_correct = jnp.sum(correct_topk(teacher_logits, labels, 1))
    # Global terms: every device computes the same value from gathered rows.
    if not config.distill.train_teacher_head_jointly:
      teacher_emb = jax.lax.stop_gradient(teacher_emb)
    embeddings["teacher_emb"] = teacher_emb
    embeddings["global_teacher_emb"] = all_gather(teacher_emb)
    embeddings["global_teacher_logits"] = all_gather(jax.lax.stop_gradient(teacher_logits))
  embeddings["global_student_emb"] = all_gather(student_emb)
  embeddings["global_student_logits"] = all_gather(student_logits)

  d = config.distill
  kd = jnp.zeros((), jnp.float32)
  if d.alpha:
    kd = losses.kd_loss(
      embeddings["global_student_logits"], embeddings["global_teacher_logits"], d.kd_temperature
    )
  distill, new_crd_memory = _distillation_term(
    models,
    config,
    hparams,
    state,
    student_params,
    batch,
    crd_tables,
    global_labels,
    embeddings,
    step_rng,
  )
  if config.debug_nan_at_step > 0:
    # Fault injection for tests of the non-finite guard.
    distill = distill * jnp.where(state.step + 1 == config.debug_nan_at_step, jnp.nan, 1.0)
  global_terms = d.alpha * kd + d.beta * distill
  # `total` must be a per-device (varying) value, as the local cross-entropy
  # makes it: a row-sharded graph loss is psum'd and so device-invariant, and
  # adding it to a varying term broadcasts it, whose transpose sums the n
  # devices' seeds (n * 1/n). Differentiating an invariant total alone would
  # give the graph term 1/n of its gradient (tests/test_losses.py, row_sharded).
  total = d.gamma * ce_student + global_terms / jax.lax.axis_size(AXIS) + ce_teacher
  aux = {
    "batch_stats": new_model_state["batch_stats"],
    "crd_memory": new_crd_memory,
    "ce": ce_student,
    "teacher_ce": ce_teacher,
    "kd": kd,
    "distill": distill,
    "correct": jnp.sum(correct_topk(student_logits, labels, 1)),
    "teacher_correct": teacher_correct,
    "num_labelled": num_labelled,
  }
  return total, aux


def _keep_old_unless_finite(finite, candidate: TrainState, state: TrainState) -> TrainState:
  """The candidate state where the step was finite, else the old one, plus the counters."""
  guarded = jax.tree.map(lambda new, old: jnp.where(finite, new, old), candidate, state)
  return guarded.replace(
    step=state.step + 1,
    skipped_steps=state.skipped_steps + jnp.where(finite, 0, 1).astype(jnp.int32),
    first_nonfinite_step=jnp.where(
      (state.first_nonfinite_step < 0) & ~finite, state.step + 1, state.first_nonfinite_step
    ).astype(jnp.int32),
  )


def train_step(
  state: TrainState,
  teacher_variables,
  batch,
  crd_tables,
  *,
  models: DistillModels,
  config,
  student_tx,
  teacher_head_tx,
  hparams: Mapping[str, float],
):
  """One SGD step on this device's slice of the global batch.

  Args:
    state: replicated TrainState.
    teacher_variables: replicated frozen teacher variables.
    batch: this device's slice: 'image', 'teacher_image' (b, H, W, 3) uint8,
      'label' (b,) int32 (-1: unlabelled), 'index' (b,) int32; with a teacher-embedding cache
      'teacher_feature' (b, D) float16 replaces 'teacher_image' and the
      teacher does not run.
    crd_tables: replicated class tables for CRD negatives (empty dict otherwise).

  Returns:
    (new_state, metrics): both replicated; metrics are global-batch values.
  """
  # Cross-entropy alone needs no teacher: neither its forward pass nor its
  # head runs (the head stays as initialised and its accuracy is not reported).
  with_teacher = config_lib.uses_teacher(config)
  teacher_feature = (
    _teacher_feature(models, config, teacher_variables, batch) if with_teacher else None
  )
  objective = functools.partial(
    _objective,
    state=state,
    models=models,
    config=config,
    hparams=hparams,
    batch=batch,
    crd_tables=crd_tables,
    teacher_feature=teacher_feature,
    step_rng=jax.random.fold_in(state.rng, state.step),
  )
  grad_fn = jax.grad(objective, argnums=(0, 1) if with_teacher else 0, has_aux=True)
  grads, aux = grad_fn(state.student_params, state.teacher_head_params)
  student_grads, teacher_head_grads = grads if with_teacher else (grads, ())

  # Gathered/global quantities are identical on every device; pmean makes
  # that visible to shard_map's replication check without changing values.
  ce = jax.lax.psum(aux["ce"], AXIS)
  teacher_ce = jax.lax.psum(aux["teacher_ce"], AXIS)
  distill = jax.lax.pmean(aux["distill"], AXIS)
  kd = jax.lax.pmean(aux["kd"], AXIS)
  d = config.distill
  loss = d.gamma * ce + d.alpha * kd + d.beta * distill

  student_updates, new_student_opt = student_tx.update(
    student_grads, state.student_opt_state, state.student_params
  )
  candidate = state.replace(
    student_params=optax.apply_updates(state.student_params, student_updates),
    student_opt_state=new_student_opt,
    student_batch_stats=jax.tree.map(lambda x: jax.lax.pmean(x, AXIS), aux["batch_stats"]),
    crd_memory=jax.tree.map(lambda x: jax.lax.pmean(x, AXIS), aux["crd_memory"]),
  )
  if with_teacher:
    teacher_updates, new_teacher_opt = teacher_head_tx.update(
      teacher_head_grads, state.teacher_head_opt_state, state.teacher_head_params
    )
    candidate = candidate.replace(
      teacher_head_params=optax.apply_updates(state.teacher_head_params, teacher_updates),
      teacher_head_opt_state=new_teacher_opt,
    )

  finite = (
    jnp.isfinite(loss)
    & jnp.isfinite(teacher_ce)
    & _tree_all_finite((student_grads, teacher_head_grads))
  )
  metrics = {
    "loss": loss,
    "ce": ce,
    "distill": distill,
    "kd": kd,
    "teacher_ce": teacher_ce,
    "top1": jax.lax.psum(aux["correct"], AXIS) / aux["num_labelled"],
    "teacher_top1": jax.lax.psum(aux["teacher_correct"], AXIS) / aux["num_labelled"],
    "finite": finite.astype(jnp.float32),
  }
  if "stop" in batch:
    # Multi-process runs: each process's rows carry its stop request; the OR
    # over all of them is the same on every process (see preemption.StopVote).
    metrics["stop"] = jax.lax.pmax(jnp.max(batch["stop"]), AXIS)
  return _keep_old_unless_finite(finite, candidate, state), metrics
