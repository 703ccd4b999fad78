"""The per-device SPMD steps (train, eval, embeddings) and their compilation.

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
from jax.sharding import Mesh, PartitionSpec as P
import jax.numpy as jnp
import optax

from ega_jax import config as config_lib
from ega_jax import losses
from ega_jax.models import preprocess
from ega_jax.train.state import AXIS, DistillModels, TrainState


def _cross_entropy_sum(logits, labels, mask=None):
  """Sum over the rows of the softmax cross-entropy. (B, C), (B,) -> ()."""
  per_example = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)
  if mask is not None:
    per_example = per_example * mask
  return jnp.sum(per_example)


def _correct_topk(logits, labels, k):
  """(B, C), (B,) -> (B,) float32: 1 where the label is among the top-k logits."""
  topk = jax.lax.top_k(logits.astype(jnp.float32), k)[1]
  return jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)


def _all_gather(x):
  return jax.lax.all_gather(x, AXIS, axis=0, tiled=True)


def _tree_all_finite(tree) -> jnp.ndarray:
  leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(leaf.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _live_teacher_embedding(models: DistillModels, variables, images_uint8) -> jnp.ndarray:
  return preprocess.teacher_embedding(
      models.teacher, variables, images_uint8, models.teacher_image_size,
      models.teacher_mean, models.teacher_std, models.dtype)


def _teacher_feature(models: DistillModels, config, teacher_variables, batch) -> jnp.ndarray:
  """(b, D_t) frozen teacher features: cached in the batch, else the teacher runs."""
  if "teacher_feature" in batch:
    return batch["teacher_feature"].astype(jnp.float32)
  source = batch["image"] if config.teacher_view == "same" else batch["teacher_image"]
  return jax.lax.stop_gradient(_live_teacher_embedding(models, teacher_variables, source))


def _distillation_term(models: DistillModels, config, hparams, state: TrainState,
                       student_params, batch, crd_tables, global_labels, embeddings, step_rng):
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
        {"params": student_params["crd_student"]}, embeddings["student_emb"])
    teacher_proj = models.crd_projection.apply(
        {"params": student_params["crd_teacher"]}, embeddings["teacher_emb"])
    global_indices = _all_gather(batch["index"])
    contrast_indices = losses.sample_crd_negatives(
        jax.random.fold_in(step_rng, 1), global_labels, global_indices,
        crd_tables, config.distill.crd_num_negatives)
    return losses.crd_loss(
        _all_gather(student_proj.astype(jnp.float32)),
        _all_gather(teacher_proj.astype(jnp.float32)),
        global_indices, contrast_indices, state.crd_memory,
        temperature=config.distill.crd_temperature, momentum=config.distill.crd_momentum)
  distill = losses.distill_loss(
      method, student_emb=embeddings["global_student_emb"],
      teacher_emb=embeddings["global_teacher_emb"], labels=global_labels,
      student_logits=embeddings["global_student_logits"],
      teacher_logits=embeddings["global_teacher_logits"], hparams=hparams)
  return distill, state.crd_memory


def _objective(student_params, teacher_head_params, *, state: TrainState, models: DistillModels,
               config, hparams, batch, crd_tables, teacher_feature, step_rng):
  """This device's share of the total loss, and what the step needs besides it."""
  labels = batch["label"]
  global_labels = _all_gather(labels)
  global_batch = global_labels.shape[0]
  student_images = preprocess.normalize_images(batch["image"], models.data_mean, models.data_std)
  (_, student_features), new_model_state = models.student.apply(
      {"params": student_params["backbone"], "batch_stats": state.student_batch_stats},
      student_images.astype(models.dtype), train=True, mutable=["batch_stats"])
  student_emb, student_logits = models.student_head.apply(
      {"params": student_params["head"]}, student_features["penultimate"])
  # Losses run in float32 whatever the computation dtype (bfloat16 included);
  # the float64 test worker keeps float64.
  loss_dtype = jnp.promote_types(models.dtype, jnp.float32)
  student_emb = student_emb.astype(loss_dtype)
  student_logits = student_logits.astype(loss_dtype)

  # Local terms: local sum / global batch (their sum over devices is the mean).
  ce_student = _cross_entropy_sum(student_logits, labels) / global_batch
  ce_teacher = jnp.zeros((), jnp.float32)
  teacher_correct = jnp.zeros((), jnp.float32)
  embeddings = {"student_emb": student_emb, "teacher_emb": None, "global_teacher_emb": None,
                "global_teacher_logits": None}
  if teacher_feature is not None:
    teacher_emb, teacher_logits = models.teacher_head.apply(
        {"params": teacher_head_params}, teacher_feature)
    teacher_emb = teacher_emb.astype(loss_dtype)
    teacher_logits = teacher_logits.astype(loss_dtype)
    ce_teacher = _cross_entropy_sum(teacher_logits, labels) / global_batch
    teacher_correct = jnp.sum(_correct_topk(teacher_logits, labels, 1))
    # Global terms: every device computes the same value from gathered rows.
    if not config.distill.train_teacher_head_jointly:
      teacher_emb = jax.lax.stop_gradient(teacher_emb)
    embeddings["teacher_emb"] = teacher_emb
    embeddings["global_teacher_emb"] = _all_gather(teacher_emb)
    embeddings["global_teacher_logits"] = _all_gather(jax.lax.stop_gradient(teacher_logits))
  embeddings["global_student_emb"] = _all_gather(student_emb)
  embeddings["global_student_logits"] = _all_gather(student_logits)

  d = config.distill
  kd = jnp.zeros((), jnp.float32)
  if d.alpha:
    kd = losses.kd_loss(embeddings["global_student_logits"],
                        embeddings["global_teacher_logits"], d.kd_temperature)
  distill, new_crd_memory = _distillation_term(
      models, config, hparams, state, student_params, batch, crd_tables, global_labels,
      embeddings, step_rng)
  if config.debug_nan_at_step > 0:
    # Fault injection for tests of the non-finite guard.
    distill = distill * jnp.where(state.step + 1 == config.debug_nan_at_step, jnp.nan, 1.0)
  global_terms = d.alpha * kd + d.beta * distill
  total = d.gamma * ce_student + global_terms / jax.lax.axis_size(AXIS) + ce_teacher
  aux = {
      "batch_stats": new_model_state["batch_stats"],
      "crd_memory": new_crd_memory,
      "ce": ce_student,
      "teacher_ce": ce_teacher,
      "kd": kd,
      "distill": distill,
      "correct": jnp.sum(_correct_topk(student_logits, labels, 1)),
      "teacher_correct": teacher_correct,
  }
  return total, aux


