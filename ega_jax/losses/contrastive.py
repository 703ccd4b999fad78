"""Contrastive baselines over student x teacher similarities: NCE and CCL."""

import jax
import jax.numpy as jnp

from ega_jax.losses._common import (
  _HIGHEST,
  _batch_mean_kl,
  _check_2d_pair,
  _check_labels,
  _l2_normalize,
  _own_rows,
  _row_kl,
  _take_rows,
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
  return jnp.mean(_nce_row_terms(similarity, labels, labels, temperature))


def _nce_row_terms(
  similarity: jnp.ndarray, row_labels: jnp.ndarray, labels: jnp.ndarray, temperature: float
) -> jnp.ndarray:
  """(R, B) student-teacher cosines of R rows -> (R,) NCE terms row_i of `nce_loss`."""
  probabilities = jax.nn.softmax(similarity / temperature, axis=1)
  positive = row_labels[:, None] == labels[None, :]
  negative = jnp.logical_not(positive)
  num_positive = jnp.sum(positive, axis=1)  # >= 1: the diagonal.
  num_negative = jnp.sum(negative, axis=1)
  positive_term = (
    jnp.sum(jnp.where(positive, -jnp.log(probabilities + 1e-10), 0.0), axis=1) / num_positive
  )
  negative_sum = jnp.sum(jnp.where(negative, -jnp.log(1.0 - probabilities + 1e-10), 0.0), axis=1)
  negative_term = jnp.where(num_negative > 0, negative_sum / jnp.maximum(num_negative, 1), 0.0)
  return positive_term + negative_term


def nce_loss_row_sharded(
  student_emb: jnp.ndarray,
  teacher_emb: jnp.ndarray,
  labels: jnp.ndarray,
  axis_name: str,
  temperature: float = 0.1,
) -> jnp.ndarray:
  """`nce_loss` with each device computing only its student rows.

  The softmax runs along each row, so device r's (B/n, B) rows of the
  student-teacher similarity need only its own student rows against all B
  teacher columns; the row terms are summed with `psum`. Called inside
  shard_map / pmap over `axis_name` with the gathered global embeddings and
  labels (B divisible by n); returns the same scalar as `nce_loss` on every
  device.

  Args:
    student_emb: (B, D) gathered student embeddings (rows).
    teacher_emb: (B, D) gathered teacher embeddings (columns).
    labels: (B,) gathered integer labels.
    axis_name: the device axis the rows are split over.
    temperature: tau > 0.

  Returns:
    Scalar loss, the same on every device.
  """
  _check_2d_pair("student_emb", student_emb, "teacher_emb", teacher_emb)
  batch_size = student_emb.shape[0]
  _check_labels(labels, batch_size)
  first, rows = _own_rows(batch_size, axis_name, "nce_loss_row_sharded")
  similarity = jnp.matmul(
    _l2_normalize(_take_rows(student_emb, first, rows)),
    _l2_normalize(teacher_emb).T,
    precision=_HIGHEST,
  )
  row_terms = _nce_row_terms(similarity, _take_rows(labels, first, rows), labels, temperature)
  return jax.lax.psum(jnp.sum(row_terms), axis_name) / float(batch_size)


def _check_ccl_logits(
  student_emb: jnp.ndarray, student_logits: jnp.ndarray, teacher_logits: jnp.ndarray
) -> None:
  """(B, C) logits of the same shape, one row per student embedding."""
  _check_2d_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
  if student_logits.shape[0] != student_emb.shape[0]:
    raise ValueError(
      f"student_logits and student_emb must have the same batch size, got shapes "
      f"{tuple(student_logits.shape)} and {tuple(student_emb.shape)}."
    )


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
  _check_ccl_logits(student_emb, student_logits, teacher_logits)
  log_p_student = jax.nn.log_softmax(student_logits, axis=-1)
  log_p_teacher = jax.nn.log_softmax(teacher_logits, axis=-1)
  symmetric_kl = 0.5 * (
    _batch_mean_kl(log_p_teacher, log_p_student) + _batch_mean_kl(log_p_student, log_p_teacher)
  )
  return nce_loss(student_emb, teacher_emb, labels, temperature) + symmetric_kl


def ccl_loss_row_sharded(
  student_emb: jnp.ndarray,
  teacher_emb: jnp.ndarray,
  labels: jnp.ndarray,
  student_logits: jnp.ndarray,
  teacher_logits: jnp.ndarray,
  axis_name: str,
  temperature: float = 0.1,
) -> jnp.ndarray:
  """`ccl_loss` with each device computing only its rows (`nce_loss_row_sharded`
  and the symmetric KL of its rows of the logits, `psum`med).

  Args:
    student_emb, teacher_emb: (B, D) gathered embeddings; B divisible by n.
    labels: (B,) gathered integer labels.
    student_logits, teacher_logits: (B, C) gathered logits.
    axis_name: the device axis the rows are split over.
    temperature: the NCE temperature.

  Returns:
    Scalar loss, the same on every device.
  """
  _check_ccl_logits(student_emb, student_logits, teacher_logits)
  batch_size = student_emb.shape[0]
  first, rows = _own_rows(batch_size, axis_name, "ccl_loss_row_sharded")
  log_p_student = jax.nn.log_softmax(_take_rows(student_logits, first, rows), axis=-1)
  log_p_teacher = jax.nn.log_softmax(_take_rows(teacher_logits, first, rows), axis=-1)
  symmetric_kl_sum = 0.5 * jnp.sum(
    _row_kl(log_p_teacher, log_p_student) + _row_kl(log_p_student, log_p_teacher)
  )
  return nce_loss_row_sharded(
    student_emb, teacher_emb, labels, axis_name, temperature
  ) + jax.lax.psum(symmetric_kl_sum, axis_name) / float(batch_size)
