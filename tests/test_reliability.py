"""Faults: preemption, kill -9, non-finite values, bad input, failing checkpoint writes."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from run_configs import fashion_mnist_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CLI_FLAGS = [
  "--config=configs/fashion_mnist.py",
  "--config.dataset.max_train_examples=512",
  "--config.dataset.max_eval_examples=64",
  "--config.batch_size=32",
  "--config.eval_batch_size=64",
  "--config.feature_dim=32",
  "--config.log_every_steps=1",
  "--config.graph_pictures=False",
]


def _env(cache_dir):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  # Restarts reuse compiled steps, so each restart costs seconds, not a compile.
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
  return env


def _command(workdir, teacher, *extra):
  # --config must precede the --config.* overrides.
  return [
    sys.executable,
    "-m",
    "ega_jax.main",
    f"--workdir={workdir}",
    CLI_FLAGS[0],
    f"--config.teacher.checkpoint={teacher}",
    *CLI_FLAGS[1:],
    *extra,
  ]


def _train_metrics(workdir):
  """{step: {train/...}} from metrics.jsonl, last record per step wins."""
  merged = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if "train/loss" in record:
        merged[record["step"]] = record
  return merged


class _Run:
  """A training subprocess whose stderr is watched for progress lines."""

  def __init__(self, command, env):
    self.process = subprocess.Popen(
      command, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    self.lines = []
    self.steps_seen = 0
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.process.stderr:
      self.lines.append(line)
      if "] step " in line and "/" in line:
        self.steps_seen = int(line.split("] step ")[1].split("/")[0])

  def wait_for_step(self, step, timeout=600):
    deadline = time.time() + timeout
    while self.steps_seen < step:
      if self.process.poll() is not None:
        raise AssertionError("run ended early:\n" + "".join(self.lines[-40:]))
      if time.time() > deadline:
        raise AssertionError("no progress:\n" + "".join(self.lines[-40:]))
      time.sleep(0.05)

  def wait(self, timeout=900):
    code = self.process.wait(timeout=timeout)
    self._reader.join(timeout=10)
    return code


# Long enough for five kills even when steps are fast; it crosses the
# learning-rate drop (step 11) and an epoch boundary (16 steps of 32 per epoch).
KILL_RUN_STEPS = 24


@pytest.fixture(scope="module")
def uninterrupted_run(converted_resnet18, tmp_path_factory):
  """{step: train metrics} of an uninterrupted KILL_RUN_STEPS-step run.

  The first n steps of it are also what an n-step run trains: the schedule
  depends on the epoch length, not on num_train_steps.
  """
  root = tmp_path_factory.mktemp("uninterrupted")
  workdir = root / "run"
  result = subprocess.run(
    _command(workdir, converted_resnet18, f"--config.num_train_steps={KILL_RUN_STEPS}"),
    cwd=REPO,
    env=_env(root / "cache"),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return _train_metrics(workdir)


def _assert_same_training(resumed, reference, num_steps):
  assert sorted(resumed) == list(range(1, num_steps + 1))
  for step in range(1, num_steps + 1):
    for key in ("train/loss", "train/ce", "train/distill", "train/top1"):
      assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-6), (step, key)


def test_sigterm_checkpoints_exits_zero_and_resume_matches(
  converted_resnet18, tmp_path, uninterrupted_run
):
  workdir = tmp_path / "run"
  env = _env(tmp_path / "cache")
  # Checkpoints only at the end: the one written on SIGTERM is what resumes.
  command = _command(
    workdir,
    converted_resnet18,
    "--config.num_train_steps=10",
    "--config.checkpoint_every_steps=100",
  )
  run = _Run(command, env)
  run.wait_for_step(4)
  run.process.send_signal(signal.SIGTERM)
  assert run.wait() == 0
  stopped = [line for line in run.lines if "Stopped by SIGTERM" in line]
  assert len(stopped) >= 1, "".join(run.lines[-20:])
  saved = sorted(int(name) for name in os.listdir(workdir / "checkpoints"))
  assert len(saved) == 1 and 4 <= saved[0] < 10

  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Resumed from {workdir} at step {saved[0]}" in result.stderr
  _assert_same_training(_train_metrics(workdir), uninterrupted_run, 10)


@pytest.mark.slow
def test_kill_9_at_random_moments_always_resumes(converted_resnet18, tmp_path, uninterrupted_run):
  workdir = tmp_path / "run"
  env = _env(tmp_path / "cache")
  # A checkpoint every step, written in the background (the default), so kills
  # land during asynchronous saves as well as between them.
  command = _command(
    workdir,
    converted_resnet18,
    f"--config.num_train_steps={KILL_RUN_STEPS}",
    "--config.checkpoint_every_steps=1",
    "--config.async_checkpoints=True",
  )
  moments = random.Random(1234)
  kills = 0
  while kills < 5:
    run = _Run(command, env)
    before = run.steps_seen
    try:
      run.wait_for_step(before + 1)
    except AssertionError:
      # Finished (or no steps left) before we could kill it: that must be success.
      assert run.wait() == 0, "".join(run.lines[-40:])
      break
    # Up to about two steps with their checkpoints, so five kills fit in the run.
    time.sleep(moments.uniform(0.0, 1.0))
    run.process.kill()
    run.wait()
    kills += 1
  assert kills == 5, "the run finished before five kills; make it longer"
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["steps"] == KILL_RUN_STEPS
  # Steps trained twice after a kill log twice; the last record per step must
  # equal the uninterrupted run's, so nothing was lost or corrupted.
  _assert_same_training(_train_metrics(workdir), uninterrupted_run, KILL_RUN_STEPS)


@pytest.mark.slow
def test_nonfinite_skip_counts_and_keeps_parameters(converted_resnet18, tmp_path):
  from ega_jax import train

  config = fashion_mnist_config(
    converted_resnet18,
    num_train_steps=3,
    debug_nan_at_step=2,
    eval_every_steps=100,
    graph_pictures=False,
  )
  summary = train.train_and_evaluate(config, str(tmp_path / "skip"))
  assert summary["skipped_steps"] == 1
  records = _train_metrics(tmp_path / "skip")
  assert np.isnan(records[2]["train/loss"]) and np.isfinite(records[3]["train/loss"])
  assert records[3]["train/skipped_steps"] == 1
  assert np.isfinite(summary["last_top1"])


@pytest.mark.slow
def test_nonfinite_stop_names_step_terms_and_checkpoint(converted_resnet18, tmp_path):
  from ega_jax import config as config_lib
  from ega_jax import train

  config = fashion_mnist_config(
    converted_resnet18,
    num_train_steps=4,
    debug_nan_at_step=3,
    nonfinite_policy="stop",
    checkpoint_every_steps=1,
    eval_every_steps=100,
    graph_pictures=False,
  )
  with pytest.raises(config_lib.NonFiniteError) as error:
    train.train_and_evaluate(config, str(tmp_path / "stop"))
  message = str(error.value)
  assert "at step 3" in message and "distill nan" in message
  assert "Last good checkpoint: step 2" in message and "\n" not in message


def _cli_error(command, env=None):
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, result.stderr[-3000:]
  return errors[0]


def test_bad_teacher_dirs_give_one_line(converted_resnet18, tmp_path):
  empty = tmp_path / "empty_teacher"
  empty.mkdir()
  line = _cli_error(_command(tmp_path / "w1", empty))
  assert "config.teacher.checkpoint=" in line and "teacher.json" in line

  corrupt = tmp_path / "corrupt_teacher"
  corrupt.mkdir()
  (corrupt / "teacher.json").write_text((converted_resnet18 / "teacher.json").read_text())
  (corrupt / "variables.msgpack").write_bytes(b"not a msgpack file")
  line = _cli_error(_command(tmp_path / "w2", corrupt))
  assert "config.teacher.checkpoint=" in line and "variables.msgpack" in line

  line = _cli_error(_command(tmp_path / "w3", converted_resnet18, "--config.teacher.arch=vit_s16"))
  assert "holds arch 'resnet18'" in line


def test_missing_dataset_names_the_preparation_command(converted_resnet18, tmp_path):
  line = _cli_error(
    _command(
      tmp_path / "w",
      converted_resnet18,
      "--config.dataset.name=cifar100",
      f"--config.dataset.data_dir={tmp_path / 'no_data'}",
    )
  )
  assert "tfds build cifar100" in line and "--file_format=array_record" in line


def test_images_too_small_for_the_student(converted_resnet18, tmp_path, monkeypatch):
  import dataclasses

  from ega_jax import data as data_lib
  from ega_jax import config as config_lib
  from ega_jax import train

  tiny = dataclasses.replace(data_lib.get_dataset_info("fashion_mnist"), image_size=4)
  monkeypatch.setitem(data_lib.DATASETS, "fashion_mnist", tiny)
  config = fashion_mnist_config(converted_resnet18, **{"student.arch": "vgg8"})
  with pytest.raises(
    config_lib.UserInputError, match=r"config.student.arch='vgg8' on 4x4"
  ) as error:
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert "\n" not in str(error.value)


@pytest.mark.slow
def test_workdir_of_another_run_is_refused_unless_overwritten(converted_resnet18, tmp_path):
  from ega_jax import config as config_lib
  from ega_jax import train

  workdir = str(tmp_path / "w")
  train.train_and_evaluate(
    fashion_mnist_config(converted_resnet18, num_train_steps=1, graph_pictures=False), workdir
  )
  other = fashion_mnist_config(
    converted_resnet18, num_train_steps=1, graph_pictures=False, **{"student.arch": "wrn_16_1"}
  )
  with pytest.raises(config_lib.ConfigError, match="holds checkpoints of another run") as error:
    train.train_and_evaluate(other, workdir)
  assert "overwrite_workdir" in str(error.value)
  other.overwrite_workdir = True
  summary = train.train_and_evaluate(other, workdir)
  assert summary["steps"] == 1


@pytest.mark.slow
def test_failed_checkpoint_write_surfaces_and_previous_stays_usable(
  converted_resnet18, tmp_path, monkeypatch
):
  import orbax.checkpoint as ocp

  from ega_jax import train

  workdir = str(tmp_path / "w")
  config = fashion_mnist_config(
    converted_resnet18,
    num_train_steps=4,
    checkpoint_every_steps=2,
    eval_every_steps=100,
    graph_pictures=False,
  )
  original_save = ocp.CheckpointManager.save
  calls = {"latest": 0}

  def failing_save(self, step, *args, **kwargs):
    if str(self.directory).endswith("checkpoints"):
      calls["latest"] += 1
      if calls["latest"] == 2:
        raise OSError(28, "No space left on device (injected)")
    return original_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save)
  with pytest.raises(OSError, match="injected"):
    train.train_and_evaluate(config, workdir)
  monkeypatch.setattr(ocp.CheckpointManager, "save", original_save)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  summary = train.train_and_evaluate(config, workdir)
  assert summary["steps"] == 4
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "4"


def test_unwritable_or_full_workdir_is_refused_before_training(
  converted_resnet18, tmp_path, monkeypatch
):
  import collections
  import shutil

  from ega_jax import config as config_lib
  from ega_jax import train

  config = fashion_mnist_config(converted_resnet18, graph_pictures=False)
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  # (Permission bits do not stop root, which CI may be; a path through a file fails for anyone.)
  with pytest.raises(config_lib.UserInputError, match=r"a_file/w' is not writable"):
    train.train_and_evaluate(config, str(blocker / "w"))

  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
  workdir = tmp_path / "full"
  with pytest.raises(config_lib.UserInputError, match=r"has 1 MiB free; checkpoints of this run"):
    train.train_and_evaluate(config, str(workdir))
  assert not os.listdir(workdir / "checkpoints") and not (workdir / "metrics.jsonl").exists()
