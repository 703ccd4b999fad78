"""Distillation losses as pure `jax.numpy` functions, plus a registry by name.

Every loss here takes the embeddings of the GLOBAL batch (the train step
all-gathers them across devices first), so relational losses (EGA, RKD, PKT,
NCE, IRG) see the same graph on 1 or 256 devices. All functions are jit- and
grad-safe: no Python control flow on traced values, and every square root or
normalisation that can meet a zero (duplicate rows, a constant row, a student
equal to the teacher) has a finite value AND a finite gradient.

Gradient routing is left to the caller, except where the reference
implementation itself blocks it: RKD treats the teacher side as a constant
(RepDistiller computes it under `torch.no_grad`), and CRD's memory banks are
never differentiated. Everywhere else, wrap `teacher_emb` in
`jax.lax.stop_gradient` before the call if the teacher head must not receive
the distillation gradient (the released EGA default).

Matrix products use `Precision.HIGHEST`: the matrices are tiny (global batch x
feature_dim) and the default TPU/GPU float32 matmul (bfloat16 passes / TF32)
would put ~1e-3 noise into correlations and distances.

Methods (see `DISTILL_METHODS`, `distill_loss`):
  ega   Embedding Graph Alignment: Pearson graph over [teacher; student] rows.
  kd    Hinton KD: KL(teacher || student) at temperature T, times T^2.
  hint  FitNet: mean squared error between embeddings.
  rkd   Relational KD (Park et al.): distance + angle smooth-L1 terms.
  pkt   Probabilistic Knowledge Transfer (Passalis & Tefas).
  nce   Contrastive loss over student x teacher cosine similarities.
  ccl   nce + symmetric KL between the logits at T = 1.
  crd   Contrastive Representation Distillation (Tian et al.): stateful,
        use `crd_loss` with a `CRDMemory`.
  irg   Instance Relationship Graph (Liu et al., CVPR 2019): vertex + edge.
"""

import math
import types
from typing import Any, Mapping, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------- #
# Small numerically safe helpers.
# --------------------------------------------------------------------------- #


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


def _smooth_l1(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """Mean Huber loss with beta = 1 (`F.smooth_l1_loss`, mean reduction)."""
  abs_diff = jnp.abs(a - b)
  return jnp.mean(jnp.where(abs_diff < 1.0, 0.5 * jnp.square(abs_diff), abs_diff - 0.5))


def _batch_mean_kl(log_p: jnp.ndarray, log_q: jnp.ndarray) -> jnp.ndarray:
  """KL(p || q) summed over the last axis, averaged over the batch.

  Written with both log-probabilities (not `p * log p`) so that a probability
  that underflows to 0 contributes exactly 0 instead of 0 * -inf = NaN.
  """
  return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


def _pairwise_distances(x: jnp.ndarray, squared: bool, clamp_min: float = 1e-12) -> jnp.ndarray:
  """(B, D) -> (B, B) Euclidean distances as in RepDistiller's `pdist`.

  Squared distances come from |x_i|^2 + |x_j|^2 - 2 <x_i, x_j>, are clamped at
  `clamp_min` (so the sqrt and its gradient stay finite for duplicate rows),
  optionally square-rooted, and the diagonal is set to exactly 0.
  """
  squared_norms = jnp.sum(jnp.square(x), axis=1)
  gram = jnp.matmul(x, x.T, precision=_HIGHEST)
  squared_distances = squared_norms[:, None] + squared_norms[None, :] - 2.0 * gram
  distances = jnp.maximum(squared_distances, clamp_min)
  if not squared:
    distances = jnp.sqrt(distances)
  return jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, distances)


def _check_2d_pair(name_a: str, a: jnp.ndarray, name_b: str, b: jnp.ndarray,
                   same_width: bool = True) -> None:
  """Raises ValueError unless a, b are (B, D) arrays with the same B (and D)."""
  if a.ndim != 2 or b.ndim != 2:
    raise ValueError(
        f"{name_a} and {name_b} must be 2-D (batch, features) arrays, got shapes "
        f"{tuple(a.shape)} and {tuple(b.shape)}.")
  if a.shape[0] != b.shape[0]:
    raise ValueError(
        f"{name_a} and {name_b} must have the same batch size, got shapes "
        f"{tuple(a.shape)} and {tuple(b.shape)}.")
  if same_width and a.shape[1] != b.shape[1]:
    raise ValueError(
        f"{name_a} and {name_b} must have the same width, got shapes "
        f"{tuple(a.shape)} and {tuple(b.shape)}.")


