"""Step-level parity of ega_jax's train step with the released EGA training step.

The reference is a PyTorch statement of one iteration of yccm/EGA's
`helper/loops.py::train_distill` for `--distill ega` (with `train_student.py`'s
optimisers and defaults), written here from the released code with real
torch.nn modules:

* the student (RepDistiller CIFAR ResNet, BatchNorm in train mode) feeds
  `StudNet` (fit_dim_Net: Linear to feature_dim, cl_Net: classifier); the
  frozen teacher's embedding feeds `TeacNet` (same layout);
* `loss = gamma * CE(logit_s) + beta * EGA(fs, ft) + alpha * KD(logit_s, logit_t)`,
  `loss_t = CE(logit_t)`;
* `optimizer` (SGD lr 0.05, momentum 0.9, wd 5e-4) holds the student and
  StudNet, `optimizer_t` (SGD lr 0.01, momentum 0.9, wd 5e-4) holds TeacNet;
* `optimizer.zero_grad(); loss.backward(retain_graph=True);
  optimizer_t.zero_grad(); loss_t.backward(); optimizer_t.step(); optimizer.step()`:
  the EGA and KD gradients reach TeacNet through the undetached `ft`/`logit_t`
  and are then zeroed, so the teacher head learns from its cross-entropy alone.

ega_jax's step (tests/workers/released_step_worker.py, float64 under
jax_enable_x64, in a subprocess) starts from the same weights on the same
uint8 batches with the teacher's embeddings given in the batch (teacher_view
'same'), and after 5 steps the student, its BatchNorm statistics, both heads
and every per-step loss agree to 1e-6 relative. Wrong variants of the
reference (weight decay off the heads, EGA gradient into the teacher head)
must disagree by far more.

Train-mode BatchNorm makes 5 steps very sensitive to their inputs: a one-ulp
float32 difference in the normalised images, or ega_jax's default Pearson
variance floor (1e-8, not in the released PCC), each end as ~2e-5 relative in
some conv weights. So both sides read ega_jax's normalised images (PyTorch's
own normalisation is checked to be within float32 rounding of them) and the worker sets
`distill.pearson_eps = 0`, the released formula; then they agree to ~1e-14.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from benchmarks.torch_reference import build_torch_student
from ega_jax.data import get_dataset_info

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "workers", "released_step_worker.py")

# The released train_student.py defaults.
LEARNING_RATE = 0.05
LEARNING_RATE_T = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
GAMMA, BETA = 1.0, 1.0
NODE_WEIGHT, EDGE_WEIGHT = 0.8, 0.24
KD_T = 4.0

# The case (the worker's DATASET, FEATURE_DIM and TEACHER_ARCH's width).
DATASET = "cifar100"
NUM_CLASSES = 100
IMAGE_SIZE = 32
FEATURE_DIM = 32
TEACHER_DIM = 512
BATCH_SIZE = 16
NUM_STEPS = 5
TOLERANCE = 1e-6
# Cases the worker runs: (arch, alpha). alpha 0 is the released default; one
# case with alpha > 0 also checks KD and that its gradient stays off TeacNet.
CASES = (("resnet8", 0.0), ("resnet8", 0.5), ("resnet8x4", 0.0))
# A wrong reference must miss ega_jax by at least this factor times the
# tolerance, in the quantity it gets wrong first.
WRONG_BY = 100.0
WRONG_VARIANTS = {"no_head_weight_decay": "student_head", "teacher_head_gets_ega": "teacher_head"}


class ReleasedHead(nn.Module):
  """The released StudNet / TeacNet: embedding Linear, then the classifier on it.

  (StudNet also defines a Dropout it never applies.)
  """

  def __init__(self, in_features: int, feature_dim: int, num_classes: int):
    super().__init__()
    self.fit_dim_Net = nn.Linear(in_features, feature_dim)
    self.cl_Net = nn.Linear(feature_dim, num_classes)

  def forward(self, feature):
    """(B, in_features) -> (embedding (B, feature_dim), logits (B, num_classes))."""
    embedding = self.fit_dim_Net(feature)
    return embedding, self.cl_Net(embedding)


def released_pearson(rows):
  """The released PCC: (n, d) -> (n, n) Pearson correlation of the rows, no variance floor."""
  fact = 1.0 / (rows.shape[1] - 1)
  centred = rows - rows.mean(dim=1, keepdim=True)
  covariance = fact * centred @ centred.t()
  std = torch.sqrt(torch.diagonal(covariance))
  return covariance / std[:, None] / std[None, :]


def released_ega(first, second):
  """The released EGA.forward(ft, fs) on (B, D) embeddings.

  train_distill calls it as criterion_kd(fs, ft), i.e. with the student
  first; the loss is symmetric in the two (E_t - E_s flips sign, N transposes),
  and this keeps the released call.
  """
  graph = released_pearson(torch.cat([first, second], dim=0))
  n = graph.shape[0] // 2
  edge = graph[:n, :n] - graph[n:, n:]
  node = graph[:n, n:] - torch.eye(n, dtype=graph.dtype)
  # torch.norm(M, 2) of the released code flattens M: the Frobenius norm.
  return NODE_WEIGHT * torch.linalg.matrix_norm(
    node, "fro"
  ) + EDGE_WEIGHT * torch.linalg.matrix_norm(edge, "fro")


def released_kd(student_logits, teacher_logits):
  """RepDistiller's DistillKL(T): KL(p_t || p_s) summed, * T^2 / B."""
  log_p_s = F.log_softmax(student_logits / KD_T, dim=1)
  p_t = F.softmax(teacher_logits / KD_T, dim=1)
  return F.kl_div(log_p_s, p_t, reduction="sum") * KD_T**2 / student_logits.shape[0]


