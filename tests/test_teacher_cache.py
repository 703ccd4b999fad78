"""Tests for the teacher-embedding cache (ega_jax.data.teacher_cache,
ega_jax.cache_builder, python -m launch.cache_teacher) and cached training.

References: views are cut from an explicitly zero-padded array here; cached
embeddings are compared with the real torchvision ResNet-18 (random weights)
run in PyTorch; a run with every view cached is compared with the live run.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ega_jax import data as data_lib
from ega_jax.data import sources
from ega_jax.data import teacher_cache
from run_configs import fashion_mnist_config
from run_configs import needs_fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_PADDING = 3  # 28 // 8


def _reference_view(image, top, left, flip, padding):
  """The view cut from an explicitly zero-padded copy (independent of augment.crop_flip)."""
  size = image.shape[0]
  padded = np.zeros((size + 2 * padding, size + 2 * padding, image.shape[2]), image.dtype)
  padded[padding : padding + size, padding : padding + size] = image
  window = padded[top : top + size, left : left + size]
  return window[:, ::-1] if flip else window


@pytest.mark.parametrize("padding", [1, 3, 4])
def test_view_ids_enumerate_every_crop_and_flip_once(padding):
  total = teacher_cache.num_views(padding)
  assert total == 2 * (2 * padding + 1) ** 2
  seen = set()
  for view in range(total):
    top, left, flip = teacher_cache.view_params(view, padding)
    assert 0 <= top <= 2 * padding and 0 <= left <= 2 * padding
    assert teacher_cache.view_id(top, left, flip, padding) == view
    seen.add((top, left, flip))
  assert len(seen) == total
  assert teacher_cache.view_params(teacher_cache.centre_view(padding), padding) == (
    padding,
    padding,
    False,
  )
  chosen = teacher_cache.cached_view_ids(7, 11, 5, padding)
  assert len(set(chosen.tolist())) == 5 and chosen.min() >= 0 and chosen.max() < total
  np.testing.assert_array_equal(chosen, teacher_cache.cached_view_ids(7, 11, 5, padding))
  assert not np.array_equal(chosen, teacher_cache.cached_view_ids(7, 12, 5, padding))
  np.testing.assert_array_equal(
    teacher_cache.cached_view_ids(0, 0, total, padding), np.arange(total)
  )


def _write_index_cache(
  directory, num_examples, num_columns, padding, split="train", dataset="fashion_mnist"
):
  """A cache whose 'embedding' of (example n, column k) is (n, view id, k, 1)."""
  os.makedirs(directory, exist_ok=True)
  if split == "train":
    view_ids = np.stack(
      [teacher_cache.cached_view_ids(0, n, num_columns, padding) for n in range(num_examples)]
    )
  else:
    view_ids = np.full((num_examples, 1), teacher_cache.centre_view(padding), np.int16)
  teacher_cache.create_split_arrays(str(directory), split, view_ids, 4)
  features = teacher_cache.open_features(str(directory), split, "r+")
  rows = np.arange(num_examples)[:, None].repeat(view_ids.shape[1], 1)
  columns = np.arange(view_ids.shape[1])[None, :].repeat(num_examples, 0)
  features[...] = np.stack([rows, view_ids, columns, np.ones_like(rows)], -1)
  features.flush()
  manifest = (
    teacher_cache.read_manifest(str(directory))
    if os.path.exists(os.path.join(directory, teacher_cache.MANIFEST_FILE))
    else {
      "format_version": teacher_cache.FORMAT_VERSION,
      "teacher": {
        "arch": "resnet18",
        "variables_sha256": "abc",
        "image_size": 32,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
      },
      "dataset": {"name": dataset, "image_size": 28, "padding": padding},
      "feature_dim": 4,
      "seed": 0,
      "compute_dtype": "float32",
      "storage_dtype": "float16",
      "splits": {},
    }
  )
  manifest["splits"][split] = {
    "num_examples": num_examples,
    "num_views": int(view_ids.shape[1]),
    "all_views": split == "train" and view_ids.shape[1] == teacher_cache.num_views(padding),
    "complete": True,
    "files": teacher_cache.split_file_records(str(directory), split),
  }
  teacher_cache.write_manifest(str(directory), manifest)


@needs_fashion_mnist
@pytest.mark.parametrize("teacher_view", ["independent", "same"])
@pytest.mark.parametrize("all_views", [True, False])
def test_cached_loader_serves_the_embedding_of_the_teacher_view(tmp_path, teacher_view, all_views):
  num_examples, batch = 48, 16
  num_columns = teacher_cache.num_views(FASHION_PADDING) if all_views else 3
  _write_index_cache(tmp_path, num_examples, num_columns, FASHION_PADDING)
  kwargs = dict(
    global_batch_size=batch, seed=5, teacher_view=teacher_view, max_examples=num_examples
  )
  live = iter(data_lib.create_train_loader("fashion_mnist", None, **kwargs))
  cached = iter(
    data_lib.create_train_loader("fashion_mnist", None, teacher_cache_dir=str(tmp_path), **kwargs)
  )
  source = sources.open_split("fashion_mnist", "train", None, num_examples)
  view_ids = teacher_cache.load_view_ids(str(tmp_path), "train")
  for _ in range(4):  # more than one epoch (3 steps per epoch)
    live_batch, cached_batch = next(live), next(cached)
    assert "teacher_image" not in cached_batch
    assert cached_batch["teacher_feature"].dtype == np.float16
    np.testing.assert_array_equal(cached_batch["index"], live_batch["index"])
    for row in range(batch):
      index, view, column, one = cached_batch["teacher_feature"][row].astype(int)
      assert one == 1 and index == cached_batch["index"][row]
      assert view == view_ids[index, column]
      teacher_sees = _reference_view(
        source[index]["image"], *teacher_cache.view_params(view, FASHION_PADDING), FASHION_PADDING
      )
      if all_views:
        # Exactly the live pipeline's views, student and teacher.
        np.testing.assert_array_equal(cached_batch["image"][row], live_batch["image"][row])
        np.testing.assert_array_equal(teacher_sees, live_batch["teacher_image"][row])
      elif teacher_view == "independent":
        np.testing.assert_array_equal(cached_batch["image"][row], live_batch["image"][row])
      if teacher_view == "same":
        np.testing.assert_array_equal(teacher_sees, cached_batch["image"][row])


@needs_fashion_mnist
def test_cached_eval_loader_serves_the_centre_view_and_zero_padding(tmp_path):
  _write_index_cache(tmp_path, 30, 1, FASHION_PADDING, split="train")
  _write_index_cache(tmp_path, 30, 1, FASHION_PADDING, split="eval")
  loader = data_lib.create_eval_loader(
    "fashion_mnist", None, global_batch_size=8, max_examples=30, teacher_cache_dir=str(tmp_path)
  )
  seen = []
  for batch in loader:
    for feature, mask in zip(batch["teacher_feature"], batch["mask"]):
      if mask:
        assert feature[1] == teacher_cache.centre_view(FASHION_PADDING)
        seen.append(int(feature[0]))
      else:
        assert not feature.any()
  assert seen == list(range(30))
  with pytest.raises(ValueError, match="max_eval_examples"):
    data_lib.create_eval_loader(
      "fashion_mnist", None, global_batch_size=8, max_examples=20, teacher_cache_dir=str(tmp_path)
    )
  with pytest.raises(ValueError, match="max_train_examples"):
    data_lib.create_train_loader(
      "fashion_mnist",
      None,
      global_batch_size=8,
      seed=0,
      max_examples=20,
      teacher_cache_dir=str(tmp_path),
    )


def _teacher_at_28(converted_resnet18, tmp_path):
  """The converted ResNet-18 declared at 28 px, so views need no resize."""
  directory = tmp_path / "teacher28"
  shutil.copytree(converted_resnet18, directory)
  meta = json.loads((directory / "teacher.json").read_text())
  meta["image_size"] = 28
  (directory / "teacher.json").write_text(json.dumps(meta))
  return directory, meta


def _cache_config(teacher_dir, num_train, num_eval, **overrides):
  return fashion_mnist_config(
    teacher_dir,
    **{"dataset.max_train_examples": num_train, "dataset.max_eval_examples": num_eval},
    **overrides,
  )


@needs_fashion_mnist
def test_builder_stores_the_torch_teacher_embedding_of_each_view_and_resumes(
  converted_resnet18, tmp_path
):
  import torch
  import torchvision

  from ega_jax import cache_builder

  teacher_dir, meta = _teacher_at_28(converted_resnet18, tmp_path)
  config = _cache_config(teacher_dir, 10, 6)

  class Interrupt(Exception):
    pass

  reports = []

  def interrupt_after_first_save(line):
    reports.append(line)
    if "train:" in line and "examples (" in line:
      raise Interrupt(line)

  directory = str(tmp_path / "cache")
  with pytest.raises(Interrupt):
    cache_builder.build_teacher_cache(
      config, directory, views=3, batch_size=8, log_every_s=0, progress=interrupt_after_first_save
    )
  done = teacher_cache.rows_done(directory, "train")
  assert 0 < done < 10
  assert not teacher_cache.read_manifest(directory)["splits"]["train"]["complete"]
  with pytest.raises(ValueError, match="no complete"):
    teacher_cache.CachedFeatures(directory, "train")
  reports.clear()
  manifest = cache_builder.build_teacher_cache(
    config, directory, views=3, batch_size=8, log_every_s=0, progress=reports.append
  )
  assert f"starting at example {done}" in reports[0]
  files = manifest["splits"]["train"].pop("files")
  assert manifest["splits"]["train"] == {
    "num_examples": 10,
    "num_views": 3,
    "all_views": False,
    "complete": True,
  }
  # The finished split's files are recorded (size; sha256 from an independent hashlib read).
  features_path = os.path.join(directory, "train_features.npy")
  assert files["features"]["bytes"] == os.path.getsize(features_path)
  with open(features_path, "rb") as f:
    assert files["features"]["sha256"] == __import__("hashlib").sha256(f.read()).hexdigest()
  assert manifest["splits"]["eval"]["complete"] and manifest["splits"]["eval"]["files"]

  model = torchvision.models.resnet18()
  model.load_state_dict(torch.load(converted_resnet18.parent / "resnet18.pth"))
  model.fc = torch.nn.Identity()
  model.eval()
  mean, std = np.array(meta["mean"]), np.array(meta["std"])
  for split, count in (("train", 10), ("eval", 6)):
    cache = teacher_cache.CachedFeatures(directory, split)
    source = sources.open_split("fashion_mnist", split, None, count)
    views, positions = [], []
    for index in range(count):
      for column, view in enumerate(cache.view_ids[index]):
        views.append(
          _reference_view(
            source[index]["image"],
            *teacher_cache.view_params(view, FASHION_PADDING),
            FASHION_PADDING,
          )
        )
        positions.append((index, column))
    images = (np.stack(views).astype(np.float64) / 255.0 - mean) / std
    with torch.no_grad():
      expected = model(torch.tensor(images.transpose(0, 3, 1, 2), dtype=torch.float32)).numpy()
    got = np.stack([cache.feature(i, c) for i, c in positions]).astype(np.float32)
    assert got.shape == expected.shape == (len(positions), 512)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3 * scale)
  # The eval split holds the unaugmented image.
  eval_views = teacher_cache.load_view_ids(directory, "eval")
  assert (eval_views == teacher_cache.centre_view(FASHION_PADDING)).all()

  with pytest.raises(ValueError, match="--overwrite"):
    cache_builder.build_teacher_cache(config, directory, views=4, batch_size=8)
  with pytest.raises(ValueError, match=r"--views='200'.*\[1, 98\]"):
    cache_builder.build_teacher_cache(config, str(tmp_path / "other"), views="200")


@needs_fashion_mnist
def test_training_with_every_view_cached_follows_the_live_run(converted_resnet18, tmp_path):
  """Same teacher views, embeddings rounded to float16: the same losses to ~1e-3."""
  from ega_jax import cache_builder
  from ega_jax import train

  teacher_dir, _ = _teacher_at_28(converted_resnet18, tmp_path)
  config = _cache_config(
    teacher_dir,
    32,
    40,
    batch_size=16,
    eval_batch_size=40,
    num_train_steps=3,
    eval_every_steps=3,
    checkpoint_every_steps=3,
    graph_pictures=False,
  )
  cache_dir = str(tmp_path / "cache")
  cache_builder.build_teacher_cache(config, cache_dir, views="all", batch_size=196, log_every_s=1e9)

  def records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [json.loads(line) for line in f]

  live = train.train_and_evaluate(config, str(tmp_path / "live"))
  config.teacher.cache = cache_dir
  cached = train.train_and_evaluate(config, str(tmp_path / "cached"))
  live_losses = [r["train/loss"] for r in records(tmp_path / "live") if "train/loss" in r]
  cached_losses = [r["train/loss"] for r in records(tmp_path / "cached") if "train/loss" in r]
  assert len(live_losses) == len(cached_losses) == 3
  np.testing.assert_allclose(cached_losses, live_losses, rtol=2e-3)
  teacher_ce = [
    [r["train/teacher_ce"] for r in records(tmp_path / run) if "train/loss" in r]
    for run in ("live", "cached")
  ]
  np.testing.assert_allclose(teacher_ce[1], teacher_ce[0], rtol=2e-3)
  assert abs(cached["teacher_top1"] - live["teacher_top1"]) <= 100 / 40 + 1e-9
  assert abs(cached["last_top1"] - live["last_top1"]) <= 100 / 40 + 1e-9


@needs_fashion_mnist
def test_a_cache_of_another_teacher_or_an_unfinished_one_is_refused(converted_resnet18, tmp_path):
  from ega_jax import config as config_lib
  from ega_jax import train

  teacher_dir, _ = _teacher_at_28(converted_resnet18, tmp_path)
  config = _cache_config(teacher_dir, 48, 40, num_train_steps=1)
  other = tmp_path / "other_teacher_cache"
  _write_index_cache(other, 48, 2, FASHION_PADDING)  # sha256 'abc'
  config.teacher.cache = str(other)
  with pytest.raises(config_lib.ConfigError, match=r"config.teacher.cache=.*another teacher"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  config.teacher.cache = str(tmp_path / "missing")
  with pytest.raises(config_lib.ConfigError, match="config.teacher.cache=.*ega-cache"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


@needs_fashion_mnist
def test_cache_teacher_cli_reports_progress_and_one_line_errors(converted_resnet18, tmp_path):
  teacher_dir, _ = _teacher_at_28(converted_resnet18, tmp_path)
  command = [
    sys.executable,
    "-m",
    "launch.cache_teacher",
    "--config=configs/fashion_mnist.py",
    f"--config.teacher.checkpoint={teacher_dir}",
    "--config.dataset.max_train_examples=8",
    "--config.dataset.max_eval_examples=8",
    f"--cache_dir={tmp_path / 'cache'}",
    "--views=2",
    "--splits=train",
  ]
  result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "train: 8/8 examples" in result.stdout
  assert "Teacher cache ready" in result.stdout
  manifest = teacher_cache.read_manifest(str(tmp_path / "cache"))
  assert set(manifest["splits"]) == {"train"}
  bad = subprocess.run(
    command[:-2] + ["--views=zero"], capture_output=True, text=True, cwd=REPO, timeout=300
  )
  assert bad.returncode == 2
  error_lines = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
  assert len(error_lines) == 1 and "--views" in error_lines[0]


def test_cached_features_reopen_their_memory_map_when_unpickled(tmp_path):
  # grain worker processes receive the reader pickled: the memory map must be
  # reopened there, not copied.
  import pickle

  _write_index_cache(tmp_path, 12, 2, FASHION_PADDING)
  cache = teacher_cache.CachedFeatures(str(tmp_path), "train")
  clone = pickle.loads(pickle.dumps(cache))
  # A pickled memory map comes back as a plain in-memory copy; a reopened one is a memmap.
  assert isinstance(clone.features, np.memmap)
  for index in range(12):
    np.testing.assert_array_equal(clone.feature(index, 1), cache.feature(index, 1))


def test_a_truncated_or_altered_cache_file_is_refused_naming_it(tmp_path):
  _write_index_cache(tmp_path, 12, 2, FASHION_PADDING)
  features = tmp_path / "train_features.npy"
  original = features.read_bytes()
  # One flipped bit in the float16 data: same size, other sha256.
  flipped = bytearray(original)
  flipped[-3] ^= 0x04
  features.write_bytes(bytes(flipped))
  with pytest.raises(ValueError, match=r"train_features.npy is corrupt: its sha256 differs"):
    teacher_cache.CachedFeatures(str(tmp_path), "train")
  features.write_bytes(original[:-64])
  with pytest.raises(ValueError, match=r"train_features.npy is truncated or overwritten"):
    teacher_cache.CachedFeatures(str(tmp_path), "train")
  features.write_bytes(original)
  teacher_cache.CachedFeatures(str(tmp_path), "train")  # intact again: accepted
  # A manifest without checksums (an older cache) says how to add them.
  manifest = teacher_cache.read_manifest(str(tmp_path))
  del manifest["splits"]["train"]["files"]
  teacher_cache.write_manifest(str(tmp_path), manifest)
  with pytest.raises(ValueError, match="records no checksums for the 'train' split"):
    teacher_cache.CachedFeatures(str(tmp_path), "train")
