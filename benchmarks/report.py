"""The benchmark's report: numbers derived from the timings, and the table on stdout.

`jax_result` turns the JAX step's facts and times into rates and shares,
`cache_economics` gives the epoch times with and without the teacher cache,
`format_table` prints the whole report (what --json writes) as two columns.
"""

from __future__ import annotations

import statistics

from benchmarks import machine
from benchmarks.timing import summarise_times


def jax_result(
  facts: dict, times: dict[str, list[float]], batch_size: int, last_loss: float
) -> dict:
  """The JAX part of the report: `prepare_jax`'s facts, the step's times and rates.

  Args:
    facts: what `jax_harness.prepare_jax` measured once.
    times: `time_interleaved`'s result ('jax_step'[, 'jax_teacher_forward',
      'jax_cached_step']).
    batch_size: the global batch.
  """
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
      "flops_fraction": (
        facts["teacher_forward_flops_per_device"] / facts["flops_per_step_per_device"]
      ),
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


def cache_economics(
  num_train: int,
  batch_size: int,
  num_epochs: float,
  num_views: int,
  live_step_s: float,
  cached_step_s: float,
  teacher_batch_s: float,
  torch_step_s: float | None,
) -> dict:
  """Epoch times with and without the cache, and the cache's build cost.

  Building K views runs the teacher over K x num_train images, at the timed
  teacher-alone rate (batch_size images per `teacher_batch_s`); "amortised"
  spreads that over `num_epochs` epochs of cached training.
  """
  steps = num_train // batch_size
  build_s = num_views * num_train / batch_size * teacher_batch_s
  result = {
    "num_train": num_train,
    "steps_per_epoch": steps,
    "num_epochs": num_epochs,
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
      result["torch_epoch_s"] / result["cached_epoch_amortised_s"]
    )
  return result


def add_cache_economics(
  report: dict, *, num_train: int, batch_size: int, num_epochs: float, num_views: int
) -> None:
  """Adds the cached step's MFU, `cache_economics` and the cached/PyTorch ratios to `report`.

  `report` holds 'jax' (with 'cached' and 'teacher_forward'), 'peak_matmul'
  and, when PyTorch was timed, 'torch'.
  """
  jax_part, torch_part = report["jax"], report.get("torch")
  cached = jax_part["cached"]
  report["cached_mfu"] = (
    cached["achieved_flops_per_sec_per_device"] / report["peak_matmul"]["flops_per_sec"]
  )
  # The teacher alone is timed on one device's slice; all devices run it at once.
  report["cache_economics"] = cache_economics(
    num_train,
    batch_size,
    num_epochs,
    num_views,
    jax_part["step_time"]["median_s"],
    cached["step_time"]["median_s"],
    jax_part["teacher_forward"]["time"]["median_s"],
    torch_part["step_time"]["median_s"] if torch_part else None,
  )
  if torch_part:
    report["cached_over_torch_images_per_sec"] = (
      cached["images_per_sec"] / torch_part["images_per_sec"]
    )
    report["cached_over_torch_cached_images_per_sec"] = (
      cached["images_per_sec"] / torch_part["cached"]["images_per_sec"]
    )


def student_result(times: dict[str, list[float]], batch_size: int) -> dict:
  """The student alone in both frameworks: forward and forward + backward times and ratios.

  A ratio 'X_jax_over_torch' is PyTorch's median time over JAX's (above 1: JAX
  is faster). 'backward_*' is forward + backward minus forward, medians.
  """
  medians = {}
  result = {"batch_size": batch_size}
  for framework in ("jax", "torch"):
    for part in ("forward", "forward_backward"):
      key = f"{framework}_student_{part}"
      result[f"{framework}_{part}"] = summarise_times(times[key])
      medians[framework, part] = statistics.median(times[key])
    result[f"{framework}_backward_s"] = (
      medians[framework, "forward_backward"] - medians[framework, "forward"]
    )
  for part in ("forward", "forward_backward"):
    result[f"{part}_jax_over_torch"] = medians["torch", part] / medians["jax", part]
  result["backward_jax_over_torch"] = result["torch_backward_s"] / result["jax_backward_s"]
  return result


