"""Tests for ega_jax.losses.

Every loss is compared with a float64 NumPy reference written here from the
published formula (explicit loops, no code shared with the module), in x64 mode,
at several batch sizes and widths; EGA and KD are also checked against torch.
Gradients must be finite for degenerate batches (duplicate rows, a constant row,
a zero row, student == teacher) and match finite differences.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.test_util import check_grads

from ega_jax import losses

SHAPES = [(5, 3), (7, 16), (64, 32)]  # (batch, width), odd batches included.
RTOL = 1e-6


@pytest.fixture
def x64():
  """Runs the test body with 64-bit JAX arrays, without leaking to other tests."""
  with jax.enable_x64(True):
    yield


def _embeddings(seed, batch, width, scale=1.0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(batch, width)) * scale


def _assert_close(actual, expected, rtol=RTOL):
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=0)


# --------------------------------------------------------------------------- #
# Float64 references, written from the formulas.
# --------------------------------------------------------------------------- #


def ref_pearson(x, eps):
  n, d = x.shape
  out = np.zeros((n, n))
  for i in range(n):
    for j in range(n):
      ci = x[i] - x[i].sum() / d
      cj = x[j] - x[j].sum() / d
      cov = (ci * cj).sum() / (d - 1)
      var_i = (ci * ci).sum() / (d - 1)
      var_j = (cj * cj).sum() / (d - 1)
      out[i, j] = cov / (np.sqrt(var_i + eps) * np.sqrt(var_j + eps))
  return out


def ref_ega(teacher, student, node_weight, edge_weight, eps=1e-8):
  b = teacher.shape[0]
  graph = ref_pearson(np.concatenate([teacher, student]), eps)
  edge = np.sqrt(sum((graph[i, j] - graph[b + i, b + j]) ** 2 for i in range(b) for j in range(b)))
  node = np.sqrt(
    sum((graph[i, b + j] - (1.0 if i == j else 0.0)) ** 2 for i in range(b) for j in range(b))
  )
  return node_weight * node + edge_weight * edge


def ref_softmax(row):
  e = np.exp(row - row.max())
  return e / e.sum()


def ref_kl(p, q):
  return sum(p[c] * np.log(p[c] / q[c]) for c in range(len(p)))


def ref_kd(student_logits, teacher_logits, temperature):
  total = 0.0
  for s_row, t_row in zip(student_logits, teacher_logits):
    total += ref_kl(ref_softmax(t_row / temperature), ref_softmax(s_row / temperature))
  return total / len(student_logits) * temperature**2


def ref_smooth_l1_mean(a, b):
  diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).ravel()
  return np.mean([0.5 * v * v if v < 1 else v - 0.5 for v in diff])


def ref_rkd(student, teacher, w_d, w_a):
  def distances(x):
    n = len(x)
    dist = np.zeros((n, n))
    for i in range(n):
      for j in range(n):
        if i != j:
          dist[i, j] = np.sqrt(max(((x[i] - x[j]) ** 2).sum(), 1e-12))
    return dist / dist[dist > 0].mean()

  def angles(x):
    n = len(x)
    out = np.zeros((n, n, n))
    for i in range(n):
      units = []
      for j in range(n):
        v = x[j] - x[i]
        norm = np.sqrt((v * v).sum())
        units.append(v / norm if norm > 0 else np.zeros_like(v))
      units = np.stack(units)
      for j in range(n):
        out[i, j] = units @ units[j]
    return out

  return w_d * ref_smooth_l1_mean(
    distances(student), distances(teacher)
  ) + w_a * ref_smooth_l1_mean(angles(student), angles(teacher))


def ref_pkt(student, teacher, eps=1e-7):
  def probabilities(x):
    n = len(x)
    unit = np.stack([row / (np.sqrt((row**2).sum()) + eps) for row in x])
    sim = np.array([[(unit[i] * unit[j]).sum() for j in range(n)] for i in range(n)])
    sim = (sim + 1) / 2
    return sim / sim.sum(axis=1, keepdims=True)

  p_s, p_t = probabilities(student), probabilities(teacher)
  return np.mean(p_t * np.log((p_t + eps) / (p_s + eps)))


def ref_nce(student, teacher, labels, temperature):
  n = len(student)
  s = student / np.linalg.norm(student, axis=1, keepdims=True)
  t = teacher / np.linalg.norm(teacher, axis=1, keepdims=True)
  rows = []
  for i in range(n):
    p = ref_softmax(np.array([s[i] @ t[j] for j in range(n)]) / temperature)
    pos = [-np.log(p[j] + 1e-10) for j in range(n) if labels[j] == labels[i]]
    neg = [-np.log(1 - p[j] + 1e-10) for j in range(n) if labels[j] != labels[i]]
    rows.append(np.mean(pos) + (np.mean(neg) if neg else 0.0))
  return np.mean(rows)


def ref_ccl(student, teacher, labels, student_logits, teacher_logits, temperature):
  kl_ts = np.mean(
    [ref_kl(ref_softmax(t), ref_softmax(s)) for s, t in zip(student_logits, teacher_logits)]
  )
  kl_st = np.mean(
    [ref_kl(ref_softmax(s), ref_softmax(t)) for s, t in zip(student_logits, teacher_logits)]
  )
  return ref_nce(student, teacher, labels, temperature) + 0.5 * (kl_ts + kl_st)


def ref_irg(student, teacher, vertex_weight, edge_weight, squared):
  def edges(x):
    n = len(x)
    a = np.zeros((n, n))
    for i in range(n):
      for j in range(n):
        if i != j:
          sq = max(((x[i] - x[j]) ** 2).sum(), 1e-12)
          a[i, j] = sq if squared else np.sqrt(sq)
    return a / a.max()

  vertex = np.mean(
    [((student[i] - teacher[i]) ** 2).sum() / student.shape[1] for i in range(len(student))]
  )
  edge = np.mean((edges(student) - edges(teacher)) ** 2)
  return vertex_weight * vertex + edge_weight * edge


def ref_crd(
  student_proj,
  teacher_proj,
  indices,
  contrast,
  student_bank,
  teacher_bank,
  z_student,
  z_teacher,
  temperature,
  momentum,
):
  """Returns loss, new banks and Z's, following RepDistiller's CRD step by step."""
  b, k1 = contrast.shape
  n = student_bank.shape[0]
  out_teacher = np.zeros((b, k1))  # student-bank rows scored against the teacher projection
  out_student = np.zeros((b, k1))
  for i in range(b):
    for k in range(k1):
      out_teacher[i, k] = np.exp(student_bank[contrast[i, k]] @ teacher_proj[i] / temperature)
      out_student[i, k] = np.exp(teacher_bank[contrast[i, k]] @ student_proj[i] / temperature)
  if z_student < 0:
    z_student = out_student.mean() * n
  if z_teacher < 0:
    z_teacher = out_teacher.mean() * n

  def contrast_loss(scores):
    m = k1 - 1
    pn = 1.0 / n
    total = 0.0
    for i in range(b):
      total += np.log(scores[i, 0] / (scores[i, 0] + m * pn + 1e-7))
      for k in range(1, k1):
        total += np.log(m * pn / (scores[i, k] + m * pn + 1e-7))
    return -total / b

  loss = contrast_loss(out_student / z_student) + contrast_loss(out_teacher / z_teacher)
  new_student_bank = student_bank.copy()
  new_teacher_bank = teacher_bank.copy()
  for i, idx in enumerate(indices):
    v = student_bank[idx] * momentum + student_proj[i] * (1 - momentum)
    new_student_bank[idx] = v / np.sqrt((v**2).sum())
    v = teacher_bank[idx] * momentum + teacher_proj[i] * (1 - momentum)
    new_teacher_bank[idx] = v / np.sqrt((v**2).sum())
  return loss, new_student_bank, new_teacher_bank, z_student, z_teacher


# --------------------------------------------------------------------------- #
# Value tests against the references (x64).
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("batch,width", SHAPES)
def test_pearson_graph_matches_reference(x64, batch, width):
  x = _embeddings(0, batch, width) + np.linspace(-2, 2, batch)[:, None]  # different row means
  got = jax.jit(losses.pearson_graph)(x)
  _assert_close(got, ref_pearson(x, 1e-8))
  assert got.dtype == jnp.float64


def test_pearson_graph_constant_row_is_zero_not_nan(x64):
  x = _embeddings(1, 4, 6)
  x[2] = 3.0
  graph = np.asarray(losses.pearson_graph(x))
  assert np.all(np.isfinite(graph))
  np.testing.assert_array_equal(graph[2], 0.0)
  np.testing.assert_array_equal(graph[:, 2], 0.0)


@pytest.mark.parametrize("batch,width", SHAPES)
def test_ega_loss_matches_reference(x64, batch, width):
  teacher = _embeddings(2, batch, width)
  student = 0.5 * teacher + _embeddings(3, batch, width)  # correlated, so N is not trivial
  ega = jax.jit(losses.ega_loss)
  _assert_close(ega(teacher, student), ref_ega(teacher, student, 0.8, 0.24))
  _assert_close(ega(teacher, student, 1.5, 0.1), ref_ega(teacher, student, 1.5, 0.1))


def test_ega_graph_blocks_orientation(x64):
  teacher = _embeddings(4, 5, 8)
  student = _embeddings(5, 5, 8)
  teacher_edges, student_edges, node_matrix = losses.ega_graph_blocks(teacher, student)
  # N is teacher rows x student columns: N[i, j] = corr(teacher_i, student_j).
  for i in range(5):
    for j in range(5):
      expected = np.corrcoef(teacher[i], student[j])[0, 1]
      np.testing.assert_allclose(node_matrix[i, j], expected, rtol=1e-6)
      np.testing.assert_allclose(
        teacher_edges[i, j], np.corrcoef(teacher[i], teacher[j])[0, 1], rtol=1e-6
      )
      np.testing.assert_allclose(
        student_edges[i, j], np.corrcoef(student[i], student[j])[0, 1], rtol=1e-6
      )


@pytest.mark.parametrize("batch,width", [(7, 16), (64, 256)])
def test_ega_loss_matches_torch_formula(x64, batch, width):
  teacher = _embeddings(6, batch, width)
  student = _embeddings(7, batch, width)
  graph = torch.corrcoef(torch.from_numpy(np.concatenate([teacher, student])))
  e_t, e_s, n = graph[:batch, :batch], graph[batch:, batch:], graph[:batch, batch:]
  expected = (
    0.8 * torch.norm(n - torch.eye(batch, dtype=torch.float64), 2) + 0.24 * torch.norm(e_t - e_s, 2)
  ).item()
  # eps = 1e-8 in the variance changes unit-variance rows by ~1e-8 relative.
  _assert_close(losses.ega_loss(teacher, student), expected)


@pytest.mark.parametrize("batch,classes", [(5, 3), (7, 10), (64, 100)])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_matches_reference_and_torch(x64, batch, classes, temperature):
  student_logits = _embeddings(8, batch, classes, scale=3.0)
  teacher_logits = _embeddings(9, batch, classes, scale=3.0)
  got = jax.jit(losses.kd_loss, static_argnums=2)(student_logits, teacher_logits, temperature)
  _assert_close(got, ref_kd(student_logits, teacher_logits, temperature))
  torch_value = (
    F.kl_div(
      F.log_softmax(torch.from_numpy(student_logits) / temperature, dim=1),
      F.softmax(torch.from_numpy(teacher_logits) / temperature, dim=1),
      reduction="sum",
    )
    * temperature**2
    / batch
  ).item()
  _assert_close(got, torch_value)


def test_kd_loss_is_zero_for_equal_logits_and_finite_for_extreme_logits(x64):
  logits = _embeddings(10, 4, 6)
  np.testing.assert_allclose(losses.kd_loss(logits, logits, 4.0), 0.0, atol=1e-15)
  extreme = logits * 1e4  # teacher probabilities underflow to exactly 0
  assert np.isfinite(losses.kd_loss(logits, extreme, 1.0))


@pytest.mark.parametrize("batch,width", SHAPES)
def test_hint_loss_matches_reference(x64, batch, width):
  student, teacher = _embeddings(11, batch, width), _embeddings(12, batch, width)
  expected = sum(((student[i] - teacher[i]) ** 2).sum() for i in range(batch)) / (batch * width)
  _assert_close(jax.jit(losses.hint_loss)(student, teacher), expected)


@pytest.mark.parametrize(
  "batch,student_width,teacher_width", [(5, 3, 3), (7, 16, 24), (64, 32, 32)]
)
def test_rkd_loss_matches_reference(x64, batch, student_width, teacher_width):
  student = _embeddings(13, batch, student_width)
  teacher = _embeddings(14, batch, teacher_width, scale=4.0)
  rkd = jax.jit(losses.rkd_loss)
  _assert_close(rkd(student, teacher, 25.0, 50.0), ref_rkd(student, teacher, 25.0, 50.0))
  _assert_close(rkd(student, teacher, 2.0, 3.0), ref_rkd(student, teacher, 2.0, 3.0))


def test_rkd_loss_teacher_side_gets_no_gradient(x64):
  student, teacher = _embeddings(15, 6, 5), _embeddings(16, 6, 5)
  grad_teacher = jax.jit(jax.grad(losses.rkd_loss, argnums=1))(student, teacher)
  np.testing.assert_array_equal(grad_teacher, 0.0)


@pytest.mark.parametrize(
  "batch,student_width,teacher_width", [(5, 3, 3), (7, 16, 24), (64, 32, 32)]
)
def test_pkt_loss_matches_reference(x64, batch, student_width, teacher_width):
  student = _embeddings(17, batch, student_width)
  teacher = _embeddings(18, batch, teacher_width)
  _assert_close(jax.jit(losses.pkt_loss)(student, teacher), ref_pkt(student, teacher))


@pytest.mark.parametrize("batch,width", SHAPES)
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nce_loss_matches_reference(x64, batch, width, temperature):
  student, teacher = _embeddings(19, batch, width), _embeddings(20, batch, width)
  labels = np.random.default_rng(21).integers(0, 3, size=batch)
  got = jax.jit(losses.nce_loss)(student, teacher, labels, temperature)
  _assert_close(got, ref_nce(student, teacher, labels, temperature))


def test_nce_loss_single_class_batch_has_no_negative_part(x64):
  student, teacher = _embeddings(22, 5, 4), _embeddings(23, 5, 4)
  labels = np.zeros(5, np.int32)
  got = jax.jit(losses.nce_loss)(student, teacher, labels)
  assert np.isfinite(got)
  _assert_close(got, ref_nce(student, teacher, labels, 0.1))


@pytest.mark.parametrize("batch,width", SHAPES)
def test_ccl_loss_matches_reference(x64, batch, width):
  student, teacher = _embeddings(24, batch, width), _embeddings(25, batch, width)
  student_logits = _embeddings(26, batch, 10, scale=2.0)
  teacher_logits = _embeddings(27, batch, 10, scale=2.0)
  labels = np.random.default_rng(28).integers(0, 4, size=batch)
  got = jax.jit(losses.ccl_loss)(student, teacher, labels, student_logits, teacher_logits)
  _assert_close(got, ref_ccl(student, teacher, labels, student_logits, teacher_logits, 0.1))


@pytest.mark.parametrize("batch,width", SHAPES)
@pytest.mark.parametrize("squared", [True, False])
def test_irg_loss_matches_reference(x64, batch, width, squared):
  student, teacher = _embeddings(29, batch, width), _embeddings(30, batch, width, scale=2.0)
  got = jax.jit(losses.irg_loss, static_argnums=4)(student, teacher, 0.1, 5.0, squared)
  _assert_close(got, ref_irg(student, teacher, 0.1, 5.0, squared))


# --------------------------------------------------------------------------- #
# Gradients: finite on degenerate batches, correct against finite differences.
# --------------------------------------------------------------------------- #


def _degenerate_pair():
  """float32 (student, teacher) with duplicate rows, a constant row and a zero row."""
  rng = np.random.default_rng(31)
  student = rng.normal(size=(6, 8)).astype(np.float32)
  teacher = rng.normal(size=(6, 8)).astype(np.float32)
  for x in (student, teacher):
    x[1] = x[0]  # duplicate rows
    x[3] = 0.7  # constant row
    x[4] = 0.0  # zero row (also constant)
  return student, teacher


LABELS6 = np.array([0, 0, 1, 1, 2, 0], np.int32)
LOGITS6 = np.random.default_rng(32).normal(size=(2, 6, 5)).astype(np.float32)

EMBEDDING_LOSSES = {
  "ega": lambda s, t: losses.ega_loss(t, s),
  "hint": losses.hint_loss,
  "rkd": losses.rkd_loss,
  "pkt": losses.pkt_loss,
  "nce": lambda s, t: losses.nce_loss(s, t, LABELS6),
  "ccl": lambda s, t: losses.ccl_loss(s, t, LABELS6, LOGITS6[0], LOGITS6[1]),
  "irg": losses.irg_loss,
  "irg_plain": lambda s, t: losses.irg_loss(s, t, squared_distance=False),
}


@pytest.mark.parametrize("name", sorted(EMBEDDING_LOSSES))
def test_gradients_finite_on_degenerate_batches(name):
  loss_fn = EMBEDDING_LOSSES[name]
  student, teacher = _degenerate_pair()
  value_and_grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
  for s, t in [(student, teacher), (teacher, teacher), (student, student[::-1].copy())]:
    value, (grad_s, grad_t) = value_and_grads(s, t)
    assert np.isfinite(value), name
    assert np.all(np.isfinite(grad_s)) and np.all(np.isfinite(grad_t)), name
  # The non-degenerate rows do receive a gradient.
  _, (grad_s, _) = value_and_grads(student, teacher)
  assert np.abs(np.asarray(grad_s)[[0, 2, 5]]).sum() > 0, name


def test_kd_gradient_finite_for_extreme_logits():
  student_logits = LOGITS6[0]
  teacher_logits = LOGITS6[1] * 1e4
  grad = jax.jit(jax.grad(losses.kd_loss))(student_logits, teacher_logits, 4.0)
  assert np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0


@pytest.mark.parametrize("name", ["ega", "hint", "rkd", "pkt", "nce", "ccl", "irg", "irg_plain"])
def test_gradients_match_finite_differences(x64, name):
  loss_fn = EMBEDDING_LOSSES[name]
  student, teacher = _embeddings(33, 6, 8), _embeddings(34, 6, 8)
  if name == "rkd":  # the teacher side is a constant; check the student side only
    check_grads(jax.jit(lambda s: loss_fn(s, teacher)), (student,), order=1, modes=["rev"])
  else:
    check_grads(jax.jit(loss_fn), (student, teacher), order=1, modes=["rev"])


def test_kd_gradient_matches_finite_differences(x64):
  logits = _embeddings(35, 2, 6, scale=2.0)
  check_grads(
    jax.jit(lambda s, t: losses.kd_loss(s, t, 2.0)),
    (logits[0:1], logits[1:2]),
    order=1,
    modes=["rev"],
  )


def test_ega_gradient_at_student_equal_teacher_ignores_zero_edge_norm(x64):
  # With student == teacher, ||E_t - E_s|| = 0 exactly: its (sub)gradient is taken as 0,
  # so the gradient equals that of the node term alone.
  x = _embeddings(36, 5, 6)
  grad = jax.jit(jax.grad(lambda s, edge_weight: losses.ega_loss(x, s, 0.8, edge_weight)))
  full = grad(x, 0.24)
  node_only = grad(x, 0.0)
  assert np.all(np.isfinite(full))
  np.testing.assert_allclose(full, node_only, rtol=1e-12)


# --------------------------------------------------------------------------- #
# Registry.
# --------------------------------------------------------------------------- #


def _registry_inputs(batch=7, width=16, classes=10):
  rng = np.random.default_rng(37)
  return dict(
    student_emb=rng.normal(size=(batch, width)).astype(np.float32),
    teacher_emb=rng.normal(size=(batch, width)).astype(np.float32),
    labels=rng.integers(0, 3, size=batch).astype(np.int32),
    student_logits=rng.normal(size=(batch, classes)).astype(np.float32),
    teacher_logits=rng.normal(size=(batch, classes)).astype(np.float32),
  )


def test_distill_loss_dispatches_with_hparams_and_jit():
  inputs = _registry_inputs()
  hparams = {
    "node_weight": 1.1,
    "edge_weight": 0.3,
    "kd_temperature": 2.0,
    "rkd_distance_weight": 3.0,
    "rkd_angle_weight": 4.0,
    "nce_temperature": 0.2,
    "irg_vertex_weight": 0.7,
    "irg_edge_weight": 2.0,
  }
  s, t, y = inputs["student_emb"], inputs["teacher_emb"], inputs["labels"]
  ls, lt = inputs["student_logits"], inputs["teacher_logits"]
  expected = {
    "none": 0.0,
    "kd": losses.kd_loss(ls, lt, 2.0),
    "hint": losses.hint_loss(s, t),
    "rkd": losses.rkd_loss(s, t, 3.0, 4.0),
    "pkt": losses.pkt_loss(s, t),
    "nce": losses.nce_loss(s, t, y, 0.2),
    "ccl": losses.ccl_loss(s, t, y, ls, lt, 0.2),
    "irg": losses.irg_loss(s, t, 0.7, 2.0),
    "ega": losses.ega_loss(t, s, 1.1, 0.3),
  }
  assert set(expected) | {"crd"} == set(losses.DISTILL_METHODS)
  for method, value in expected.items():
    jitted = jax.jit(functools.partial(losses.distill_loss, method, hparams=hparams))(**inputs)
    np.testing.assert_allclose(jitted, value, rtol=1e-5, atol=1e-7, err_msg=method)
  # Missing keys take the documented defaults.
  np.testing.assert_allclose(
    losses.distill_loss("ega", hparams={}, **inputs), losses.ega_loss(t, s, 0.8, 0.24), rtol=1e-6
  )
  np.testing.assert_allclose(
    losses.distill_loss("kd", hparams=None, **inputs), losses.kd_loss(ls, lt, 4.0), rtol=1e-6
  )
  assert losses.DEFAULT_HPARAMS["node_weight"] == 0.8
  assert losses.DEFAULT_HPARAMS["edge_weight"] == 0.24


def test_distill_loss_errors_name_the_problem():
  inputs = _registry_inputs()
  with pytest.raises(ValueError, match=r"'fitnet'.*'none', 'kd', 'hint'.*'ega'"):
    losses.distill_loss("fitnet", hparams={}, **inputs)
  with pytest.raises(ValueError, match="crd_loss"):
    losses.distill_loss("crd", hparams={}, **inputs)
  with pytest.raises(ValueError, match=r"\['node_wieght'\].*node_weight"):
    losses.distill_loss("ega", hparams={"node_wieght": 1.0}, **inputs)
  with pytest.raises(ValueError, match="kd_temperature.*> 0"):
    losses.distill_loss("kd", hparams={"kd_temperature": 0.0}, **inputs)
  with pytest.raises(ValueError, match=r"missing \['labels'\]"):
    losses.distill_loss(
      "nce", hparams={}, student_emb=inputs["student_emb"], teacher_emb=inputs["teacher_emb"]
    )
  with pytest.raises(ValueError, match="same batch size"):
    losses.ega_loss(inputs["teacher_emb"], inputs["student_emb"][:5])
  with pytest.raises(ValueError, match="same width"):
    losses.hint_loss(inputs["student_emb"], inputs["teacher_emb"][:, :4])
  with pytest.raises(ValueError, match="labels must be a 1-D"):
    losses.nce_loss(inputs["student_emb"], inputs["teacher_emb"], inputs["labels"][:3])


# --------------------------------------------------------------------------- #
# CRD.
# --------------------------------------------------------------------------- #


def test_init_crd_memory():
  memory = losses.init_crd_memory(jax.random.key(0), num_data=500, dim=128)
  stdv = 1.0 / np.sqrt(128 / 3)
  for bank in (memory.student_bank, memory.teacher_bank):
    bank = np.asarray(bank)
    assert bank.shape == (500, 128) and bank.dtype == np.float32
    assert bank.min() >= -stdv and bank.max() <= stdv
    assert bank.min() < -0.99 * stdv and bank.max() > 0.99 * stdv  # fills the interval
    np.testing.assert_allclose(bank.std(), stdv / np.sqrt(3), rtol=0.02)  # uniform's std
  assert not np.allclose(memory.student_bank, memory.teacher_bank)
  assert float(memory.z_student) == -1.0 and float(memory.z_teacher) == -1.0


TRAIN_LABELS = np.array([2, 0, 2, 2, 4, 0, 2, 1, 2, 4, 2, 2, 0, 2, 4, 2, 2, 1, 2, 2, 4, 2, 2])


def test_build_crd_class_tables():
  tables = losses.build_crd_class_tables(TRAIN_LABELS, num_classes=6)
  sorted_indices, starts, counts = (np.asarray(a) for a in tables)
  assert sorted(sorted_indices.tolist()) == list(range(len(TRAIN_LABELS)))
  for c in range(6):
    block = sorted_indices[starts[c] : starts[c] + counts[c]]
    assert counts[c] == np.sum(TRAIN_LABELS == c)
    assert sorted(block.tolist()) == np.flatnonzero(TRAIN_LABELS == c).tolist()
  with pytest.raises(ValueError, match="single class"):
    losses.build_crd_class_tables(np.zeros(5, np.int64))
  with pytest.raises(ValueError, match="integer"):
    losses.build_crd_class_tables(TRAIN_LABELS.astype(np.float32))
  with pytest.raises(ValueError, match="num_classes=3"):
    losses.build_crd_class_tables(TRAIN_LABELS, num_classes=3)


def test_sample_crd_negatives_exact_mode():
  tables = losses.build_crd_class_tables(TRAIN_LABELS, num_classes=6)
  indices = np.array([0, 1, 7, 4, 3, 17], np.int32)  # classes 2, 0, 1, 4, 2, 1
  labels = TRAIN_LABELS[indices]
  num_negatives = 6000
  sampler = jax.jit(losses.sample_crd_negatives, static_argnums=4)
  contrast = np.asarray(sampler(jax.random.key(1), labels, indices, tables, num_negatives))
  assert contrast.shape == (6, num_negatives + 1) and contrast.dtype == np.int32
  np.testing.assert_array_equal(contrast[:, 0], indices)
  negatives = contrast[:, 1:]
  assert negatives.min() >= 0 and negatives.max() < len(TRAIN_LABELS)
  for row, label in zip(negatives, labels):
    assert not np.any(TRAIN_LABELS[row] == label)  # never the positive's class
    eligible = np.flatnonzero(TRAIN_LABELS != label)
    observed = np.bincount(row, minlength=len(TRAIN_LABELS))[eligible]
    # Uniform over the other classes' examples: chi-square far below a 6-sigma bound.
    expected = num_negatives / len(eligible)
    chi_square = np.sum((observed - expected) ** 2 / expected)
    dof = len(eligible) - 1
    assert np.all(observed > 0)
    assert chi_square < dof + 6 * np.sqrt(2 * dof), (label, chi_square)
  other = np.asarray(sampler(jax.random.key(2), labels, indices, tables, num_negatives))
  assert not np.array_equal(other, contrast)  # the key matters


def _crd_case(seed, batch, num_data, dim, num_negatives):
  rng = np.random.default_rng(seed)

  def unit(shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  student_proj, teacher_proj = unit((batch, dim)), unit((batch, dim))
  student_bank = rng.uniform(-0.3, 0.3, size=(num_data, dim))
  teacher_bank = rng.uniform(-0.3, 0.3, size=(num_data, dim))
  indices = rng.choice(num_data, size=batch, replace=False)
  contrast = np.concatenate(
    [indices[:, None], rng.integers(0, num_data, size=(batch, num_negatives))], axis=1
  )
  return student_proj, teacher_proj, indices, contrast, student_bank, teacher_bank


@pytest.mark.parametrize("batch,num_data,dim,num_negatives", [(5, 40, 8, 16), (7, 300, 128, 63)])
@pytest.mark.parametrize("z_given", [False, True])
def test_crd_loss_and_memory_update_match_reference(
  x64, batch, num_data, dim, num_negatives, z_given
):
  s, t, idx, contrast, s_bank, t_bank = _crd_case(38, batch, num_data, dim, num_negatives)
  z_s, z_t = (3.5, 7.25) if z_given else (-1.0, -1.0)
  memory = losses.CRDMemory(
    student_bank=s_bank, teacher_bank=t_bank, z_student=np.float64(z_s), z_teacher=np.float64(z_t)
  )
  loss, new_memory = jax.jit(losses.crd_loss)(s, t, idx, contrast, memory, 0.07, 0.5)
  ref_loss, ref_s_bank, ref_t_bank, ref_z_s, ref_z_t = ref_crd(
    s, t, idx, contrast, s_bank, t_bank, z_s, z_t, 0.07, 0.5
  )
  _assert_close(loss, ref_loss)
  _assert_close(new_memory.student_bank, ref_s_bank)
  _assert_close(new_memory.teacher_bank, ref_t_bank)
  _assert_close(new_memory.z_student, ref_z_s)
  _assert_close(new_memory.z_teacher, ref_z_t)
  if z_given:
    assert float(new_memory.z_student) == 3.5 and float(new_memory.z_teacher) == 7.25
  # Only the positives' rows change; they become unit vectors.
  untouched = np.setdiff1d(np.arange(num_data), idx)
  np.testing.assert_array_equal(np.asarray(new_memory.student_bank)[untouched], s_bank[untouched])
  np.testing.assert_allclose(
    np.linalg.norm(np.asarray(new_memory.teacher_bank)[idx], axis=1), 1.0, rtol=1e-12
  )


def test_crd_z_is_set_once_and_kept():
  s, t, idx, contrast, _, _ = _crd_case(39, 6, 50, 16, 20)
  s, t = s.astype(np.float32), t.astype(np.float32)
  memory = losses.init_crd_memory(jax.random.key(3), num_data=50, dim=16)
  step = jax.jit(losses.crd_loss)
  _, memory1 = step(s, t, idx, contrast, memory)
  z_s1, z_t1 = float(memory1.z_student), float(memory1.z_teacher)
  assert z_s1 > 0 and z_t1 > 0
  # Z is mean(exp(score / T)) * N of the first batch: check against the banks it saw.
  scores = np.einsum("bkd,bd->bk", np.asarray(memory.teacher_bank)[contrast], s)
  np.testing.assert_allclose(z_s1, np.exp(scores / 0.07).mean() * 50, rtol=1e-5)
  _, memory2 = step(t, s, idx[::-1], contrast[::-1], memory1)  # a different batch
  assert float(memory2.z_student) == z_s1 and float(memory2.z_teacher) == z_t1


def test_crd_gradients_reach_projections_not_memory():
  s, t, idx, contrast, _, _ = _crd_case(40, 6, 50, 16, 20)
  s, t = s.astype(np.float32), t.astype(np.float32)
  memory = losses.init_crd_memory(jax.random.key(4), num_data=50, dim=16)

  def loss_only(student_proj, teacher_proj, memory):
    return losses.crd_loss(student_proj, teacher_proj, idx, contrast, memory)[0]

  grad_s, grad_t, grad_memory = jax.jit(jax.grad(loss_only, argnums=(0, 1, 2)))(s, t, memory)
  for grad in (grad_s, grad_t):
    assert np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0
  for leaf in jax.tree_util.tree_leaves(grad_memory):
    np.testing.assert_array_equal(leaf, 0.0)


def test_crd_gradient_matches_finite_differences(x64):
  s, t, idx, contrast, s_bank, t_bank = _crd_case(41, 4, 30, 8, 10)
  memory = losses.CRDMemory(
    student_bank=s_bank, teacher_bank=t_bank, z_student=np.float64(2.0), z_teacher=np.float64(3.0)
  )
  check_grads(
    jax.jit(lambda a, b: losses.crd_loss(a, b, idx, contrast, memory)[0]),
    (s, t),
    order=1,
    modes=["rev"],
  )


# Non-default hyper-parameters, so that a row-sharded form that passed one in
# the wrong place (or dropped one for its default) would give another value.
_ROW_SHARDED_HPARAMS = {
  "node_weight": 1.5,
  "edge_weight": 0.1,
  "rkd_distance_weight": 3.0,
  "rkd_angle_weight": 7.0,
  "nce_temperature": 0.5,
  "irg_vertex_weight": 0.3,
  "irg_edge_weight": 2.0,
  "pkt_eps": 1e-2,
  "pearson_eps": 1e-3,
}
# Repeated labels whose positive pairs cross the 4 devices' 3-row blocks.
_ROW_SHARDED_LABELS = [0, 1, 2, 0, 1, 2, 3, 3, 4, 5, 0, 1]

_ROW_SHARDED_WORKER = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from ega_jax import losses

out, hparams, labels = sys.argv[1], json.loads(sys.argv[2]), np.array(json.loads(sys.argv[3]))
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("rows",))
rng = np.random.RandomState(0)
teacher = rng.normal(size=(12, 5))
student = 0.5 * teacher + rng.normal(size=(12, 5))
teacher_logits = rng.normal(size=(12, 4))
student_logits = 0.5 * teacher_logits + rng.normal(size=(12, 4))
rows = NamedSharding(mesh, P("rows"))
inputs = [jax.device_put(x, rows) for x in (student, teacher, student_logits, teacher_logits)]
local_labels = jax.device_put(labels, rows)
results = dict(teacher=teacher, student=student, teacher_logits=teacher_logits,
               student_logits=student_logits)
for method in losses.GRAPH_METHODS:
  def per_device(s, t, s_logits, t_logits, y):  # this device's 3 rows -> the loss over all 12
    gather = lambda x: jax.lax.all_gather(x, "rows", axis=0, tiled=True)
    return losses.distill_loss(
      method, student_emb=gather(s), teacher_emb=gather(t), labels=gather(y),
      student_logits=gather(s_logits), teacher_logits=gather(t_logits), hparams=hparams,
      axis_name="rows")
  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("rows"),) * 5,
                                  out_specs=P()))
  results[method + "/value"] = sharded(*inputs, local_labels)
  grads = jax.grad(sharded, argnums=(0, 1, 2, 3))(*inputs, local_labels)
  for name, grad in zip(("student", "teacher", "student_logits", "teacher_logits"), grads):
    results[method + "/grad_" + name] = grad
  # As the train step differentiates: inside the per-device body, each device's
  # share is a local term (there the cross-entropy: local sum / global count)
  # plus loss / n. The row-sharded form must give each device the same gradient
  # on its rows as the whole loss computed on every device does.
  for form, axis_name in (("sharded", "rows"), ("replicated", None)):
    def per_device_student_grad(s, t, s_logits, t_logits, y, axis_name=axis_name):
      gather = lambda x: jax.lax.all_gather(x, "rows", axis=0, tiled=True)
      def share(s):
        local_term = 0.5 * jax.numpy.sum(s ** 2) / 12
        return local_term + losses.distill_loss(
          method, student_emb=gather(s), teacher_emb=gather(t), labels=gather(y),
          student_logits=gather(s_logits), teacher_logits=gather(t_logits), hparams=hparams,
          axis_name=axis_name) / jax.lax.axis_size("rows")
      return jax.grad(share)(s)
    inside = jax.jit(jax.shard_map(per_device_student_grad, mesh=mesh,
                                   in_specs=(P("rows"),) * 5, out_specs=P("rows")))
    results[method + "/grad_student_inside_" + form] = inside(*inputs, local_labels)
# IRG with two distinct pairs at the largest distance, placed unevenly on the
# devices' 3-row blocks ({0, 1} on device 0; {4, 7} on devices 1 and 2): the
# gradient must split over the 4 tied entries as the whole matrix's max does.
# Integer coordinates keep the distances exact.
ties = rng.randint(-1, 2, size=(12, 5)).astype(np.float64)
ties[[0, 1, 4, 7]] = 0.0
ties[0, 0], ties[1, 0], ties[4, 1], ties[7, 1] = -5.0, 5.0, 5.0, -5.0
results["ties_student"] = ties
for squared in (True, False):
  def per_device_irg(s, t, squared=squared):
    gather = lambda x: jax.lax.all_gather(x, "rows", axis=0, tiled=True)
    return losses.distill_loss("irg", student_emb=gather(s), teacher_emb=gather(t),
                               hparams={**hparams, "irg_squared_distance": squared},
                               axis_name="rows")
  irg = jax.jit(jax.shard_map(per_device_irg, mesh=mesh, in_specs=(P("rows"),) * 2,
                              out_specs=P()))
  tie_inputs = (jax.device_put(ties, rows), inputs[1])
  results[f"irg_ties_{squared}/value"] = irg(*tie_inputs)
  results[f"irg_ties_{squared}/grad_student"] = jax.grad(irg)(*tie_inputs)
np.savez(out, **results)
"""


