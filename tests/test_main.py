"""The real training loop end to end: CLI, metrics, checkpoints, resume, errors.

The teacher is a randomly initialised torchvision ResNet-18 converted through
python -m launch.convert_teacher, exactly as a user converts a released checkpoint;
the data are the real Fashion-MNIST files (a small slice) and TFDS mock data.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from run_configs import fashion_mnist_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_cli_trains_evaluates_checkpoints_and_writes_metrics(converted_resnet18, tmp_path):
  workdir = tmp_path / "run"
  command = [
    sys.executable,
    "-m",
    "ega_jax.main",
    "--config=configs/fashion_mnist.py",
    f"--workdir={workdir}",
    f"--config.teacher.checkpoint={converted_resnet18}",
    "--config.dataset.max_train_examples=256",
    "--config.dataset.max_eval_examples=100",
    "--config.batch_size=32",
    "--config.eval_batch_size=64",
    "--config.feature_dim=32",
    "--config.num_train_steps=4",
    "--config.log_every_steps=2",
    "--config.eval_every_steps=2",
    "--config.checkpoint_every_steps=2",
    "--config.graph_picture_batch=16",
  ]
  result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]

  records = _read_jsonl(workdir / "metrics.jsonl")
  merged = {}
  for record in records:
    merged.setdefault(record["step"], {}).update(record)
  assert sorted(merged) == [2, 4]
  for key in (
    "train/loss",
    "train/ce",
    "train/distill",
    "train/top1",
    "eval/top1",
    "eval/top5",
    "eval/teacher_top1",
    "eval/best_top1",
    "train/steps_per_sec",
  ):
    assert key in merged[4], key
  # Padded, masked evaluation: 100 examples in batches of 64 count exactly once.
  assert merged[4]["eval/count"] == 100
  assert 0 <= merged[4]["eval/top1"] <= merged[4]["eval/top5"] <= 100
  assert merged[4]["eval/best_top1"] == max(merged[2]["eval/top1"], merged[4]["eval/top1"])
  assert np.isfinite(merged[4]["train/loss"]) and merged[4]["train/distill"] > 0

  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  # One checkpoint manager keeps the latest k and, besides them, the best by eval/top1.
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(
    workdir / "checkpoints",
    options=ocp.CheckpointManagerOptions(
      best_fn=lambda metrics: metrics["eval/top1"], best_mode="max", read_only=True
    ),
  ) as manager:
    best_step = manager.best_step()
  assert merged[best_step]["eval/top1"] == merged[4]["eval/best_top1"]
  assert sorted(os.listdir(workdir / "graphs")) == ["graphs_00000002.png", "graphs_00000004.png"]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["steps"] == 4 and summary["last_top1"] == merged[4]["eval/top1"]
  # Progress and results are readable in the log, not buried in library chatter.
  assert "eval at step 4" in result.stderr
  assert "orbax" not in result.stderr.lower() or "WARNING" in result.stderr


def _final_params(workdir, step):
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints"))) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return restored["state"]


def test_resume_after_restart_equals_uninterrupted_run(converted_resnet18, tmp_path):
  from ega_jax import train

  straight = tmp_path / "straight"
  config = fashion_mnist_config(
    converted_resnet18, num_train_steps=6, checkpoint_every_steps=3, eval_every_steps=3
  )
  train.train_and_evaluate(config, str(straight))

  restarted = tmp_path / "restarted"
  first = fashion_mnist_config(
    converted_resnet18, num_train_steps=3, checkpoint_every_steps=3, eval_every_steps=3
  )
  train.train_and_evaluate(first, str(restarted))
  # A new process would see the same: a fresh call that only finds the workdir.
  second = fashion_mnist_config(
    converted_resnet18, num_train_steps=6, checkpoint_every_steps=3, eval_every_steps=3
  )
  train.train_and_evaluate(second, str(restarted))

  def by_step(path):
    merged = {}
    for record in _read_jsonl(path / "metrics.jsonl"):
      merged.setdefault(record["step"], {}).update(record)
    return merged

  a, b = by_step(straight), by_step(restarted)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
  for step in range(1, 7):
    for key, value in a[step].items():
      if key == "train/steps_per_sec":
        continue
      assert b[step][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, key)

  state_a, state_b = _final_params(straight, 6), _final_params(restarted, 6)
  leaves_a = {str(k): v for k, v in __import__("jax").tree_util.tree_leaves_with_path(state_a)}
  leaves_b = {str(k): v for k, v in __import__("jax").tree_util.tree_leaves_with_path(state_b)}
  assert leaves_a.keys() == leaves_b.keys()
  for key in leaves_a:
    np.testing.assert_allclose(
      np.asarray(leaves_b[key]), np.asarray(leaves_a[key]), rtol=1e-6, atol=1e-9, err_msg=key
    )


@pytest.mark.slow
def test_loop_runs_on_tfds_mock_cifar100(converted_resnet18, tmp_path):
  import tensorflow_datasets as tfds
  from ega_jax import train

  config = fashion_mnist_config(
    converted_resnet18,
    **{
      "dataset.name": "cifar100",
      "dataset.max_train_examples": -1,
      "dataset.max_eval_examples": -1,
      "num_train_steps": 2,
      "eval_every_steps": 2,
      "distill.method": "crd",
      "distill.crd_num_negatives": 16,
      "graph_pictures": False,
    },
  )
  with tfds.testing.mock_data(num_examples=64):
    summary = train.train_and_evaluate(config, str(tmp_path / "cifar"))
  assert summary["steps"] == 2
  assert 0.0 <= summary["last_top1"] <= 100.0
  records = _read_jsonl(tmp_path / "cifar" / "metrics.jsonl")
  evals = [r for r in records if "eval/count" in r]
  assert evals[-1]["eval/count"] == 64
  assert all(np.isfinite(r["train/distill"]) for r in records if "train/distill" in r)


def test_config_errors_name_the_field(converted_resnet18, tmp_path):
  from ega_jax import config as config_lib
  from ega_jax import train

  cases = [
    ({"distill.method": "egaa"}, "config.distill.method='egaa'"),
    ({"student.arch": "resnet9"}, "config.student.arch='resnet9'"),
    ({"dataset.name": "cifar1000"}, "config.dataset.name='cifar1000'"),
    ({"teacher_view": "other"}, "config.teacher_view='other'"),
    ({"batch_size": 0}, "config.batch_size=0"),
    ({"teacher.checkpoint": str(tmp_path / "missing")}, "config.teacher.checkpoint="),
  ]
  for overrides, expected in cases:
    config = fashion_mnist_config(converted_resnet18, **overrides)
    with pytest.raises(config_lib.ConfigError, match=expected.replace("[", r"\[")) as error:
      config_lib.validate_config(config, num_devices=1)
    assert "\n" not in str(error.value)
  config = fashion_mnist_config(converted_resnet18, batch_size=12)
  with pytest.raises(config_lib.ConfigError, match="multiple of the device count"):
    config_lib.validate_config(config, num_devices=8)
  config = fashion_mnist_config(converted_resnet18, **{"teacher.arch": "resnet50"})
  with pytest.raises(config_lib.ConfigError, match="holds arch 'resnet18'"):
    train.train_and_evaluate(config, str(tmp_path / "mismatch"))


@pytest.mark.parametrize(
  "name", ["cifar100", "fashion_mnist", "fashion_mnist_few_labels", "stl10", "tinyimagenet"]
)
def test_shipped_configs_are_valid_on_1_to_16_devices(name, converted_resnet18):
  import importlib

  from ega_jax import config as config_lib

  config = importlib.import_module(f"ega_jax.configs.{name}").get_config()
  config.teacher.checkpoint = str(converted_resnet18)
  for num_devices in (1, 2, 4, 8, 16):
    config_lib.validate_config(config, num_devices)
    eval_batch = config_lib.eval_batch_size_for(config, num_devices)
    # Rounded up to whole per-device batches, never down.
    assert eval_batch % num_devices == 0
    assert config.eval_batch_size <= eval_batch < config.eval_batch_size + num_devices


@pytest.mark.parametrize(
  "argv, expected",
  [
    (
      ["--config=configs/fashion_mnist.py", "--config.distill.metod=rkd"],
      "--config.distill.metod: config.distill has no field 'metod'; did you mean "
      "config.distill.method?",
    ),
    (
      ["--config", "fashion_mnist", "--config.dataset.nam=x"],
      "config.dataset has no field 'nam'; did you mean config.dataset.name?",
    ),
    (["--config=configs/nope.py"], "configs/nope.py does not exist; give a path"),
    (["--config=nope"], "shipped configs: cifar100, fashion_mnist, fashion_mnist_few_labels"),
    (["--config=configs/cifar100.py:x"], "get_config() cannot take the argument 'x'"),
    (["--config=configs/cifar100.py", "--config.seed.x=1"], "config.seed has no field 'x'"),
  ],
)
def test_flag_mistakes_are_one_sentence(argv, expected):
  from ega_jax import cli

  with pytest.raises(cli.FlagError) as error:
    cli.check_config_flags(["prog"] + argv)
  assert expected in str(error.value) and "\n" not in str(error.value)


def test_config_by_name_and_get_config():
  import ega_jax
  from ega_jax import cli
  from ega_jax import config as config_lib

  argv = cli.check_config_flags(["prog", "--config=fashion_mnist", "--config.seed=3"])
  assert argv[1] == "--config=" + os.path.join(cli.PACKAGED_CONFIG_DIR, "fashion_mnist.py")
  config = ega_jax.get_config("cifar100", distill__method="rkd", batch_size=128)
  assert config.distill.method == "rkd" and config.batch_size == 128
  with pytest.raises(config_lib.UserInputError, match="did you mean config.batch_size"):
    ega_jax.get_config("cifar100", batch_sise=128)


def test_cli_reports_a_config_mistake_in_one_line(converted_resnet18, tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "ega_jax.main",
      "--config=configs/fashion_mnist.py",
      f"--workdir={tmp_path / 'w'}",
      f"--config.teacher.checkpoint={converted_resnet18}",
      "--config.distill.method=nope",
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
  )
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(error_lines) == 1 and "config.distill.method='nope'" in error_lines[0]
  assert "ega" in error_lines[0]  # lists the valid names


def test_config_file_argument_mistakes_and_the_shipped_fallback(tmp_path, monkeypatch):
  from ega_jax import cli

  needs_one = tmp_path / "needs_one.py"
  needs_one.write_text("def get_config(size):\n  return {'size': size}\n")
  with pytest.raises(
    cli.FlagError, match=r"cannot take no argument .*add one as --config=PATH:ARG"
  ):
    cli.load_config_file(str(needs_one))
  assert cli.load_config_file(f"{needs_one}:7") == {"size": "7"}
  not_python = tmp_path / "fashion_mnist"
  not_python.write_text("")
  with pytest.raises(cli.FlagError, match="is not a Python file"):
    cli.load_config_file(str(not_python))
  # Outside the checkout, configs/NAME.py means the shipped NAME.
  monkeypatch.chdir(tmp_path / "..")
  resolved = cli.resolve_config_path("configs/cifar100.py")
  assert resolved == os.path.join(cli.PACKAGED_CONFIG_DIR, "cifar100.py")