def _check_labels(labels: jnp.ndarray, batch_size: int) -> None:
  if labels is None or jnp.ndim(labels) != 1 or jnp.shape(labels)[0] != batch_size:
    shape = None if labels is None else tuple(jnp.shape(labels))
    raise ValueError(
        f"labels must be a 1-D integer array of length {batch_size} (the batch size), "
        f"got {'None' if shape is None else f'shape {shape}'}.")


# --------------------------------------------------------------------------- #
# EGA.
# --------------------------------------------------------------------------- #


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
        f"pearson_graph needs an (n, d) array with d >= 2 features, got shape {tuple(x.shape)}.")
  num_features = x.shape[1]
  centred = x - jnp.mean(x, axis=1, keepdims=True)
  covariance = jnp.matmul(centred, centred.T, precision=_HIGHEST) / (num_features - 1)
  # Variance from the centred rows directly (not the Gram diagonal) so a
  # constant row gives exactly 0 in both the numerator and the variance.
  variance = jnp.sum(jnp.square(centred), axis=1) / (num_features - 1)
  std = jnp.sqrt(variance + eps)
  return covariance / (std[:, None] * std[None, :])


def ega_graph_blocks(teacher_emb: jnp.ndarray, student_emb: jnp.ndarray,
                     eps: float = 1e-8) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
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


def ega_loss(teacher_emb: jnp.ndarray, student_emb: jnp.ndarray,
             node_weight: float = 0.8, edge_weight: float = 0.24,
             eps: float = 1e-8) -> jnp.ndarray:
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


# --------------------------------------------------------------------------- #
# Logit and embedding baselines.
# --------------------------------------------------------------------------- #


def kd_loss(student_logits: jnp.ndarray, teacher_logits: jnp.ndarray,
            temperature: float = 4.0) -> jnp.ndarray:
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


def _rkd_normalised_distances(x: jnp.ndarray) -> jnp.ndarray:
  """(B, D) -> (B, B) distances divided by their mean over positive entries."""
  distances = _pairwise_distances(x, squared=False)
  positive = distances > 0
  num_positive = jnp.sum(positive)
  mean_positive = jnp.sum(jnp.where(positive, distances, 0.0)) / jnp.maximum(num_positive, 1)
  # B = 1 has no off-diagonal entry: keep the all-zero matrix instead of 0 / 0.
  return distances / jnp.where(mean_positive > 0, mean_positive, 1.0)


def _rkd_angles(x: jnp.ndarray) -> jnp.ndarray:
  """(B, D) -> (B, B, B): A[i, j, k] = <e_ij, e_ik>, e_ij = unit(x_j - x_i)."""
  directions = _l2_normalize(x[None, :, :] - x[:, None, :], axis=-1)
  return jnp.einsum("ijd,ikd->ijk", directions, directions, precision=_HIGHEST)


def rkd_loss(student_emb: jnp.ndarray, teacher_emb: jnp.ndarray,
             distance_weight: float = 25.0, angle_weight: float = 50.0) -> jnp.ndarray:
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
  distance_term = _smooth_l1(_rkd_normalised_distances(student_emb),
                             _rkd_normalised_distances(teacher_emb))
  angle_term = _smooth_l1(_rkd_angles(student_emb), _rkd_angles(teacher_emb))
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

  def conditional_probabilities(x):
    norms = _safe_sqrt(jnp.sum(jnp.square(x), axis=1, keepdims=True))
    unit = x / (norms + eps)
    similarity = (jnp.matmul(unit, unit.T, precision=_HIGHEST) + 1.0) / 2.0
    return similarity / jnp.sum(similarity, axis=1, keepdims=True)

  p_student = conditional_probabilities(student_emb)
  p_teacher = conditional_probabilities(teacher_emb)
  return jnp.mean(p_teacher * jnp.log((p_teacher + eps) / (p_student + eps)))


def nce_loss(student_emb: jnp.ndarray, teacher_emb: jnp.ndarray, labels: jnp.ndarray,
             temperature: float = 0.1) -> jnp.ndarray:
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
  similarity = jnp.matmul(_l2_normalize(student_emb), _l2_normalize(teacher_emb).T,
                          precision=_HIGHEST)
  probabilities = jax.nn.softmax(similarity / temperature, axis=1)
  positive = labels[:, None] == labels[None, :]
  negative = jnp.logical_not(positive)
  num_positive = jnp.sum(positive, axis=1)  # >= 1: the diagonal.
  num_negative = jnp.sum(negative, axis=1)
  positive_term = jnp.sum(jnp.where(positive, -jnp.log(probabilities + 1e-10), 0.0),
                          axis=1) / num_positive
  negative_sum = jnp.sum(jnp.where(negative, -jnp.log(1.0 - probabilities + 1e-10), 0.0),
                         axis=1)
  negative_term = jnp.where(num_negative > 0, negative_sum / jnp.maximum(num_negative, 1), 0.0)
  return jnp.mean(positive_term + negative_term)


