"""What a run records about itself: `config.json` in the workdir, and its progress meter.

`config.json` is written by process 0 each time a run starts (a resume rewrites
it): the full resolved config, the software (package version, git commit when
the package runs from a checkout, jax/flax versions), the hardware (device kind
and count, process count), the student's input contract (arch, classes, image
size, mean/std, feature_dim) and the parameter counts. `ega_jax.export` and
`ega_jax.evaluate` read it, so a workdir can be exported or scored without the
command line that trained it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import time

import jax
import numpy as np

import ega_jax

RECORD_NAME = "config.json"


def config_hash(config_dict: dict) -> str:
  """sha256 of the config's canonical JSON: equal configs, equal hashes."""
  canonical = json.dumps(config_dict, sort_keys=True, default=str)
  return hashlib.sha256(canonical.encode()).hexdigest()


def git_commit() -> str | None:
  """The checkout's HEAD commit when ega_jax runs from its own git checkout, else None
  (an installed copy inside some other repository records nothing)."""
  package_dir = os.path.dirname(os.path.abspath(ega_jax.__file__))
  try:
    result = subprocess.run(
      ["git", "-C", package_dir, "rev-parse", "--show-toplevel", "HEAD"],
      capture_output=True,
      text=True,
      timeout=10,
    )
  except (OSError, subprocess.TimeoutExpired):
    return None
  if result.returncode != 0:
    return None
  top_level, commit = result.stdout.split()
  if os.path.realpath(top_level) != os.path.dirname(package_dir):
    return None
  return commit


def count_parameters(tree) -> int:
  return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree.leaves(tree)))


def parameter_counts(state) -> dict[str, int]:
  """Trainable parameter counts of the student backbone, its head and the teacher head."""
  counts = {name: count_parameters(tree) for name, tree in state.student_params.items()}
  counts["teacher_head"] = count_parameters(state.teacher_head_params)
  return {f"student_{name}" if name != "teacher_head" else name: n for name, n in counts.items()}


def build_record(
  config, run, *, image_size: int, num_train_examples: int, steps_per_epoch: int, num_steps: int
) -> dict:
  """The JSON-able run record (see the module docstring); `image_size` is the student's input."""
  import flax

  from ega_jax.models import students

  config_dict = json.loads(json.dumps(config.to_dict(), default=list))
  models = run.models
  devices = jax.devices()
  return {
    "config": config_dict,
    "config_hash": config_hash(config_dict),
    "ega_jax_version": ega_jax.__version__,
    "git_commit": git_commit(),
    "jax_version": jax.__version__,
    "flax_version": flax.__version__,
    "device_kind": devices[0].device_kind,
    "platform": devices[0].platform,
    "device_count": jax.device_count(),
    "process_count": jax.process_count(),
    "student": {
      "arch": config.student.arch,
      "num_classes": int(models.student.num_classes),
      "image_size": int(image_size),
      "mean": list(models.data_mean),
      "std": list(models.data_std),
      "feature_dim": int(config.feature_dim),
      "backbone_feature_dim": students.student_feature_dim(config.student.arch),
    },
    "num_train_examples": int(num_train_examples),
    "steps_per_epoch": int(steps_per_epoch),
    "num_train_steps": int(num_steps),
    "parameter_counts": parameter_counts(run.state),
    "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def write_record(workdir, record: dict) -> None:
  """Writes workdir/config.json on process 0."""
  if jax.process_index() == 0:
    (workdir / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")


def read_record(workdir) -> dict:
  """The run record of `workdir`; one clear error when it has none."""
  from ega_jax import config as config_lib

  path = os.path.join(str(workdir), RECORD_NAME)
  if not os.path.isfile(path):
    raise config_lib.UserInputError(
      f"{path} does not exist: {workdir!s} is not a workdir of a training run "
      "(python -m ega_jax.main writes config.json there when it starts)."
    )
  with open(path) as f:
    return json.load(f)


def format_duration(seconds: float) -> str:
  """12 -> '12s', 754 -> '12m34s', 7384 -> '2h03m'."""
  seconds = max(0, int(round(seconds)))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressMeter:
  """Training steps per second between two log records, and the ETA.

  Time spent in evaluation, checkpoints and pictures is excluded (`pause`), so
  steps_per_sec is the training throughput and the ETA the training time left.
  """

  def __init__(self, step: int, num_steps: int):
    self.num_steps = num_steps
    self.first_step = step
    self._step = step
    self._time = time.perf_counter()
    self._paused = 0.0

  def pause(self, seconds: float) -> None:
    self._paused += seconds

  def tick(self, step: int) -> tuple[float, float]:
    """(steps per second since the last tick, seconds left at that rate)."""
    now = time.perf_counter()
    elapsed = max(now - self._time - self._paused, 1e-9)
    rate = (step - self._step) / elapsed
    self._step, self._time, self._paused = step, now, 0.0
    eta = (self.num_steps - step) / rate if rate > 0 else float("inf")
    return rate, eta
