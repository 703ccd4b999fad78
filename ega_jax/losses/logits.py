"""Logit and embedding-matching baselines: Hinton KD and the FitNet hint."""

import jax
import jax.numpy as jnp

from ega_jax.losses._common import _batch_mean_kl, _check_2d_pair


def kd_loss(
  student_logits: jnp.ndarray, teacher_logits: jnp.ndarray, temperature: float = 4.0
) -> jnp.ndarray:
  """Hinton KD: T^2 * mean_b sum_c p_t log(p_t / p_s), p = softmax(logits / T).

  Matches RepDistiller's `DistillKL` (`F.kl_div(log p_s, p_t, sum) * T^2 / B`).

  Args:
    student_logits: (B, C).
    teacher_logits: (B, C).
    temperature: T > 0.

  Returns:
    Scalar loss.
  """
  _check_2d_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
  log_p_student = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  log_p_teacher = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  return _batch_mean_kl(log_p_teacher, log_p_student) * temperature**2


def hint_loss(student_emb: jnp.ndarray, teacher_emb: jnp.ndarray) -> jnp.ndarray:
  """FitNet hint: mean over all B * D entries of (x_s - x_t)^2 (`nn.MSELoss`)."""
  _check_2d_pair("student_emb", student_emb, "teacher_emb", teacher_emb)
  return jnp.mean(jnp.square(student_emb - teacher_emb))
