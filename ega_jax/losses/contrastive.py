"""Contrastive baselines over student x teacher similarities: NCE and CCL."""

import jax
import jax.numpy as jnp

from ega_jax.losses._common import (
  _HIGHEST,
  _batch_mean_kl,
  _check_2d_pair,
  _check_labels,
  _l2_normalize,
)


def nce_loss(
  student_emb: jnp.ndarray, teacher_emb: jnp.ndarray, labels: jnp.ndarray, temperature: float = 0.1
) -> jnp.ndarray:
  """Supervised contrastive loss between student rows and teacher columns.

    s_i, t_j = L2-normalised rows,  p_ij = softmax_j(<s_i, t_j> / tau),
    positives: labels_i == labels_j (including j = i), negatives: the rest,
    row_i = mean_{j pos} -log(p_ij + 1e-10) + mean_{j neg} -log(1 - p_ij + 1e-10),
    L = mean_i row_i.

  A row without negatives (its whole batch shares its label) contributes 0 for
  the negative part.

  Args:
    student_emb: (B, D) student embeddings (rows of the similarity matrix).
    teacher_emb: (B, D) teacher embeddings (columns).
    labels: (B,) integer class labels.
    temperature: tau > 0.

  Returns:
    Scalar loss.
  """
  _check_2d_pair("student_emb", student_emb, "teacher_emb", teacher_emb)
  _check_labels(labels, student_emb.shape[0])
  similarity = jnp.matmul(
    _l2_normalize(student_emb), _l2_normalize(teacher_emb).T, precision=_HIGHEST
  )
  probabilities = jax.nn.softmax(similarity / temperature, axis=1)
  positive = labels[:, None] == labels[None, :]
  negative = jnp.logical_not(positive)
  num_positive = jnp.sum(positive, axis=1)  # >= 1: the diagonal.
  num_negative = jnp.sum(negative, axis=1)
  positive_term = (
    jnp.sum(jnp.where(positive, -jnp.log(probabilities + 1e-10), 0.0), axis=1) / num_positive
  )
  negative_sum = jnp.sum(jnp.where(negative, -jnp.log(1.0 - probabilities + 1e-10), 0.0), axis=1)
  negative_term = jnp.where(num_negative > 0, negative_sum / jnp.maximum(num_negative, 1), 0.0)
  return jnp.mean(positive_term + negative_term)


def ccl_loss(
  student_emb: jnp.ndarray,
  teacher_emb: jnp.ndarray,
  labels: jnp.ndarray,
  student_logits: jnp.ndarray,
  teacher_logits: jnp.ndarray,
  temperature: float = 0.1,
) -> jnp.ndarray:
  """CCL: nce_loss + (KL(p_t || p_s) + KL(p_s || p_t)) / 2 on the logits at T = 1.

  KLs are summed over classes and averaged over the batch.

  Args:
    student_emb, teacher_emb: (B, D) embeddings.
    labels: (B,) integer labels.
    student_logits, teacher_logits: (B, C) logits.
    temperature: the NCE temperature.

  Returns:
    Scalar loss.
  """
  _check_2d_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
  if student_logits.shape[0] != student_emb.shape[0]:
    raise ValueError(
      f"student_logits and student_emb must have the same batch size, got shapes "
      f"{tuple(student_logits.shape)} and {tuple(student_emb.shape)}."
    )
  log_p_student = jax.nn.log_softmax(student_logits, axis=-1)
  log_p_teacher = jax.nn.log_softmax(teacher_logits, axis=-1)
  symmetric_kl = 0.5 * (
    _batch_mean_kl(log_p_teacher, log_p_student) + _batch_mean_kl(log_p_student, log_p_teacher)
  )
  return nce_loss(student_emb, teacher_emb, labels, temperature) + symmetric_kl
