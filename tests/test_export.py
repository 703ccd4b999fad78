"""The student leaves the workdir: the run record, export, evaluate and the Python API.

One short EGA run (module fixture) is exported in every format, scored again
from its workdir and from the export, and loaded back; the PyTorch layout is
loaded strictly into PyTorch re-statements of the released student classes.
"""

import json
import logging
import os

import numpy as np
import pytest
import torch

from ega_jax.models.students import STUDENT_NAMES
from run_configs import fashion_mnist_config, needs_fashion_mnist
from torch_zoo import build_torch_zoo_student


class ReleasedStudNet(torch.nn.Module):
  """yccm/EGA models/stud_net.py's StudNet, with the classifier's width as an argument
  (the release hard-codes 100 classes): fit_dim_Net then cl_Net."""

  def __init__(self, f_dim, feature_dim, num_classes):
    super().__init__()
    self.fit_dim_Net = torch.nn.Linear(f_dim, feature_dim)
    self.cl_Net = torch.nn.Linear(feature_dim, num_classes)
    self.dropout = torch.nn.Dropout(p=0.2)  # defined, never applied (as released)

  def forward(self, x):
    fs = self.fit_dim_Net(x)
    return fs, self.cl_Net(fs)


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained_workdir(converted_resnet18, tmp_path_factory):
  """A 6-step EGA run evaluated and checkpointed at steps 3 and 6, with its log lines."""
  from ega_jax import train

  workdir = tmp_path_factory.mktemp("run") / "ega"
  config = fashion_mnist_config(
    converted_resnet18,
    num_train_steps=6,
    log_every_steps=3,
    eval_every_steps=3,
    checkpoint_every_steps=3,
    graph_pictures=False,
    # lr 0.5 moves the student enough that steps 3 and 6 score differently.
    learning_rate=0.5,
  )
  records = []
  handler = logging.Handler()
  handler.emit = lambda record: records.append(record.getMessage())
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.addHandler(handler)
  absl_logger.setLevel(logging.INFO)
  try:
    summary = train.train_and_evaluate(config, str(workdir))
  finally:
    absl_logger.removeHandler(handler)
    absl_logger.setLevel(level)
  return workdir, config, summary, records


def _eval_records(workdir):
  return {r["step"]: r for r in _read_jsonl(workdir / "metrics.jsonl") if "eval/top1" in r}


@needs_fashion_mnist
def test_run_record_and_progress(trained_workdir):
  import flax
  import jax

  from ega_jax.train import run_record

  workdir, config, _, log_lines = trained_workdir
  record = json.loads((workdir / "config.json").read_text())
  assert record["config"]["distill"]["method"] == "ega"
  assert record["config"]["student"]["arch"] == "resnet8"
  assert record["config"]["dataset"]["max_eval_examples"] == 100
  assert record["config_hash"] == run_record.config_hash(json.loads(json.dumps(config.to_dict())))
  assert record["jax_version"] == jax.__version__ and record["flax_version"] == flax.__version__
  assert record["device_count"] == jax.device_count() and record["process_count"] == 1
  assert record["git_commit"] is None or len(record["git_commit"]) == 40
  assert record["student"] == {
    "arch": "resnet8",
    "num_classes": 10,
    "image_size": 28,
    "mean": [0.286] * 3,
    "std": [0.353] * 3,
    "feature_dim": 32,
    "backbone_feature_dim": 64,
  }
  # resnet8 with a 10-class fc: RepDistiller's 83,892 for 100 classes minus 90 * 65.
  assert record["parameter_counts"]["student_backbone"] == 83_892 - 90 * 65
  assert record["parameter_counts"]["student_head"] == 64 * 32 + 32 + 32 * 10 + 10
  train_records = [r for r in _read_jsonl(workdir / "metrics.jsonl") if "train/loss" in r]
  assert [r["step"] for r in train_records] == [3, 6]
  assert all(r["train/steps_per_sec"] > 0 for r in train_records)
  step_lines = [line for line in log_lines if line.startswith("step ")]
  assert len(step_lines) == 2 and all("steps/s, ETA " in line for line in step_lines)
  assert step_lines[-1].endswith("ETA 0s")
  assert any(line.startswith("Parameters: student_backbone 78,042") for line in log_lines)


