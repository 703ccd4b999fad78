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

Matrix products use `Precision.HIGHEST` (see `_common`).

Every graph loss (GRAPH_METHODS) also has a `*_row_sharded` form, for use
inside shard_map / pmap: with the same gathered inputs on each of n devices,
device r computes only its B/n rows of the graph and the sums are assembled
with `psum`, so every device returns the whole-batch value while its share of
the O(B^2) work and memory falls as 1/n. `distill_loss(..., axis_name=...)`
picks them.

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

Modules:
  _common       numerically safe helpers and input checks (private).
  graph         pearson_graph, ega_graph_blocks, ega_loss, ega_loss_row_sharded.
  logits        kd_loss, hint_loss.
  relational    rkd_loss, pkt_loss, irg_loss (and their *_row_sharded forms).
  contrastive   nce_loss, ccl_loss (and their *_row_sharded forms).
  crd           CRDMemory, CRDClassTables, negative sampling, crd_loss.
  registry      DISTILL_METHODS, GRAPH_METHODS, DEFAULT_HPARAMS, distill_loss.
"""

from ega_jax.losses.contrastive import (
  ccl_loss,
  ccl_loss_row_sharded,
  nce_loss,
  nce_loss_row_sharded,
)
from ega_jax.losses.crd import (
  CRDClassTables,
  CRDMemory,
  build_crd_class_tables,
  crd_loss,
  init_crd_memory,
  sample_crd_negatives,
)
from ega_jax.losses.graph import ega_graph_blocks, ega_loss, ega_loss_row_sharded, pearson_graph
from ega_jax.losses.logits import hint_loss, kd_loss
from ega_jax.losses.registry import DEFAULT_HPARAMS, DISTILL_METHODS, GRAPH_METHODS, distill_loss
from ega_jax.losses.relational import (
  irg_loss,
  irg_loss_row_sharded,
  pkt_loss,
  pkt_loss_row_sharded,
  rkd_loss,
  rkd_loss_row_sharded,
)

__all__ = [
  "DISTILL_METHODS",
  "GRAPH_METHODS",
  "DEFAULT_HPARAMS",
  "distill_loss",
  "pearson_graph",
  "ega_graph_blocks",
  "ega_loss",
  "ega_loss_row_sharded",
  "kd_loss",
  "hint_loss",
  "rkd_loss",
  "rkd_loss_row_sharded",
  "pkt_loss",
  "pkt_loss_row_sharded",
  "irg_loss",
  "irg_loss_row_sharded",
  "nce_loss",
  "nce_loss_row_sharded",
  "ccl_loss",
  "ccl_loss_row_sharded",
  "CRDMemory",
  "CRDClassTables",
  "init_crd_memory",
  "build_crd_class_tables",
  "sample_crd_negatives",
  "crd_loss",
]
