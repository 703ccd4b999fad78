"""Two processes x 2 CPU devices (jax.distributed on 127.0.0.1) = 1 process x 4 devices."""

import json
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _command(workdir, teacher, *extra):
  return [
    sys.executable,
    "-m",
    "ega_jax.main",
    f"--workdir={workdir}",
    "--config=configs/fashion_mnist.py",
    f"--config.teacher.checkpoint={teacher}",
    "--config.dataset.max_train_examples=512",
    "--config.dataset.max_eval_examples=100",
    "--config.batch_size=32",
    "--config.eval_batch_size=64",
    "--config.feature_dim=32",
    "--config.num_train_steps=3",
    "--config.log_every_steps=1",
    "--config.eval_every_steps=3",
    "--config.graph_picture_batch=16",
    *extra,
  ]


def _env(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _metrics(workdir):
  merged = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      merged.setdefault(record["step"], {}).update(record)
  return merged


@pytest.mark.slow
def test_two_processes_match_one_process(converted_resnet18, tmp_path):
  single = tmp_path / "single"
  result = subprocess.run(
    _command(single, converted_resnet18),
    cwd=REPO,
    env=_env(4),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert result.returncode == 0, result.stderr[-3000:]

  multi = tmp_path / "multi"
  port = _free_port()
  processes = [
    subprocess.Popen(
      _command(
        multi,
        converted_resnet18,
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={rank}",
      ),
      cwd=REPO,
      env=_env(2),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for rank in range(2)
  ]
  outputs = [p.communicate(timeout=900)[0] for p in processes]
  for p, out in zip(processes, outputs):
    assert p.returncode == 0, out[-3000:]
  assert "JAX process 1 of 2, 2 local / 4 global devices" in outputs[1]

  a, b = _metrics(single), _metrics(multi)
  assert sorted(a) == sorted(b) == [1, 2, 3]
  for step in (1, 2, 3):
    for key in ("train/loss", "train/ce", "train/distill", "train/teacher_ce", "train/top1"):
      assert b[step][key] == pytest.approx(a[step][key], rel=1e-5), (step, key)
  for key in ("eval/top1", "eval/top5", "eval/teacher_top1", "eval/count"):
    assert b[3][key] == pytest.approx(a[3][key], rel=1e-5), key
  # Only process 0 writes the metrics file and the summary.
  with open(os.path.join(multi, "metrics.jsonl")) as f:
    assert sum(1 for line in f if '"train/loss"' in line) == 3