def ccl_loss(student_emb: jnp.ndarray, teacher_emb: jnp.ndarray, labels: jnp.ndarray,
             student_logits: jnp.ndarray, teacher_logits: jnp.ndarray,
             temperature: float = 0.1) -> jnp.ndarray:
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
        f"{tuple(student_logits.shape)} and {tuple(student_emb.shape)}.")
  log_p_student = jax.nn.log_softmax(student_logits, axis=-1)
  log_p_teacher = jax.nn.log_softmax(teacher_logits, axis=-1)
  symmetric_kl = 0.5 * (_batch_mean_kl(log_p_teacher, log_p_student)
                        + _batch_mean_kl(log_p_student, log_p_teacher))
  return nce_loss(student_emb, teacher_emb, labels, temperature) + symmetric_kl


def _max_normalised_distances(x: jnp.ndarray, squared: bool) -> jnp.ndarray:
  """(B, D) -> (B, B) pairwise distances (zero diagonal) divided by their max."""
  distances = _pairwise_distances(x, squared=squared)
  largest = jnp.max(distances)
  # Only B = 1 has largest == 0 (off-diagonal entries are >= the 1e-12 clamp).
  return distances / jnp.where(largest > 0, largest, 1.0)


def irg_loss(student_emb: jnp.ndarray, teacher_emb: jnp.ndarray,
             vertex_weight: float = 0.1, edge_weight: float = 5.0,
             squared_distance: bool = True) -> jnp.ndarray:
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
  edge_term = jnp.mean(jnp.square(_max_normalised_distances(student_emb, squared_distance)
                                  - _max_normalised_distances(teacher_emb, squared_distance)))
  return vertex_weight * vertex_term + edge_weight * edge_term


# --------------------------------------------------------------------------- #
# CRD: memory bank state, on-device negative sampling, loss + memory update.
# --------------------------------------------------------------------------- #


@flax.struct.dataclass
class CRDMemory:
  """CRD memory state (RepDistiller's `ContrastMemory` buffers), a pytree.

  Attributes:
    student_bank: (N, dim) running student projections per training example
      (RepDistiller's memory_v1).
    teacher_bank: (N, dim) running teacher projections (memory_v2).
    z_student: () normalisation constant of the student scores; negative
      means "not yet set" (it is set from the first batch, then frozen).
    z_teacher: () same for the teacher scores.
  """

  student_bank: jnp.ndarray
  teacher_bank: jnp.ndarray
  z_student: jnp.ndarray
  z_teacher: jnp.ndarray


class CRDClassTables(NamedTuple):
  """Per-class lookup tables for on-device negative sampling (a pytree).

  Attributes:
    sorted_indices: (N,) int32 training-set indices sorted by label (stable),
      so class c occupies sorted_indices[class_starts[c]:][:class_counts[c]].
    class_starts: (C,) int32 offset of each class's block.
    class_counts: (C,) int32 number of examples of each class.
  """

  sorted_indices: Any
  class_starts: Any
  class_counts: Any


def init_crd_memory(rng: jax.Array, num_data: int, dim: int = 128) -> CRDMemory:
  """Fresh CRD memory: both banks uniform in [-stdv, stdv], stdv = 1/sqrt(dim/3).

  Args:
    rng: PRNG key.
    num_data: N, the number of training examples (one bank row each).
    dim: projection width (RepDistiller's feat_dim, 128).

  Returns:
    CRDMemory with z_student = z_teacher = -1 (unset).
  """
  if num_data < 2 or dim < 1:
    raise ValueError(
        f"init_crd_memory needs num_data >= 2 and dim >= 1, got num_data={num_data}, dim={dim}.")
  stdv = 1.0 / math.sqrt(dim / 3.0)
  student_key, teacher_key = jax.random.split(rng)
  return CRDMemory(
      student_bank=jax.random.uniform(student_key, (num_data, dim), jnp.float32, -stdv, stdv),
      teacher_bank=jax.random.uniform(teacher_key, (num_data, dim), jnp.float32, -stdv, stdv),
      z_student=jnp.asarray(-1.0, jnp.float32),
      z_teacher=jnp.asarray(-1.0, jnp.float32),
  )


