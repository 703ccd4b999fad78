"""Numerically safe helpers and input checks shared by the distillation losses.

Every square root or normalisation here that can meet a zero (duplicate rows,
a constant row, a student equal to the teacher) has a finite value AND a
finite gradient, so the losses built on them are jit- and grad-safe.

Matrix products use `Precision.HIGHEST` (`_HIGHEST`): the matrices are tiny
(global batch x feature_dim) and the default TPU/GPU float32 matmul (bfloat16
passes / TF32) would put ~1e-3 noise into correlations and distances.
"""

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _safe_sqrt(x: jnp.ndarray) -> jnp.ndarray:
  """Elementwise sqrt whose value AND gradient are 0 (not inf/NaN) at x == 0."""
  positive = x > 0
  # The inner `where` keeps the untaken branch's gradient finite, so the outer
  # `where` does not multiply an infinite derivative by zero (which is NaN).
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _frobenius_norm(matrix: jnp.ndarray) -> jnp.ndarray:
  """||M||_F = sqrt(sum M_ij^2), with gradient 0 at M == 0 (e.g. student == teacher)."""
  return _safe_sqrt(jnp.sum(jnp.square(matrix)))


def _l2_normalize(x: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
  """x / ||x|| along `axis`; an all-zero vector maps to 0 with gradient 0.

  Equal to `torch.nn.functional.normalize` except for vectors with
  0 < ||x|| < 1e-12 (torch divides those by 1e-12, which also gives a 1e12
  gradient); an exact zero (e.g. x_i - x_i) is 0 in both.
  """
  squared_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x / jnp.where(squared_norm > 0, _safe_sqrt(squared_norm), 1.0)


def _huber(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """Elementwise Huber loss with beta = 1 (`F.smooth_l1_loss`, no reduction)."""
  abs_diff = jnp.abs(a - b)
  return jnp.where(abs_diff < 1.0, 0.5 * jnp.square(abs_diff), abs_diff - 0.5)


def _smooth_l1(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """Mean Huber loss with beta = 1 (`F.smooth_l1_loss`, mean reduction)."""
  return jnp.mean(_huber(a, b))


def _row_kl(log_p: jnp.ndarray, log_q: jnp.ndarray) -> jnp.ndarray:
  """(B, C) -> (B,): KL(p_i || q_i) of each row, summed over the last axis.

  Written with both log-probabilities (not `p * log p`) so that a probability
  that underflows to 0 contributes exactly 0 instead of 0 * -inf = NaN.
  """
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _batch_mean_kl(log_p: jnp.ndarray, log_q: jnp.ndarray) -> jnp.ndarray:
  """KL(p || q) summed over the last axis, averaged over the batch."""
  return jnp.mean(_row_kl(log_p, log_q))


def _sum_over_devices(x: jnp.ndarray, axis_name: str | None) -> jnp.ndarray:
  """`psum` over `axis_name`; x itself when None (the whole batch on one device)."""
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _own_rows(batch_size: int, axis_name: str, caller: str) -> tuple[jnp.ndarray, int]:
  """(first, rows): this device's rows [first, first + rows) of a (batch_size, ...) graph.

  For the row-sharded losses, called inside shard_map / pmap over `axis_name`
  (n devices): device r owns rows [r * B / n, (r + 1) * B / n).
  """
  num_devices = jax.lax.axis_size(axis_name)
  if batch_size % num_devices:
    raise ValueError(
      f"{caller} needs the global batch ({batch_size}) divisible by the {num_devices} devices "
      f"of axis {axis_name!r}."
    )
  rows = batch_size // num_devices
  return jax.lax.axis_index(axis_name) * rows, rows


def _take_rows(x: jnp.ndarray, first: jnp.ndarray | int, rows: int) -> jnp.ndarray:
  """x[first : first + rows] along axis 0, with a traced `first`."""
  if isinstance(first, int) and first == 0 and rows == x.shape[0]:
    # All rows (the whole-batch losses): x itself, so that no slice and its
    # transpose enter the program and the gradients round exactly as before.
    return x
  return jax.lax.dynamic_slice_in_dim(x, first, rows, axis=0)


def _diagonal_rows(first: jnp.ndarray | int, rows: int, batch_size: int) -> jnp.ndarray:
  """(rows, batch_size) bool: rows [first, first + rows) of the identity."""
  return (first + jnp.arange(rows))[:, None] == jnp.arange(batch_size)[None, :]


def _row_pairwise_distances(
  x: jnp.ndarray, first: jnp.ndarray | int, rows: int, squared: bool, clamp_min: float = 1e-12
) -> jnp.ndarray:
  """(B, D) -> (rows, B): rows [first, first + rows) of the Euclidean distances, as in
  RepDistiller's `pdist` (first = 0, rows = B: the whole matrix).

  Squared distances come from |x_i|^2 + |x_j|^2 - 2 <x_i, x_j>, are clamped at
  `clamp_min` (so the sqrt and its gradient stay finite for duplicate rows),
  optionally square-rooted, and the diagonal is set to exactly 0.
  """
  squared_norms = jnp.sum(jnp.square(x), axis=1)
  gram = jnp.matmul(_take_rows(x, first, rows), x.T, precision=_HIGHEST)
  squared_distances = (
    _take_rows(squared_norms, first, rows)[:, None] + squared_norms[None, :] - 2.0 * gram
  )
  distances = jnp.maximum(squared_distances, clamp_min)
  if not squared:
    distances = jnp.sqrt(distances)
  return jnp.where(_diagonal_rows(first, rows, x.shape[0]), 0.0, distances)


def _check_2d_pair(
  name_a: str, a: jnp.ndarray, name_b: str, b: jnp.ndarray, same_width: bool = True
) -> None:
  """Raises ValueError unless a, b are (B, D) arrays with the same B (and D)."""
  if a.ndim != 2 or b.ndim != 2:
    raise ValueError(
      f"{name_a} and {name_b} must be 2-D (batch, features) arrays, got shapes "
      f"{tuple(a.shape)} and {tuple(b.shape)}."
    )
  if a.shape[0] != b.shape[0]:
    raise ValueError(
      f"{name_a} and {name_b} must have the same batch size, got shapes "
      f"{tuple(a.shape)} and {tuple(b.shape)}."
    )
  if same_width and a.shape[1] != b.shape[1]:
    raise ValueError(
      f"{name_a} and {name_b} must have the same width, got shapes "
      f"{tuple(a.shape)} and {tuple(b.shape)}."
    )


def _check_labels(labels: jnp.ndarray, batch_size: int) -> None:
  if labels is None or jnp.ndim(labels) != 1 or jnp.shape(labels)[0] != batch_size:
    shape = None if labels is None else tuple(jnp.shape(labels))
    raise ValueError(
      f"labels must be a 1-D integer array of length {batch_size} (the batch size), "
      f"got {'None' if shape is None else f'shape {shape}'}."
    )