@pytest.fixture(scope="module")
def row_sharded_results(tmp_path_factory):
  """Every graph loss's row-sharded value and gradients on 4 forced CPU devices."""
  import json
  import os
  import subprocess
  import sys

  out = tmp_path_factory.mktemp("rows") / "rows.npz"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": repo}
  env.pop("XLA_FLAGS", None)
  done = subprocess.run(
    [
      sys.executable,
      "-c",
      _ROW_SHARDED_WORKER,
      str(out),
      json.dumps(_ROW_SHARDED_HPARAMS),
      json.dumps(_ROW_SHARDED_LABELS),
    ],
    env=env,
    capture_output=True,
    text=True,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return dict(np.load(out))


def _row_sharded_reference(method, student, teacher, labels, student_logits, teacher_logits):
  """The float64 NumPy formula of `method` with _ROW_SHARDED_HPARAMS."""
  hp = {**losses.DEFAULT_HPARAMS, **_ROW_SHARDED_HPARAMS}
  if method == "ega":
    return ref_ega(teacher, student, hp["node_weight"], hp["edge_weight"], hp["pearson_eps"])
  if method == "rkd":
    return ref_rkd(student, teacher, hp["rkd_distance_weight"], hp["rkd_angle_weight"])
  if method == "pkt":
    return ref_pkt(student, teacher, hp["pkt_eps"])
  if method == "nce":
    return ref_nce(student, teacher, labels, hp["nce_temperature"])
  if method == "ccl":
    return ref_ccl(student, teacher, labels, student_logits, teacher_logits, hp["nce_temperature"])
  assert method == "irg"
  return ref_irg(student, teacher, hp["irg_vertex_weight"], hp["irg_edge_weight"], True)


@pytest.mark.parametrize("method", losses.GRAPH_METHODS)
def test_row_sharded_loss_equals_the_whole_batch_on_4_devices(x64, row_sharded_results, method):
  """Value against the float64 NumPy formula, gradients against the whole-batch loss."""
  got = row_sharded_results
  labels = np.array(_ROW_SHARDED_LABELS)
  arrays = ("student", "teacher", "student_logits", "teacher_logits")
  student, teacher, student_logits, teacher_logits = (got[name] for name in arrays)
  _assert_close(
    got[method + "/value"],
    _row_sharded_reference(method, student, teacher, labels, student_logits, teacher_logits),
  )

  def whole(s, t, s_logits, t_logits):
    return losses.distill_loss(
      method,
      student_emb=s,
      teacher_emb=t,
      labels=labels,
      student_logits=s_logits,
      teacher_logits=t_logits,
      hparams=_ROW_SHARDED_HPARAMS,
    )

  whole_grads = jax.grad(whole, argnums=(0, 1, 2, 3))(
    student, teacher, student_logits, teacher_logits
  )
  assert np.abs(whole_grads[0]).sum() > 0  # the student side is really differentiated
  for name, expected in zip(arrays, whole_grads):
    np.testing.assert_allclose(
      got[method + "/grad_" + name], expected, rtol=1e-9, atol=1e-12, err_msg=name
    )
  # Inside the body, both forms give each device the whole-batch gradient (plus
  # the local term's student / B).
  for form in ("sharded", "replicated"):
    np.testing.assert_allclose(
      got[method + "/grad_student_inside_" + form],
      whole_grads[0] + student / 12,
      rtol=1e-9,
      atol=1e-12,
      err_msg=form,
    )


@pytest.mark.parametrize("squared", [True, False])
def test_row_sharded_irg_splits_tied_maxima_as_the_whole_matrix(x64, row_sharded_results, squared):
  got = row_sharded_results
  student, teacher = got["ties_student"], got["teacher"]
  hp = {**losses.DEFAULT_HPARAMS, **_ROW_SHARDED_HPARAMS}
  _assert_close(
    got[f"irg_ties_{squared}/value"],
    ref_irg(student, teacher, hp["irg_vertex_weight"], hp["irg_edge_weight"], squared),
  )
  whole = jax.grad(
    lambda s: losses.irg_loss(
      s, teacher, hp["irg_vertex_weight"], hp["irg_edge_weight"], squared_distance=squared
    )
  )(student)
  np.testing.assert_allclose(got[f"irg_ties_{squared}/grad_student"], whole, rtol=1e-9, atol=1e-12)


def test_row_sharded_forms_reject_per_example_methods_and_uneven_rows():
  with pytest.raises(ValueError, match="only the graph methods"):
    losses.distill_loss(
      "kd", student_logits=np.zeros((4, 3)), teacher_logits=np.zeros((4, 3)), axis_name="rows"
    )
  x = np.ones((3, 2), np.float32)
  # vmap's named axis of size 2 stands in for 2 devices: 3 rows cannot be split.
  with pytest.raises(ValueError, match=r"global batch \(3\) divisible by the 2 devices"):
    jax.vmap(lambda s: losses.pkt_loss_row_sharded(s, s, "pairs"), axis_name="pairs")(
      np.stack([x, x])
    )


@pytest.mark.parametrize("method", losses.GRAPH_METHODS)
def test_row_sharded_forms_trace_past_int32_counts(method):
  """B = 1,296: B**3 is above 2**31, so a normaliser kept as a Python int would not trace."""
  batch = jax.ShapeDtypeStruct((2, 1296, 8), jnp.float32)
  labels = np.zeros(1296, np.int32)

  def loss(x):
    return losses.distill_loss(
      method,
      student_emb=x,
      teacher_emb=x,
      labels=labels,
      student_logits=x,
      teacher_logits=x,
      axis_name="pair",
    )

  assert jax.eval_shape(jax.vmap(loss, axis_name="pair"), batch).shape == (2,)
