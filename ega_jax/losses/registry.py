"""The distillation registry: method names, hyper-parameter defaults, `distill_loss`.

This module is the one home of the method names (`DISTILL_METHODS`,
`GRAPH_METHODS`) and of every distillation hyper-parameter default
(`DEFAULT_HPARAMS`); configs carry the names and `distill_loss` maps them to
the loss functions.
"""

import types
from typing import Any, Mapping

import jax.numpy as jnp

from ega_jax.losses.contrastive import (
  ccl_loss,
  ccl_loss_row_sharded,
  nce_loss,
  nce_loss_row_sharded,
)
from ega_jax.losses.graph import ega_loss, ega_loss_row_sharded
from ega_jax.losses.logits import hint_loss, kd_loss
from ega_jax.losses.relational import (
  irg_loss,
  irg_loss_row_sharded,
  pkt_loss,
  pkt_loss_row_sharded,
  rkd_loss,
  rkd_loss_row_sharded,
)

DISTILL_METHODS = ("none", "kd", "hint", "rkd", "pkt", "nce", "ccl", "crd", "irg", "ega")

# Methods whose loss is over pairs of rows of the (global) batch: a graph,
# pairwise distances or similarities between examples. A batch of one row has
# no pair to relate, so config validation asks these for a global batch >= 2.
GRAPH_METHODS = ("rkd", "irg", "ega", "pkt", "nce", "ccl")

# Every hyper-parameter key `distill_loss` (and the CRD code) understands, with
# the released / reference defaults. Read-only; copy with dict(...) to edit.
DEFAULT_HPARAMS: Mapping[str, Any] = types.MappingProxyType(
  {
    "node_weight": 0.8,  # ega: weight of ||N - I||_F
    "edge_weight": 0.24,  # ega: weight of ||E_t - E_s||_F
    "pearson_eps": 1e-8,  # ega: variance floor in the Pearson graph
    "kd_temperature": 4.0,  # kd
    "rkd_distance_weight": 25.0,  # rkd: w_d
    "rkd_angle_weight": 50.0,  # rkd: w_a
    "pkt_eps": 1e-7,  # pkt
    "nce_temperature": 0.1,  # nce and ccl
    "irg_vertex_weight": 0.1,  # irg
    "irg_edge_weight": 5.0,  # irg
    "irg_squared_distance": True,  # irg: squared Euclidean edges
    "crd_temperature": 0.07,  # crd (used by crd_loss, not distill_loss)
    "crd_momentum": 0.5,  # crd
    "crd_num_negatives": 16384,  # crd: K
    "crd_feature_dim": 128,  # crd: projection width
  }
)


def _resolve_hparams(hparams: Mapping[str, Any] | None) -> dict[str, Any]:
  """DEFAULT_HPARAMS overridden by `hparams`; unknown keys raise ValueError."""
  given = {} if hparams is None else dict(hparams.items())
  unknown = sorted(set(given) - set(DEFAULT_HPARAMS))
  if unknown:
    raise ValueError(
      f"Unknown distillation hparams {unknown}; valid keys are {sorted(DEFAULT_HPARAMS)}."
    )
  resolved = dict(DEFAULT_HPARAMS)
  resolved.update(given)
  for key in ("kd_temperature", "nce_temperature", "crd_temperature"):
    value = resolved[key]
    if isinstance(value, (int, float)) and not value > 0:
      raise ValueError(f"hparams['{key}'] must be > 0, got {value}.")
  return resolved