def build_crd_class_tables(train_labels: np.ndarray,
                           num_classes: int | None = None) -> CRDClassTables:
  """Host-side tables for `sample_crd_negatives` (NumPy int32 arrays).

  Args:
    train_labels: (N,) integer label of every training example, in dataset
      index order (the index that the data pipeline hands to the step).
    num_classes: C; defaults to max(label) + 1.

  Returns:
    CRDClassTables(sorted_indices (N,), class_starts (C,), class_counts (C,)).
  """
  labels = np.asarray(train_labels)
  if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
        f"train_labels must be a non-empty 1-D integer array, got dtype {labels.dtype} "
        f"and shape {labels.shape}.")
  if labels.min() < 0:
    raise ValueError(f"train_labels must be non-negative class ids, found {labels.min()}.")
  if num_classes is None:
    num_classes = int(labels.max()) + 1
  if labels.max() >= num_classes:
    raise ValueError(
        f"num_classes={num_classes} but train_labels contains class {labels.max()}; "
        f"valid labels are 0..{num_classes - 1}.")
  counts = np.bincount(labels, minlength=num_classes)
  if np.count_nonzero(counts) < 2:
    raise ValueError(
        "train_labels holds a single class, so CRD has no negatives from other classes.")
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  sorted_indices = np.argsort(labels, kind="stable")
  return CRDClassTables(sorted_indices.astype(np.int32), starts.astype(np.int32),
                        counts.astype(np.int32))


def sample_crd_negatives(rng: jax.Array, labels: jnp.ndarray, indices: jnp.ndarray,
                         class_tables: CRDClassTables,
                         num_negatives: int = 16384) -> jnp.ndarray:
  """Contrast indices for CRD, RepDistiller's 'exact' mode, on device.

  For each example (dataset index i, label c) draws `num_negatives` indices
  uniformly, with replacement, from the examples of all OTHER classes: r is
  uniform in [0, N - n_c) over the label-sorted order with class c's block
  [start_c, start_c + n_c) cut out (r >= start_c is shifted by n_c).

  Args:
    rng: PRNG key.
    labels: (B,) labels of the batch.
    indices: (B,) their dataset indices (the positives).
    class_tables: from `build_crd_class_tables` on the training labels.
    num_negatives: K (RepDistiller's nce_k, 16384).

  Returns:
    (B, K + 1) int32: column 0 is `indices`, columns 1.. the negatives.
  """
  sorted_indices, class_starts, class_counts = class_tables
  num_data = sorted_indices.shape[0]
  labels = jnp.asarray(labels, jnp.int32)
  block_start = jnp.asarray(class_starts)[labels][:, None]
  block_size = jnp.asarray(class_counts)[labels][:, None]
  draws = jax.random.randint(rng, (labels.shape[0], num_negatives), 0, num_data - block_size,
                             dtype=jnp.int32)
  positions = jnp.where(draws >= block_start, draws + block_size, draws)
  negatives = jnp.asarray(sorted_indices)[positions]
  return jnp.concatenate([jnp.asarray(indices, jnp.int32)[:, None], negatives], axis=1)


def _contrast_loss(scores: jnp.ndarray, num_data: int, eps: float = 1e-7) -> jnp.ndarray:
  """RepDistiller's `ContrastLoss` (NCE with noise Pn = 1/N) on (B, K+1) scores.

    log D1 = log(P_pos / (P_pos + K Pn + eps)),  P_pos = scores[:, 0],
    log D0 = log(K Pn / (P_neg + K Pn + eps)),   P_neg = scores[:, 1:],
    L = -(sum log D1 + sum log D0) / B.
  """
  batch_size, num_negatives = scores.shape[0], scores.shape[1] - 1
  noise = num_negatives / num_data
  positive = scores[:, 0]
  negative = scores[:, 1:]
  log_d1 = jnp.log(positive / (positive + noise + eps))
  log_d0 = jnp.log(noise / (negative + noise + eps))
  return -(jnp.sum(log_d1) + jnp.sum(log_d0)) / batch_size