def _keep_old_unless_finite(finite, candidate: TrainState, state: TrainState) -> TrainState:
  """The candidate state where the step was finite, else the old one, plus the counters."""
  guarded = jax.tree.map(lambda new, old: jnp.where(finite, new, old), candidate, state)
  return guarded.replace(
      step=state.step + 1,
      skipped_steps=state.skipped_steps + jnp.where(finite, 0, 1).astype(jnp.int32),
      first_nonfinite_step=jnp.where(
          (state.first_nonfinite_step < 0) & ~finite, state.step + 1,
          state.first_nonfinite_step).astype(jnp.int32),
  )


def train_step(state: TrainState, teacher_variables, batch, crd_tables, *,
               models: DistillModels, config, student_tx, teacher_head_tx,
               hparams: Mapping[str, float]):
  """One SGD step on this device's slice of the global batch.

  Args:
    state: replicated TrainState.
    teacher_variables: replicated frozen teacher variables.
    batch: this device's slice: 'image', 'teacher_image' (b, H, W, 3) uint8,
      'label' (b,) int32, 'index' (b,) int32; with a teacher-embedding cache
      'teacher_feature' (b, D) float16 replaces 'teacher_image' and the
      teacher does not run.
    crd_tables: replicated class tables for CRD negatives (empty dict otherwise).

  Returns:
    (new_state, metrics): both replicated; metrics are global-batch values.
  """
  # Cross-entropy alone needs no teacher: neither its forward pass nor its
  # head runs (the head stays as initialised and its accuracy is not reported).
  with_teacher = config_lib.uses_teacher(config)
  teacher_feature = (_teacher_feature(models, config, teacher_variables, batch)
                     if with_teacher else None)
  objective = functools.partial(
      _objective, state=state, models=models, config=config, hparams=hparams,
      batch=batch, crd_tables=crd_tables, teacher_feature=teacher_feature,
      step_rng=jax.random.fold_in(state.rng, state.step))
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
      student_grads, state.student_opt_state, state.student_params)
  candidate = state.replace(
      student_params=optax.apply_updates(state.student_params, student_updates),
      student_opt_state=new_student_opt,
      student_batch_stats=jax.tree.map(lambda x: jax.lax.pmean(x, AXIS), aux["batch_stats"]),
      crd_memory=jax.tree.map(lambda x: jax.lax.pmean(x, AXIS), aux["crd_memory"]))
  if with_teacher:
    teacher_updates, new_teacher_opt = teacher_head_tx.update(
        teacher_head_grads, state.teacher_head_opt_state, state.teacher_head_params)
    candidate = candidate.replace(
        teacher_head_params=optax.apply_updates(state.teacher_head_params, teacher_updates),
        teacher_head_opt_state=new_teacher_opt)

  finite = jnp.isfinite(loss) & jnp.isfinite(teacher_ce) & _tree_all_finite(
      (student_grads, teacher_head_grads))
  global_batch = batch["label"].shape[0] * jax.lax.axis_size(AXIS)
  metrics = {
      "loss": loss,
      "ce": ce,
      "distill": distill,
      "kd": kd,
      "teacher_ce": teacher_ce,
      "top1": jax.lax.psum(aux["correct"], AXIS) / global_batch,
      "teacher_top1": jax.lax.psum(aux["teacher_correct"], AXIS) / global_batch,
      "finite": finite.astype(jnp.float32),
  }
  return _keep_old_unless_finite(finite, candidate, state), metrics


