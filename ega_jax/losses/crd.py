"""CRD (Tian et al.): memory bank state, on-device negative sampling, loss + memory update.

Stateful, so it is not reachable through `distill_loss`: the caller keeps a
`CRDMemory`, draws contrast indices with `sample_crd_negatives` and calls
`crd_loss`, which returns the loss and the updated memory. The memory banks
are never differentiated.
"""

import math
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ega_jax.losses._common import _HIGHEST, _check_2d_pair, _l2_normalize


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
      f"init_crd_memory needs num_data >= 2 and dim >= 1, got num_data={num_data}, dim={dim}."
    )
  stdv = 1.0 / math.sqrt(dim / 3.0)
  student_key, teacher_key = jax.random.split(rng)
  return CRDMemory(
    student_bank=jax.random.uniform(student_key, (num_data, dim), jnp.float32, -stdv, stdv),
    teacher_bank=jax.random.uniform(teacher_key, (num_data, dim), jnp.float32, -stdv, stdv),
    z_student=jnp.asarray(-1.0, jnp.float32),
    z_teacher=jnp.asarray(-1.0, jnp.float32),
  )


def build_crd_class_tables(
  train_labels: np.ndarray, num_classes: int | None = None
) -> CRDClassTables:
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
      f"and shape {labels.shape}."
    )
  if labels.min() < 0:
    raise ValueError(f"train_labels must be non-negative class ids, found {labels.min()}.")
  if num_classes is None:
    num_classes = int(labels.max()) + 1
  if labels.max() >= num_classes:
    raise ValueError(
      f"num_classes={num_classes} but train_labels contains class {labels.max()}; "
      f"valid labels are 0..{num_classes - 1}."
    )
  counts = np.bincount(labels, minlength=num_classes)
  if np.count_nonzero(counts) < 2:
    raise ValueError(
      "train_labels holds a single class, so CRD has no negatives from other classes."
    )
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  sorted_indices = np.argsort(labels, kind="stable")
  return CRDClassTables(
    sorted_indices.astype(np.int32), starts.astype(np.int32), counts.astype(np.int32)
  )


def sample_crd_negatives(
  rng: jax.Array,
  labels: jnp.ndarray,
  indices: jnp.ndarray,
  class_tables: CRDClassTables,
  num_negatives: int = 16384,
) -> jnp.ndarray:
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
  draws = jax.random.randint(
    rng, (labels.shape[0], num_negatives), 0, num_data - block_size, dtype=jnp.int32
  )
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


def crd_loss(
  student_proj: jnp.ndarray,
  teacher_proj: jnp.ndarray,
  indices: jnp.ndarray,
  contrast_indices: jnp.ndarray,
  memory: CRDMemory,
  temperature: float = 0.07,
  momentum: float = 0.5,
) -> tuple[jnp.ndarray, CRDMemory]:
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
      f"{memory.student_bank.shape[1]}."
    )
  if contrast_indices.ndim != 2 or contrast_indices.shape[0] != student_proj.shape[0]:
    raise ValueError(
      f"contrast_indices must be (batch, K + 1) = ({student_proj.shape[0]}, K + 1), "
      f"got shape {tuple(contrast_indices.shape)}."
    )
  memory = jax.tree_util.tree_map(jnp.asarray, memory)
  num_data = memory.student_bank.shape[0]
  student_weights = jax.lax.stop_gradient(memory.student_bank[contrast_indices])
  teacher_weights = jax.lax.stop_gradient(memory.teacher_bank[contrast_indices])
  out_teacher = jnp.exp(
    jnp.einsum("bkd,bd->bk", student_weights, teacher_proj, precision=_HIGHEST) / temperature
  )
  out_student = jnp.exp(
    jnp.einsum("bkd,bd->bk", teacher_weights, student_proj, precision=_HIGHEST) / temperature
  )

  # Z is fixed by the first batch it sees (a constant, like torch's `.item()`).
  z_student = jnp.where(
    memory.z_student < 0, jax.lax.stop_gradient(jnp.mean(out_student)) * num_data, memory.z_student
  )
  z_teacher = jnp.where(
    memory.z_teacher < 0, jax.lax.stop_gradient(jnp.mean(out_teacher)) * num_data, memory.z_teacher
  )
  loss = _contrast_loss(out_student / z_student, num_data) + _contrast_loss(
    out_teacher / z_teacher, num_data
  )

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