def crd_loss(student_proj: jnp.ndarray, teacher_proj: jnp.ndarray, indices: jnp.ndarray,
             contrast_indices: jnp.ndarray, memory: CRDMemory,
             temperature: float = 0.07, momentum: float = 0.5) -> tuple[jnp.ndarray, CRDMemory]:
  """CRD loss and memory update, as RepDistiller's `CRDLoss` + `ContrastMemory`.

  With W_s = student_bank[contrast_indices], W_t = teacher_bank[...] (B, K+1, dim):
    out_teacher = exp(<W_s, t_proj> / T),  out_student = exp(<W_t, s_proj> / T),
    Z = mean(out) * N on the first call (memory Z < 0), the stored Z after,
    loss = ContrastLoss(out_student / Z_s) + ContrastLoss(out_teacher / Z_t).
  Then for the positives: bank[indices] = normalise(momentum * bank[indices] +
  (1 - momentum) * proj) (student bank from student_proj, teacher bank from
  teacher_proj). Gradients reach both projections through the exp terms;
  the banks and Z are constants.

  Args:
    student_proj: (B, dim) L2-normalised student projection (the CRD embed head).
    teacher_proj: (B, dim) L2-normalised teacher projection.
    indices: (B,) dataset indices of the batch (distinct).
    contrast_indices: (B, K+1) from `sample_crd_negatives` (column 0 = indices).
    memory: current CRDMemory with N rows.
    temperature: T (RepDistiller's nce_t, 0.07).
    momentum: bank momentum (nce_m, 0.5).

  Returns:
    (scalar loss, updated CRDMemory).
  """
  _check_2d_pair("student_proj", student_proj, "teacher_proj", teacher_proj)
  if student_proj.shape[1] != memory.student_bank.shape[1]:
    raise ValueError(
        f"student_proj width {student_proj.shape[1]} does not match the CRD memory width "
        f"{memory.student_bank.shape[1]}.")
  if contrast_indices.ndim != 2 or contrast_indices.shape[0] != student_proj.shape[0]:
    raise ValueError(
        f"contrast_indices must be (batch, K + 1) = ({student_proj.shape[0]}, K + 1), "
        f"got shape {tuple(contrast_indices.shape)}.")
  memory = jax.tree_util.tree_map(jnp.asarray, memory)
  num_data = memory.student_bank.shape[0]
  student_weights = jax.lax.stop_gradient(memory.student_bank[contrast_indices])
  teacher_weights = jax.lax.stop_gradient(memory.teacher_bank[contrast_indices])
  out_teacher = jnp.exp(
      jnp.einsum("bkd,bd->bk", student_weights, teacher_proj, precision=_HIGHEST) / temperature)
  out_student = jnp.exp(
      jnp.einsum("bkd,bd->bk", teacher_weights, student_proj, precision=_HIGHEST) / temperature)

  # Z is fixed by the first batch it sees (a constant, like torch's `.item()`).
  z_student = jnp.where(memory.z_student < 0,
                        jax.lax.stop_gradient(jnp.mean(out_student)) * num_data, memory.z_student)
  z_teacher = jnp.where(memory.z_teacher < 0,
                        jax.lax.stop_gradient(jnp.mean(out_teacher)) * num_data, memory.z_teacher)
  loss = (_contrast_loss(out_student / z_student, num_data)
          + _contrast_loss(out_teacher / z_teacher, num_data))

  def updated_bank(bank, proj):
    mixed = bank[indices] * momentum + jax.lax.stop_gradient(proj) * (1.0 - momentum)
    return bank.at[indices].set(_l2_normalize(mixed).astype(bank.dtype))

  new_memory = CRDMemory(
      student_bank=updated_bank(memory.student_bank, student_proj),
      teacher_bank=updated_bank(memory.teacher_bank, teacher_proj),
      z_student=jnp.asarray(z_student, memory.z_student.dtype),
      z_teacher=jnp.asarray(z_teacher, memory.z_teacher.dtype),
  )
  return loss, new_memory


# --------------------------------------------------------------------------- #
# Registry.
# --------------------------------------------------------------------------- #

DISTILL_METHODS = ("none", "kd", "hint", "rkd", "pkt", "nce", "ccl", "crd", "irg", "ega")