def _eval_student(state: TrainState, images_uint8, models: DistillModels):
  """Eval-mode student embedding and logits: (b, feature_dim), (b, classes) float32."""
  student_images = preprocess.normalize_images(images_uint8, models.data_mean, models.data_std)
  _, student_features = models.student.apply(
      {"params": state.student_params["backbone"], "batch_stats": state.student_batch_stats},
      student_images.astype(models.dtype), train=False)
  embedding, logits = models.student_head.apply(
      {"params": state.student_params["head"]}, student_features["penultimate"])
  return embedding.astype(jnp.float32), logits.astype(jnp.float32)


def _eval_teacher(state: TrainState, teacher_variables, batch, models: DistillModels):
  """Teacher embedding and teacher-head logits: (b, feature_dim), (b, classes) float32.

  From the batch's cached 'teacher_feature' when it has one, else the teacher
  runs on 'image'.
  """
  if "teacher_feature" in batch:
    teacher_feature = batch["teacher_feature"]
  else:
    teacher_feature = _live_teacher_embedding(models, teacher_variables, batch["image"])
  embedding, logits = models.teacher_head.apply(
      {"params": state.teacher_head_params}, teacher_feature.astype(jnp.float32))
  return embedding.astype(jnp.float32), logits.astype(jnp.float32)


def eval_step(state: TrainState, teacher_variables, batch, *, models: DistillModels,
              with_teacher: bool = True):
  """Counts correct predictions on this device's slice of a padded eval batch.

  Args:
    batch: 'image' (b, H, W, 3) uint8, 'label' (b,), 'mask' (b,) bool; padded
      rows have mask False and count nowhere. Optionally 'teacher_feature'
      (b, D) cached teacher embeddings of the images.
    with_teacher: False skips the teacher (its 'teacher_top1' is then 0).

  Returns:
    Replicated sums over the global batch: 'count', 'top1', 'top5',
    'teacher_top1', 'ce'.
  """
  mask = batch["mask"].astype(jnp.float32)
  labels = batch["label"]
  _, student_logits = _eval_student(state, batch["image"], models)
  if with_teacher:
    _, teacher_logits = _eval_teacher(state, teacher_variables, batch, models)
  else:
    teacher_logits = jnp.zeros_like(student_logits)
  num_classes = student_logits.shape[-1]
  sums = {
      "count": jnp.sum(mask),
      "top1": jnp.sum(_correct_topk(student_logits, labels, 1) * mask),
      "top5": jnp.sum(_correct_topk(student_logits, labels, min(5, num_classes)) * mask),
      "teacher_top1": jnp.sum(_correct_topk(teacher_logits, labels, 1) * mask),
      "ce": _cross_entropy_sum(student_logits, labels, mask),
  }
  return jax.tree.map(lambda x: jax.lax.psum(x, AXIS), sums)


def embedding_step(state: TrainState, teacher_variables, batch, *, models: DistillModels):
  """Global eval-mode embeddings of a batch, for the graph pictures.

  Returns:
    (teacher_emb (B, feature_dim), student_emb (B, feature_dim), labels (B,)),
    replicated, B the global batch.
  """
  student_emb, _ = _eval_student(state, batch["image"], models)
  teacher_emb, _ = _eval_teacher(state, teacher_variables, batch, models)
  gathered = (_all_gather(teacher_emb), _all_gather(student_emb), _all_gather(batch["label"]))
  # Identical on every device; pmean records that for the replication check.
  return (jax.lax.pmean(gathered[0], AXIS), jax.lax.pmean(gathered[1], AXIS),
          jax.lax.pmax(gathered[2], AXIS))


def compile_steps(mesh: Mesh, models: DistillModels, config, student_tx, teacher_head_tx,
                  donate_state: bool = True):
  """jit(shard_map(...)) versions of the steps over the 1-D data mesh.

  `donate_state=False` (the donation ablation only) keeps the input state's
  buffers alive instead of reusing them for the new state.
  """
  replicated = P()
  sharded = P(AXIS)
  train = functools.partial(
      train_step, models=models, config=config, student_tx=student_tx,
      teacher_head_tx=teacher_head_tx, hparams=config_lib.distill_hparams(config))
  train = jax.jit(
      jax.shard_map(train, mesh=mesh,
                    in_specs=(replicated, replicated, sharded, replicated),
                    out_specs=(replicated, replicated)),
      donate_argnums=(0,) if donate_state else ())
  with_teacher = config_lib.uses_teacher(config)
  evaluate = jax.jit(jax.shard_map(
      functools.partial(eval_step, models=models, with_teacher=with_teacher), mesh=mesh,
      in_specs=(replicated, replicated, sharded), out_specs=replicated))
  embed = jax.jit(jax.shard_map(
      functools.partial(embedding_step, models=models), mesh=mesh,
      in_specs=(replicated, replicated, sharded), out_specs=replicated))
  return train, evaluate, embed
