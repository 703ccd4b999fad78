"""The sharded train step: 1 device vs 8 forced CPU devices give the same numbers."""

import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "workers", "train_steps_worker.py")


def run_worker(tmp_path, num_devices, method, steps=2):
  out = tmp_path / f"{method}_{num_devices}.npz"
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, WORKER, str(num_devices), method, str(steps), str(out)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  return dict(np.load(out))


def relative_error(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ega", "rkd"])
def test_one_device_equals_eight_devices(tmp_path, method):
  single = run_worker(tmp_path, 1, method)
  sharded = run_worker(tmp_path, 8, method)
  assert single.keys() == sharded.keys()
  # The steps really trained: the loss moved and the parameters are finite.
  assert single["metric/0/loss"] != single["metric/1/loss"]
  assert float(single["metric/0/distill"]) > 0
  for key in single:
    assert np.all(np.isfinite(single[key])), key
    assert relative_error(sharded[key], single[key]) <= 1e-5, (
        key, relative_error(sharded[key], single[key]))
