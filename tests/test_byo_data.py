"""Bring-your-own data: image folders, torchvision's CIFAR files, and the one-sentence
errors for data that are missing, half-prepared or in the wrong folder.

Every input is written here: PNG/JPEG/BMP folders with PIL, CIFAR pickles in
torchvision's layout, and empty or half-written TFDS directories (no network).
References are independent of the readers: CIFAR images are built HWC and
flattened into planes here, statistics are NumPy means over the stacked images.
"""

import json
import os
import pickle

import numpy as np
from PIL import Image
import pytest

from ega_jax import config as config_lib
from ega_jax import data
from ega_jax.data import folders
from ega_jax.data import sources
from run_configs import fashion_mnist_config


@pytest.fixture(autouse=True)
def _fresh_listings():
  # Folders are listed once per process; these tests rewrite them.
  folders.list_split.cache_clear()
  yield
  folders.list_split.cache_clear()


def _folder_dataset(root, image_size=None, **fields):
  return {"name": "image_folder", "data_dir": str(root), "image_size": image_size, **fields}


def _save(path, array, mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = Image.fromarray(array)
  Image.Image.save(image.convert(mode) if mode else image, path)


def _random(rng, height, width, channels=3):
  shape = (height, width, channels) if channels > 1 else (height, width)
  return rng.integers(0, 256, shape, dtype=np.uint8)


def _small_folder(root, seed=0, train=None, test=None):
  """train/ and test/ with `n` 10x14 RGB PNGs per class; returns root."""
  rng = np.random.default_rng(seed)
  for split, classes in (("train", train or {"a": 3, "b": 2}), ("test", test or {"a": 1, "b": 2})):
    for name, count in classes.items():
      for k in range(count):
        _save(os.path.join(root, split, name, f"{k}.png"), _random(rng, 10, 14))
  return str(root)


def _one_line_error(error_type, function, *args, **kwargs):
  with pytest.raises(error_type) as error:
    function(*args, **kwargs)
  message = str(error.value)
  assert "\n" not in message
  return message


# ------------------------------------------------------------------ image folders


def test_image_folder_records_labels_shapes_and_class_mapping(tmp_path):
  rng = np.random.default_rng(1)
  root = str(tmp_path / "pets")
  size = 12
  exact = _random(rng, size, size)  # PNG at the target size: kept pixel for pixel.
  gray = _random(rng, size, size, channels=1)
  _save(f"{root}/train/zebra/z.bmp", _random(rng, size, size))
  _save(f"{root}/train/ant/a.png", exact)
  _save(f"{root}/train/ant/c.png", gray)
  _save(f"{root}/train/ant/sub/b.jpg", np.full((20, 30, 3), (200, 100, 50), np.uint8))
  _save(f"{root}/train/ant/.hidden.png", exact)
  (tmp_path / "pets/train/ant/notes.txt").write_text("not an image")
  _save(f"{root}/train/bee/p.png", _random(rng, size, size), mode="P")
  _save(f"{root}/train/bee/q.png", _random(rng, 5, 7, channels=4))
  _save(f"{root}/test/bee/t.png", _random(rng, 9, 9))
  _save(f"{root}/test/ant/s.jpeg", _random(rng, 30, 16))  # zebra is absent from test/.

  info = data.get_dataset_info(_folder_dataset(root, size))
  assert (info.name, info.num_classes, info.image_size) == ("image_folder", 3, size)
  assert (info.num_train, info.num_test) == (6, 2)
  train = sources.open_split("image_folder", "train", root, image_size=size)
  listing = train.source.listing
  # Sorted class names -> labels; records in class, then path order.
  assert listing.classes == ("ant", "bee", "zebra")
  assert list(listing.files) == [
    "train/ant/a.png",
    "train/ant/c.png",
    "train/ant/sub/b.jpg",
    "train/bee/p.png",
    "train/bee/q.png",
    "train/zebra/z.bmp",
  ]
  records = [train[k] for k in range(len(train))]
  assert [int(r["label"]) for r in records] == [0, 0, 0, 1, 1, 2]
  assert [int(r["index"]) for r in records] == list(range(6))
  for record in records:
    assert record["image"].shape == (size, size, 3) and record["image"].dtype == np.uint8
    assert record["label"].dtype == np.int32
  np.testing.assert_array_equal(records[0]["image"], exact)
  for channel in range(3):
    np.testing.assert_array_equal(records[1]["image"][..., channel], gray)
  # A resized constant JPEG stays (about) constant: the whole image, not a crop.
  assert np.abs(records[2]["image"].astype(int) - (200, 100, 50)).max() <= 3
  path = f"{root}/train/bee/q.png"
  reference = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
  np.testing.assert_array_equal(records[4]["image"], np.asarray(reference))

  evaluation = sources.open_split("image_folder", "eval", root, image_size=size)
  assert evaluation.split == "test"
  assert [int(evaluation[k]["label"]) for k in range(2)] == [0, 1]  # ant, bee as in train
  np.testing.assert_array_equal(data.train_labels("image_folder", root), [0, 0, 0, 1, 1, 2])


def test_image_folder_loaders_are_deterministic_and_cover_the_eval_split(tmp_path):
  root = _small_folder(tmp_path / "f", train={"a": 4, "b": 4}, test={"a": 2, "b": 3})

  def first_batches():
    loader = data.create_train_loader(
      "image_folder", root, global_batch_size=4, seed=5, image_size=8
    )
    iterator = iter(loader)
    return [next(iterator) for _ in range(3)]

  for want, got in zip(first_batches(), first_batches()):
    assert got["image"].shape == (4, 8, 8, 3) and got["image"].dtype == np.uint8
    for key in ("image", "teacher_image", "label", "index"):
      np.testing.assert_array_equal(got[key], want[key])

  reference = sources.open_split("image_folder", "eval", root, image_size=8)
  loader = data.create_eval_loader("image_folder", root, global_batch_size=4, image_size=8)
  seen = []
  for batch in loader:
    assert batch["image"].shape == (4, 8, 8, 3)
    seen += [
      (batch["image"][r].tobytes(), int(batch["label"][r])) for r in np.flatnonzero(batch["mask"])
    ]
  expected = [(reference[k]["image"].tobytes(), int(reference[k]["label"])) for k in range(5)]
  assert seen == expected


def test_image_folder_decodes_lazily_and_pickles_without_pixels(tmp_path, monkeypatch):
  root = _small_folder(tmp_path / "f")
  decoded = []
  original = folders.decode_image
  monkeypatch.setattr(folders, "decode_image", lambda p, s: decoded.append(p) or original(p, s))
  source = sources.open_split("image_folder", "train", root, image_size=8)
  assert len(source) == 5 and decoded == []
  source[3]
  assert decoded == [os.path.join(root, "train", "b", "0.png")]
  copy = pickle.loads(pickle.dumps(source))  # what grain workers receive
  assert len(pickle.dumps(source)) < 4096
  np.testing.assert_array_equal(copy[3]["image"], source[3]["image"])


def _reference_stats(root, size):
  images = []
  for dirpath, _, files in os.walk(os.path.join(root, "train")):
    for name in files:
      image = Image.open(os.path.join(dirpath, name)).convert("RGB")
      images.append(np.asarray(image.resize((size, size), Image.Resampling.BILINEAR)))
  pixels = np.stack(images).reshape(-1, 3).astype(np.float64) / 255.0
  return pixels.mean(axis=0), pixels.std(axis=0)


def test_image_folder_statistics_are_computed_once_and_cached(tmp_path, monkeypatch):
  root = _small_folder(tmp_path / "f")
  info = data.get_dataset_info(_folder_dataset(root, 8))
  mean, std = _reference_stats(root, 8)
  np.testing.assert_allclose(info.mean, mean, rtol=1e-12)
  np.testing.assert_allclose(info.std, std, rtol=1e-12)
  data.get_dataset_info(_folder_dataset(root, 16))
  cache = json.loads((tmp_path / "f" / folders.STATS_FILE).read_text())
  assert sorted(cache) == ["16", "8"] and cache["8"]["num_train"] == 5

  calls = []
  real_compute = folders.compute_stats
  monkeypatch.setattr(folders, "compute_stats", lambda s: calls.append(len(s)) or real_compute(s))
  assert data.get_dataset_info(_folder_dataset(root, 8)) == info  # from the cache
  assert calls == []
  # Given statistics are used as they are.
  given = data.get_dataset_info(_folder_dataset(root, 24, mean=(0.1, 0.2, 0.3), std=(0.5,) * 3))
  assert (given.mean, given.std, calls) == ((0.1, 0.2, 0.3), (0.5, 0.5, 0.5), [])
  # Another image changes the file list, so the statistics are recomputed.
  _save(f"{root}/train/b/new.png", np.zeros((10, 14, 3), np.uint8))
  folders.list_split.cache_clear()
  changed = data.get_dataset_info(_folder_dataset(root, 8))
  assert calls == [6] and changed.num_train == 6 and changed.mean != info.mean


def test_read_only_image_folder_caches_statistics_in_the_user_cache(tmp_path, monkeypatch):
  root = _small_folder(tmp_path / "f")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  real_write = folders._write_json

  def refuse_data_folder(path, content):
    if path.startswith(root):
      raise PermissionError(13, "Permission denied", path)
    real_write(path, content)

  monkeypatch.setattr(folders, "_write_json", refuse_data_folder)
  info = data.get_dataset_info(_folder_dataset(root, 8))
  assert not os.path.exists(os.path.join(root, folders.STATS_FILE))
  cached = folders.user_cache_path(root)
  assert cached.startswith(str(tmp_path / "cache" / "ega_jax"))
  assert json.loads(open(cached).read())["8"]["mean"] == list(info.mean)
  monkeypatch.setattr(folders, "compute_stats", lambda s: pytest.fail("recomputed"))
  assert data.get_dataset_info(_folder_dataset(root, 8)) == info


def _layout(tmp_path, case):
  """(data_dir, expected phrase) for one mistaken layout."""
  root = tmp_path / "d"
  if case == "missing":
    return str(root), "does not exist"
  if case == "split_folder":
    _small_folder(root)
    return str(root / "train"), "looks like one split's folder"
  if case == "val_not_test":
    _small_folder(root)
    os.rename(root / "test", root / "val")
    return str(root), "rename (or symlink) its val/ folder to test/"
  if case == "nested":
    _small_folder(root / "pets")
    return str(root), f"set config.dataset.data_dir={root / 'pets'}"
  if case == "flat_train":
    _small_folder(root)
    _save(str(root / "train" / "loose.png"), np.zeros((4, 4, 3), np.uint8))
    for name in ("a", "b"):
      for file in os.listdir(root / "train" / name):
        os.remove(root / "train" / name / file)
      os.rmdir(root / "train" / name)
    return str(root), "holds images directly"
  if case == "unknown_test_class":
    _small_folder(root, test={"a": 1, "c": 1})
    return str(root), "test/c is not a class of"
  if case == "empty_class":
    _small_folder(root)
    os.makedirs(root / "train" / "c")
    return str(root), "holds no images"
  raise AssertionError(case)


@pytest.mark.parametrize(
  "case",
  [
    "missing",
    "split_folder",
    "val_not_test",
    "nested",
    "flat_train",
    "unknown_test_class",
    "empty_class",
  ],
)
def test_image_folder_layout_mistakes_are_one_sentence(tmp_path, case):
  data_dir, phrase = _layout(tmp_path, case)
  message = _one_line_error(
    config_lib.UserInputError, data.get_dataset_info, _folder_dataset(data_dir)
  )
  assert message.startswith("image_folder: ") and phrase in message, message


def test_image_folder_config_mistakes_name_the_field(tmp_path):
  root = _small_folder(tmp_path / "f")
  message = _one_line_error(config_lib.ConfigError, data.get_dataset_info, _folder_dataset(""))
  assert "config.dataset.data_dir is unset" in message
  for fields, phrase in (
    ({"image_size": 0}, "config.dataset.image_size=0 must be a positive integer"),
    ({"image_size": 8, "mean": (0.5, 0.5)}, "config.dataset.mean=(0.5, 0.5) must be three"),
    ({"image_size": 8, "std": (0.5, 0.0, 0.5)}, "config.dataset.std=(0.5, 0.0, 0.5) must be"),
  ):
    dataset = dict(_folder_dataset(root), **fields)
    assert phrase in _one_line_error(config_lib.ConfigError, data.get_dataset_info, dataset)
  # The name alone cannot describe a folder; registered datasets keep their constants.
  with pytest.raises(ValueError, match="pass the config's dataset section"):
    data.get_dataset_info("image_folder")
  message = _one_line_error(
    config_lib.ConfigError, data.get_dataset_info, {"name": "cifar100", "mean": (0.5,) * 3}
  )
  assert "only read for image_folder" in message
  from ega_jax.configs import default

  assert data.get_dataset_info(default.get_config().dataset) == data.DATASETS["cifar100"]


def test_unreadable_image_names_the_file(tmp_path):
  root = _small_folder(tmp_path / "f")
  (tmp_path / "f" / "train" / "b" / "9.png").write_bytes(b"not a png")
  source = sources.open_split("image_folder", "train", root, image_size=8)
  message = _one_line_error(config_lib.UserInputError, source.__getitem__, len(source) - 1)
  assert f"{root}/train/b/9.png cannot be read as an image" in message


def test_training_on_an_image_folder(converted_resnet18, tmp_path):
  from ega_jax import train

  root = _small_folder(tmp_path / "f", train={"a": 8, "b": 8, "c": 8}, test={"a": 2, "c": 3})
  config = fashion_mnist_config(
    converted_resnet18,
    **{
      "dataset.name": "image_folder",
      "dataset.data_dir": root,
      "dataset.image_size": 16,
      "distill.method": "none",
      "student.arch": "resnet8",
    },
  )
  config.batch_size, config.eval_batch_size, config.num_train_steps = 8, 8, 2
  config.graph_pictures = False
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(summary["best_top1"])
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert any(r.get("eval/count") == 5 for r in records)
  assert "16" in json.loads((tmp_path / "f" / folders.STATS_FILE).read_text())
  # The student leaves the workdir and scores the same on the folder's test/ split.
  from ega_jax import evaluate, export

  assert export.main([f"--workdir={tmp_path / 'run'}", f"--output={tmp_path / 'e'}"]) == 0
  meta = json.loads((tmp_path / "e" / "student.json").read_text())
  assert meta["image_size"] == 16 and meta["num_classes"] == 3
  scores = evaluate.evaluate(student=str(tmp_path / "e"))
  assert scores["count"] == 5 and scores["top1"] == summary["best_top1"]


# ------------------------------------------------------- torchvision CIFAR files


def _write_cifar(data_dir, name, per_file, bytes_keys):
  """torchvision's files for `name` with `per_file` random images per data file.

  Returns {split: (images uint8 (N, 32, 32, 3), labels (N,))}.
  """
  rng = np.random.default_rng(7)
  folder, split_files, label_key, meta = {
    "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, "fine_labels", "meta"),
    "cifar10": (
      "cifar-10-batches-py",
      {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"]},
      "labels",
      "batches.meta",
    ),
  }[name]
  os.makedirs(data_dir / folder)
  key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
  expected = {}
  for split, files in split_files.items():
    images, labels = [], []
    for file_name in files:
      hwc = rng.integers(0, 256, (per_file, 32, 32, 3), dtype=np.uint8)
      file_labels = rng.integers(0, 100 if name == "cifar100" else 10, per_file).tolist()
      content = {
        key("data"): hwc.transpose(0, 3, 1, 2).reshape(per_file, 3072),  # R, G, B planes
        key(label_key): file_labels,
        key("coarse_labels"): [19 - label // 5 for label in file_labels],
        key("filenames"): [f"img_{k}.png" for k in range(per_file)],
      }
      with open(data_dir / folder / file_name, "wb") as stream:
        pickle.dump(content, stream, protocol=2)
      images.append(hwc)
      labels += file_labels
    expected[split] = (np.concatenate(images), np.array(labels))
  with open(data_dir / folder / meta, "wb") as stream:
    pickle.dump({key("label_names"): ["x"]}, stream, protocol=2)
  return expected


@pytest.mark.parametrize("name,bytes_keys", [("cifar100", False), ("cifar10", True)])
def test_torchvision_cifar_files_are_read_instead_of_tfds(tmp_path, name, bytes_keys):
  expected = _write_cifar(tmp_path, name, per_file=4, bytes_keys=bytes_keys)
  for role, split in (("train", "train"), ("eval", "test")):
    source = sources.open_split(name, role, str(tmp_path))
    assert type(source.source).__name__ == "CifarPickleSource"
    images, labels = expected[split]
    assert len(source) == len(labels)
    for k in range(len(source)):
      record = source[k]
      assert record["image"].dtype == np.uint8 and record["image"].shape == (32, 32, 3)
      np.testing.assert_array_equal(record["image"], images[k])
      assert record["label"] == labels[k] and record["index"] == k
  np.testing.assert_array_equal(data.train_labels(name, str(tmp_path)), expected["train"][1])
  batch = next(iter(data.create_train_loader(name, str(tmp_path), global_batch_size=4, seed=0)))
  assert batch["image"].shape == (4, 32, 32, 3)
  assert data.get_dataset_info(name).num_classes == (100 if name == "cifar100" else 10)


def test_cifar_files_half_copied_misplaced_packed_or_foreign(tmp_path):
  _write_cifar(tmp_path / "half", "cifar100", per_file=2, bytes_keys=False)
  os.remove(tmp_path / "half" / "cifar-100-python" / "test")
  message = _one_line_error(
    config_lib.UserInputError, sources.open_split, "cifar100", "eval", str(tmp_path / "half")
  )
  assert "cifar-100-python lacks test" in message and "extract cifar-100-python.tar.gz" in message

  _write_cifar(tmp_path / "ok", "cifar100", per_file=2, bytes_keys=False)
  inner = tmp_path / "ok" / "cifar-100-python"
  message = _one_line_error(
    config_lib.UserInputError, sources.open_split, "cifar100", "train", str(inner)
  )
  assert f"set config.dataset.data_dir={tmp_path / 'ok'}" in message

  (tmp_path / "packed").mkdir()
  (tmp_path / "packed" / "cifar-10-python.tar.gz").write_bytes(b"")
  message = _one_line_error(
    config_lib.UserInputError, sources.open_split, "cifar10", "train", str(tmp_path / "packed")
  )
  assert f"tar xzf {tmp_path / 'packed' / 'cifar-10-python.tar.gz'}" in message
  assert "tfds build cifar10" in message

  # A pickle that references anything but NumPy's array rebuilders is refused, unrun.
  with open(inner / "test", "wb") as stream:
    pickle.dump({"data": os.system}, stream, protocol=2)
  message = _one_line_error(
    config_lib.UserInputError,
    lambda: len(sources.open_split("cifar100", "eval", str(tmp_path / "ok"))),
  )
  assert "is not a CIFAR python-version pickle (refusing to load posix.system)" in message


# ------------------------------------------------------------- TFDS directories


@pytest.mark.parametrize(
  "name,command",
  [
    ("cifar100", "tfds build cifar100 --data_dir={} --file_format=array_record"),
    ("cifar10", "tfds build cifar10 --data_dir={} --file_format=array_record"),
    ("stl10", "tfds build stl10 --data_dir={} --file_format=array_record"),
    ("tiny_imagenet", "python -m ega_jax.data.tiny_imagenet --manual_dir="),
    ("fashion_mnist", "tfds build fashion_mnist --data_dir={} --file_format=array_record"),
  ],
)
def test_missing_data_is_one_sentence_with_the_command(tmp_path, monkeypatch, name, command):
  monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "no_debian"))
  message = _one_line_error(
    config_lib.UserInputError,
    data.create_train_loader,
    name,
    str(tmp_path),
    global_batch_size=2,
    seed=0,
  )
  assert message.startswith(f"{name} (train split) is not ready in {tmp_path}: it has no ")
  assert command.format(tmp_path) in message
  if name == "fashion_mnist":
    assert f"put the four idx .gz files in {tmp_path / 'fashion-mnist'}" in message
  if name.startswith("cifar"):
    assert "torchvision's cifar-" in message


def test_unprepared_default_data_dir_is_not_a_tfds_traceback(tmp_path, monkeypatch):
  # What python -m ega_jax.main --config=configs/tinyimagenet.py met with nothing
  # prepared: TFDS's KeyError "`splits` is empty".
  from tensorflow_datasets.core import constants

  monkeypatch.setattr(constants, "DATA_DIR", str(tmp_path / "tensorflow_datasets"))
  message = _one_line_error(
    config_lib.UserInputError, data.create_eval_loader, "tiny_imagenet", None, global_batch_size=2
  )
  assert "tiny_imagenet (validation split) is not ready in" in message
  assert (
    "(TFDS's default; config.dataset.data_dir is unset): that directory does not exist" in message
  )
  assert f"--data_dir={tmp_path / 'tensorflow_datasets'}" in message


def _dataset_info_json(version_dir, version="3.0.2", file_format="array_record"):
  """A dataset_info.json as `tfds build cifar100` writes it (2 records per split)."""
  os.makedirs(version_dir, exist_ok=True)
  splits = [
    {
      "name": s,
      "shardLengths": ["2"],
      "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
    }
    for s in ("train", "test")
  ]
  info = {"name": "cifar100", "fileFormat": file_format, "version": version, "splits": splits}
  (version_dir / "dataset_info.json").write_text(json.dumps(info))


def test_half_written_or_misplaced_tfds_builds_say_what_to_do(tmp_path):
  def message(data_dir, split="train"):
    return _one_line_error(
      config_lib.UserInputError, sources.open_tfds, "cifar100", split, str(data_dir)
    )

  (tmp_path / "a" / "cifar100" / "incomplete.1f2e_3.0.2").mkdir(parents=True)
  assert "cifar100/ holds only an interrupted build (incomplete.1f2e_3.0.2); delete " in message(
    tmp_path / "a"
  )
  (tmp_path / "b" / "cifar100" / "3.0.2").mkdir(parents=True)
  (tmp_path / "b" / "cifar100" / "3.0.2" / "features.json").write_text("{}")
  assert "cifar100/3.0.2 has no dataset_info.json (an unfinished build)" in message(tmp_path / "b")
  assert f"delete {tmp_path / 'b' / 'cifar100'} and prepare it again" in message(tmp_path / "b")

  _dataset_info_json(tmp_path / "c" / "cifar100" / "3.0.2")
  assert (
    f"is the cifar100/ folder itself, not the TFDS data_dir above it; set config.dataset.data_dir={tmp_path / 'c'}"
    in message(tmp_path / "c" / "cifar100")
  )
  assert f"set config.dataset.data_dir={tmp_path / 'c'}" in message(
    tmp_path / "c" / "cifar100" / "3.0.2"
  )
  # TFDS opens shards only at the first read; the missing one is named up front.
  shard = "cifar100-train.array_record-00000-of-00001"
  assert f"3.0.2 is incomplete ({shard} is missing); delete " in message(tmp_path / "c")

  _dataset_info_json(tmp_path / "d" / "cifar100" / "2.0.0", version="2.0.0")
  assert "holds version 2.0.0, but this tensorflow-datasets reads version 3.0.2" in message(
    tmp_path / "d"
  )
  _dataset_info_json(tmp_path / "e" / "cifar100" / "3.0.2", file_format="tfrecord")
  (tmp_path / "e" / "cifar100" / "3.0.2" / "cifar100-train.tfrecord-00000-of-00001").write_bytes(
    b""
  )
  assert "TFRecord format, but random access needs ArrayRecord" in message(tmp_path / "e")


def test_half_copied_fashion_mnist_folder_names_the_missing_files(tmp_path):
  (tmp_path / "fashion-mnist").mkdir()
  (tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"")
  message = _one_line_error(
    config_lib.UserInputError, sources.open_split, "fashion_mnist", "train", str(tmp_path)
  )
  assert f"fashion_mnist: {tmp_path / 'fashion-mnist'} lacks train-labels-idx1-ubyte.gz" in message