# The speed targets of docs/performance.md: (report key, what it is, at least).
SPEED_TARGETS = (
  ("jax_over_torch_images_per_sec", "live JAX / live PyTorch images/s", 1.5),
  ("cached_over_torch_cached_images_per_sec", "cached JAX / cached PyTorch images/s", 1.0),
  ("student_forward_backward_jax_over_torch", "student fwd+bwd JAX / PyTorch speed", 1.0),
)


def targets(report: dict) -> list[dict]:
  """Each speed target this run measured: {'name', 'measured', 'target', 'met', 'cpu_kind'}."""
  return [
    {
      "name": name,
      "measured": report[key],
      "target": target,
      "met": bool(report[key] >= target),
      "cpu_kind": report["cpu"]["vector_kind"],
    }
    for key, name, target in SPEED_TARGETS
    if key in report
  ]


def _si(value: float, unit: str) -> str:
  for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= scale:
      return f"{value / scale:.2f} {prefix}{unit}"
  return f"{value:.2f} {unit}"


def format_table(report: dict) -> str:
  """The report as aligned 'name  value' lines.

  First the headline ratios (live JAX / live PyTorch, cached JAX / cached
  PyTorch, the student's forward + backward) where they were measured, then
  the JAX step, PyTorch, the student alone, the cache, and the speed targets.
  """
  rows = []
  if "jax_over_torch_images_per_sec" in report:
    rows.append(
      ("live JAX / live PyTorch images/s", f"{report['jax_over_torch_images_per_sec']:.2f}x")
    )
  if "cached_over_torch_cached_images_per_sec" in report:
    rows.append(
      (
        "cached JAX / cached PyTorch images/s",
        f"{report['cached_over_torch_cached_images_per_sec']:.2f}x",
      )
    )
  if "student_forward_backward_jax_over_torch" in report:
    rows.append(
      (
        "student fwd+bwd JAX / PyTorch speed",
        f"{report['student_forward_backward_jax_over_torch']:.2f}x",
      )
    )
  rows += _jax_rows(report)
  if "torch" in report:
    rows += _torch_rows(report)
  if "student_alone" in report:
    rows += _student_rows(report)
  if "cached" in report["jax"]:
    rows += _cached_rows(report)
  for target in report.get("targets", ()):
    verdict = "met" if target["met"] else "SHORT (docs/performance.md: where the time goes)"
    rows.append(
      (
        f"target {target['name']} >= {target['target']:g}x",
        f"{target['measured']:.2f}x {verdict} on {target['cpu_kind']}",
      )
    )
  width = max(len(name) for name, _ in rows)
  return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _jax_rows(report: dict) -> list[tuple[str, str]]:
  jax_part = report["jax"]
  peak = report["peak_matmul"]
  step = jax_part["step_time"]
  load = lambda key: " ".join(f"{v:.2f}" for v in report[key])  # noqa: E731
  rows = [
    (
      "machine",
      f"{report['cpu_count']} CPUs, {jax_part['backend']} x{jax_part['num_devices']} "
      f"({jax_part['device_kind']})",
    ),
    ("CPU", machine.one_line(report["cpu"]).rsplit(", load", 1)[0]),
    (
      "load average (1/5/15 min)",
      f"{load('load_average_before')} before, {load('load_average_after')} after",
    ),
    (
      "malloc tuning (host_memory)",
      "on: temporary buffers stay mapped between steps"
      if report.get("malloc_tuning")
      else "off: every step maps its temporary buffers afresh (page faults)",
    ),
    (
      "setting",
      f"{report['dataset']} {report['image_size']}px, teacher {report['teacher']} "
      f"@{jax_part['teacher_image_size']}px, student {report['student']}, "
      f"{report['method']}, batch {report['batch_size']}, {report['dtype']}",
    ),
    ("compile (lower + compile)", f"{jax_part['lower_s']:.2f} s + {jax_part['compile_s']:.2f} s"),
    ("first step", f"{jax_part['first_step_s']:.3f} s"),
    (
      f"step time (median of {report['steps']})",
      f"{step['median_s'] * 1e3:.1f} ms (min {step['min_s'] * 1e3:.1f}, "
      f"max {step['max_s'] * 1e3:.1f})",
    ),
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
    (
      f"measured peak ({peak['size']}^3 {peak['dtype']} matmul)",
      _si(peak["flops_per_sec"], "FLOP/s") + " per device",
    ),
    ("MFU (achieved / measured peak)", f"{100 * report['mfu']:.1f} %"),
    ("peak host memory (JAX part)", f"{report['peak_host_memory_mb']:.0f} MiB"),
  ]
  return rows


