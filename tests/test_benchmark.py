"""benchmarks/: the FLOP count, the PyTorch step's parts, and tiny runs of its commands."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks import report as report_lib
from benchmarks import timing, torch_reference
from run_configs import needs_fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_module(module, *flags, timeout=300):
  return subprocess.run(
    [sys.executable, "-m", module, *flags],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=timeout,
  )


def _run_cli(tmp_path, *flags):
  out = tmp_path / "report.json"
  result = _run_module("benchmarks.step", *flags, f"--json={out}")
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  return json.loads(out.read_text()), result.stdout


@pytest.mark.parametrize("m, k, n", [(48, 80, 24), (7, 33, 5)])
def test_xla_flops_of_a_matmul_is_two_m_n_k(m, k, n):
  import jax
  import jax.numpy as jnp

  a = jnp.ones((m, k), jnp.float32)
  b = jnp.ones((k, n), jnp.float32)
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  assert timing.xla_flops(compiled) == 2 * m * n * k


def test_peak_matmul_counts_and_times_the_product():
  peak = timing.measure_peak_matmul(128, "float32", num_warmup=1, num_timed=3)
  assert peak["flops"] == peak["xla_flops"] == 2 * 128**3
  assert peak["median_s"] > 0
  assert peak["flops_per_sec"] == pytest.approx(peak["flops"] / peak["median_s"])


def _ega_float64(teacher, student, node_weight=0.8, edge_weight=0.24, eps=1e-8):
  """EGA from the formula: Pearson rows of [x_t; x_s], Frobenius norms of the blocks."""
  x = np.concatenate([teacher, student]).astype(np.float64)
  batch, dim = teacher.shape
  centred = x - x.mean(axis=1, keepdims=True)
  covariance = centred @ centred.T / (dim - 1)
  std = np.sqrt(np.diag(covariance) + eps)
  graph = covariance / np.outer(std, std)
  node = graph[:batch, batch:] - np.eye(batch)
  edge = graph[:batch, :batch] - graph[batch:, batch:]
  return node_weight * np.sqrt((node**2).sum()) + edge_weight * np.sqrt((edge**2).sum())


def test_torch_ega_loss_matches_the_formula():
  rng = np.random.default_rng(0)
  teacher = rng.normal(size=(6, 16)).astype(np.float32)
  student = (0.5 * teacher + rng.normal(size=(6, 16))).astype(np.float32)
  loss = torch_reference.torch_ega_loss(
    torch.from_numpy(teacher), torch.from_numpy(student), 0.8, 0.24
  )
  assert float(loss) == pytest.approx(_ega_float64(teacher, student), rel=1e-5)


@pytest.mark.parametrize("name, expected", [("resnet8", 83_892), ("resnet8x4", 1_233_540)])
def test_torch_student_has_repdistillers_parameter_count(name, expected):
  model = torch_reference.build_torch_student(name, 100)
  _, widths = torch_reference.TORCH_STUDENTS[name]
  assert sum(p.numel() for p in model.parameters()) == expected
  logits, feature = model(torch.zeros(2, 3, 32, 32))
  assert logits.shape == (2, 100) and feature.shape == (2, widths[3])


@pytest.mark.parametrize(
  "flags, message",
  [
    (
      ["--config.teacher.arch=clip_vit_b99"],
      "config.teacher.arch='clip_vit_b99' is not valid; valid: clip_vit_b32",
    ),
    (["--config.student.arch=vgg8", "--compare_torch"], "PyTorch students resnet8"),
    (["--config.distill.method=kd", "--compare-torch"], "EGA step"),
    (["--config=configs/nope.py"], "--config='configs/nope.py' is not a file"),
    (["--teacher_cache", "--cache_views=some"], "--cache_views='some' is not valid"),
    (
      ["--teacher_cache", "--config.distill.method=none"],
      "--teacher_cache needs a step with a teacher",
    ),
  ],
)
def test_user_mistakes_are_one_line(flags, message):
  if not any(flag.startswith("--config=") for flag in flags):
    flags = ["--config=configs/cifar100.py", *flags]
  result = _run_module("benchmarks.step", *flags, timeout=120)
  assert result.returncode == 2
  assert message in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.slow
def test_cli_reports_the_production_step(tmp_path):
  report, stdout = _run_cli(
    tmp_path,
    "--config=configs/fashion_mnist.py",
    "--config.teacher.arch=resnet18",
    "--config.student.arch=resnet8",
    "--config.batch_size=8",
    "--steps=3",
    "--warmup=1",
    "--peak_matmul_size=1024",
  )
  assert "images/s" in stdout and "MFU" in stdout
  jax_result = report["jax"]
  assert (
    report["dataset"],
    report["teacher"],
    report["student"],
    report["method"],
    report["batch_size"],
    report["dtype"],
  ) == ("fashion_mnist", "resnet18", "resnet8", "ega", 8, "float32")
  assert jax_result["teacher_image_size"] == 224  # TEACHER_SPECS['resnet18']
  assert len(jax_result["step_time"]["all_s"]) == 3
  median = jax_result["step_time"]["median_s"]
  assert report["images_per_sec"] == pytest.approx(8 / median)
  assert report["steps_per_sec"] == pytest.approx(1 / median)
  assert report["compile_s"] > 0 and report["peak_host_memory_mb"] > 100
  # The frozen ResNet-18 forward at 224 alone is several GFLOPs per image.
  assert report["flops_per_step"] > 8 * 2e9
  assert 0.5 < jax_result["teacher_forward"]["flops_fraction"] < 1.0
  assert report["peak_matmul"]["flops"] == 2 * 1024**3
  assert 0 < report["mfu"] < 1.5
  assert report["mfu"] == pytest.approx(
    report["flops_per_step"] / median / report["peak_matmul"]["flops_per_sec"]
  )
  assert math.isfinite(jax_result["first_loss"]) and math.isfinite(jax_result["last_loss"])
  assert "torch" not in report


def test_cache_economics_arithmetic():
  economics = report_lib.cache_economics(
    num_train=1000,
    batch_size=100,
    num_epochs=20,
    num_views=4,
    live_step_s=2.0,
    cached_step_s=0.5,
    teacher_batch_s=1.5,
    torch_step_s=3.0,
  )
  assert economics["steps_per_epoch"] == 10
  assert economics["live_epoch_s"] == pytest.approx(20.0)
  assert economics["cached_epoch_s"] == pytest.approx(5.0)
  # 4 views of 1000 images = 40 teacher batches of 1.5 s.
  assert economics["cache_build_s"] == pytest.approx(60.0)
  assert economics["cached_epoch_amortised_s"] == pytest.approx(5.0 + 60.0 / 20)
  assert economics["cached_over_torch_per_epoch"] == pytest.approx(30.0 / 5.0)
  assert economics["cached_amortised_over_torch_per_epoch"] == pytest.approx(30.0 / 8.0)


@pytest.mark.slow
def test_cli_compares_with_pytorch(tmp_path):
  report, stdout = _run_cli(
    tmp_path,
    "--config=configs/fashion_mnist.py",
    "--config.teacher.arch=resnet18",
    "--config.student.arch=resnet8x4",
    "--config.batch_size=4",
    "--steps=2",
    "--warmup=1",
    "--teacher_image_size=64",
    "--peak_matmul_size=1024",
    "--compare_torch",
    "--torch_threads=1",
    "--teacher_cache",
    "--cache_views=3",
  )
  table = [line for line in stdout.splitlines() if "  " in line]
  assert table[0].startswith("live JAX / live PyTorch images/s")
  assert table[1].startswith("cached JAX / cached PyTorch images/s")
  assert table[2].startswith("student fwd+bwd JAX / PyTorch speed")
  student = report["student_alone"]
  assert report["student"] == "resnet8x4"  # The arch name, not overwritten by the timings.
  assert student["batch_size"] == 4 and len(student["jax_forward_backward"]["all_s"]) == 2
  assert report["student_forward_backward_jax_over_torch"] == pytest.approx(
    student["torch_forward_backward"]["median_s"] / student["jax_forward_backward"]["median_s"]
  )
  verdicts = {t["name"]: t for t in report["targets"]}
  assert len(verdicts) == 3
  live = verdicts["live JAX / live PyTorch images/s"]
  assert live["met"] == (report["jax_over_torch_images_per_sec"] >= 1.5)
  assert any(line.startswith("target live JAX / live PyTorch") for line in table)
  assert report["cpu"]["vector_kind"] in ("AMX", "AVX-512", "AVX2", "other")
  assert any(line.startswith("CPU ") and report["cpu"]["vector_kind"] in line for line in table)
  torch_result = report["torch"]
  assert torch_result["num_threads"] == 1 and torch_result["dtype"] == "float32"
  assert len(torch_result["step_time"]["all_s"]) == 2
  assert torch_result["images_per_sec"] == pytest.approx(4 / torch_result["step_time"]["median_s"])
  assert report["jax_over_torch_images_per_sec"] == pytest.approx(
    report["images_per_sec"] / torch_result["images_per_sec"]
  )
  assert 0 < torch_result["teacher_forward_time_fraction"] < 1
  assert report["jax"]["teacher_image_size"] == 64
  assert report["flops_per_step"] > 0 and 0 < report["mfu"] < 1.5
  # The cached step: same step without the teacher, fed 512-d embeddings.
  cached = report["jax"]["cached"]
  assert "cached images/s" in stdout and "cached / PyTorch per epoch" in stdout
  assert cached["teacher_feature_dim"] == 512
  assert cached["images_per_sec"] == pytest.approx(4 / cached["step_time"]["median_s"])
  teacher_flops = report["jax"]["teacher_forward"]["flops_per_device"]
  assert cached["flops_per_step"] == pytest.approx(
    report["flops_per_step"] - teacher_flops, rel=0.05
  )
  economics = report["cache_economics"]
  assert economics["num_views"] == 3 and economics["num_train"] == 60000  # The whole train split.
  assert report["cached_over_torch_images_per_sec"] == pytest.approx(
    cached["images_per_sec"] / torch_result["images_per_sec"]
  )
  torch_cached = torch_result["cached"]
  assert len(torch_cached["step_time"]["all_s"]) == 2
  assert torch_cached["images_per_sec"] == pytest.approx(4 / torch_cached["step_time"]["median_s"])
  assert report["cached_over_torch_cached_images_per_sec"] == pytest.approx(
    cached["images_per_sec"] / torch_cached["images_per_sec"]
  )


@pytest.mark.slow
@needs_fashion_mnist
def test_ablations_script_measures_every_variant(tmp_path):
  out = tmp_path / "ablations.json"
  result = _run_module("benchmarks.ablations", "--steps", "2", "--json", str(out), timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  report = json.loads(out.read_text())
  loop, donation = report["loop"], report["donation"]
  for value in (
    loop["naive_step_ms"],
    loop["production_step_ms"],
    loop["host_batch_ms"],
    loop["step_alone_ms"],
    donation["with_ms"],
    donation["without_ms"],
  ):
    assert 0 < value < 60_000
  # resnet8 + the two 256-d heads + momentum buffers: a few MiB.
  assert 0.5 < donation["state_mib"] < 10
  clip = report["traffic"]["CIFAR + CLIP (32 -> 224 px)"]
  assert clip["uint8_bytes"] == 64 * 32 * 32 * 3
  assert clip["float32_bytes"] == 64 * 224 * 224 * 3 * 4
  demo = report["traffic"]["demo (28 -> 32 px)"]
  assert demo["uint8_bytes"] == 128 * 28 * 28 * 3
  assert demo["float32_bytes"] == 128 * 32 * 32 * 3 * 4
  assert "loop: production" in result.stdout and "donation: with / without" in result.stdout


@pytest.mark.parametrize("method", ["rkd", "nce"])
def test_graph_rows_times_both_forms_of_the_same_loss(tmp_path, method):
  out = tmp_path / "rows.json"
  result = _run_module(
    "benchmarks.graph_rows",
    f"--method={method}",
    "--devices=2",
    "--batches=8,16",
    "--rounds=1",
    f"--json={out}",
  )
  assert result.returncode == 0, result.stderr[-4000:]
  record = json.loads(out.read_text())
  assert record["method"] == method and record["devices"] == 2
  assert [row["batch"] for row in record["rows"]] == [8, 16]
  for row in record["rows"]:
    assert row["sharded_loss"] == pytest.approx(row["replicated_loss"], rel=1e-5)
    # Each of the 2 devices does half the graph products.
    assert row["sharded_gflop_per_device"] == pytest.approx(row["replicated_gflop_per_device"] / 2)
    assert row["replicated_over_sharded"] == pytest.approx(row["replicated_ms"] / row["sharded_ms"])
  assert f"{method}: 2 forced CPU devices" in result.stdout


def test_conv_ablation_times_three_variants_of_the_same_function(tmp_path):
  # ShuffleV1 exercises the depthwise and grouped 1x1 rewrites and has ungrouped convs (its
  # stem and shortcut-free 3x3s) that the variants compute differently (XLA's weight gradient,
  # the patch matmuls, oneDNN); they must be different programs computing the same loss and
  # gradients.
  out = tmp_path / "conv.json"
  result = _run_module(
    "benchmarks.conv_ablation",
    "--students",
    "ShuffleV1",
    "--batch_size",
    "4",
    "--rounds",
    "1",
    "--json",
    str(out),
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  (row,) = json.loads(out.read_text())
  assert row["student"] == "ShuffleV1" and row["batch_size"] == 4
  others = ("lax", "xla_weight_grad", "patch_weight_grad", "flax_batch_norm")
  for key in others + ("conv_py",):
    assert 0 < row[f"{key}_ms"] < 60_000
  for key in others:
    assert row[f"speedup_over_{key}"] == pytest.approx(row[f"{key}_ms"] / row["conv_py_ms"])
  losses = row["losses"]
  assert set(losses) == set(others) | {"conv.py"}
  for key in others:
    assert losses[key] == pytest.approx(losses["conv.py"], rel=1e-5)
  # Float rounding only, but amplified by train-mode BatchNorm at batch 4: here XLA's float32
  # gradients (the first three variants) lie 1e-2 from the float64 one, oneDNN's 7.5e-7
  # (measured 2026-12-03, docs/performance.md).
  assert 0 < row["relative_grad_difference"] < 5e-2
  assert "ShuffleV1" in result.stdout and "vs patch_weight_grad" in result.stdout


def test_conv_ablation_variants_differ_in_how_the_convs_are_computed():
  from benchmarks import conv_ablation
  from ega_jax.models import conv as conv_lib

  student = conv_ablation.create_student("resnet8", 10)
  # 32x32 maps: one image per patch matmul, so the patch-matmul weight gradient is a scan.
  images = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  labels = np.array([1, 2], np.int32)
  variables = student.init(jax.random.PRNGKey(0), images, train=False)
  programs = {
    key: conv_ablation._compiled_grad_step(student, variables, images, labels, key).as_text()
    for key in conv_ablation.VARIANTS
  }
  # The patch-matmul weight gradient is a while loop (lax.scan); oneDNN's convs custom calls.
  assert "while" in programs["patch_weight_grad"]
  assert "while" not in programs["xla_weight_grad"] and "while" not in programs["lax"]
  assert "ega_onednn_conv_kernel_grad" in programs["conv.py"]
  assert "ega_onednn_conv_kernel_grad" in programs["flax_batch_norm"]
  assert not any(
    "ega_onednn" in programs[key] for key in ("lax", "xla_weight_grad", "patch_weight_grad")
  )
  # flax's BatchNorm differentiated by JAX reduces over the activations more often.
  reductions = {key: program.count(" reduce(") for key, program in programs.items()}
  assert reductions["conv.py"] < reductions["flax_batch_norm"], reductions
  # Restored afterwards.
  assert conv_lib.PATCH_MATMUL_WEIGHT_GRAD_ON_CPU is True
  assert conv_lib.CPU_CONV_LIBRARY == "auto"
  assert conv_ablation.layers.batch_norm is not conv_ablation.flax_batch_norm


def test_student_result_and_targets_arithmetic():
  times = {
    "jax_student_forward": [0.10, 0.12, 0.11],
    "jax_student_forward_backward": [0.40, 0.50, 0.45],
    "torch_student_forward": [0.05, 0.06, 0.04],
    "torch_student_forward_backward": [0.20, 0.25, 0.30],
  }
  student = report_lib.student_result(times, 64)
  assert student["batch_size"] == 64
  assert student["forward_jax_over_torch"] == pytest.approx(0.05 / 0.11)
  assert student["forward_backward_jax_over_torch"] == pytest.approx(0.25 / 0.45)
  assert student["jax_backward_s"] == pytest.approx(0.45 - 0.11)
  assert student["backward_jax_over_torch"] == pytest.approx((0.25 - 0.05) / (0.45 - 0.11))
  report = {
    "cpu": {"vector_kind": "AVX2"},
    "jax_over_torch_images_per_sec": 1.6,
    "student_forward_backward_jax_over_torch": student["forward_backward_jax_over_torch"],
  }
  verdicts = {t["name"]: t for t in report_lib.targets(report)}
  # The cached ratio was not measured, so it has no verdict.
  assert set(verdicts) == {
    "live JAX / live PyTorch images/s",
    "student fwd+bwd JAX / PyTorch speed",
  }
  assert verdicts["live JAX / live PyTorch images/s"]["met"] is True
  assert verdicts["student fwd+bwd JAX / PyTorch speed"]["met"] is False
  assert all(t["cpu_kind"] == "AVX2" for t in verdicts.values())


def _torch_conv_shapes(arch, batch_size):
  """Counter of (H, W, in, out, k, stride, padding, groups) of every nn.Conv2d call of the
  RepDistiller PyTorch student: the independent reference of conv_layers.student_convs."""
  import collections

  model = torch_reference.build_torch_student(arch, 100).train()
  found = collections.Counter()

  def hook(module, inputs, output):
    _, channels, height, width = inputs[0].shape
    found[
      (
        height,
        width,
        channels,
        module.out_channels,
        module.kernel_size[0],
        module.stride[0],
        module.padding[0],
        module.groups,
      )
    ] += 1

  for module in model.modules():
    if isinstance(module, torch.nn.Conv2d):
      module.register_forward_hook(hook)
  with torch.no_grad():
    model(torch.zeros(batch_size, 3, 32, 32))
  return found


@pytest.mark.parametrize("arch", ["resnet8x4", "resnet20"])
def test_conv_layers_finds_every_conv_of_the_student(arch):
  from benchmarks import conv_layers

  assert conv_layers.student_convs(arch, 2) == _torch_conv_shapes(arch, 2)


def test_conv_layers_times_the_same_function_in_both_frameworks():
  from benchmarks import conv_layers

  # A strided 3x3 conv and a strided 1x1 conv: the shapes where a wrong layout or padding shows.
  for shape in ((8, 8, 3, 4, 3, 2, 1, 1), (6, 6, 4, 6, 1, 2, 0, 1)):
    calls = {c.name: c for c in conv_layers.conv_calls(shape, batch_size=2)}
    for part in conv_layers.PARTS:
      ours = np.asarray(calls[f"jax_{part}"].call())
      theirs = calls[f"torch_{part}"].call().numpy()
      layout = (0, 2, 3, 1) if part != "weight_grad" else (2, 3, 1, 0)  # NCHW->NHWC, OIHW->HWIO
      np.testing.assert_allclose(ours, theirs.transpose(layout), rtol=1e-4, atol=1e-4)


def test_conv_layers_cli_reports_totals(tmp_path):
  out = tmp_path / "convs.json"
  result = _run_module(
    "benchmarks.conv_layers",
    "--student",
    "resnet8",
    "--batch_size",
    "2",
    "--rounds",
    "1",
    "--torch_threads",
    "1",
    "--json",
    str(out),
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  measured = json.loads(out.read_text())
  rows = measured["convs"]
  assert sum(row["count"] for row in rows) == sum(_torch_conv_shapes("resnet8", 2).values())
  expected = sum(row["count"] * row["torch_weight_grad"] for row in rows)
  assert measured["total_ms"]["torch_weight_grad"] == pytest.approx(expected)
  # The first conv's input gradient (of the images) is left out of the totals.
  expected = sum(row["count"] * row["jax_input_grad"] for row in rows[1:])
  assert measured["total_ms"]["jax_input_grad"] == pytest.approx(expected)
  assert "JAX / PyTorch speed" in result.stdout and "total" in result.stdout


def test_conv_layers_rejects_an_unknown_student():
  result = _run_module("benchmarks.conv_layers", "--student", "resnet9", timeout=120)
  assert result.returncode == 2 and "--student='resnet9' is unknown; valid:" in result.stderr


def test_conv_ablation_rejects_an_unknown_student():
  result = _run_module("benchmarks.conv_ablation", "--students", "resnet9", timeout=120)
  assert result.returncode == 2
  assert "--students: unknown resnet9; valid names are:" in result.stderr


def test_machine_description_reads_the_cpu_kind(tmp_path):
  from benchmarks import machine

  cpuinfo = tmp_path / "cpuinfo"
  for flags, kind in (
    ("fpu sse2 avx2 fma", "AVX2"),
    ("avx2 avx512f avx512_vnni", "AVX-512"),
    ("avx2 avx512f amx_tile amx_bf16", "AMX"),
    ("sse2", "other"),
  ):
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n")
    described = machine.describe(str(cpuinfo))
    assert described["cpu_model"] == "Test CPU" and described["vector_kind"] == kind, flags
    assert kind in machine.one_line(described)


@pytest.mark.slow
def test_device_check_rehearsal_on_cpu_writes_the_summary(tmp_path):
  """launch/device_check.sh run, shrunk to one CPU setting, then with no time left."""
  script = os.path.join(REPO, "launch", "device_check.sh")
  env = {
    **os.environ,
    "PYTHON": sys.executable,
    "DEVICE_CHECK_DTYPES": "float32",
    "DEVICE_CHECK_BATCHES": "4",
    "DEVICE_CHECK_STEPS": "1",
    "DEVICE_CHECK_ARGS": "--teacher_image_size=64 --peak_matmul_size=256 --torch_threads=1",
    "OMP_WAIT_POLICY": "PASSIVE",
  }
  done = subprocess.run(
    [script, "run", str(tmp_path / "full")], env=env, capture_output=True, text=True, timeout=600
  )
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
  summary = json.loads((tmp_path / "full" / "summary.json").read_text())
  assert summary["skipped"] == [] and list(summary["settings"]) == ["step_float32_b4"]
  setting = summary["settings"]["step_float32_b4"]
  assert setting["batch_size"] == 4 and setting["dtype"] == "float32"
  for key in ("images_per_sec", "cached_images_per_sec", "torch_images_per_sec", "mfu"):
    assert setting[key] > 0, key
  assert setting["jax_over_torch_images_per_sec"] == pytest.approx(
    setting["images_per_sec"] / setting["torch_images_per_sec"]
  )

  # Out of time: every setting is skipped and listed, none is half-run.
  env.update(DEVICE_CHECK_BUDGET_S="10", DEVICE_CHECK_BATCHES="4 8")
  done = subprocess.run(
    [script, "run", str(tmp_path / "late")], env=env, capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stderr[-2000:]
  summary = json.loads((tmp_path / "late" / "summary.json").read_text())
  assert summary["settings"] == {} and summary["skipped"] == ["step_float32_b4", "step_float32_b8"]


def test_ynn_threads_reports_the_cases_and_the_gradient_error(tmp_path):
  # What docs/performance.md's "YNNPACK runs a lone convolution on one core" rests on: which
  # ops each case puts into YNNPACK fusions, every case's output against a float64 NumPy
  # convolution, and a student's float32 gradient against its float64 one.
  out = tmp_path / "ynn.json"
  result = _run_module(
    "benchmarks.ynn_threads",
    "--batch_size=4",
    "--size=16",
    "--channels=32",
    "--calls=1",
    "--students",
    "resnet8",
    "--grad_batch_size=2",
    f"--json={out}",
  )
  assert result.returncode == 0, result.stderr[-4000:]
  report = json.loads(out.read_text())
  convs = report["convolution"]
  for row in convs.values():
    assert row["max_abs_error"] < 1e-4 and row["ms_per_call"] > 0
  assert convs["conv alone"]["ynn_fused_ops"] == ["convolution"]
  assert "maximum" not in convs["conv + relu"]["ynn_fused_ops"]
  assert {"convolution", "maximum"} <= set(convs["conv + relu, eltwise fusion"]["ynn_fused_ops"])
  assert set(convs["conv + channel sum"]["ynn_fused_ops"]) == {"convolution", "reduce"}
  assert convs["conv alone, no YNNPACK"]["ynn_fusions"] == 0
  errors = report["student_gradient_error"]["resnet8"]
  # float32 against float64: rounding, not zero (a float32 "reference" would give exactly 0).
  assert 0 < errors["default"] < 1e-5 and 0 < errors["eltwise_fusion"] < 1e-3
  assert "in YNNPACK fusions" in result.stdout


def test_ynn_threads_rejects_an_unknown_student():
  result = _run_module("benchmarks.ynn_threads", "--students", "resnet9", timeout=120)
  assert result.returncode == 2 and "--students: unknown resnet9" in result.stderr


def test_ynn_threads_float64_reference_computes_every_op_in_float64():
  # The reference of the student-gradient error must be float64 end to end: a student built
  # for float32 casts its inputs back to float32 in every conv, which made the earlier
  # "float64" reference a float32-conv one (docs/performance.md, "oneDNN through the FFI").
  from benchmarks import ynn_threads

  with jax.enable_x64(True):
    loss_fn, params = ynn_threads.student_loss("resnet8", 2, jnp.float64)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss_fn))(params))
  assert "f32[" not in jaxpr and "f64[" in jaxpr
