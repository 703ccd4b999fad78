"""Tests for experiments.pretrain_demo_teacher and experiments.simclr (the offline demo's
SimCLR teacher)."""

import ast
import hashlib
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torchvision

from experiments import pretrain_demo_teacher as teacher_script
from experiments import simclr
from run_configs import needs_fashion_mnist

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The script's modules: its command line and loop, and the SimCLR pieces.
SCRIPT_FILES = [
  os.path.join(REPO_ROOT, "experiments", name) for name in ("pretrain_demo_teacher.py", "simclr.py")
]


def _nt_xent_reference(view_a, view_b, temperature):
  """NT-Xent in float64 NumPy, straight from the SimCLR paper's definition.

  l(i, j) = -log( exp(sim(z_i, z_j) / t) / sum_{k != i} exp(sim(z_i, z_k) / t) ),
  averaged over all 2N ordered positive pairs (i, j) and (j, i).
  """
  z = np.concatenate([view_a, view_b]).astype(np.float64)
  count = len(view_a)
  losses = []
  for i in range(2 * count):
    positive = i + count if i < count else i - count
    cosine = lambda k: z[i] @ z[k] / (np.linalg.norm(z[i]) * np.linalg.norm(z[k]))
    denominator = sum(math.exp(cosine(k) / temperature) for k in range(2 * count) if k != i)
    losses.append(-math.log(math.exp(cosine(positive) / temperature) / denominator))
  return float(np.mean(losses))


@pytest.mark.parametrize("temperature", [0.2, 0.5])
def test_nt_xent_matches_numpy_reference(temperature):
  rng = np.random.default_rng(3)
  view_a = rng.normal(size=(5, 7))
  view_b = view_a + 0.7 * rng.normal(size=(5, 7))  # Positives correlated, as in training.
  loss = simclr.nt_xent_loss(torch.from_numpy(view_a), torch.from_numpy(view_b), temperature)
  np.testing.assert_allclose(
    float(loss), _nt_xent_reference(view_a, view_b, temperature), rtol=1e-10
  )


def test_backbone_features_are_torchvision_avgpool_output():
  torch.manual_seed(0)
  model = simclr.build_simclr_resnet18().eval()
  reference = torchvision.models.resnet18()
  reference.load_state_dict(
    {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}, strict=False
  )
  reference.fc = torch.nn.Identity()
  reference.eval()
  images = torch.randn(2, 3, 32, 32)
  with torch.no_grad():
    features = simclr.backbone_features(model, images)
    np.testing.assert_allclose(features.numpy(), reference(images).numpy(), rtol=1e-5, atol=1e-6)
    assert model(images).shape == (2, simclr.PROJECTION_DIM)


def test_full_crop_is_the_image_or_its_mirror():
  images = torch.rand(16, 1, 32, 32)
  crops = simclr.random_resized_crop_and_flip(
    images, torch.Generator().manual_seed(0), scale=(1.0, 1.0), log_ratio=(0.0, 0.0)
  )
  mirrored = torch.flip(images, dims=[3])
  same = [(crop - image).abs().max() < 1e-5 for crop, image in zip(crops, images)]
  flipped = [(crop - image).abs().max() < 1e-5 for crop, image in zip(crops, mirrored)]
  assert all(a or b for a, b in zip(same, flipped))
  assert any(same) and any(flipped)  # 16 fair coins: both sides occur.


def test_small_crop_zooms_in():
  # A crop of at most 30% of the area, resized back up, shows fewer distinct
  # columns of a horizontal ramp than the image has (and stays in range).
  ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(8, 1, 32, 32).contiguous()
  crops = simclr.random_resized_crop_and_flip(
    ramp, torch.Generator().manual_seed(1), scale=(0.3, 0.3)
  )
  value_range = crops.amax(dim=(1, 2, 3)) - crops.amin(dim=(1, 2, 3))
  assert torch.all(value_range < 0.8) and torch.all(value_range > 0.2)