# Every hyper-parameter key `distill_loss` (and the CRD code) understands, with
# the released / reference defaults. Read-only; copy with dict(...) to edit.
DEFAULT_HPARAMS: Mapping[str, Any] = types.MappingProxyType({
    "node_weight": 0.8,             # ega: weight of ||N - I||_F
    "edge_weight": 0.24,            # ega: weight of ||E_t - E_s||_F
    "pearson_eps": 1e-8,            # ega: variance floor in the Pearson graph
    "kd_temperature": 4.0,          # kd
    "rkd_distance_weight": 25.0,    # rkd: w_d
    "rkd_angle_weight": 50.0,       # rkd: w_a
    "pkt_eps": 1e-7,                # pkt
    "nce_temperature": 0.1,         # nce and ccl
    "irg_vertex_weight": 0.1,       # irg
    "irg_edge_weight": 5.0,         # irg
    "irg_squared_distance": True,   # irg: squared Euclidean edges
    "crd_temperature": 0.07,        # crd (used by crd_loss, not distill_loss)
    "crd_momentum": 0.5,            # crd
    "crd_num_negatives": 16384,     # crd: K
    "crd_feature_dim": 128,         # crd: projection width
})


def _resolve_hparams(hparams: Mapping[str, Any] | None) -> dict[str, Any]:
  """DEFAULT_HPARAMS overridden by `hparams`; unknown keys raise ValueError."""
  given = {} if hparams is None else dict(hparams.items())
  unknown = sorted(set(given) - set(DEFAULT_HPARAMS))
  if unknown:
    raise ValueError(
        f"Unknown distillation hparams {unknown}; valid keys are {sorted(DEFAULT_HPARAMS)}.")
  resolved = dict(DEFAULT_HPARAMS)
  resolved.update(given)
  for key in ("kd_temperature", "nce_temperature", "crd_temperature"):
    value = resolved[key]
    if isinstance(value, (int, float)) and not value > 0:
      raise ValueError(f"hparams['{key}'] must be > 0, got {value}.")
  return resolved


def distill_loss(method: str, *, student_emb: jnp.ndarray | None = None,
                 teacher_emb: jnp.ndarray | None = None, labels: jnp.ndarray | None = None,
                 student_logits: jnp.ndarray | None = None,
                 teacher_logits: jnp.ndarray | None = None,
                 hparams: Mapping[str, Any] | None = None) -> jnp.ndarray:
  """The distillation term L_distill of `method` on the global batch.

  Args:
    method: one of DISTILL_METHODS except 'crd' (stateful: use `crd_loss`).
    student_emb, teacher_emb: (B, D) node embeddings.
    labels: (B,) labels (nce, ccl).
    student_logits, teacher_logits: (B, C) logits (kd, ccl).
    hparams: flat mapping of DEFAULT_HPARAMS keys; missing keys take the
      defaults, unknown keys raise.

  Returns:
    Scalar loss ('none' returns 0.0).
  """
  if method not in DISTILL_METHODS:
    raise ValueError(
        f"Unknown distillation method {method!r}; valid methods are {list(DISTILL_METHODS)}.")
  if method == "crd":
    raise ValueError(
        "distill_loss('crd') is not available because CRD keeps a memory bank: call "
        "crd_loss(student_proj, teacher_proj, indices, contrast_indices, memory) instead.")
  hp = _resolve_hparams(hparams)
  if method == "none":
    return jnp.zeros((), jnp.float32)

  needed = {
      "kd": ("student_logits", "teacher_logits"),
      "ccl": ("student_emb", "teacher_emb", "labels", "student_logits", "teacher_logits"),
      "nce": ("student_emb", "teacher_emb", "labels"),
  }.get(method, ("student_emb", "teacher_emb"))
  given = dict(student_emb=student_emb, teacher_emb=teacher_emb, labels=labels,
               student_logits=student_logits, teacher_logits=teacher_logits)
  missing = [name for name in needed if given[name] is None]
  if missing:
    raise ValueError(f"distill_loss({method!r}) needs {list(needed)}; missing {missing}.")

  if method == "kd":
    return kd_loss(student_logits, teacher_logits, hp["kd_temperature"])
  if method == "hint":
    return hint_loss(student_emb, teacher_emb)
  if method == "rkd":
    return rkd_loss(student_emb, teacher_emb, hp["rkd_distance_weight"], hp["rkd_angle_weight"])
  if method == "pkt":
    return pkt_loss(student_emb, teacher_emb, hp["pkt_eps"])
  if method == "nce":
    return nce_loss(student_emb, teacher_emb, labels, hp["nce_temperature"])
  if method == "ccl":
    return ccl_loss(student_emb, teacher_emb, labels, student_logits, teacher_logits,
                    hp["nce_temperature"])
  if method == "irg":
    return irg_loss(student_emb, teacher_emb, hp["irg_vertex_weight"], hp["irg_edge_weight"],
                    bool(hp["irg_squared_distance"]))
  # method == "ega"
  return ega_loss(teacher_emb, student_emb, hp["node_weight"], hp["edge_weight"], hp["pearson_eps"])