class BiasedRunningVariance:
  """Each BatchNorm's running variance kept from the biased batch variance.

  PyTorch's running_var averages the unbiased batch variance, ega_jax's (flax)
  the biased one (ega_jax/models/students/layers.py::batch_norm says so); the
  two differ by n / (n - 1), n = B * H * W, which the step never reads in train
  mode. This follows the same inputs with ega_jax's convention, so the batch
  variances themselves are what gets compared.
  """

  def __init__(self, model: nn.Module):
    self.values = {}
    for name, module in model.named_modules():
      if isinstance(module, nn.BatchNorm2d):
        self.values[name] = module.running_var.detach().clone()
        module.register_forward_pre_hook(self._hook(name))

  def _hook(self, name):
    def hook(module, inputs):
      if module.training:
        batch_var = inputs[0].detach().var(dim=(0, 2, 3), unbiased=False)
        self.values[name] = (1 - module.momentum) * self.values[name] + module.momentum * batch_var

    return hook


def build_modules(arch: str, seed: int):
  """Student, StudNet and TeacNet in float64, torch-initialised.

  BatchNorm affine parameters and running statistics are drawn away from
  (1, 0, 0, 1) so every one of them matters to the comparison.
  """
  torch.manual_seed(seed)
  student = build_torch_student(arch, NUM_CLASSES).double()
  with torch.no_grad():
    for module in student.modules():
      if isinstance(module, nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.2, 0.2)
        module.running_mean.uniform_(-0.2, 0.2)
        module.running_var.uniform_(0.5, 1.5)
  student_head = ReleasedHead(student.fc.in_features, FEATURE_DIM, NUM_CLASSES).double()
  teacher_head = ReleasedHead(TEACHER_DIM, FEATURE_DIM, NUM_CLASSES).double()
  return student, student_head, teacher_head


def named_state(student, student_head, teacher_head) -> dict:
  """Every parameter and BatchNorm buffer by the worker's keys, as float64 numpy."""
  state = {}
  for prefix, module in (
    ("student", student),
    ("student_head", student_head),
    ("teacher_head", teacher_head),
  ):
    for key, value in module.state_dict().items():
      if not key.endswith("num_batches_tracked"):
        state[f"{prefix}.{key}"] = value.detach().numpy().copy()
  return state


def make_batches(seed: int) -> dict:
  """NUM_STEPS batches: distinct uint8 images, labels, float32 teacher embeddings.

  Images differ in colour and layout (pure noise gives near-identical
  embeddings); embeddings are float32 so both sides read the same numbers.
  """
  rng = np.random.RandomState(seed)
  shape = (NUM_STEPS, BATCH_SIZE, IMAGE_SIZE, IMAGE_SIZE, 3)
  ramp = np.linspace(-1, 1, IMAGE_SIZE)
  base = rng.uniform(0, 255, (NUM_STEPS, BATCH_SIZE, 1, 1, 3))
  direction = rng.uniform(-60, 60, (NUM_STEPS, BATCH_SIZE, 1, 1, 1))
  pattern = direction * (ramp[:, None, None] + ramp[None, :, None])
  images = np.clip(base + pattern + rng.normal(0, 20, shape), 0, 255).astype(np.uint8)
  labels = rng.randint(0, NUM_CLASSES, (NUM_STEPS, BATCH_SIZE)).astype(np.int64)
  features = (
    rng.normal(0, 1, (NUM_STEPS, BATCH_SIZE, TEACHER_DIM))
    + rng.normal(0, 1, (NUM_STEPS, 1, TEACHER_DIM))
  ).astype(np.float32)
  return {"image": images, "label": labels, "teacher_feature": features}