def _torch_rows(report: dict) -> list[tuple[str, str]]:
  torch_part = report["torch"]
  return [
    (
      "PyTorch step time (median)",
      f"{torch_part['step_time']['median_s'] * 1e3:.1f} ms "
      f"({torch_part['device']}, "
      f"{torch_part['num_threads']} threads, float32)",
    ),
    ("PyTorch images/s", f"{torch_part['images_per_sec']:.2f}"),
    (
      "PyTorch teacher share of step time",
      f"{100 * torch_part['teacher_forward_time_fraction']:.1f} %",
    ),
  ]


def _student_rows(report: dict) -> list[tuple[str, str]]:
  student = report["student_alone"]
  ms = lambda key: f"{student[key]['median_s'] * 1e3:.1f} ms"  # noqa: E731
  return [
    (
      f"student alone, batch {student['batch_size']}: JAX fwd / fwd+bwd",
      f"{ms('jax_forward')} / {ms('jax_forward_backward')}",
    ),
    (
      "student alone: PyTorch fwd / fwd+bwd",
      f"{ms('torch_forward')} / {ms('torch_forward_backward')}",
    ),
    (
      "student JAX / PyTorch speed: fwd, bwd alone",
      f"{student['forward_jax_over_torch']:.2f}x, {student['backward_jax_over_torch']:.2f}x",
    ),
  ]


def _cached_rows(report: dict) -> list[tuple[str, str]]:
  cached = report["jax"]["cached"]
  economics = report["cache_economics"]
  rows = [
    ("cached step: compile", f"{cached['compile_s']:.2f} s"),
    (
      f"cached step time (median of {report['steps']})",
      f"{cached['step_time']['median_s'] * 1e3:.1f} ms (min "
      f"{cached['step_time']['min_s'] * 1e3:.1f}, max {cached['step_time']['max_s'] * 1e3:.1f})",
    ),
    ("cached images/s", f"{cached['images_per_sec']:.2f}"),
    ("cached FLOPs per step (XLA)", _si(cached["flops_per_step"], "FLOP")),
    ("cached MFU", f"{100 * report['cached_mfu']:.1f} %"),
    (
      f"epoch of {economics['num_train']} images: live / cached",
      f"{economics['live_epoch_s']:.0f} s / {economics['cached_epoch_s']:.0f} s",
    ),
    (
      f"cache build, {economics['num_views']} views x {economics['num_train']} images",
      f"{economics['cache_build_s']:.0f} s (teacher alone)",
    ),
    (
      f"cached epoch incl. build / {economics['num_epochs']:g} epochs",
      f"{economics['cached_epoch_amortised_s']:.0f} s",
    ),
  ]
  if "torch_epoch_s" in economics:
    rows += [
      ("PyTorch epoch", f"{economics['torch_epoch_s']:.0f} s"),
      (
        "cached / PyTorch per epoch",
        f"{economics['cached_over_torch_per_epoch']:.2f}x "
        f"({economics['cached_amortised_over_torch_per_epoch']:.2f}x incl. build)",
      ),
      (
        "PyTorch cached step: images/s",
        f"{report['torch']['cached']['images_per_sec']:.2f} (fed the same float16 embeddings)",
      ),
    ]
  return rows
