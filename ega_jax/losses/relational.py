"""Relational baselines over pairs of batch rows: RKD, PKT and IRG."""

import jax
import jax.numpy as jnp

from ega_jax.losses._common import (
  _HIGHEST,
  _check_2d_pair,
  _huber,
  _l2_normalize,
  _own_rows,
  _row_pairwise_distances,
  _safe_sqrt,
  _smooth_l1,
  _sum_over_devices,
  _take_rows,
)


def _rkd_normalised_distances(
  x: jnp.ndarray, first: jnp.ndarray | int = 0, rows: int | None = None, axis_name=None
) -> jnp.ndarray:
  """(B, D) -> (rows, B): rows [first, first + rows) of the distances divided by the
  mean over positive entries of the whole (B, B) matrix (all B rows by default; with
  `axis_name`, each device's rows, the mean's sums `psum`med)."""
  rows = x.shape[0] if rows is None else rows
  distances = _row_pairwise_distances(x, first, rows, squared=False)
  positive = distances > 0
  num_positive = _sum_over_devices(jnp.sum(positive), axis_name)
  positive_sum = _sum_over_devices(jnp.sum(jnp.where(positive, distances, 0.0)), axis_name)
  mean_positive = positive_sum / jnp.maximum(num_positive, 1)
  # B = 1 has no off-diagonal entry: keep the all-zero matrix instead of 0 / 0.
  return distances / jnp.where(mean_positive > 0, mean_positive, 1.0)


def _rkd_angles(x: jnp.ndarray, anchors: jnp.ndarray | None = None) -> jnp.ndarray:
  """(B, D) -> (A, B, B): angles[a, j, k] = <e_aj, e_ak>, e_aj = unit(x_j - anchors_a).

  `anchors` (A, D) defaults to x itself (A = B, the whole tensor); the
  row-sharded loss passes its own rows.
  """
  anchors = x if anchors is None else anchors
  directions = _l2_normalize(x[None, :, :] - anchors[:, None, :], axis=-1)
  return jnp.einsum("ijd,ikd->ijk", directions, directions, precision=_HIGHEST)


def rkd_loss(
  student_emb: jnp.ndarray,
  teacher_emb: jnp.ndarray,
  distance_weight: float = 25.0,
  angle_weight: float = 50.0,
) -> jnp.ndarray:
  """Relational KD (Park et al., CVPR 2019), as RepDistiller's `RKDLoss`.

  Distance term: d_ij = sqrt(max(|x_i - x_j|^2, 1e-12)) with d_ii = 0, each
  matrix divided by its mean over the positive (off-diagonal) entries; the loss
  is the mean smooth-L1 (beta 1) between the student and teacher matrices.
  Angle term: for every anchor i, e_ij = (x_j - x_i) / |x_j - x_i| (0 for
  j = i), A_ijk = <e_ij, e_ik>; mean smooth-L1 over all B^3 entries.

    L = distance_weight * L_distance + angle_weight * L_angle.

  The teacher side is a constant (stop_gradient), as in RepDistiller.
  Memory: the angle term builds a (B, B, D) difference tensor and (B, B, B)
  angles, fine for the usual batch of 64, heavy past ~512.

  Args:
    student_emb: (B, D_s).
    teacher_emb: (B, D_t); widths may differ.
    distance_weight, angle_weight: RepDistiller's w_d = 25, w_a = 50.

  Returns:
    Scalar loss.
  """
  _check_2d_pair("student_emb", student_emb, "teacher_emb", teacher_emb, same_width=False)
  teacher_emb = jax.lax.stop_gradient(teacher_emb)
  distance_term = _smooth_l1(
    _rkd_normalised_distances(student_emb), _rkd_normalised_distances(teacher_emb)
  )
  angle_term = _smooth_l1(_rkd_angles(student_emb), _rkd_angles(teacher_emb))
  return distance_weight * distance_term + angle_weight * angle_term