@needs_fashion_mnist
def test_tensorboard_hparams_carry_nested_fields(trained_workdir):
  from ega_jax.train import setup

  workdir, config, _, _ = trained_workdir
  flat = setup.flat_hparams(config)
  assert flat["distill.method"] == "ega" and flat["student.arch"] == "resnet8"
  assert flat["teacher.arch"] == "resnet18" and flat["dataset.name"] == "fashion_mnist"
  assert flat["dataset.data_dir"] == "None" and flat["lr_decay_epochs"] == "(0.3,)"
  # ...and they are what TensorBoard received: the hparams plugin's session start info.
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.plugins.hparams import plugin_data_pb2

  (events,) = [name for name in os.listdir(workdir) if name.startswith("events.out")]
  accumulator = event_accumulator.EventAccumulator(
    str(workdir / events), size_guidance={event_accumulator.TENSORS: 0}
  )
  accumulator.Reload()
  content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
  hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
  assert hparams["distill.method"].string_value == "ega"
  assert hparams["student.arch"].string_value == "resnet8"
  assert hparams["batch_size"].number_value == 32


@needs_fashion_mnist
def test_export_every_format_and_load_back(trained_workdir, tmp_path):
  import jax

  import ega_jax
  from ega_jax import config as config_lib
  from ega_jax import export

  workdir, _, summary, _ = trained_workdir
  evals = _eval_records(workdir)
  best_step = max(evals, key=lambda step: evals[step]["eval/top1"])
  assert export.main([f"--workdir={workdir}", f"--output={tmp_path / 'best'}"]) == 0
  meta = json.loads((tmp_path / "best" / "student.json").read_text())
  record = json.loads((workdir / "config.json").read_text())
  for key, value in record["student"].items():  # arch, classes, image size, mean/std, widths
    assert meta[key] == value, key
  assert meta["config_hash"] == record["config_hash"] and meta["dtype"] == "float32"
  assert meta["epoch"] == 1 and meta["dataset"] == "fashion_mnist"
  assert meta["step"] == best_step == summary["best_step"]
  assert meta["eval_top1"] == evals[best_step]["eval/top1"] == summary["best_top1"]
  assert meta["files"] == ["variables.msgpack", "student.safetensors", "resnet8_best.pth"]
  assert meta["source_workdir"] == str(workdir)

  # Flax and safetensors hold the checkpoint's student, exactly.
  state = export.restore_checkpoint(str(workdir), best_step)
  module, variables, loaded_meta = ega_jax.load_student(str(tmp_path / "best"))
  assert loaded_meta == meta
  np.testing.assert_array_equal(
    variables["params"]["backbone"]["conv1"]["kernel"],
    state["student_params"]["backbone"]["conv1"]["kernel"],
  )
  export.main([f"--workdir={workdir}", f"--output={tmp_path / 'st'}", "--format=safetensors"])
  _, from_safetensors, _ = ega_jax.load_student(str(tmp_path / "st"))
  jax.tree.map(np.testing.assert_array_equal, from_safetensors, variables)

  # The latest checkpoint by name and by number; the PyTorch file named as released.
  export.main([f"--workdir={workdir}", f"--output={tmp_path / 'latest'}", "--which=latest"])
  export.main(
    [f"--workdir={workdir}", f"--output={tmp_path / 's3'}", "--which=3", "--format=pytorch"]
  )
  assert json.loads((tmp_path / "latest" / "student.json").read_text())["step"] == 6
  assert sorted(os.listdir(tmp_path / "s3")) == ["resnet8_step3.pth", "student.json"]
  # Exporting again into a directory removes the earlier export's files: none goes stale.
  export.main([f"--workdir={workdir}", f"--output={tmp_path / 'latest'}", "--format=pytorch"])
  assert sorted(os.listdir(tmp_path / "latest")) == ["resnet8_best.pth", "student.json"]
  with pytest.raises(config_lib.UserInputError, match="holds neither variables.msgpack"):
    ega_jax.load_student(str(tmp_path / "latest"))


