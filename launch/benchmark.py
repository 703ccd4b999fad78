r"""Times the production train step on synthetic data, optionally against PyTorch.

  python launch/benchmark.py --config=configs/cifar100.py --teacher clip_vit_b32 \
      --student resnet8x4 --batch_size 64 --steps 20 --warmup 3 --compare-torch \
      --json bench.json

What is timed is exactly what `python -m ega_jax.main` runs: `train.compile_steps`
over a ('data',) mesh of all local devices, with the state from
`train.init_train_state` and synthetic uint8 batches (student and teacher views
at the dataset's image size) made into global arrays by
`train.global_batch_from_local`. The teacher has random weights
(`create_teacher(arch).init`), so no converted checkpoint is needed; its
resolution, mean and std come from `TEACHER_SPECS`.

Reported (table on stdout, everything in --json):
  * compile time (lowering and XLA compilation of the step, then its first call);
  * steady-state step time: median of --steps timed calls after --warmup
    untimed ones, each waited for with `block_until_ready`; steps/s, images/s;
  * FLOPs per step from XLA's cost analysis of the compiled step (the
    per-device program, times the device count), achieved FLOP/s;
  * the device's measured peak: a jitted N x N @ N x N matmul in the requested
    dtype, timed the same way, 2 N^3 FLOPs; MFU = achieved / measured peak;
  * the teacher's share: its forward pass (resize, normalise, backbone) on one
    device's slice, compiled and timed on its own;
  * peak host memory (maxrss of this process; the JAX part is read before
    PyTorch builds its models).

Timings are taken in rounds: each round runs the step, the teacher alone, the
peak matmul and (with --compare-torch) the PyTorch step once each, so on a
machine shared with other jobs they all see the same load and their ratios
(MFU, JAX / PyTorch) stay meaningful while the absolute numbers move.

--compare-torch also times a PyTorch implementation of the same step on the
same machine, in the same run (written below, independent of ega_jax): the
frozen teacher (clip-anytorch for clip_*, torchvision for resnet*, timm for
vit_*) in eval mode under no_grad on the image bicubic-resized to its
resolution and normalised, a CIFAR ResNet student (RepDistiller layout) in
train mode, the same heads (Linear to feature_dim + classifier on each side),
EGA + cross-entropy for the student and the teacher head's own cross-entropy,
each with its own SGD (momentum, weight decay), float32.
"""

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # Run as a script: make the repository importable.
  sys.path.insert(0, REPO)

DTYPE_NAMES = ("float32", "bfloat16")

# PyTorch CIFAR students: name -> (depth, (stem, stage1, stage2, stage3) widths).
TORCH_STUDENTS = {
    **{f"resnet{depth}": (depth, (16, 16, 32, 64)) for depth in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}
# timm model names of the timm/DINO teachers.
TIMM_NAMES = {
    "vit_s16": "vit_small_patch16_224",
    "vit_s8": "vit_small_patch8_224",
    "vit_b16": "vit_base_patch16_224",
    "vit_b8": "vit_base_patch8_224",
}


class BenchmarkError(ValueError):
  """A flag or config value that cannot be benchmarked; reported as one line."""


# ---------------------------------------------------------------------------
# Generic measurement helpers.


def peak_host_memory_mb() -> float:
  """Peak resident memory of this process so far (getrusage maxrss), in MiB."""
  maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  # Linux reports KiB, macOS bytes.
  return maxrss / (1024.0 * 1024.0) if sys.platform == "darwin" else maxrss / 1024.0


@dataclasses.dataclass
class TimedCall:
  """One thing to time.

  Attributes:
    name: key of its times in the result of `time_interleaved`.
    call: () -> result; runs it once (it may update state it closes over).
    wait: result -> None; blocks until the result is computed (e.g.
      jax.block_until_ready), so each time covers the whole computation.
  """

  name: str
  call: Callable[[], Any]
  wait: Callable[[Any], None]


def time_interleaved(calls: list[TimedCall], num_warmup: int,
                     num_timed: int) -> dict[str, list[float]]:
  """Seconds of each call in `num_timed` rounds, after `num_warmup` untimed calls of each.

  Every round times each call once, in order, so on a machine shared with
  other jobs all the timings (the step, its parts, the peak matmul, PyTorch)
  see the same load, and their ratios stay meaningful when it changes.
  """
  for timed in calls:
    for _ in range(num_warmup):
      timed.wait(timed.call())
  times = {timed.name: [] for timed in calls}
  for _ in range(num_timed):
    for timed in calls:
      start = time.perf_counter()
      timed.wait(timed.call())
      times[timed.name].append(time.perf_counter() - start)
  return times


def summarise_times(times: list[float]) -> dict:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "all_s": times}