def rkd_loss_row_sharded(
  student_emb: jnp.ndarray,
  teacher_emb: jnp.ndarray,
  axis_name: str,
  distance_weight: float = 25.0,
  angle_weight: float = 50.0,
) -> jnp.ndarray:
  """`rkd_loss` with each device computing only its anchors' rows.

  Called inside shard_map / pmap over `axis_name` (n devices) with the gathered
  global embeddings, identical on every device. Device r owns anchors
  [r*B/n, (r+1)*B/n): its (B/n, B) rows of the distance matrices and its
  (B/n, B, B) slab of the angle tensor. The means over positive distances and
  the smooth-L1 sums are `psum`med, so every device returns the same scalar as
  `rkd_loss` on the whole batch. Its largest intermediates are the (B/n, B, D)
  directions and the (B/n, B, B) angles instead of (B, B, D) and (B, B, B).

  Args:
    student_emb: (B, D_s) gathered; B divisible by n.
    teacher_emb: (B, D_t) gathered; widths may differ.
    axis_name: the device axis the anchors are split over.
    distance_weight, angle_weight: as in `rkd_loss`.

  Returns:
    Scalar loss, the same on every device.
  """
  _check_2d_pair("student_emb", student_emb, "teacher_emb", teacher_emb, same_width=False)
  teacher_emb = jax.lax.stop_gradient(teacher_emb)
  batch_size = student_emb.shape[0]
  first, rows = _own_rows(batch_size, axis_name, "rkd_loss_row_sharded")

  def normalised_distance_rows(x):
    return _rkd_normalised_distances(x, first, rows, axis_name)

  def angle_rows(x):
    return _rkd_angles(x, _take_rows(x, first, rows))

  distance_sum = jnp.sum(
    _huber(normalised_distance_rows(student_emb), normalised_distance_rows(teacher_emb))
  )
  angle_sum = jnp.sum(_huber(angle_rows(student_emb), angle_rows(teacher_emb)))
  # Float counts: B**3 passes int32 from B = 1,291 and would not trace.
  distance_term = jax.lax.psum(distance_sum, axis_name) / float(batch_size) ** 2
  angle_term = jax.lax.psum(angle_sum, axis_name) / float(batch_size) ** 3
  return distance_weight * distance_term + angle_weight * angle_term


def pkt_loss(student_emb: jnp.ndarray, teacher_emb: jnp.ndarray, eps: float = 1e-7) -> jnp.ndarray:
  """Probabilistic Knowledge Transfer, as RepDistiller's `PKT`.

    u_i = x_i / (|x_i| + eps),  S_ij = (<u_i, u_j> + 1) / 2,
    P_ij = S_ij / sum_k S_ik  (conditional probabilities, per row),
    L = mean_ij P_t_ij * log((P_t_ij + eps) / (P_s_ij + eps)).

  A zero row gives u = 0 with a finite gradient (torch's sqrt would give NaN).

  Args:
    student_emb: (B, D_s).
    teacher_emb: (B, D_t); widths may differ.
    eps: the 1e-7 of the reference, in the normalisation and in the log.

  Returns:
    Scalar loss.
  """
  _check_2d_pair("student_emb", student_emb, "teacher_emb", teacher_emb, same_width=False)

  p_student = _pkt_conditional_probabilities(student_emb, eps)
  p_teacher = _pkt_conditional_probabilities(teacher_emb, eps)
  return jnp.mean(p_teacher * jnp.log((p_teacher + eps) / (p_student + eps)))


def _pkt_conditional_probabilities(
  x: jnp.ndarray, eps: float, first: jnp.ndarray | int = 0, rows: int | None = None
) -> jnp.ndarray:
  """(B, D) -> (rows, B): rows [first, first + rows) of P (all B rows by default).

  P_ij = S_ij / sum_k S_ik with S_ij = (<u_i, u_j> + 1) / 2, u_i = x_i / (|x_i| + eps);
  each row is normalised by itself, so any subset of rows is exact.
  """
  rows = x.shape[0] if rows is None else rows
  norms = _safe_sqrt(jnp.sum(jnp.square(x), axis=1, keepdims=True))
  unit = x / (norms + eps)
  similarity = (jnp.matmul(_take_rows(unit, first, rows), unit.T, precision=_HIGHEST) + 1.0) / 2.0
  return similarity / jnp.sum(similarity, axis=1, keepdims=True)