def distill_loss(
  method: str,
  *,
  student_emb: jnp.ndarray | None = None,
  teacher_emb: jnp.ndarray | None = None,
  labels: jnp.ndarray | None = None,
  student_logits: jnp.ndarray | None = None,
  teacher_logits: jnp.ndarray | None = None,
  hparams: Mapping[str, Any] | None = None,
  axis_name: str | None = None,
) -> jnp.ndarray:
  """The distillation term L_distill of `method` on the global batch.

  Args:
    method: one of DISTILL_METHODS except 'crd' (stateful: use `crd_loss`).
    student_emb, teacher_emb: (B, D) node embeddings.
    labels: (B,) labels (nce, ccl).
    student_logits, teacher_logits: (B, C) logits (kd, ccl).
    hparams: flat mapping of DEFAULT_HPARAMS keys; missing keys take the
      defaults, unknown keys raise.
    axis_name: None for the whole loss on this device; the name of a
      shard_map / pmap device axis for the row-sharded form of a graph method
      (GRAPH_METHODS): the inputs are then the gathered global batch, the same
      on every device, and each device computes its B/n rows (B divisible by
      the axis size). The value is the same either way.

  Returns:
    Scalar loss ('none' returns 0.0).
  """
  if method not in DISTILL_METHODS:
    raise ValueError(
      f"Unknown distillation method {method!r}; valid methods are {list(DISTILL_METHODS)}."
    )
  if method == "crd":
    raise ValueError(
      "distill_loss('crd') is not available because CRD keeps a memory bank: call "
      "crd_loss(student_proj, teacher_proj, indices, contrast_indices, memory) instead."
    )
  hp = _resolve_hparams(hparams)
  if method == "none":
    return jnp.zeros((), jnp.float32)
  if axis_name is not None and method not in GRAPH_METHODS:
    raise ValueError(
      f"distill_loss({method!r}, axis_name={axis_name!r}): only the graph methods "
      f"{list(GRAPH_METHODS)} have a row-sharded form; call {method!r} with axis_name=None."
    )

  needed = {
    "kd": ("student_logits", "teacher_logits"),
    "ccl": ("student_emb", "teacher_emb", "labels", "student_logits", "teacher_logits"),
    "nce": ("student_emb", "teacher_emb", "labels"),
  }.get(method, ("student_emb", "teacher_emb"))
  given = dict(
    student_emb=student_emb,
    teacher_emb=teacher_emb,
    labels=labels,
    student_logits=student_logits,
    teacher_logits=teacher_logits,
  )
  missing = [name for name in needed if given[name] is None]
  if missing:
    raise ValueError(f"distill_loss({method!r}) needs {list(needed)}; missing {missing}.")

  if method == "kd":
    return kd_loss(student_logits, teacher_logits, hp["kd_temperature"])
  if method == "hint":
    return hint_loss(student_emb, teacher_emb)
  sharded = axis_name is not None
  if method == "rkd":
    weights = (hp["rkd_distance_weight"], hp["rkd_angle_weight"])
    if sharded:
      return rkd_loss_row_sharded(student_emb, teacher_emb, axis_name, *weights)
    return rkd_loss(student_emb, teacher_emb, *weights)
  if method == "pkt":
    if sharded:
      return pkt_loss_row_sharded(student_emb, teacher_emb, axis_name, hp["pkt_eps"])
    return pkt_loss(student_emb, teacher_emb, hp["pkt_eps"])
  if method == "nce":
    if sharded:
      return nce_loss_row_sharded(
        student_emb, teacher_emb, labels, axis_name, hp["nce_temperature"]
      )
    return nce_loss(student_emb, teacher_emb, labels, hp["nce_temperature"])
  if method == "ccl":
    inputs = (student_emb, teacher_emb, labels, student_logits, teacher_logits)
    if sharded:
      return ccl_loss_row_sharded(*inputs, axis_name, hp["nce_temperature"])
    return ccl_loss(*inputs, hp["nce_temperature"])
  if method == "irg":
    irg_hparams = (
      hp["irg_vertex_weight"],
      hp["irg_edge_weight"],
      bool(hp["irg_squared_distance"]),
    )
    if sharded:
      return irg_loss_row_sharded(student_emb, teacher_emb, axis_name, *irg_hparams)
    return irg_loss(student_emb, teacher_emb, *irg_hparams)
  # method == "ega"
  ega_hparams = (hp["node_weight"], hp["edge_weight"], hp["pearson_eps"])
  if sharded:
    return ega_loss_row_sharded(teacher_emb, student_emb, axis_name, *ega_hparams)
  return ega_loss(teacher_emb, student_emb, *ega_hparams)