def torch_normalize(images_uint8: np.ndarray) -> np.ndarray:
  """(..., H, W, 3) uint8 -> float32 (x / 255 - mean) / std, each op rounded (PyTorch's way)."""
  info = get_dataset_info(DATASET)
  images = torch.from_numpy(images_uint8).float() / 255.0
  images = (images - torch.tensor(info.mean, dtype=torch.float32)) / torch.tensor(
    info.std, dtype=torch.float32
  )
  return images.numpy()


def run_released(
  arch: str,
  alpha: float,
  init: dict,
  batches: dict,
  student_images: np.ndarray,
  variant: str = "released",
):
  """NUM_STEPS iterations of the released train_distill from `init`.

  Args:
    student_images: (NUM_STEPS, B, H, W, 3) float32, the normalised batches.
    variant: 'released', or a wrong step the test must reject:
      'no_head_weight_decay' (StudNet and TeacNet without weight decay) or
      'teacher_head_gets_ega' (TeacNet also receives the EGA/KD gradient).

  Returns:
    (final named_state, per-step losses {name: (NUM_STEPS,)}, biased running
    variances {BatchNorm key: tensor}).
  """
  student, student_head, teacher_head = build_modules(arch, seed=0)
  for prefix, module in (
    ("student", student),
    ("student_head", student_head),
    ("teacher_head", teacher_head),
  ):
    state = {
      key[len(prefix) + 1 :]: torch.from_numpy(value)
      for key, value in init.items()
      if key.startswith(prefix + ".")
    }
    missing, unexpected = module.load_state_dict(state, strict=False)
    assert not unexpected and all(key.endswith("num_batches_tracked") for key in missing)
  student.train()
  student_head.train()
  teacher_head.train()
  biased_var = BiasedRunningVariance(student)

  # The released ResNet has no fc (its forward stops at the pooled feature);
  # this one's fc is outside the loss and kept out of the optimiser.
  backbone = [p for name, p in student.named_parameters() if not name.startswith("fc.")]
  head_decay = 0.0 if variant == "no_head_weight_decay" else WEIGHT_DECAY
  optimizer = torch.optim.SGD(
    [{"params": backbone}, {"params": student_head.parameters(), "weight_decay": head_decay}],
    lr=LEARNING_RATE,
    momentum=MOMENTUM,
    weight_decay=WEIGHT_DECAY,
  )
  optimizer_t = torch.optim.SGD(
    teacher_head.parameters(), lr=LEARNING_RATE_T, momentum=MOMENTUM, weight_decay=head_decay
  )

  losses = {name: [] for name in ("loss", "ce", "distill", "kd", "teacher_ce")}
  for step in range(NUM_STEPS):
    images = torch.from_numpy(student_images[step]).double().permute(0, 3, 1, 2)
    target = torch.from_numpy(batches["label"][step])
    feat_t = torch.from_numpy(batches["teacher_feature"][step]).double()
    _, feat_s = student(images)  # (its fc logits, pooled feature); the logits are unused
    fs, logit_s = student_head(feat_s)
    ft, logit_t = teacher_head(feat_t)
    loss_cls = F.cross_entropy(logit_s, target)
    loss_cls_t = F.cross_entropy(logit_t, target)
    loss_div = released_kd(logit_s, logit_t)
    loss_kd = released_ega(fs, ft)
    loss = GAMMA * loss_cls + BETA * loss_kd + alpha * loss_div

    optimizer.zero_grad()
    if variant == "teacher_head_gets_ega":
      optimizer_t.zero_grad()  # before, not after, the student's backward
    loss.backward(retain_graph=True)
    if variant != "teacher_head_gets_ega":
      optimizer_t.zero_grad()
    loss_cls_t.backward()
    optimizer_t.step()
    optimizer.step()
    for name, value in (
      ("loss", loss),
      ("ce", loss_cls),
      ("distill", loss_kd),
      ("kd", loss_div),
      ("teacher_ce", loss_cls_t),
    ):
      losses[name].append(value.item())
  return (
    named_state(student, student_head, teacher_head),
    {name: np.array(values) for name, values in losses.items()},
    biased_var.values,
  )