def pkt_loss_row_sharded(
  student_emb: jnp.ndarray, teacher_emb: jnp.ndarray, axis_name: str, eps: float = 1e-7
) -> jnp.ndarray:
  """`pkt_loss` with each device computing only its rows of P_s and P_t.

  P is normalised per row, so device r's (B/n, B) rows need only its own rows
  against all B columns; the KL sums are `psum`med. Called inside shard_map /
  pmap over `axis_name` with the gathered global embeddings (B divisible by n);
  returns the same scalar as `pkt_loss` on every device.

  Args:
    student_emb: (B, D_s) gathered.
    teacher_emb: (B, D_t) gathered; widths may differ.
    axis_name: the device axis the rows are split over.
    eps: as in `pkt_loss`.

  Returns:
    Scalar loss, the same on every device.
  """
  _check_2d_pair("student_emb", student_emb, "teacher_emb", teacher_emb, same_width=False)
  batch_size = student_emb.shape[0]
  first, rows = _own_rows(batch_size, axis_name, "pkt_loss_row_sharded")

  p_student = _pkt_conditional_probabilities(student_emb, eps, first, rows)
  p_teacher = _pkt_conditional_probabilities(teacher_emb, eps, first, rows)
  kl_sum = jnp.sum(p_teacher * jnp.log((p_teacher + eps) / (p_student + eps)))
  return jax.lax.psum(kl_sum, axis_name) / float(batch_size) ** 2


def _max_normalised_distances(
  x: jnp.ndarray,
  squared: bool,
  first: jnp.ndarray | int = 0,
  rows: int | None = None,
  axis_name=None,
) -> jnp.ndarray:
  """(B, D) -> (rows, B): rows [first, first + rows) of the pairwise distances (zero
  diagonal) divided by the whole (B, B) matrix's max (all B rows by default; with
  `axis_name`, each device's rows and `_global_max`)."""
  rows = x.shape[0] if rows is None else rows
  distances = _row_pairwise_distances(x, first, rows, squared=squared)
  if axis_name is not None:
    return distances / _global_max(distances, axis_name)
  largest = jnp.max(distances)
  # Only B = 1 has largest == 0 (off-diagonal entries are >= the 1e-12 clamp).
  return distances / jnp.where(largest > 0, largest, 1.0)


def irg_loss(
  student_emb: jnp.ndarray,
  teacher_emb: jnp.ndarray,
  vertex_weight: float = 0.1,
  edge_weight: float = 5.0,
  squared_distance: bool = True,
) -> jnp.ndarray:
  """Instance Relationship Graph (Liu et al., CVPR 2019) on the final embeddings.

  The graph of one layer: vertices are the instances' embeddings, edges the
  pairwise distances A_ij = |x_i - x_j|^2 (squared Euclidean, as the paper's
  edge and the PyTorch ports of the authors' Caffe code use; set
  `squared_distance=False` for the plain Euclidean distance), clamped at 1e-12,
  zero diagonal, and each matrix divided by its own maximum.

    L_vertex = mean_{i, d} (x_s_id - x_t_id)^2    (F.mse_loss: the instance-wise
               squared distance |x_s_i - x_t_i|^2 averaged over instances, / D)
    L_edge   = mean_{i, j} (A_s_ij - A_t_ij)^2
    L = vertex_weight * L_vertex + edge_weight * L_edge.

  Weights: vertex 0.1 and edge 5.0, the defaults of the widely used PyTorch
  port of the official Caffe IRG (Knowledge-Distillation-Zoo, `IRG(w_irg_vert
  =0.1, w_irg_edge=5.0)`), which uses exactly these reductions. The IRG
  transformation term (across layers) is not used: EGA and every baseline here
  distil only the final embedding. Both embeddings must have the same width for
  the vertex term.

  Args:
    student_emb: (B, D).
    teacher_emb: (B, D).
    vertex_weight, edge_weight: see above.
    squared_distance: squared (default) or plain Euclidean edges.

  Returns:
    Scalar loss.
  """
  _check_2d_pair("student_emb", student_emb, "teacher_emb", teacher_emb)
  vertex_term = jnp.mean(jnp.square(student_emb - teacher_emb))
  edge_term = jnp.mean(
    jnp.square(
      _max_normalised_distances(student_emb, squared_distance)
      - _max_normalised_distances(teacher_emb, squared_distance)
    )
  )
  return vertex_weight * vertex_term + edge_weight * edge_term