@needs_fashion_mnist
def test_pytorch_export_loads_strictly_and_predicts_like_flax(trained_workdir, tmp_path):
  import jax.numpy as jnp

  import ega_jax
  from ega_jax import data as data_lib

  workdir, _, _, _ = trained_workdir
  export_dir = tmp_path / "export"
  ega_jax.export_student(str(workdir), str(export_dir), formats=("flax", "pytorch"))
  saved = torch.load(export_dir / "resnet8_best.pth", weights_only=True)
  assert set(saved) == {"model", "layer", "epoch", "best_acc"}
  module, variables, meta = ega_jax.load_student(str(export_dir))
  assert saved["best_acc"] == meta["eval_top1"] and saved["epoch"] == meta["epoch"]

  model_s = build_torch_zoo_student("resnet8", 10)
  model_s.load_state_dict(saved["model"], strict=True)
  stud_net = ReleasedStudNet(64, 32, 10)
  stud_net.load_state_dict(saved["layer"], strict=True)
  model_s.eval(), stud_net.eval()

  batch = next(iter(data_lib.create_eval_loader("fashion_mnist", None, global_batch_size=16)))
  images = batch["image"]
  normalised = (images / 255.0 - np.float32(0.286)) / np.float32(0.353)
  with torch.no_grad():
    pooled, _ = model_s(torch.from_numpy(normalised.transpose(0, 3, 1, 2).astype(np.float32)))
    _, torch_logits = stud_net(pooled)
  flax_logits, _ = module.apply(
    variables, ega_jax.normalize_images(jnp.asarray(images), meta["mean"], meta["std"])
  )
  scale = np.abs(torch_logits.numpy()).max()
  np.testing.assert_allclose(np.asarray(flax_logits), torch_logits.numpy(), atol=1e-4 * scale)


@needs_fashion_mnist
def test_evaluate_reproduces_the_logged_numbers(trained_workdir, tmp_path):
  from ega_jax import evaluate, export

  workdir, _, summary, _ = trained_workdir
  evals = _eval_records(workdir)
  out = tmp_path / "scores.json"
  assert evaluate.main([f"--workdir={workdir}", "--teacher_head", f"--json={out}"]) == 0
  scores = json.loads(out.read_text())
  logged = evals[summary["best_step"]]
  assert scores["step"] == summary["best_step"] and scores["count"] == 100
  assert scores["top1"] == logged["eval/top1"] and scores["top5"] == logged["eval/top5"]
  assert scores["ce"] == pytest.approx(logged["eval/ce"], rel=1e-5)
  assert scores["teacher_top1"] == logged["eval/teacher_top1"]

  # Another step, and an export (no teacher, no workdir config needed).
  other = evaluate.evaluate(workdir=str(workdir), which="3")
  assert other["top1"] == evals[3]["eval/top1"] and other["ce"] == pytest.approx(
    evals[3]["eval/ce"], rel=1e-5
  )
  export.main([f"--workdir={workdir}", f"--output={tmp_path / 'e'}", "--format=safetensors"])
  # No teacher is needed for the student's scores.
  from unittest import mock

  from ega_jax.train import setup

  with mock.patch.object(setup, "load_teacher", side_effect=AssertionError("teacher loaded")):
    from_export = evaluate.evaluate(student=str(tmp_path / "e"))
    from_workdir = evaluate.evaluate(workdir=str(workdir))
  assert from_export["top1"] == from_workdir["top1"] == logged["eval/top1"]
  assert "teacher_top1" not in from_export


@needs_fashion_mnist
@pytest.mark.parametrize(
  "argv, expected",
  [
    (["--which=5"], "--which='5' is not a checkpoint of"),
    (["--format=onnx"], "--format=onnx is not valid; choose one or more of flax"),
  ],
)
def test_export_mistakes_are_one_line(trained_workdir, tmp_path, capsys, argv, expected):
  from ega_jax import export

  workdir, _, _, _ = trained_workdir
  assert export.main([f"--workdir={workdir}", f"--output={tmp_path}"] + argv) == 2
  error = capsys.readouterr().err.strip().splitlines()
  assert len(error) == 1 and expected in error[0], error


def test_export_and_evaluate_of_a_non_workdir(tmp_path, capsys):
  from ega_jax import evaluate, export

  assert export.main([f"--workdir={tmp_path}", f"--output={tmp_path / 'o'}"]) == 2
  assert "config.json does not exist" in capsys.readouterr().err
  assert evaluate.main([f"--student={tmp_path}"]) == 2
  assert "is not a student exported by" in capsys.readouterr().err


