"""Tests for ega_jax.plot (learning curves from metrics.jsonl) and compare.py's curves.png."""

import argparse
import json
import os
import subprocess
import sys

from matplotlib import image as mpl_image
import numpy as np
import pytest

from ega_jax import plot

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# FIGSIZE (12, 4.5) inches at 100 dpi, as (H, W): written out so a change shows up here.
PNG_SHAPE = (450, 1200)


def _write_run(workdir, records, tail=""):
  """metrics.jsonl in `workdir` with one line per record (dicts), plus raw `tail`."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, plot.METRICS_FILE), "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in records) + tail)
  return str(workdir)


def _records(steps, eval_every, loss_start, top1_start):
  """Train lines at `steps`, eval lines (separate) every `eval_every`, as the loop writes them."""
  records = []
  for step in steps:
    records.append({"step": step, "train/loss": loss_start / step, "train/learning_rate": 0.1})
    if step % eval_every == 0:
      records.append({"step": step, "eval/top1": top1_start + step / 10, "eval/ce": 1.0})
  return records


def test_read_metrics_returns_the_written_values(tmp_path):
  workdir = _write_run(tmp_path / "run", _records([10, 20, 30, 40], 20, 8.0, 50.0))
  metrics = plot.read_metrics(workdir)
  assert set(metrics) == {"train/loss", "train/learning_rate", "eval/top1", "eval/ce"}
  steps, values = metrics["train/loss"]
  assert steps.dtype == np.int64 and values.dtype == np.float64
  np.testing.assert_array_equal(steps, [10, 20, 30, 40])
  np.testing.assert_array_equal(values, [0.8, 0.4, 8.0 / 30, 0.2])
  steps, values = metrics["eval/top1"]
  np.testing.assert_array_equal(steps, [20, 40])
  np.testing.assert_array_equal(values, [52.0, 54.0])


def test_resumed_run_keeps_the_last_value_of_each_step(tmp_path):
  # Ran to step 30 (checkpoint at 20), was killed, resumed from 20 and reran 30
  # with other values before going on to 40; the kill also left half a line.
  first = [
    {"step": 10, "train/loss": 3.0},
    {"step": 20, "train/loss": 2.0},
    {"step": 20, "eval/top1": 40.0},
    {"step": 30, "train/loss": 1.5},
    {"step": 30, "eval/top1": 45.0},
  ]
  resumed = [
    {"step": 30, "train/loss": 1.25},
    {"step": 30, "eval/top1": 47.0},
    {"step": 40, "train/loss": 1.0},
    {"step": 40, "eval/top1": 50.0},
  ]
  workdir = _write_run(tmp_path / "resumed", first + resumed, tail='{"step": 50, "train/lo')
  metrics = plot.read_metrics(workdir)
  np.testing.assert_array_equal(metrics["train/loss"][0], [10, 20, 30, 40])
  np.testing.assert_array_equal(metrics["train/loss"][1], [3.0, 2.0, 1.25, 1.0])
  np.testing.assert_array_equal(metrics["eval/top1"][0], [20, 30, 40])
  np.testing.assert_array_equal(metrics["eval/top1"][1], [40.0, 47.0, 50.0])


def test_missing_file_and_missing_eval_are_errors_naming_the_file(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(plot.MetricsError, match=f"{empty}/metrics.jsonl does not exist"):
    plot.read_metrics(empty)
  no_eval = _write_run(tmp_path / "no_eval", [{"step": 10, "train/loss": 1.0}])
  with pytest.raises(plot.MetricsError, match=f"{no_eval}/metrics.jsonl holds no eval/top1"):
    plot.read_metrics(no_eval)
  broken = _write_run(tmp_path / "broken", [{"step": 10, "eval/top1": 1.0}], tail="oops\n{}\n")
  with pytest.raises(plot.MetricsError, match="metrics.jsonl line 2 is not a metrics record"):
    plot.read_metrics(broken)


def test_average_metrics_means_over_runs_at_common_steps():
  run_a = {"eval/top1": (np.array([10, 20, 30]), np.array([1.0, 2.0, 3.0])), "only_a": None}
  run_b = {"eval/top1": (np.array([20, 30, 40]), np.array([4.0, 6.0, 8.0]))}
  averaged = plot.average_metrics([run_a, run_b])
  assert set(averaged) == {"eval/top1"}
  np.testing.assert_array_equal(averaged["eval/top1"][0], [20, 30])
  np.testing.assert_array_equal(averaged["eval/top1"][1], [3.0, 4.5])


def test_plot_learning_curves_writes_a_png_of_the_figure_size(tmp_path):
  workdirs = [
    _write_run(tmp_path / "kd_seed0", _records(range(10, 101, 10), 20, 8.0, 50.0)),
    _write_run(tmp_path / "ega_seed0", _records(range(10, 101, 10), 50, 80.0, 40.0)),
  ]
  output = tmp_path / "out" / "curves.png"  # Its folder does not exist yet.
  assert plot.plot_learning_curves(workdirs, output, title="two runs") == output
  image = mpl_image.imread(output)
  assert image.shape[:2] == PNG_SHAPE
  assert image.dtype == np.float32 and 0.0 <= image.min() < image.max() <= 1.0
  with pytest.raises(ValueError, match="1 labels were given for 2 workdirs"):
    plot.plot_learning_curves(workdirs, output, labels=["a"])


def test_cli_in_process_and_as_a_module(tmp_path, capsys):
  first = _write_run(tmp_path / "a" / "run", _records([5, 10], 5, 2.0, 10.0))
  second = _write_run(tmp_path / "b" / "run", _records([5, 10], 10, 3.0, 20.0))
  output = tmp_path / "cli.png"
  # Flags after the workdirs, as in the documented usage.
  plot.main(["plot", first, second, f"--output={output}", "--labels=a,b", "--title", "T"])
  assert f"wrote {output}" in capsys.readouterr().out
  assert mpl_image.imread(output).shape[:2] == PNG_SHAPE
  # Both workdirs are called "run": the default labels would clash.
  with pytest.raises(SystemExit, match="labels must be distinct"):
    plot.main(["plot", first, second, f"--output={output}"])
  with pytest.raises(SystemExit, match="give at least one workdir"):
    plot.main(["plot", f"--output={output}"])

  missing = tmp_path / "missing"
  result = subprocess.run(
    [sys.executable, "-m", "ega_jax.plot", first, str(missing), f"--output={output}"],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 1
  assert result.stderr.strip() == (
    f"ega_jax.plot: {missing}/metrics.jsonl does not exist: {missing} is not a training "
    "workdir, or its run logged nothing yet."
  )


def test_compare_draws_each_methods_seed_mean(tmp_path, capsys):
  from experiments import compare

  args = argparse.Namespace(
    output_dir=str(tmp_path), config="configs/fashion_mnist.py", seeds="0,1"
  )
  for seed, top1 in ((0, 60.0), (1, 70.0)):
    _write_run(compare.run_workdir(args, "ega", seed), _records([10, 20], 10, 5.0, top1))
    _write_run(compare.run_workdir(args, "kd", seed), _records([10, 20], 20, 4.0, top1))
  # A reused run without metrics.jsonl costs only its method's curve.
  os.makedirs(compare.run_workdir(args, "none", 0))
  path = compare.plot_curves(args, ["ega", "kd", "none"], [0, 1])
  assert path == os.path.join(str(tmp_path), "curves.png")
  assert mpl_image.imread(path).shape[:2] == PNG_SHAPE
  assert "no curve for none" in capsys.readouterr().out