def relative_error(actual, expected) -> float:
  """max |actual - expected| / max |expected|."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-300))


def compare(jax_out: dict, init: dict, reference, alpha: float) -> dict[str, float]:
  """Largest relative error per quantity of ega_jax's run against a reference run.

  'student' covers the backbone's parameters (not its unused fc), 'bn_mean'
  and 'bn_var' the running statistics (var against the biased convention),
  'updates' the change from the initial weights of every parameter (a
  stricter measure: the weights themselves are dominated by the start),
  'torch_running_var' PyTorch's own (unbiased) running_var, reported only.

  Args:
    jax_out: the worker's outputs; init: the starting weights (named_state);
    reference: run_released's result; alpha: the case's KD weight.
  """
  final, losses, biased_var = reference
  errors = {
    "student": 0.0,
    "student_head": 0.0,
    "teacher_head": 0.0,
    "bn_mean": 0.0,
    "bn_var": 0.0,
    "updates": 0.0,
    "torch_running_var": 0.0,
  }
  for key, expected in final.items():
    if key.startswith("student.fc."):
      continue
    actual = jax_out[f"final/{key}"]
    assert actual.dtype == np.float64, (key, actual.dtype)
    if key.endswith("running_mean"):
      errors["bn_mean"] = max(errors["bn_mean"], relative_error(actual, expected))
    elif key.endswith("running_var"):
      shadow = biased_var[key[len("student.") : -len(".running_var")]].numpy()
      errors["bn_var"] = max(errors["bn_var"], relative_error(actual, shadow))
      errors["torch_running_var"] = max(
        errors["torch_running_var"], relative_error(actual, expected)
      )
    else:
      group = key.split(".")[0]
      errors[group] = max(errors[group], relative_error(actual, expected))
      errors["updates"] = max(
        errors["updates"], relative_error(actual - init[key], expected - init[key])
      )
  for name, expected in losses.items():
    actual = jax_out[f"metric/{name}"]
    if name == "kd" and not alpha:
      # ega_jax skips KD at alpha 0 (its metric is 0); the released loop
      # computes it with weight 0.
      errors["loss/kd"] = float(np.max(np.abs(actual)))
      continue
    errors[f"loss/{name}"] = relative_error(actual, expected)
  return errors


def case_id(case) -> str:
  return f"{case[0]}-alpha{case[1]:g}"


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory):
  """{case: (init weights, batches, ega_jax outputs)}; one worker process for every case."""
  root = tmp_path_factory.mktemp("released_step")
  inputs, args = {}, []
  for index, (arch, alpha) in enumerate(CASES):
    init = named_state(*build_modules(arch, seed=0))
    batches = make_batches(seed=index + 1)
    case_path, out_path = root / f"case{index}.npz", root / f"out{index}.npz"
    np.savez(
      case_path,
      arch=arch,
      alpha=alpha,
      num_classes=NUM_CLASSES,
      **batches,
      **{f"init/{key}": value for key, value in init.items()},
    )
    inputs[(arch, alpha)] = (init, batches, out_path)
    args += [str(case_path), str(out_path)]
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = REPO  # the worker imports ega_jax and configs from this checkout
  result = subprocess.run(
    [sys.executable, WORKER, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=900
  )
  assert result.returncode == 0, result.stderr[-4000:]
  return {
    case: (init, batches, dict(np.load(out_path)))
    for case, (init, batches, out_path) in inputs.items()
  }


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_released_step(parity_runs, case):
  init, batches, jax_out = parity_runs[case]
  assert int(jax_out["skipped_steps"]) == 0
  # The shared input is PyTorch's normalisation up to float32 rounding (XLA's
  # fused multiply-add rounds x / 255 - mean once, PyTorch twice).
  np.testing.assert_allclose(
    jax_out["normalized"],
    torch_normalize(batches["image"]),
    rtol=0,
    atol=4 * np.finfo(np.float32).eps,
  )
  errors = compare(
    jax_out, init, run_released(*case, init, batches, jax_out["normalized"]), case[1]
  )
  print(case_id(case), {name: f"{value:.1e}" for name, value in errors.items()})
  # PyTorch's own running_var (unbiased) is ~1/(n-1) off by convention; see
  # BiasedRunningVariance.
  checked = {name: value for name, value in errors.items() if name != "torch_running_var"}
  assert max(checked.values()) <= TOLERANCE, checked


@pytest.mark.parametrize("variant", sorted(WRONG_VARIANTS))
def test_wrong_reference_fails(parity_runs, variant):
  """The comparison can fail: a wrong released step misses ega_jax by far."""
  case = ("resnet8", 0.0)
  init, batches, jax_out = parity_runs[case]
  reference = run_released(*case, init, batches, jax_out["normalized"], variant=variant)
  errors = compare(jax_out, init, reference, case[1])
  print(variant, {name: f"{value:.1e}" for name, value in errors.items()})
  assert errors[WRONG_VARIANTS[variant]] > WRONG_BY * TOLERANCE, errors