# ------------------------------------------------ every student, PyTorch parity
# Over 5 s each on 2 CPU cores (mostly the compile).
_SLOW_ARCHS = ("resnet110", "MobileNetV2", "ShuffleV1", "ShuffleV2")


def _random_distilled_variables(module, seed):
  """Random variables with non-trivial BatchNorm statistics for a DistilledStudent."""
  import jax
  import jax.numpy as jnp
  from flax import traverse_util

  variables = jax.jit(lambda key: module.init(key, jnp.zeros((1, 32, 32, 3)), train=False))(
    jax.random.PRNGKey(seed)
  )
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(jax.device_get(variables))
  for path, value in flat.items():
    if path[-1] == "mean":
      flat[path] = rng.uniform(-0.3, 0.3, value.shape).astype(np.float32)
    elif path[-1] == "var":
      flat[path] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
    elif path[-1] in ("scale", "bias") and path[0] == "params":
      flat[path] = rng.uniform(-0.5, 1.0, value.shape).astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def _assert_close_relative(actual, expected):
  """Within 1e-4 of the reference, relative to its largest magnitude."""
  expected = np.asarray(expected)
  np.testing.assert_allclose(
    np.asarray(actual), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
  )


@pytest.mark.parametrize(
  "arch",
  [pytest.param(a, marks=pytest.mark.slow) if a in _SLOW_ARCHS else a for a in STUDENT_NAMES],
)
def test_released_layout_of_every_student_matches_pytorch(arch):
  """The exported layout loads strictly into the released class + StudNet and predicts alike.

  The PyTorch side (tests/torch_zoo.py) is checked against RepDistiller's
  parameter counts; eval mode, random weights, non-trivial BatchNorm statistics.
  """
  import functools

  import jax
  import jax.numpy as jnp

  from ega_jax import export
  from ega_jax.models.distilled import DistilledStudent
  from ega_jax.models.students import student_feature_dim
  from test_students import REPDISTILLER_PARAM_COUNTS
  from torch_zoo import CLASSIFIER_PREFIXES

  num_classes, feature_dim = 100, 16
  module = DistilledStudent(arch, num_classes, feature_dim)
  variables = _random_distilled_variables(module, seed=3)
  layout = export.released_layout(variables, {"arch": arch, "epoch": 7, "eval_top1": 50.0})
  assert layout["epoch"] == 7 and layout["best_acc"] == 50.0
  model_s = build_torch_zoo_student(arch, num_classes)
  model_s.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in layout["model"].items()})
  stud_net = ReleasedStudNet(student_feature_dim(arch), feature_dim, num_classes)
  stud_net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in layout["layer"].items()})
  model_s.eval(), stud_net.eval()
  # The re-statement is RepDistiller's model (the CIFAR ResNets less the fc
  # EGA's release drops).
  torch_count = sum(parameter.numel() for parameter in model_s.parameters())
  if CLASSIFIER_PREFIXES[arch] is None:
    torch_count += (student_feature_dim(arch) + 1) * num_classes
  assert torch_count == REPDISTILLER_PARAM_COUNTS[arch]

  images = np.random.default_rng(4).normal(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    pooled, backbone_logits, maps = model_s(
      torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), is_feat=True
    )
    _, torch_logits = stud_net(pooled)
  # One compile: op-by-op dispatch of the ShuffleNets and MobileNetV2 is several times slower.
  logits, features = jax.jit(functools.partial(module.apply, train=False))(
    variables, jnp.asarray(images)
  )
  _assert_close_relative(logits, torch_logits.numpy())
  _assert_close_relative(features["penultimate"], pooled.numpy())
  assert len(features["stages"]) == len(maps)
  for stage, ref_map in zip(features["stages"], maps):
    _assert_close_relative(stage, ref_map.numpy().transpose(0, 2, 3, 1))
  if backbone_logits is not None:  # RepDistiller's own (unused) fc came along too.
    backbone = variables["params"]["backbone"][CLASSIFIER_PREFIXES[arch]]
    expected = pooled.numpy() @ backbone["kernel"] + backbone["bias"]
    _assert_close_relative(backbone_logits.numpy(), expected)
