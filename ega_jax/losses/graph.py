"""EGA: the Pearson graph over [teacher; student] rows and its alignment loss."""

import jax
import jax.numpy as jnp

from ega_jax.losses._common import (
  _HIGHEST,
  _check_2d_pair,
  _diagonal_rows,
  _frobenius_norm,
  _own_rows,
  _safe_sqrt,
  _take_rows,
)


def pearson_graph(x: jnp.ndarray, eps: float = 1e-8) -> jnp.ndarray:
  """Pearson correlation between the rows of `x`, across the feature axis.

  With c_i = x_i - mean(x_i) (each row centred over its d features):
    cov_ij = <c_i, c_j> / (d - 1),  std_i = sqrt(cov_ii + eps),
    R_ij = cov_ij / (std_i * std_j).

  `eps` (default 1e-8, added to the variance inside the sqrt) keeps a constant
  row finite: its R row/column is 0 (including R_ii) instead of NaN, and the
  gradient of the sqrt at zero variance is finite. For rows with variance v the
  result is scaled by ~(1 - eps / (2 v)), i.e. negligible for v >> 1e-8.

  Args:
    x: (n, d) array, d >= 2.
    eps: variance floor inside the square root.

  Returns:
    (n, n) correlation matrix, symmetric, R_ii = v_i / (v_i + eps) ~ 1.
  """
  if x.ndim != 2 or x.shape[1] < 2:
    raise ValueError(
      f"pearson_graph needs an (n, d) array with d >= 2 features, got shape {tuple(x.shape)}."
    )
  num_features = x.shape[1]
  centred = x - jnp.mean(x, axis=1, keepdims=True)
  covariance = jnp.matmul(centred, centred.T, precision=_HIGHEST) / (num_features - 1)
  # Variance from the centred rows directly (not the Gram diagonal) so a
  # constant row gives exactly 0 in both the numerator and the variance.
  variance = jnp.sum(jnp.square(centred), axis=1) / (num_features - 1)
  std = jnp.sqrt(variance + eps)
  return covariance / (std[:, None] * std[None, :])


def ega_graph_blocks(
  teacher_emb: jnp.ndarray, student_emb: jnp.ndarray, eps: float = 1e-8
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """The three blocks of the EGA graph over the stacked rows [x_t; x_s].

  Args:
    teacher_emb: (B, D) teacher node embeddings x_t.
    student_emb: (B, D) student node embeddings x_s.
    eps: variance floor of `pearson_graph`.

  Returns:
    (E_t, E_s, N), each (B, B): E_t = teacher-teacher block (top-left),
    E_s = student-student block (bottom-right), N = teacher rows x student
    columns (top-right), so N_ij = corr(x_t_i, x_s_j).
  """
  _check_2d_pair("teacher_emb", teacher_emb, "student_emb", student_emb)
  batch_size = teacher_emb.shape[0]
  graph = pearson_graph(jnp.concatenate([teacher_emb, student_emb], axis=0), eps=eps)
  teacher_edges = graph[:batch_size, :batch_size]
  student_edges = graph[batch_size:, batch_size:]
  node_matrix = graph[:batch_size, batch_size:]
  return teacher_edges, student_edges, node_matrix


def ega_loss(
  teacher_emb: jnp.ndarray,
  student_emb: jnp.ndarray,
  node_weight: float = 0.8,
  edge_weight: float = 0.24,
  eps: float = 1e-8,
) -> jnp.ndarray:
  """Embedding Graph Alignment loss (note: teacher first).

    L_edge = ||E_t - E_s||_F,  L_node = ||N - I||_F,
    L_EGA = node_weight * L_node + edge_weight * L_edge,

  Frobenius norms of the whole (B, B) matrices, not squared and not averaged
  (what `torch.norm(M, 2)` computes on a matrix). Blocks as in
  `ega_graph_blocks`. Gradients flow into both embeddings.

  Args:
    teacher_emb: (B, D) teacher node embeddings.
    student_emb: (B, D) student node embeddings.
    node_weight, edge_weight: the released defaults 0.8 and 0.24.
    eps: variance floor of `pearson_graph`.

  Returns:
    Scalar loss.
  """
  teacher_edges, student_edges, node_matrix = ega_graph_blocks(teacher_emb, student_emb, eps=eps)
  identity = jnp.eye(node_matrix.shape[0], dtype=node_matrix.dtype)
  edge_term = _frobenius_norm(teacher_edges - student_edges)
  node_term = _frobenius_norm(node_matrix - identity)
  return node_weight * node_term + edge_weight * edge_term


def _pearson_unit_rows(x: jnp.ndarray, eps: float) -> jnp.ndarray:
  """(n, d) -> (n, d) rows z_i with <z_i, z_j> = pearson_graph(x, eps)[i, j].

  z_i = c_i / (sqrt(d - 1) * std_i), with c_i and std_i as in `pearson_graph`.
  """
  num_features = x.shape[1]
  centred = x - jnp.mean(x, axis=1, keepdims=True)
  variance = jnp.sum(jnp.square(centred), axis=1, keepdims=True) / (num_features - 1)
  return centred / (jnp.sqrt(variance + eps) * jnp.sqrt(num_features - 1.0))


def ega_loss_row_sharded(
  teacher_emb: jnp.ndarray,
  student_emb: jnp.ndarray,
  axis_name: str,
  node_weight: float = 0.8,
  edge_weight: float = 0.24,
  eps: float = 1e-8,
) -> jnp.ndarray:
  """`ega_loss` with each device computing only its rows of the graph.

  Called inside shard_map / pmap over `axis_name` (n devices) with the gathered
  global embeddings, identical on every device. Device r owns rows
  [r*B/n, (r+1)*B/n) of E_t - E_s and of N - I, each (B/n, B) against all B
  columns; the squared Frobenius norms are summed over devices with `psum`, so
  every device returns the same scalar as `ega_loss` on the whole batch, after
  O(B^2 D / n) work and a (B/n, B) largest intermediate instead of (2B, 2B).

  Args:
    teacher_emb: (B, D) gathered teacher node embeddings; B divisible by n.
    student_emb: (B, D) gathered student node embeddings.
    axis_name: the device axis the rows are split over.
    node_weight, edge_weight, eps: as in `ega_loss`.

  Returns:
    Scalar loss, the same on every device.
  """
  _check_2d_pair("teacher_emb", teacher_emb, "student_emb", student_emb)
  batch_size = teacher_emb.shape[0]
  first, rows = _own_rows(batch_size, axis_name, "ega_loss_row_sharded")
  teacher_unit = _pearson_unit_rows(teacher_emb, eps)
  student_unit = _pearson_unit_rows(student_emb, eps)
  own_teacher = _take_rows(teacher_unit, first, rows)
  own_student = _take_rows(student_unit, first, rows)
  edge_rows = jnp.matmul(own_teacher, teacher_unit.T, precision=_HIGHEST) - jnp.matmul(
    own_student, student_unit.T, precision=_HIGHEST
  )
  node_rows = jnp.matmul(own_teacher, student_unit.T, precision=_HIGHEST) - _diagonal_rows(
    first, rows, batch_size
  ).astype(teacher_unit.dtype)
  edge_squared = jax.lax.psum(jnp.sum(jnp.square(edge_rows)), axis_name)
  node_squared = jax.lax.psum(jnp.sum(jnp.square(node_rows)), axis_name)
  return node_weight * _safe_sqrt(node_squared) + edge_weight * _safe_sqrt(edge_squared)