def xla_flops(compiled) -> float:
  """FLOPs of a compiled JAX computation, from XLA's cost analysis.

  `jax.stages.Compiled.cost_analysis()` returns a dict in jax 0.10 (older
  versions: a list with one dict per program); under shard_map the program is
  the per-device one, so this is the FLOP count of one device.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, dict):
    analysis = [analysis]
  if not analysis or any(not entry or "flops" not in entry for entry in analysis):
    raise RuntimeError(f"XLA's cost analysis gave no 'flops' entry: {analysis!r}.")
  return float(sum(entry["flops"] for entry in analysis))


def prepare_peak_matmul(size: int, dtype_name: str) -> tuple[TimedCall, dict]:
  """A jitted (size, size) @ (size, size) matmul on the default device, compiled.

  Returns:
    its TimedCall ('peak_matmul') and {'size', 'dtype', 'flops' (2 size^3),
    'xla_flops' (XLA's count of the compiled matmul)}.
  """
  import jax
  import jax.numpy as jnp

  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
  key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(key_a, (size, size), jnp.float32).astype(dtype)
  b = jax.random.normal(key_b, (size, size), jnp.float32).astype(dtype)
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  timed = TimedCall("peak_matmul", lambda: compiled(a, b), jax.block_until_ready)
  return timed, {"size": size, "dtype": dtype_name, "flops": 2.0 * size**3,
                 "xla_flops": xla_flops(compiled)}


def peak_matmul_result(info: dict, times: list[float]) -> dict:
  median = statistics.median(times)
  return {**info, **summarise_times(times), "flops_per_sec": info["flops"] / median}


def measure_peak_matmul(size: int, dtype_name: str, num_warmup: int, num_timed: int) -> dict:
  """Times the matmul of `prepare_peak_matmul` on its own.

  Returns:
    'size', 'dtype', 'flops', 'xla_flops', the times ('median_s', ...) and
    'flops_per_sec' (2 size^3 / median time).
  """
  timed, info = prepare_peak_matmul(size, dtype_name)
  times = time_interleaved([timed], num_warmup, num_timed)
  return peak_matmul_result(info, times["peak_matmul"])


# ---------------------------------------------------------------------------
# Configuration.


def load_config(path: str):
  """Returns get_config() of an ml_collections config file (configs/*.py)."""
  candidates = [path, os.path.join(REPO, path)]
  found = next((p for p in candidates if os.path.isfile(p)), None)
  if found is None:
    raise BenchmarkError(f"--config={path!r} is not a file; use e.g. configs/cifar100.py.")
  spec = importlib.util.spec_from_file_location("benchmark_config", found)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise BenchmarkError(f"--config={path!r} defines no get_config().")
  return module.get_config()


def apply_flags(config, args):
  """Copies the flags that override config fields into the config and checks them."""
  from ega_jax import data as data_lib
  from ega_jax import losses
  from ega_jax import models as models_lib

  if args.teacher is not None:
    config.teacher.arch = args.teacher
  if args.student is not None:
    config.student.arch = args.student
  if args.batch_size is not None:
    config.batch_size = args.batch_size
  if args.dtype is not None:
    config.dtype = args.dtype
  if args.method is not None:
    config.distill.method = args.method
  checks = (
      ("--teacher", config.teacher.arch, tuple(models_lib.TEACHER_SPECS)),
      ("--student", config.student.arch, models_lib.STUDENT_NAMES),
      ("--method", config.distill.method, losses.DISTILL_METHODS),
      ("--dtype", config.dtype, DTYPE_NAMES),
      ("config.dataset.name", config.dataset.name, tuple(data_lib.DATASETS)),
  )
  for flag, value, valid in checks:
    if value not in valid:
      raise BenchmarkError(f"{flag}={value!r} is not valid; valid: {', '.join(valid)}.")
  if config.batch_size < 2:
    raise BenchmarkError(f"--batch_size={config.batch_size} must be at least 2 (the graph "
                         "losses and BatchNorm need two rows).")
  if args.steps < 1 or args.warmup < 0:
    raise BenchmarkError(f"--steps={args.steps} must be >= 1 and --warmup={args.warmup} >= 0.")
  if args.teacher_cache:
    from ega_jax import train

    if not train.uses_teacher(config):
      raise BenchmarkError(f"--teacher_cache needs a step with a teacher; --method="
                           f"{config.distill.method!r} with alpha=0 has none.")
    if args.cache_views != "all" and not (
        args.cache_views.isdigit() and int(args.cache_views) >= 1):
      raise BenchmarkError(f"--cache_views={args.cache_views!r} is not valid; use 'all' or a "
                           "positive number of views.")
  if args.compare_torch:
    if config.student.arch not in TORCH_STUDENTS:
      raise BenchmarkError(
          f"--compare-torch has PyTorch students {', '.join(TORCH_STUDENTS)} only, not "
          f"--student={config.student.arch!r}.")
    if config.distill.method != "ega" or config.distill.alpha:
      raise BenchmarkError(
          f"--compare-torch implements the EGA step (config.distill.alpha=0) only, not "
          f"--method={config.distill.method!r} with alpha={config.distill.alpha}.")
  return config


def synthetic_local_batches(count: int, batch_size: int, image_size: int, num_classes: int,
                            num_train: int, seed: int):
  """`count` random batches shaped like the train loader's output (this process's rows).

  Returns:
    list of {'image', 'teacher_image': (b, H, W, 3) uint8, 'label': (b,) int32,
    'index': (b,) int32}.
  """
  import numpy as np

  rng = np.random.default_rng(seed)
  shape = (batch_size, image_size, image_size, 3)
  return [{
      "image": rng.integers(0, 256, shape, dtype=np.uint8),
      "teacher_image": rng.integers(0, 256, shape, dtype=np.uint8),
      "label": rng.integers(0, num_classes, (batch_size,), dtype=np.int32),
      "index": rng.integers(0, num_train, (batch_size,), dtype=np.int32),
  } for _ in range(count)]


# ---------------------------------------------------------------------------
# JAX: the production step.


def prepare_jax(config, args, local_batches) -> tuple[list[TimedCall], dict, Callable]:
  """Builds and compiles train.compile_steps' train step (and the teacher alone).

  Returns:
    (timed calls 'jax_step' [+ 'jax_teacher_forward' when the method uses the
    teacher], facts measured once: compile times, first step, FLOPs, ...,
    last_loss(): the loss of the latest step run).
  """
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh
  import numpy as np

  from ega_jax import data as data_lib
  from ega_jax import losses
  from ega_jax import models as models_lib
  from ega_jax import train

  devices = np.array(jax.local_devices())
  num_devices = len(devices)
  if config.batch_size % num_devices:
    raise BenchmarkError(f"--batch_size={config.batch_size} must be a multiple of the "
                         f"device count ({num_devices}).")
  mesh = Mesh(devices, (train.AXIS,))
  info = data_lib.get_dataset_info(config.dataset.name)
  spec = models_lib.TEACHER_SPECS[config.teacher.arch]
  teacher_image_size = args.teacher_image_size or spec.image_size
  try:
    teacher_module = models_lib.create_teacher(config.teacher.arch, image_size=teacher_image_size)
  except ValueError as error:
    raise BenchmarkError(f"--teacher_image_size={teacher_image_size}: {error}") from error
  # Random weights are all a timing needs; drawn with 'unsafe_rbg', whose
  # initialiser compiles ~3x faster on CPU than the default threefry's.
  teacher_host_variables = jax.jit(teacher_module.init)(
      jax.random.key(args.seed, impl="unsafe_rbg"),
      jnp.zeros((1, teacher_image_size, teacher_image_size, 3), jnp.float32))
  teacher_meta = {"image_size": teacher_image_size, "mean": spec.mean, "std": spec.std}
  models = train.build_models(config, teacher_module, teacher_meta, info.num_classes)
  student_tx, teacher_head_tx = train.create_optimizers(config, info.num_train)
  # Drawn with 'unsafe_rbg' (threefry's initialiser compiles ~4x slower); the
  # state then gets the production (threefry) key, so the step sees the same types.
  host_state = train.create_train_state(
      config, models, teacher_host_variables, jax.random.key(args.seed, impl="unsafe_rbg"),
      (info.image_size, info.image_size, 3), info.num_train, student_tx, teacher_head_tx)
  host_state = host_state.replace(rng=jax.random.PRNGKey(args.seed))
  state = train.replicate(host_state, mesh)
  # The cached step gets its own copy: each step donates its state.
  cached_state = train.replicate(host_state, mesh) if args.teacher_cache else None
  teacher_variables = train.replicate(teacher_host_variables, mesh)
  crd_tables = {}
  if config.distill.method == "crd":
    synthetic_labels = np.arange(info.num_train, dtype=np.int32) % info.num_classes
    crd_tables = train.replicate(losses.build_crd_class_tables(synthetic_labels), mesh)
  del host_state
  # Global batches are made before timing, as train.DevicePrefetcher keeps
  # them in flight ahead of the step; the host ships uint8 only.
  batches = [train.global_batch_from_local(mesh, b) for b in local_batches]

  train_fn, _, _ = train.compile_steps(mesh, models, config, student_tx, teacher_head_tx)
  start = time.perf_counter()
  lowered = train_fn.lower(state, teacher_variables, batches[0], crd_tables)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  flops_per_device = xla_flops(compiled)

  step_count = [0]
  latest_metrics = []

  def run_step():
    nonlocal state
    batch = batches[step_count[0] % len(batches)]
    step_count[0] += 1
    # The step donates its state: always continue from the returned one.
    state, metrics = compiled(state, teacher_variables, batch, crd_tables)
    latest_metrics[:] = [metrics]
    return state, metrics

  start = time.perf_counter()
  jax.block_until_ready(run_step())
  first_step_s = time.perf_counter() - start
  facts = {
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "num_devices": num_devices,
      "teacher_image_size": teacher_image_size,
      "lower_s": lower_s,
      "compile_s": compile_s,
      "first_step_s": first_step_s,
      "first_loss": float(latest_metrics[0]["loss"]),
      "flops_per_step_per_device": flops_per_device,
      "flops_per_step": flops_per_device * num_devices,
  }
  calls = [TimedCall("jax_step", run_step, jax.block_until_ready)]
  if train.uses_teacher(config):
    # The teacher alone on one device's slice: resize + normalise + backbone.
    per_device_batch = config.batch_size // num_devices

    def teacher_forward(variables, images_uint8):
      return train.teacher_embedding(
          models.teacher, variables, images_uint8, models.teacher_image_size,
          models.teacher_mean, models.teacher_std, models.dtype)

    single_device_variables = jax.device_put(teacher_host_variables, devices[0])
    teacher_source = jax.device_put(
        local_batches[0]["teacher_image"][:per_device_batch], devices[0])
    teacher_compiled = jax.jit(teacher_forward).lower(
        single_device_variables, teacher_source).compile()
    facts["teacher_forward_flops_per_device"] = xla_flops(teacher_compiled)
    calls.append(TimedCall(
        "jax_teacher_forward", lambda: teacher_compiled(single_device_variables, teacher_source),
        jax.block_until_ready))
  if args.teacher_cache:
    # The same step reading cached float16 teacher embeddings (what
    # config.teacher.cache feeds it): the teacher neither runs nor sits on
    # the devices.
    feature_dim = jax.eval_shape(
        models.teacher.apply, teacher_host_variables,
        jnp.zeros((1, teacher_image_size, teacher_image_size, 3), jnp.float32)).shape[-1]
    rng = np.random.default_rng(args.seed + 1)
    cached_batches = [train.global_batch_from_local(mesh, {
        "image": b["image"], "label": b["label"], "index": b["index"],
        "teacher_feature": rng.standard_normal((len(b["label"]), feature_dim)).astype(
            np.float16)}) for b in local_batches]
    no_teacher = train.replicate({}, mesh)
    start = time.perf_counter()
    cached_compiled = train_fn.lower(
        cached_state, no_teacher, cached_batches[0], crd_tables).compile()
    facts["cached_compile_s"] = time.perf_counter() - start
    facts["cached_flops_per_step_per_device"] = xla_flops(cached_compiled)
    facts["cached_flops_per_step"] = facts["cached_flops_per_step_per_device"] * num_devices
    facts["teacher_feature_dim"] = int(feature_dim)
    cached_count = [0]

    def run_cached_step():
      nonlocal cached_state
      batch = cached_batches[cached_count[0] % len(cached_batches)]
      cached_count[0] += 1
      cached_state, metrics = cached_compiled(cached_state, no_teacher, batch, crd_tables)
      return cached_state, metrics

    jax.block_until_ready(run_cached_step())
    calls.append(TimedCall("jax_cached_step", run_cached_step, jax.block_until_ready))
  return calls, facts, lambda: float(latest_metrics[0]["loss"])


def jax_result(facts: dict, times: dict[str, list[float]], batch_size: int,
               last_loss: float) -> dict:
  step_s = statistics.median(times["jax_step"])
  result = {
      **facts,
      "step_time": summarise_times(times["jax_step"]),
      "steps_per_sec": 1.0 / step_s,
      "images_per_sec": batch_size / step_s,
      "achieved_flops_per_sec_per_device": facts["flops_per_step_per_device"] / step_s,
      "achieved_flops_per_sec": facts["flops_per_step"] / step_s,
      "last_loss": last_loss,
  }
  if "jax_teacher_forward" in times:
    teacher_times = times["jax_teacher_forward"]
    result["teacher_forward"] = {
        "flops_per_device": facts["teacher_forward_flops_per_device"],
        "flops_fraction": (facts["teacher_forward_flops_per_device"]
                           / facts["flops_per_step_per_device"]),
        "time": summarise_times(teacher_times),
        "time_fraction": statistics.median(teacher_times) / step_s,
    }
  if "jax_cached_step" in times:
    cached_s = statistics.median(times["jax_cached_step"])
    result["cached"] = {
        "compile_s": facts["cached_compile_s"],
        "step_time": summarise_times(times["jax_cached_step"]),
        "steps_per_sec": 1.0 / cached_s,
        "images_per_sec": batch_size / cached_s,
        "flops_per_step": facts["cached_flops_per_step"],
        "achieved_flops_per_sec_per_device": facts["cached_flops_per_step_per_device"] / cached_s,
        "teacher_feature_dim": facts["teacher_feature_dim"],
    }
  return result


def cache_economics(num_train: int, batch_size: int, num_epochs: float, num_views: int,
                    live_step_s: float, cached_step_s: float, teacher_batch_s: float,
                    torch_step_s: float | None) -> dict:
  """Epoch times with and without the cache, and the cache's build cost.

  Building K views runs the teacher over K x num_train images, at the timed
  teacher-alone rate (batch_size images per `teacher_batch_s`); "amortised"
  spreads that over `num_epochs` epochs of cached training.
  """
  steps = num_train // batch_size
  build_s = num_views * num_train / batch_size * teacher_batch_s
  result = {
      "num_train": num_train, "steps_per_epoch": steps, "num_epochs": num_epochs,
      "num_views": num_views,
      "live_epoch_s": steps * live_step_s,
      "cached_epoch_s": steps * cached_step_s,
      "cache_build_s": build_s,
      "cached_epoch_amortised_s": steps * cached_step_s + build_s / num_epochs,
  }
  if torch_step_s is not None:
    result["torch_epoch_s"] = steps * torch_step_s
    result["cached_over_torch_per_epoch"] = result["torch_epoch_s"] / result["cached_epoch_s"]
    result["cached_amortised_over_torch_per_epoch"] = (
        result["torch_epoch_s"] / result["cached_epoch_amortised_s"])
  return result


# ---------------------------------------------------------------------------
# PyTorch: the same step, written independently of ega_jax.


def build_torch_modules():
  """Defines the PyTorch modules (torch is imported lazily, before any tensorflow)."""
  import torch
  from torch import nn

  class TorchCifarBasicBlock(nn.Module):
    """RepDistiller's BasicBlock: conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int):
      super().__init__()
      self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.downsample = None
      if stride != 1 or in_planes != planes:
        self.downsample = nn.Sequential(
            nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
      out = torch.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      shortcut = x if self.downsample is None else self.downsample(x)
      return torch.relu(out + shortcut)

  class TorchCifarResNet(nn.Module):
    """RepDistiller's CIFAR ResNet (depth 6n + 2); forward gives (logits, pooled feature)."""

    def __init__(self, depth: int, widths, num_classes: int):
      super().__init__()
      blocks_per_stage = (depth - 2) // 6
      self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(widths[0])
      stages, in_planes = [], widths[0]
      for planes, stride in zip(widths[1:], (1, 2, 2)):
        blocks = []
        for index in range(blocks_per_stage):
          blocks.append(TorchCifarBasicBlock(in_planes, planes, stride if index == 0 else 1))
          in_planes = planes
        stages.append(nn.Sequential(*blocks))
      self.stages = nn.Sequential(*stages)
      self.fc = nn.Linear(widths[3], num_classes)
      for module in self.modules():
        if isinstance(module, nn.Conv2d):
          nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images):
      """(B, 3, H, W) -> (logits (B, num_classes), feature (B, widths[3]))."""
      x = torch.relu(self.bn1(self.conv1(images)))
      # Pool the whole final map (RepDistiller's AvgPool2d(8) at 32x32).
      feature = self.stages(x).mean(dim=(2, 3))
      return self.fc(feature), feature

  class TorchEmbeddingHead(nn.Module):
    """Linear node embedding to feature_dim, then the classifier on the embedding."""

    def __init__(self, in_features: int, feature_dim: int, num_classes: int):
      super().__init__()
      self.embed = nn.Linear(in_features, feature_dim)
      self.classifier = nn.Linear(feature_dim, num_classes)

    def forward(self, feature):
      embedding = self.embed(feature)
      return embedding, self.classifier(embedding)

  return TorchCifarResNet, TorchEmbeddingHead


def torch_pearson_graph(x, eps: float = 1e-8):
  """(n, d) -> (n, n) Pearson correlation of the rows (variance floor eps)."""
  import torch

  centred = x - x.mean(dim=1, keepdim=True)
  covariance = centred @ centred.t() / (x.shape[1] - 1)
  std = torch.sqrt(centred.pow(2).sum(dim=1) / (x.shape[1] - 1) + eps)
  return covariance / (std[:, None] * std[None, :])


def torch_ega_loss(teacher_emb, student_emb, node_weight: float = 0.8,
                   edge_weight: float = 0.24):
  """EGA on (B, D) embeddings: node_weight ||N - I||_F + edge_weight ||E_t - E_s||_F."""
  import torch

  batch = teacher_emb.shape[0]
  graph = torch_pearson_graph(torch.cat([teacher_emb, student_emb], dim=0))
  teacher_edges, student_edges = graph[:batch, :batch], graph[batch:, batch:]
  node_matrix = graph[:batch, batch:]
  identity = torch.eye(batch, dtype=graph.dtype, device=graph.device)
  return (node_weight * torch.linalg.matrix_norm(node_matrix - identity)
          + edge_weight * torch.linalg.matrix_norm(teacher_edges - student_edges))


def build_torch_teacher(arch: str, image_size: int):
  """A random-weight PyTorch teacher returning (B, embed_dim) embeddings."""
  from torch import nn

  from ega_jax.models.teachers import specs

  spec = specs.get_spec(arch)
  config = spec.config
  if spec.family in (specs.CLIP_VIT, specs.CLIP_RESNET):
    with warnings.catch_warnings():  # clip imports the deprecated pkg_resources.
      warnings.simplefilter("ignore")
      from clip import model as clip_model
    if spec.family == specs.CLIP_VIT:
      return clip_model.VisionTransformer(
          input_resolution=image_size, patch_size=config["patch_size"], width=config["width"],
          layers=config["depth"], heads=config["num_heads"], output_dim=config["output_dim"])
    return clip_model.ModifiedResNet(
        layers=config["stage_sizes"], output_dim=config["output_dim"],
        heads=config["num_heads"], input_resolution=image_size, width=config["width"])
  if spec.family == specs.TORCHVISION_RESNET:
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None)
    model.fc = nn.Identity()
    return model
  if spec.family == specs.TIMM_VIT:
    import timm

    return timm.create_model(TIMM_NAMES[arch], pretrained=False, num_classes=0,
                             img_size=image_size)
  raise AssertionError(f"no PyTorch teacher for family {spec.family!r}")


def prepare_torch(config, args, local_batches, teacher_image_size: int
                  ) -> tuple[list[TimedCall], Callable[..., dict]]:
  """Builds the PyTorch EGA step on the same synthetic batches (float32).

  Returns:
    its TimedCalls ('torch_step', and with --teacher_cache 'torch_cached_step':
    the same step fed float16 embeddings instead of running the teacher) and
    a function of their step times giving the result (images/s, the
    teacher's share of the step, losses).
  """
  import torch
  import torch.nn.functional as F

  from ega_jax import data as data_lib
  from ega_jax.models.teachers import specs

  torch.set_num_threads(args.torch_threads or os.cpu_count())
  torch.manual_seed(args.seed)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  info = data_lib.get_dataset_info(config.dataset.name)
  spec = specs.get_spec(config.teacher.arch)
  cifar_resnet, embedding_head = build_torch_modules()
  depth, widths = TORCH_STUDENTS[config.student.arch]
  student = cifar_resnet(depth, widths, info.num_classes).to(device).train()
  student_head = embedding_head(widths[3], config.feature_dim, info.num_classes).to(device)
  teacher = build_torch_teacher(config.teacher.arch, teacher_image_size).to(device).eval()
  for parameter in teacher.parameters():
    parameter.requires_grad_(False)
  teacher_head = embedding_head(spec.embed_dim, config.feature_dim, info.num_classes).to(device)
  student_opt = torch.optim.SGD(
      list(student.parameters()) + list(student_head.parameters()), lr=config.learning_rate,
      momentum=config.momentum, weight_decay=config.weight_decay)
  teacher_head_opt = torch.optim.SGD(
      teacher_head.parameters(), lr=config.teacher_head_learning_rate,
      momentum=config.teacher_head_momentum, weight_decay=config.teacher_head_weight_decay)

  def channel_constant(values):
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)

  data_mean, data_std = channel_constant(info.mean), channel_constant(info.std)
  teacher_mean, teacher_std = channel_constant(spec.mean), channel_constant(spec.std)
  batches = [{key: torch.from_numpy(value) for key, value in batch.items()}
             for batch in local_batches]
  batch_size = local_batches[0]["image"].shape[0]
  d = config.distill
  synchronise = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  step_count = [0]
  teacher_seconds = []
  losses = []

  generator = torch.Generator().manual_seed(args.seed + 1)
  cached_features = [torch.randn(batch_size, spec.embed_dim, generator=generator).half()
                     for _ in batches]

  def run_step(cached: bool = False):
    index = step_count[0] % len(batches)
    batch = batches[index]
    step_count[0] += 1
    images = batch["image"].to(device).permute(0, 3, 1, 2).float() / 255.0
    labels = batch["label"].to(device).long()
    student_images = (images - data_mean) / data_std
    if cached:
      # As the JAX cached step: float16 embeddings read instead of the teacher.
      teacher_feature = cached_features[index].to(device).float()
    else:
      teacher_start = time.perf_counter()
      with torch.no_grad():
        teacher_images = batch["teacher_image"].to(device).permute(0, 3, 1, 2).float() / 255.0
        if teacher_images.shape[-1] != teacher_image_size:
          teacher_images = F.interpolate(teacher_images, size=(teacher_image_size,) * 2,
                                         mode="bicubic", align_corners=False).clamp_(0.0, 1.0)
        teacher_feature = teacher((teacher_images - teacher_mean) / teacher_std).float()
      synchronise()
      teacher_seconds.append(time.perf_counter() - teacher_start)
    _, student_feature = student(student_images)
    student_emb, student_logits = student_head(student_feature)
    teacher_emb, teacher_logits = teacher_head(teacher_feature)
    ce = F.cross_entropy(student_logits, labels)
    teacher_ce = F.cross_entropy(teacher_logits, labels)
    distill = torch_ega_loss(teacher_emb.detach(), student_emb, d.node_weight, d.edge_weight)
    loss = d.gamma * ce + d.beta * distill
    student_opt.zero_grad()
    teacher_head_opt.zero_grad()
    # One backward: the teacher head only sees its CE (its embedding is
    # detached in the distillation term), the student only CE + EGA.
    (loss + teacher_ce).backward()
    student_opt.step()
    teacher_head_opt.step()
    return loss

  def wait(loss):
    synchronise()
    losses.append(loss.item())

  def result(times: list[float], cached_times: list[float] | None = None) -> dict:
    step_s = statistics.median(times)
    extra = {}
    if cached_times:
      extra["cached"] = {"step_time": summarise_times(cached_times),
                         "images_per_sec": batch_size / statistics.median(cached_times)}
    return {
        **extra,
        "device": str(device),
        "num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "dtype": "float32",
        "step_time": summarise_times(times),
        "steps_per_sec": 1.0 / step_s,
        "images_per_sec": batch_size / step_s,
        "teacher_forward_time_fraction": (
            statistics.median(teacher_seconds[-len(times):]) / step_s),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }

  calls = [TimedCall("torch_step", run_step, wait)]
  if args.teacher_cache:
    calls.append(TimedCall("torch_cached_step", lambda: run_step(cached=True), wait))
  return calls, result


# ---------------------------------------------------------------------------
# Report.


def _si(value: float, unit: str) -> str:
  for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= scale:
      return f"{value / scale:.2f} {prefix}{unit}"
  return f"{value:.2f} {unit}"


def format_table(report: dict) -> str:
  jax_part = report["jax"]
  peak = report["peak_matmul"]
  step = jax_part["step_time"]
  load = lambda key: " ".join(f"{v:.2f}" for v in report[key])  # noqa: E731
  rows = [
      ("machine", f"{report['cpu_count']} CPUs, {jax_part['backend']} x{jax_part['num_devices']} "
                  f"({jax_part['device_kind']})"),
      ("load average (1/5/15 min)", f"{load('load_average_before')} before, "
                                    f"{load('load_average_after')} after"),
      ("setting", f"{report['dataset']} {report['image_size']}px, teacher {report['teacher']} "
                  f"@{jax_part['teacher_image_size']}px, student {report['student']}, "
                  f"{report['method']}, batch {report['batch_size']}, {report['dtype']}"),
      ("compile (lower + compile)", f"{jax_part['lower_s']:.2f} s + {jax_part['compile_s']:.2f} s"),
      ("first step", f"{jax_part['first_step_s']:.3f} s"),
      (f"step time (median of {report['steps']})",
       f"{step['median_s'] * 1e3:.1f} ms (min {step['min_s'] * 1e3:.1f}, "
       f"max {step['max_s'] * 1e3:.1f})"),
      ("steps/s", f"{jax_part['steps_per_sec']:.3f}"),
      ("images/s", f"{jax_part['images_per_sec']:.2f}"),
      ("FLOPs per step (XLA)", _si(jax_part["flops_per_step"], "FLOP")),
  ]
  if "teacher_forward" in jax_part:
    teacher = jax_part["teacher_forward"]
    rows += [
        ("teacher forward alone (median)", f"{teacher['time']['median_s'] * 1e3:.1f} ms"),
        ("teacher share of FLOPs", f"{100 * teacher['flops_fraction']:.1f} %"),
        ("teacher alone / step time", f"{100 * teacher['time_fraction']:.1f} %"),
    ]
  else:
    rows.append(("teacher", f"not in the step (method {report['method']})"))
  rows += [
      ("achieved", _si(jax_part["achieved_flops_per_sec"], "FLOP/s")),
      (f"measured peak ({peak['size']}^3 {peak['dtype']} matmul)",
       _si(peak["flops_per_sec"], "FLOP/s") + " per device"),
      ("MFU (achieved / measured peak)", f"{100 * report['mfu']:.1f} %"),
      ("peak host memory (JAX part)", f"{report['peak_host_memory_mb']:.0f} MiB"),
  ]
  if "torch" in report:
    torch_part = report["torch"]
    rows += [
        ("PyTorch step time (median)", f"{torch_part['step_time']['median_s'] * 1e3:.1f} ms "
                                       f"({torch_part['device']}, "
                                       f"{torch_part['num_threads']} threads, float32)"),
        ("PyTorch images/s", f"{torch_part['images_per_sec']:.2f}"),
        ("PyTorch teacher share of step time",
         f"{100 * torch_part['teacher_forward_time_fraction']:.1f} %"),
        ("JAX / PyTorch images/s", f"{report['jax_over_torch_images_per_sec']:.2f}x"),
    ]
  if "cached" in jax_part:
    cached = jax_part["cached"]
    economics = report["cache_economics"]
    rows += [
        ("cached step: compile", f"{cached['compile_s']:.2f} s"),
        (f"cached step time (median of {report['steps']})",
         f"{cached['step_time']['median_s'] * 1e3:.1f} ms (min "
         f"{cached['step_time']['min_s'] * 1e3:.1f}, max {cached['step_time']['max_s'] * 1e3:.1f})"),
        ("cached images/s", f"{cached['images_per_sec']:.2f}"),
        ("cached FLOPs per step (XLA)", _si(cached["flops_per_step"], "FLOP")),
        ("cached MFU", f"{100 * report['cached_mfu']:.1f} %"),
        (f"epoch of {economics['num_train']} images: live / cached",
         f"{economics['live_epoch_s']:.0f} s / {economics['cached_epoch_s']:.0f} s"),
        (f"cache build, {economics['num_views']} views x {economics['num_train']} images",
         f"{economics['cache_build_s']:.0f} s (teacher alone)"),
        (f"cached epoch incl. build / {economics['num_epochs']:g} epochs",
         f"{economics['cached_epoch_amortised_s']:.0f} s"),
    ]
    if "torch_epoch_s" in economics:
      rows += [
          ("PyTorch epoch", f"{economics['torch_epoch_s']:.0f} s"),
          ("cached / PyTorch per epoch",
           f"{economics['cached_over_torch_per_epoch']:.2f}x "
           f"({economics['cached_amortised_over_torch_per_epoch']:.2f}x incl. build)"),
          ("PyTorch cached step: images/s",
           f"{report['torch']['cached']['images_per_sec']:.2f} (fed the same float16 "
           "embeddings)"),
          ("cached JAX / cached PyTorch images/s",
           f"{report['cached_over_torch_cached_images_per_sec']:.2f}x"),
      ]
  width = max(len(name) for name, _ in rows)
  return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      description="Time the production EGA train step on synthetic data (and PyTorch's).")
  parser.add_argument("--config", default="configs/cifar100.py",
                      help="ml_collections config file (default configs/cifar100.py)")
  parser.add_argument("--teacher", default=None,
                      help="teacher arch (TEACHER_SPECS name; default: the config's)")
  parser.add_argument("--student", default=None, help="student arch (default: the config's)")
  parser.add_argument("--batch_size", type=int, default=None,
                      help="global batch size (default: the config's)")
  parser.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                      help="computation dtype (default: the config's)")
  parser.add_argument("--method", default=None,
                      help="distillation method (default: the config's, ega in configs/)")
  parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
  parser.add_argument("--warmup", type=int, default=3,
                      help="untimed steps after the first call (default 3)")
  parser.add_argument("--teacher_image_size", type=int, default=None,
                      help="teacher resolution (default: TEACHER_SPECS')")
  parser.add_argument("--peak_matmul_size", type=int, default=4096,
                      help="N of the N x N @ N x N matmul measuring the peak (default 4096; "
                      "too small a matmul is overhead-bound and understates the peak)")
  parser.add_argument("--torch_threads", type=int, default=None,
                      help="torch.set_num_threads for --compare-torch (default: os.cpu_count())")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", default=None, metavar="OUT", help="write the report here")
  parser.add_argument("--teacher_cache", "--teacher-cache", dest="teacher_cache",
                      action="store_true",
                      help="also time the step reading cached teacher embeddings "
                      "(config.teacher.cache) and report epoch times with the cache")
  parser.add_argument("--cache_views", default="all",
                      help="views per image assumed for the cache's build cost "
                      "('all' = every crop x flip view; default)")
  parser.add_argument("--compare-torch", "--compare_torch", dest="compare_torch",
                      action="store_true",
                      help="also time the PyTorch implementation of the same step")
  return parser


def run(args) -> dict:
  if args.compare_torch:
    import torch  # noqa: F401  (before anything could import tensorflow)
    import torchvision  # noqa: F401
  load_before = os.getloadavg()
  config = apply_flags(load_config(args.config), args)
  import jax

  from ega_jax import data as data_lib

  info = data_lib.get_dataset_info(config.dataset.name)
  local_batch_size = config.batch_size // jax.process_count()
  local_batches = synthetic_local_batches(
      2, local_batch_size, info.image_size, info.num_classes, info.num_train, args.seed)
  calls, jax_facts, last_jax_loss = prepare_jax(config, args, local_batches)
  peak_call, peak_info = prepare_peak_matmul(args.peak_matmul_size, config.dtype)
  calls.append(peak_call)
  memory_jax_mb = peak_host_memory_mb()
  torch_result = None
  if args.compare_torch:
    torch_calls, torch_result = prepare_torch(
        config, args, local_batches, jax_facts["teacher_image_size"])
    calls.extend(torch_calls)
  times = time_interleaved(calls, args.warmup, args.steps)

  jax_part = jax_result(jax_facts, times, config.batch_size, last_jax_loss())
  peak = peak_matmul_result(peak_info, times["peak_matmul"])
  report = {
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "host": platform.node(),
      "cpu_count": os.cpu_count(),
      "load_average_before": list(load_before),
      "jax_version": jax.__version__,
      "config": args.config,
      "dataset": config.dataset.name,
      "image_size": info.image_size,
      "teacher": config.teacher.arch,
      "student": config.student.arch,
      "method": config.distill.method,
      "batch_size": config.batch_size,
      "dtype": config.dtype,
      "steps": args.steps,
      "warmup": args.warmup,
      "jax": jax_part,
      "images_per_sec": jax_part["images_per_sec"],
      "steps_per_sec": jax_part["steps_per_sec"],
      "flops_per_step": jax_part["flops_per_step"],
      "compile_s": jax_part["compile_s"],
      "peak_matmul": peak,
      "mfu": jax_part["achieved_flops_per_sec_per_device"] / peak["flops_per_sec"],
      "peak_host_memory_mb": memory_jax_mb,
  }
  if torch_result is not None:
    report["torch"] = torch_result(times["torch_step"], times.get("torch_cached_step"))
    report["jax_over_torch_images_per_sec"] = (
        jax_part["images_per_sec"] / report["torch"]["images_per_sec"])
    report["peak_host_memory_mb_with_torch"] = peak_host_memory_mb()
  if "cached" in jax_part:
    from ega_jax.data import augment

    padding = augment.crop_padding(info.image_size)
    all_views = 2 * (2 * padding + 1) ** 2
    num_views = all_views if args.cache_views == "all" else int(args.cache_views)
    num_train = info.num_train
    if config.dataset.max_train_examples > 0:
      num_train = min(num_train, config.dataset.max_train_examples)
    report["cached_mfu"] = (jax_part["cached"]["achieved_flops_per_sec_per_device"]
                            / peak["flops_per_sec"])
    # The teacher alone is timed on one device's slice; all devices run it at once.
    report["cache_economics"] = cache_economics(
        num_train, config.batch_size, config.num_epochs, num_views,
        jax_part["step_time"]["median_s"], jax_part["cached"]["step_time"]["median_s"],
        jax_part["teacher_forward"]["time"]["median_s"],
        report["torch"]["step_time"]["median_s"] if "torch" in report else None)
    if "torch" in report:
      report["cached_over_torch_images_per_sec"] = (
          jax_part["cached"]["images_per_sec"] / report["torch"]["images_per_sec"])
      report["cached_over_torch_cached_images_per_sec"] = (
          jax_part["cached"]["images_per_sec"] / report["torch"]["cached"]["images_per_sec"])
  report["load_average_after"] = list(os.getloadavg())
  return report


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    report = run(args)
  except BenchmarkError as error:
    print(f"benchmark: {error}", file=sys.stderr)
    return 2
  print(format_table(report))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
