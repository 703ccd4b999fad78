"""The per-device evaluation and embedding steps (run under shard_map over AXIS)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ega_jax.models import preprocess
from ega_jax.train.state import AXIS, DistillModels, TrainState
from ega_jax.train.steps import all_gather, correct_topk, cross_entropy_sum, live_teacher_embedding


def _eval_student(state: TrainState, images_uint8, models: DistillModels):
  """Eval-mode student embedding and logits: (b, feature_dim), (b, classes) float32."""
  student_images = preprocess.normalize_images(images_uint8, models.data_mean, models.data_std)
  _, student_features = models.student.apply(
    {"params": state.student_params["backbone"], "batch_stats": state.student_batch_stats},
    student_images.astype(models.dtype),
    train=False,
  )
  embedding, logits = models.student_head.apply(
    {"params": state.student_params["head"]}, student_features["penultimate"]
  )
  return embedding.astype(jnp.float32), logits.astype(jnp.float32)


def _eval_teacher(state: TrainState, teacher_variables, batch, models: DistillModels):
  """Teacher embedding and teacher-head logits: (b, feature_dim), (b, classes) float32.

  From the batch's cached 'teacher_feature' when it has one, else the teacher
  runs on 'image'.
  """
  if "teacher_feature" in batch:
    teacher_feature = batch["teacher_feature"]
  else:
    teacher_feature = live_teacher_embedding(models, teacher_variables, batch["image"])
  embedding, logits = models.teacher_head.apply(
    {"params": state.teacher_head_params}, teacher_feature.astype(jnp.float32)
  )
  return embedding.astype(jnp.float32), logits.astype(jnp.float32)


def eval_step(
  state: TrainState, teacher_variables, batch, *, models: DistillModels, with_teacher: bool = True
):
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
    "top1": jnp.sum(correct_topk(student_logits, labels, 1) * mask),
    "top5": jnp.sum(correct_topk(student_logits, labels, min(5, num_classes)) * mask),
    "teacher_top1": jnp.sum(correct_topk(teacher_logits, labels, 1) * mask),
    "ce": cross_entropy_sum(student_logits, labels, mask),
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
  gathered = (all_gather(teacher_emb), all_gather(student_emb), all_gather(batch["label"]))
  # Identical on every device; pmean records that for the replication check.
  return (
    jax.lax.pmean(gathered[0], AXIS),
    jax.lax.pmean(gathered[1], AXIS),
    jax.lax.pmax(gathered[2], AXIS),
  )