def _global_max(row_values: jnp.ndarray, axis_name: str) -> jnp.ndarray:
  """The maximum over all devices' rows (1 where it is 0, only at B = 1), differentiated
  as `jnp.max` of the whole matrix: the gradient is split equally over every entry, on
  any device, that equals the maximum.

  The value is a `pmax`; the gradient comes from adding the psum of (entry - max) over
  the T tied entries divided by T, which is zero in value. A two-stage max (each
  device's, then the largest of those) would split ties per device first, and so differ
  from the whole-matrix gradient when tied entries sit unevenly on the devices.
  """
  largest = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(row_values)), axis_name)
  ties = row_values == largest
  # One psum for both sums (each collective has a fixed cost that shows at small B).
  num_ties, tied_excess = jax.lax.psum(
    jnp.stack(
      [jnp.sum(ties.astype(row_values.dtype)), jnp.sum(jnp.where(ties, row_values - largest, 0.0))]
    ),
    axis_name,
  )
  largest = largest + tied_excess / num_ties
  return jnp.where(largest > 0, largest, 1.0)


def irg_loss_row_sharded(
  student_emb: jnp.ndarray,
  teacher_emb: jnp.ndarray,
  axis_name: str,
  vertex_weight: float = 0.1,
  edge_weight: float = 5.0,
  squared_distance: bool = True,
) -> jnp.ndarray:
  """`irg_loss` with each device computing only its rows of the distance graphs.

  Device r owns rows [r*B/n, (r+1)*B/n) of both (B, B) edge matrices and of
  the vertex term. Each matrix's maximum is a `pmax` of the devices' row maxima,
  with its gradient split over tied entries as `jnp.max` splits it
  (`_global_max`); the squared-error sums are `psum`med. Called inside shard_map /
  pmap over `axis_name` with the gathered global embeddings (B divisible by n);
  returns the same scalar as `irg_loss` on every device.

  Args:
    student_emb: (B, D) gathered.
    teacher_emb: (B, D) gathered.
    axis_name: the device axis the rows are split over.
    vertex_weight, edge_weight, squared_distance: as in `irg_loss`.

  Returns:
    Scalar loss, the same on every device.
  """
  _check_2d_pair("student_emb", student_emb, "teacher_emb", teacher_emb)
  batch_size, width = student_emb.shape
  first, rows = _own_rows(batch_size, axis_name, "irg_loss_row_sharded")

  def max_normalised_distance_rows(x):
    return _max_normalised_distances(x, squared_distance, first, rows, axis_name)

  vertex_sum = jnp.sum(
    jnp.square(_take_rows(student_emb, first, rows) - _take_rows(teacher_emb, first, rows))
  )
  edge_sum = jnp.sum(
    jnp.square(
      max_normalised_distance_rows(student_emb) - max_normalised_distance_rows(teacher_emb)
    )
  )
  vertex_term = jax.lax.psum(vertex_sum, axis_name) / (float(batch_size) * width)
  edge_term = jax.lax.psum(edge_sum, axis_name) / float(batch_size) ** 2
  return vertex_weight * vertex_term + edge_weight * edge_term