def test_random_erasing_zeroes_one_rectangle():
  images = torch.ones(8, 1, 32, 32)
  erased = simclr.random_erasing(
    images, torch.Generator().manual_seed(2), probability=1.0, scale=(0.05, 0.1)
  )
  for image in erased[:, 0]:
    rows = torch.nonzero((image == 0).any(1)).flatten()
    cols = torch.nonzero((image == 0).any(0)).flatten()
    box = image[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert torch.all(box == 0)  # The zeros form one solid rectangle...
    assert int((image == 0).sum()) == box.numel()  # ...and nothing else is zero.
    assert 0.02 < box.numel() / image.numel() < 0.15


def test_jitter_keeps_range_and_changes_images():
  images = torch.rand(8, 1, 32, 32)
  jittered = simclr.brightness_contrast_jitter(images, torch.Generator().manual_seed(3))
  assert jittered.min() >= 0 and jittered.max() <= 1
  assert (jittered - images).abs().mean() > 1e-3


def test_linear_probe_separates_separable_classes_and_not_noise():
  generator = torch.Generator().manual_seed(4)
  centres = 3.0 * torch.randn(10, 32, generator=generator)
  train_labels = torch.arange(600) % 10
  test_labels = torch.arange(400) % 10
  train = centres[train_labels] + torch.randn(600, 32, generator=generator)
  test = centres[test_labels] + torch.randn(400, 32, generator=generator)
  assert simclr.linear_probe_accuracy(train, train_labels, test, test_labels, steps=100) > 0.97
  # Labels unrelated to the features: the probe cannot beat chance by much.
  shuffled = train_labels[torch.randperm(600, generator=generator)]
  assert simclr.linear_probe_accuracy(train, shuffled, test, test_labels, steps=100) < 0.25


def test_script_imports_neither_tensorflow_nor_jax():
  imported = set()
  for path in SCRIPT_FILES:
    with open(path) as f:
      tree = ast.parse(f.read())
    imported |= {
      alias.name.split(".")[0]
      for node in ast.walk(tree)
      if isinstance(node, ast.Import)
      for alias in node.names
    }
    imported |= {
      node.module.split(".")[0]
      for node in ast.walk(tree)
      if isinstance(node, ast.ImportFrom) and node.module
    }
  assert {"torch", "torchvision"} <= imported
  assert not imported & {"tensorflow", "jax", "flax"}


def test_missing_data_dir_is_one_clear_error(tmp_path):
  with pytest.raises(teacher_script.ScriptError, match="--data_dir"):
    teacher_script.main(["--data_dir", str(tmp_path), "--output", str(tmp_path / "t.pth")])
  with pytest.raises(teacher_script.ScriptError, match="--batch_size"):
    teacher_script.main(["--num_train_examples", "32", "--batch_size", "64"])
  with pytest.raises(teacher_script.ScriptError, match=r"--output must end in \.pth"):
    teacher_script.main(["--output", str(tmp_path / "t.pt")])


def test_cache_needs_matching_settings(tmp_path):
  output = str(tmp_path / "teacher.pth")
  settings = {name: 1 for name in teacher_script.TRAINING_SETTING_NAMES}
  assert not teacher_script.is_cached(output, settings)  # Nothing there yet.
  open(output, "wb").close()
  with open(output + ".json", "w") as f:
    json.dump({"settings": settings}, f)
  assert teacher_script.is_cached(output, settings)
  assert not teacher_script.is_cached(output, dict(settings, seed=2))
  assert not teacher_script.is_cached(output, dict(settings, steps=2))


def test_importing_the_script_imports_no_tensorflow():
  # The idx reader comes from ega_jax.data, whose package import must keep
  # tensorflow out: tensorflow imported before torch segfaults.
  code = (
    "import sys; import experiments.pretrain_demo_teacher; "
    "print(sorted(m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules))"
  )
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "[]"


def _run_script(*args):
  return subprocess.run(
    [sys.executable, "-m", "experiments.pretrain_demo_teacher", *args],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )


@needs_fashion_mnist
@pytest.mark.slow
def test_tiny_run_writes_a_torchvision_checkpoint_and_is_cached(tmp_path):
  output = str(tmp_path / "teacher" / "simclr.pth")
  args = [
    "--output",
    output,
    "--num_train_examples",
    "512",
    "--steps",
    "10",
    "--batch_size",
    "64",
    "--probe_train_examples",
    "1000",
    "--probe_test_examples",
    "1000",
    "--probe_steps",
    "100",
    "--log_every",
    "4",
    "--seed",
    "1",
    "--save_dtype",
    "float16",
  ]
  first = _run_script(*args)
  assert first.returncode == 0, first.stderr
  assert "images/s" in first.stdout and "ETA" in first.stdout

  state_dict = torch.load(output, map_location="cpu", weights_only=True)
  resnet = torchvision.models.resnet18()
  result = resnet.load_state_dict(state_dict, strict=False)  # Raises on any shape mismatch.
  assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
  assert sorted(result.unexpected_keys) == ["fc.0.bias", "fc.0.weight", "fc.2.bias", "fc.2.weight"]
  assert state_dict["fc.2.weight"].shape == (128, 512)
  assert state_dict["conv1.weight"].dtype == torch.float16
  # Trained, not a fresh init: the BatchNorm running statistics moved.
  assert not torch.allclose(state_dict["bn1.running_mean"].float(), torch.zeros(64))

  with open(output + ".json") as f:
    metadata = json.load(f)
  assert metadata["image_size"] == 32
  # Fashion-MNIST's published pixel statistics: mean 0.2860, std 0.3530.
  np.testing.assert_allclose(metadata["mean"], [0.2860] * 3, atol=5e-4)
  np.testing.assert_allclose(metadata["std"], [0.3530] * 3, atol=5e-4)
  # Steps alone end training: 10 steps over 8 batches per epoch.
  assert metadata["steps_run"] == 10 and metadata["epochs_run"] == 10 / 8
  assert [entry["step"] for entry in metadata["training_log"]] == [4, 8, 10]
  assert math.isfinite(metadata["final_loss"])
  assert metadata["sha256"] == _sha256(output)
  # Far above chance (0.1) even from 1000 probe images: the probe works.
  assert 0.4 < metadata["linear_probe_accuracy"] <= 1.0
  assert metadata["seconds"] > 0

  modified = os.path.getmtime(output)
  start = time.time()
  second = _run_script(*args)
  assert second.returncode == 0, second.stderr
  assert "cached" in second.stdout
  assert time.time() - start < 30  # Imports only; no data loaded, nothing trained.
  assert os.path.getmtime(output) == modified


def _sha256(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


SHIPPED = os.path.join(REPO_ROOT, "experiments", "demo_teacher", "simclr_resnet18_fmnist.pth")


def test_shipped_teacher_matches_its_record_and_loads_strictly():
  with open(SHIPPED + ".json") as f:
    record = json.load(f)
  assert _sha256(SHIPPED) == record["sha256"]
  assert os.path.getsize(SHIPPED) <= 25 * 2**20
  # Reproducible from its settings: a fixed number of steps, no time budget.
  assert set(record["settings"]) == set(teacher_script.TRAINING_SETTING_NAMES)
  assert record["steps_run"] == record["settings"]["steps"]
  assert record["training_log"][-1]["step"] == record["settings"]["steps"]
  assert record["linear_probe_accuracy"] >= 0.85
  model = simclr.build_simclr_resnet18()
  state_dict = torch.load(SHIPPED, map_location="cpu", weights_only=True)
  model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)


def test_demo_refuses_a_damaged_teacher_file(tmp_path, monkeypatch):
  from experiments import demo

  damaged = tmp_path / "teacher.pth"
  damaged.write_bytes(open(SHIPPED, "rb").read()[:1000])
  (tmp_path / "teacher.pth.json").write_text(open(SHIPPED + ".json").read())
  monkeypatch.setattr(demo, "SHIPPED_TEACHER", str(damaged))
  with pytest.raises(SystemExit, match="sha256 .* the file is damaged"):
    demo.shipped_teacher()
