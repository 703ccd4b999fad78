r"""Times the production train step on synthetic data, optionally against PyTorch.

  python -m benchmarks.step --config=configs/cifar100.py \
      --config.teacher.arch=clip_vit_b32 --config.student.arch=resnet8x4 \
      --config.batch_size=64 --steps=20 --warmup=3 --compare_torch --json=bench.json

Run it from the repository root. Every config field can be overridden
(`--config.dtype=bfloat16`, `--config.distill.method=none`, `--config.seed=1`).
What is timed is `build_run`'s train step (benchmarks/jax_harness.py) on
synthetic uint8 batches; the teacher has random weights, so neither a
converted checkpoint nor a dataset is needed.

Reported (table on stdout, everything in --json):
  * compile time (lowering and XLA compilation of the step, then its first call);
  * steady-state step time: median of --steps timed calls after --warmup
    untimed ones, each waited for with `block_until_ready`; steps/s, images/s;
  * FLOPs per step from XLA's cost analysis of the compiled step (the
    per-device program, times the device count), achieved FLOP/s;
  * the device's measured peak: a jitted N x N @ N x N matmul in the config's
    dtype, timed the same way, 2 N^3 FLOPs; MFU = achieved / measured peak;
  * the teacher's share: its forward pass (resize, normalise, backbone) on one
    device's slice, compiled and timed on its own;
  * peak host memory (maxrss of this process; the JAX part is read before
    PyTorch builds its models).

Timings are taken in rounds (benchmarks/timing.py): each round runs the step,
the teacher alone, the peak matmul and (with --compare_torch) the PyTorch step
once each, so on a machine shared with other jobs they all see the same load
and their ratios (MFU, JAX / PyTorch) stay meaningful while the absolute
numbers move. --compare_torch times the PyTorch step of
benchmarks/torch_reference.py on the same batches, in the same run, and the
student alone (train-mode forward, and forward + backward of a cross-entropy)
in both frameworks on one device. The report ends with the issue's speed
targets, each marked met or short, for the CPU kind it ran on.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from benchmarks import BenchmarkError
from benchmarks import machine
from ega_jax import host_memory

# jax, ega_jax and the harnesses are imported inside the functions: with
# --compare_torch, torch is imported first (before anything that could import
# tensorflow; the reverse order segfaults on this stack).
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config",
  None,
  "ml_collections config file (configs/*.py): the dataset (image size, "
  "classes), the teacher and student archs, batch size, dtype and every hyperparameter.",
  lock_config=True,
)
flags.DEFINE_integer("steps", 20, "Timed steps.")
flags.DEFINE_integer("warmup", 3, "Untimed steps after the first call.")
flags.DEFINE_integer("teacher_image_size", None, "Teacher resolution (default: TEACHER_SPECS').")
flags.DEFINE_integer(
  "peak_matmul_size",
  4096,
  "N of the N x N @ N x N matmul measuring the peak (too small a matmul is "
  "overhead-bound and understates the peak).",
)
flags.DEFINE_integer(
  "torch_threads", None, "torch.set_num_threads for --compare_torch (default: os.cpu_count())."
)
flags.DEFINE_string("json", None, "Write the report here.")
flags.DEFINE_bool(
  "teacher_cache",
  False,
  "Also time the step reading cached teacher embeddings (config.teacher.cache) "
  "and report epoch times with the cache.",
)
flags.DEFINE_alias("teacher-cache", "teacher_cache")
flags.DEFINE_string(
  "cache_views",
  "all",
  "Views per image assumed for the cache's build cost ('all' = every crop x flip view).",
)
flags.DEFINE_bool("compare_torch", False, "Also time the PyTorch implementation of the same step.")
flags.DEFINE_alias("compare-torch", "compare_torch")
flags.mark_flags_as_required(["config"])


@dataclasses.dataclass(frozen=True)
class Options:
  """What to measure besides the config: the flags above (their defaults live there)."""

  config_path: str
  steps: int
  warmup: int
  teacher_image_size: int | None
  peak_matmul_size: int
  torch_threads: int | None
  teacher_cache: bool
  cache_views: str
  compare_torch: bool


def check_settings(config, options: Options) -> None:
  """Raises BenchmarkError (one sentence naming the flag) for what cannot be benchmarked."""
  from ega_jax import config as config_lib
  from ega_jax import data as data_lib
  from ega_jax import losses
  from ega_jax import models as models_lib

  checks = (
    ("config.teacher.arch", config.teacher.arch, tuple(models_lib.TEACHER_SPECS)),
    ("config.student.arch", config.student.arch, models_lib.STUDENT_NAMES),
    ("config.distill.method", config.distill.method, losses.DISTILL_METHODS),
    ("config.dtype", config.dtype, tuple(config_lib.DTYPES)),
    ("config.dataset.name", config.dataset.name, data_lib.DATASET_NAMES),
  )
  for field, value, valid in checks:
    if value not in valid:
      raise BenchmarkError(f"{field}={value!r} is not valid; valid: {', '.join(valid)}.")
  if config.batch_size < 2:
    raise BenchmarkError(
      f"config.batch_size={config.batch_size} must be at least 2 (the graph "
      "losses and BatchNorm need two rows)."
    )
  if options.steps < 1 or options.warmup < 0:
    raise BenchmarkError(
      f"--steps={options.steps} must be >= 1 and --warmup={options.warmup} >= 0."
    )
  if options.teacher_cache:
    if not config_lib.uses_teacher(config):
      raise BenchmarkError(
        f"--teacher_cache needs a step with a teacher; config.distill.method="
        f"{config.distill.method!r} with alpha=0 has none."
      )
    if options.cache_views != "all" and not (
      options.cache_views.isdigit() and int(options.cache_views) >= 1
    ):
      raise BenchmarkError(
        f"--cache_views={options.cache_views!r} is not valid; use 'all' or a "
        "positive number of views."
      )
  if options.compare_torch:
    from benchmarks.torch_reference import TORCH_STUDENTS

    if config.student.arch not in TORCH_STUDENTS:
      raise BenchmarkError(
        f"--compare_torch has PyTorch students {', '.join(TORCH_STUDENTS)} only, not "
        f"config.student.arch={config.student.arch!r}."
      )
    if config.distill.method != "ega" or config.distill.alpha:
      raise BenchmarkError(
        f"--compare_torch implements the EGA step (config.distill.alpha=0) only, not "
        f"config.distill.method={config.distill.method!r} with alpha={config.distill.alpha}."
      )


def synthetic_local_batches(
  count: int, batch_size: int, image_size: int, num_classes: int, num_train: int, seed: int
) -> list[dict[str, np.ndarray]]:
  """`count` random batches shaped like the train loader's output (this process's rows).

  Returns:
    list of {'image', 'teacher_image': (b, H, W, 3) uint8, 'label': (b,) int32,
    'index': (b,) int32}.
  """
  rng = np.random.default_rng(seed)
  shape = (batch_size, image_size, image_size, 3)
  return [
    {
      "image": rng.integers(0, 256, shape, dtype=np.uint8),
      "teacher_image": rng.integers(0, 256, shape, dtype=np.uint8),
      "label": rng.integers(0, num_classes, (batch_size,), dtype=np.int32),
      "index": rng.integers(0, num_train, (batch_size,), dtype=np.int32),
    }
    for _ in range(count)
  ]


def run(config, options: Options) -> dict:
  """Checks the settings, builds and times everything; returns the report (--json's content)."""
  check_settings(config, options)
  load_before = os.getloadavg()
  import jax

  from benchmarks import jax_harness
  from benchmarks import report as report_lib
  from benchmarks import timing
  from ega_jax import data as data_lib

  info = data_lib.get_dataset_info(config.dataset)
  local_batches = synthetic_local_batches(
    2,
    config.batch_size // jax.process_count(),
    info.image_size,
    info.num_classes,
    info.num_train,
    config.seed,
  )
  calls, jax_facts, last_jax_loss = jax_harness.prepare_jax(
    config,
    local_batches,
    teacher_image_size=options.teacher_image_size,
    with_cached_step=options.teacher_cache,
  )
  peak_call, peak_info = timing.prepare_peak_matmul(options.peak_matmul_size, config.dtype)
  calls.append(peak_call)
  memory_jax_mb = timing.peak_host_memory_mb()
  torch_result = None
  if options.compare_torch:
    from benchmarks import torch_reference

    student_images = (local_batches[0]["image"].astype(np.float32) / 255.0 - info.mean) / info.std
    calls.extend(
      jax_harness.student_calls(
        config.student.arch,
        info.num_classes,
        student_images.astype(np.float32),
        local_batches[0]["label"],
        config.dtype,
        config.seed,
      )
    )

    torch_calls, torch_result = torch_reference.prepare_torch(
      config,
      local_batches,
      jax_facts["teacher_image_size"],
      num_threads=options.torch_threads,
      with_cached_step=options.teacher_cache,
    )
    calls.extend(torch_calls)
  times = timing.time_interleaved(calls, options.warmup, options.steps)

  jax_part = report_lib.jax_result(jax_facts, times, config.batch_size, last_jax_loss())
  peak = timing.peak_matmul_result(peak_info, times["peak_matmul"])
  report = {
    "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    "host": platform.node(),
    "cpu_count": os.cpu_count(),
    "cpu": machine.describe(),
    "load_average_before": list(load_before),
    # malloc keeps XLA's per-step temporary buffers mapped (ega_jax/host_memory.py).
    "malloc_tuning": host_memory.applied(),
    "jax_version": jax.__version__,
    "config": options.config_path,
    "dataset": config.dataset.name,
    "image_size": info.image_size,
    "teacher": config.teacher.arch,
    "student": config.student.arch,
    "method": config.distill.method,
    "batch_size": config.batch_size,
    "dtype": config.dtype,
    "steps": options.steps,
    "warmup": options.warmup,
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
      jax_part["images_per_sec"] / report["torch"]["images_per_sec"]
    )
    report["student_alone"] = report_lib.student_result(times, len(local_batches[0]["label"]))
    report["student_forward_backward_jax_over_torch"] = report["student_alone"][
      "forward_backward_jax_over_torch"
    ]
    report["peak_host_memory_mb_with_torch"] = timing.peak_host_memory_mb()
  if "cached" in jax_part:
    from ega_jax.data import augment, teacher_cache

    all_views = teacher_cache.num_views(augment.crop_padding(info.image_size))
    num_train = info.num_train
    if config.dataset.max_train_examples > 0:
      num_train = min(num_train, config.dataset.max_train_examples)
    report_lib.add_cache_economics(
      report,
      num_train=num_train,
      batch_size=config.batch_size,
      num_epochs=config.num_epochs,
      num_views=all_views if options.cache_views == "all" else int(options.cache_views),
    )
  report["targets"] = report_lib.targets(report)
  report["load_average_after"] = list(os.getloadavg())
  return report


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a mistake reported as one line (exit status 2)."""
  try:
    return FLAGS(argv)
  except flags.Error as error:
    print(f"benchmark: {' '.join(str(error).split())}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  options = Options(
    config_path=config_flags.get_config_filename(FLAGS["config"]),
    steps=FLAGS.steps,
    warmup=FLAGS.warmup,
    teacher_image_size=FLAGS.teacher_image_size,
    peak_matmul_size=FLAGS.peak_matmul_size,
    torch_threads=FLAGS.torch_threads,
    teacher_cache=FLAGS.teacher_cache,
    cache_views=FLAGS.cache_views,
    compare_torch=FLAGS.compare_torch,
  )
  if options.compare_torch:
    import torch  # noqa: F401  (before anything could import tensorflow)
    import torchvision  # noqa: F401
  try:
    if not os.path.isfile(options.config_path):
      raise BenchmarkError(
        f"--config={options.config_path!r} is not a file; use e.g. configs/cifar100.py."
      )
    report = run(FLAGS.config, options)
  except BenchmarkError as error:
    print(f"benchmark: {error}", file=sys.stderr)
    sys.exit(2)
  from benchmarks import report as report_lib

  print(report_lib.format_table(report))
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {FLAGS.json}")


if __name__ == "__main__":
  host_memory.reexec_with_malloc_tuning()
  app.run(main, flags_parser=_parse_flags)
