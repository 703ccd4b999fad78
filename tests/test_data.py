"""Tests for ega_jax.data: readers, augmentation, the process-independent
global order, eval padding, iterator checkpointing, TFDS mock data and the
Tiny ImageNet builder.

References are independent: the idx files are parsed here with gzip +
np.frombuffer, crops are checked by exhaustive search over all windows of
the zero-padded original, and examples are matched by their pixels.
"""

import gzip
import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
from PIL import Image
import pytest

from ega_jax import data
from ega_jax.data import sources

FASHION_DIR = sources.DEBIAN_FASHION_MNIST_DIR
HAVE_FASHION_FILES = os.path.isfile(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz"))
needs_fashion_files = pytest.mark.skipif(
  not HAVE_FASHION_FILES, reason=f"Debian dataset-fashion-mnist not installed in {FASHION_DIR}"
)


def _mock_data(num_examples):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds.testing.mock_data(num_examples=num_examples)


def _tfds_split(name, split):
  """The split as TFDS serves it (inside a mock_data context)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds.data_source(name, split=split, data_dir="/unused", download=False)


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _parse_idx_gz(path, header_bytes):
  with gzip.open(path, "rb") as stream:
    raw = stream.read()
  return raw[:header_bytes], np.frombuffer(raw, np.uint8, offset=header_bytes)


def _window_offsets(view, original, padding):
  """All (top, left, flipped) windows of the zero-padded `original` == view."""
  size = original.shape[0]
  padded = np.zeros((size + 2 * padding, size + 2 * padding, 3), np.int64)
  padded[padding : padding + size, padding : padding + size] = original
  matches = []
  for top in range(2 * padding + 1):
    for left in range(2 * padding + 1):
      window = padded[top : top + size, left : left + size]
      for flipped, candidate in ((False, window), (True, window[:, ::-1])):
        if np.array_equal(candidate, view):
          matches.append((top, left, flipped))
  return matches


# --------------------------------------------------------------------- info


def test_dataset_info_fields_and_unknown_name():
  cifar = data.get_dataset_info("cifar100")
  assert (cifar.num_classes, cifar.image_size, cifar.num_train, cifar.num_test) == (
    100,
    32,
    50_000,
    10_000,
  )
  assert (data.DATASETS["stl10"].num_train, data.DATASETS["stl10"].num_test) == (5_000, 8_000)
  assert data.DATASETS["tiny_imagenet"].num_classes == 200
  assert data.DATASETS["fashion_mnist"].image_size == 28
  assert (data.DATASETS["cifar10"].num_classes, data.DATASETS["cifar10"].image_size) == (10, 32)
  for info in data.DATASETS.values():
    assert len(info.mean) == 3 and len(info.std) == 3
  with pytest.raises(Exception):
    cifar.num_classes = 10  # frozen
  with pytest.raises(ValueError, match="cifar100.*fashion_mnist.*stl10.*image_folder"):
    data.get_dataset_info("cifar1000")


# ------------------------------------------------------------ Fashion-MNIST


@needs_fashion_files
def test_fashion_mnist_reader_matches_independent_idx_parse():
  for role, prefix, count in (("train", "train", 60_000), ("eval", "t10k", 10_000)):
    image_header, pixels = _parse_idx_gz(
      os.path.join(FASHION_DIR, f"{prefix}-images-idx3-ubyte.gz"), 16
    )
    label_header, labels = _parse_idx_gz(
      os.path.join(FASHION_DIR, f"{prefix}-labels-idx1-ubyte.gz"), 8
    )
    # Magic numbers 2051 / 2049 and the counts, read as big-endian int32.
    assert np.frombuffer(image_header, ">i4").tolist() == [2051, count, 28, 28]
    assert np.frombuffer(label_header, ">i4").tolist() == [2049, count]
    images = pixels.reshape(count, 28, 28)

    source = sources.open_split("fashion_mnist", role, None)
    assert len(source) == count
    for key in (0, 1, count // 2, count - 1):
      record = source[key]
      assert record["image"].shape == (28, 28, 3)
      assert record["image"].dtype == np.uint8
      for channel in range(3):
        np.testing.assert_array_equal(record["image"][..., channel], images[key])
      assert record["label"] == labels[key]
      assert record["index"] == key
    if role == "train":
      np.testing.assert_array_equal(
        data.train_labels("fashion_mnist", None), labels.astype(np.int32)
      )
      # The DatasetInfo normalisation constants, from the pixels in float64.
      # (A histogram keeps it exact without a 60000x784 float64 copy.)
      counts = np.bincount(pixels, minlength=256).astype(np.float64)
      values = np.arange(256, dtype=np.float64) / 255.0
      mean = (counts * values).sum() / counts.sum()
      std = np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum())
      info = data.get_dataset_info("fashion_mnist")
      np.testing.assert_allclose(info.mean, [mean] * 3, atol=1e-4)
      np.testing.assert_allclose(info.std, [std] * 3, atol=1e-4)


def test_read_idx_rejects_a_truncated_file(tmp_path):
  path = tmp_path / "bad-idx3-ubyte.gz"
  header = np.array([0x00000803, 2, 4, 4], ">u4").tobytes()
  with gzip.open(path, "wb") as stream:
    stream.write(header + bytes(20))  # 32 pixels promised
  with pytest.raises(ValueError, match="truncated"):
    sources.read_idx(str(path))


def test_fashion_mnist_falls_back_to_tfds_with_a_log_line(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "absent"))
  with _mock_data(num_examples=8), caplog.at_level("WARNING"):
    loader = data.create_train_loader("fashion_mnist", str(tmp_path), global_batch_size=4, seed=0)
    batch = next(iter(loader))
  assert "falling back to TFDS" in caplog.text
  assert batch["image"].shape == (4, 28, 28, 3)
  # Grayscale replicated to RGB.
  np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])


def test_importing_data_and_reading_fashion_mnist_needs_no_tensorflow():
  script = (
    "import sys\n"
    "from ega_jax import data\n"
    "assert 'tensorflow' not in sys.modules, 'imported tensorflow'\n"
    "assert 'tensorflow_datasets' not in sys.modules, 'imported tfds'\n"
    "import os\n"
    f"if os.path.isdir({FASHION_DIR!r}):\n"
    "  loader = data.create_train_loader('fashion_mnist', None,\n"
    "                                    global_batch_size=2, seed=0)\n"
    "  next(iter(loader))\n"
    "  assert 'tensorflow' not in sys.modules, 'offline path imported tf'\n"
  )
  repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
    [sys.executable, "-c", script],
    cwd=repo_root,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]


# ------------------------------------------------------------ augmentation


@pytest.mark.parametrize("teacher_view", ["independent", "same"])
def test_views_are_shifted_flipped_windows_of_the_padded_original(teacher_view):
  with _mock_data(num_examples=32):
    originals = _tfds_split("cifar100", "train")
    loader = data.create_train_loader(
      "cifar100", None, global_batch_size=16, seed=3, teacher_view=teacher_view
    )
    batches = _take(iter(loader), 2)
    offsets = []
    for batch in batches:
      assert batch["image"].shape == (16, 32, 32, 3)
      assert batch["image"].dtype == np.uint8
      assert batch["teacher_image"].shape == (16, 32, 32, 3)
      assert batch["teacher_image"].dtype == np.uint8
      assert batch["label"].dtype == np.int32
      assert batch["index"].dtype == np.int32
      for row, index in enumerate(batch["index"]):
        original = originals[int(index)]
        assert batch["label"][row] == original["label"]
        for key in ("image", "teacher_image"):
          matches = _window_offsets(batch[key][row], original["image"], 4)
          assert matches, f"{key} row {row} is not a crop/flip of the original"
        offsets.append(matches[0])
  # The views vary: both flips and more than one offset occur (a fixed view
  # has probability < 1e-9 over 32 random images).
  assert {flipped for _, _, flipped in offsets} == {False, True}
  assert len({(top, left) for top, left, _ in offsets}) > 1
  teacher_equals_student = [
    np.array_equal(batch["image"][row], batch["teacher_image"][row])
    for batch in batches
    for row in range(16)
  ]
  if teacher_view == "same":
    assert all(teacher_equals_student)
  else:
    assert sum(teacher_equals_student) < 8  # P(same view) = 1/162 each


# ------------------------------- global order, process layout, restore

BATCH_KEYS = ("image", "teacher_image", "label", "index")


def _indices(batches):
  return np.concatenate([batch["index"] for batch in batches])


def _assert_same_batches(expected, actual):
  assert len(expected) == len(actual)
  for want, got in zip(expected, actual):
    assert set(want) == set(got) == set(BATCH_KEYS)
    for key in BATCH_KEYS:
      assert got[key].dtype == want[key].dtype, key
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize("teacher_view", ["independent", "same"])
def test_process_batches_concatenate_to_the_single_process_batch(teacher_view):
  # 20 examples, global batch 8: 2 steps per epoch, so steps 0..3 span two
  # epochs (4 examples dropped from each).
  num_steps, global_batch_size = 4, 8
  with _mock_data(num_examples=20):

    def process_batches(process_index, process_count):
      loader = data.create_train_loader(
        "cifar100",
        None,
        global_batch_size=global_batch_size,
        seed=9,
        process_index=process_index,
        process_count=process_count,
        teacher_view=teacher_view,
      )
      return _take(iter(loader), num_steps)

    single = process_batches(0, 1)
    for process_count in (2, 4):
      per_process = [process_batches(p, process_count) for p in range(process_count)]
      for batches in per_process:
        assert all(
          batch["image"].shape[0] == global_batch_size // process_count for batch in batches
        )
      concatenated = [
        {
          key: np.concatenate([per_process[p][step][key] for p in range(process_count)])
          for key in BATCH_KEYS
        }
        for step in range(num_steps)
      ]
      _assert_same_batches(single, concatenated)


def test_each_epoch_is_a_prefix_of_a_permutation_and_epochs_differ():
  num_examples, global_batch_size, num_epochs = 20, 8, 6
  steps_per_epoch = num_examples // global_batch_size
  with _mock_data(num_examples=num_examples):
    loader = data.create_train_loader(
      "cifar100", None, global_batch_size=global_batch_size, seed=2, num_epochs=num_epochs
    )
    batches = list(iter(loader))
  assert len(batches) == num_epochs * steps_per_epoch
  epochs = [
    _indices(batches[e * steps_per_epoch : (e + 1) * steps_per_epoch]) for e in range(num_epochs)
  ]
  for indices in epochs:
    # N // B * B positions of a permutation: distinct records of the split.
    assert len(indices) == steps_per_epoch * global_batch_size
    assert len(set(indices.tolist())) == len(indices)
    assert set(indices.tolist()) <= set(range(num_examples))
  assert len({indices.tobytes() for indices in epochs}) == num_epochs
  # The dropped remainder changes from epoch to epoch: no record is skipped
  # for good.
  assert set(np.concatenate(epochs).tolist()) == set(range(num_examples))


def test_order_and_views_are_a_pure_function_of_seed_and_epoch():
  with _mock_data(num_examples=16):

    def first_batches(seed, count=8):
      loader = data.create_train_loader("cifar100", None, global_batch_size=4, seed=seed)
      return _take(iter(loader), count)

    run_a, run_b, other_seed = first_batches(7), first_batches(7), first_batches(8)
  _assert_same_batches(run_a, run_b)
  epoch0, epoch1 = _indices(run_a[:4]), _indices(run_a[4:])
  assert sorted(epoch0) == list(range(16)) == sorted(epoch1)
  assert not np.array_equal(epoch0, epoch1), "epochs must reshuffle"
  assert not np.array_equal(_indices(other_seed[:4]), epoch0)


def test_num_epochs_stops_after_whole_epochs():
  with _mock_data(num_examples=16):
    loader = data.create_train_loader("cifar100", None, global_batch_size=4, seed=0, num_epochs=2)
    batches = list(iter(loader))
  assert len(batches) == 8
  assert sorted(_indices(batches)) == sorted(list(range(16)) * 2)


def test_iterator_state_restored_mid_epoch_reproduces_the_next_batches():
  with _mock_data(num_examples=16):

    def make_loader(process_index=0):
      return data.create_train_loader(
        "cifar100", None, global_batch_size=4, seed=11, process_index=process_index, process_count=2
      )

    for process_index in (0, 1):
      iterator = iter(make_loader(process_index))
      _take(iterator, 3)  # mid-epoch 0 (4 steps per epoch)
      state = iterator.get_state()
      # orbax stores the state as JSON.
      assert json.loads(json.dumps(state)) == state
      expected = _take(iterator, 4)  # crosses into epoch 1
      restored = iter(make_loader(process_index))
      restored.set_state(json.loads(json.dumps(state)))
      _assert_same_batches(expected, _take(restored, 4))


def test_a_loader_started_at_a_step_continues_any_process_layout():
  # Elastic resume: the batches from step 3 on of a 1-process loader started
  # at step 3 are the 2-process loaders' rows of those steps, concatenated.
  with _mock_data(num_examples=16):

    def loader(process_index, process_count, start_step=0):
      return iter(
        data.create_train_loader(
          "cifar100",
          None,
          global_batch_size=4,
          seed=4,
          process_index=process_index,
          process_count=process_count,
          start_step=start_step,
        )
      )

    two_processes = []
    for process_index in range(2):
      iterator = loader(process_index, 2)
      _take(iterator, 3)
      two_processes.append(_take(iterator, 5))  # crosses into epoch 1 (4 steps per epoch)
    expected = [
      {key: np.concatenate([a[key], b[key]]) for key in a} for a, b in zip(*two_processes)
    ]
    _assert_same_batches(expected, _take(loader(0, 1, start_step=3), 5))
    with pytest.raises(ValueError, match="start_step must be a non-negative integer"):
      data.create_train_loader("cifar100", None, global_batch_size=4, seed=4, start_step=-1)


@needs_fashion_files
@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_restore():
  from absl import flags  # pylint: disable=g-import-not-at-top

  # grain's worker processes read its absl flags (main parses them).
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

  def make_loader(worker_count):
    return data.create_train_loader(
      "fashion_mnist", None, global_batch_size=8, seed=5, max_examples=40, worker_count=worker_count
    )

  expected = _take(iter(make_loader(0)), 7)
  iterator = iter(make_loader(2))
  try:
    _assert_same_batches(expected[:3], _take(iterator, 3))
    state = iterator.get_state()
    assert json.loads(json.dumps(state)) == state
    _assert_same_batches(expected[3:5], _take(iterator, 2))
    iterator.set_state(state)  # rewind, as a restore would
    _assert_same_batches(expected[3:], _take(iterator, 4))
  finally:
    iterator.close()


def test_invalid_arguments_name_the_field():
  with pytest.raises(ValueError, match="global_batch_size"):
    data.create_train_loader("cifar100", None, global_batch_size=10, seed=0, process_count=3)
  with pytest.raises(ValueError, match="global_batch_size"):
    data.create_eval_loader("cifar100", None, global_batch_size=10, process_count=4)
  with pytest.raises(ValueError, match="teacher_view.*independent, same"):
    data.create_train_loader("cifar100", None, global_batch_size=4, seed=0, teacher_view="shared")
  with pytest.raises(ValueError, match="process_index"):
    data.create_train_loader(
      "cifar100", None, global_batch_size=4, seed=0, process_index=2, process_count=2
    )
  with pytest.raises(ValueError, match="valid names"):
    data.create_train_loader("imagenet", None, global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match="worker_count"):
    data.create_train_loader("cifar100", None, global_batch_size=4, seed=0, worker_count=-1)
  with _mock_data(num_examples=6):
    with pytest.raises(ValueError, match="global_batch_size=8 is larger than the 6"):
      data.create_train_loader("cifar100", None, global_batch_size=8, seed=0)


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
  from ega_jax import config as config_lib

  with pytest.raises(config_lib.UserInputError) as error:
    data.create_eval_loader("stl10", str(tmp_path), global_batch_size=4)
  message = str(error.value)
  assert "\n" not in message
  assert (f"tfds build stl10 --data_dir={tmp_path} --file_format=array_record") in message


# ------------------------------------------------------------- evaluation


@pytest.mark.parametrize("process_count", [1, 3])
def test_eval_padding_counts_every_example_exactly_once(process_count):
  num_examples, global_batch_size = 10, 3
  with _mock_data(num_examples=num_examples):
    reference = _tfds_split("cifar100", "test")
    expected = sorted(
      (reference[key]["image"].tobytes(), int(reference[key]["label"]))
      for key in range(num_examples)
    )
    seen, batch_counts = [], []
    for process_index in range(process_count):
      loader = data.create_eval_loader(
        "cifar100",
        None,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
      )
      first_pass, second_pass = list(loader), list(loader)  # re-iterable
      batch_counts.append(len(first_pass))
      assert len(first_pass) == len(loader)
      for batch, again in zip(first_pass, second_pass):
        local = global_batch_size // process_count
        assert batch["image"].shape == (local, 32, 32, 3)
        assert batch["image"].dtype == np.uint8
        assert batch["label"].dtype == np.int32
        assert batch["mask"].dtype == np.bool_
        np.testing.assert_array_equal(batch["image"], again["image"])
        assert not batch["image"][~batch["mask"]].any()  # zero padding
        for row in np.flatnonzero(batch["mask"]):
          seen.append((batch["image"][row].tobytes(), int(batch["label"][row])))
  assert len(set(batch_counts)) == 1, "processes disagree on batch count"
  assert sorted(seen) == expected


# ---------------------------------------------------- TFDS mock data paths


@pytest.mark.parametrize("name,image_size,num_classes", [("cifar100", 32, 100), ("stl10", 96, 10)])
def test_mock_data_flows_through_train_eval_and_labels(name, image_size, num_classes):
  with _mock_data(num_examples=12):
    train = next(iter(data.create_train_loader(name, None, global_batch_size=4, seed=0)))
    evaluation = next(iter(data.create_eval_loader(name, None, global_batch_size=4)))
    labels = data.train_labels(name, None)
    reference = _tfds_split(name, "train")
    expected_labels = [int(reference[key]["label"]) for key in range(12)]
  assert train["image"].shape == (4, image_size, image_size, 3)
  assert train["teacher_image"].shape == (4, image_size, image_size, 3)
  assert evaluation["image"].shape == (4, image_size, image_size, 3)
  assert labels.dtype == np.int32 and labels.tolist() == expected_labels
  assert 0 <= labels.min() and labels.max() < num_classes
  np.testing.assert_array_equal(train["label"], labels[train["index"]])


# ---------------------------------------------------- Tiny ImageNet builder

# Listed unsorted on purpose: labels must follow the sorted wnids.
_WNIDS = ["n03000003", "n01000001", "n02000002"]
_COLOURS = {"n01000001": (220, 20, 20), "n02000002": (20, 220, 20), "n03000003": (20, 20, 220)}


def _jpeg(colour, grayscale=False):
  image = Image.new("RGB", (64, 64), colour)
  if grayscale:
    image = image.convert("L")
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=95)
  return buffer.getvalue()


def _write_synthetic_tiny_imagenet(zip_path):
  """3 classes x 4 train images, 6 val images, 1 unlabeled test image."""
  root = "tiny-imagenet-200"
  val_wnids = {}
  with zipfile.ZipFile(zip_path, "w") as archive:
    archive.writestr(f"{root}/wnids.txt", "\n".join(_WNIDS) + "\n")
    archive.writestr(f"{root}/words.txt", "".join(f"{wnid}\tthing {wnid}\n" for wnid in _WNIDS))
    for wnid in _WNIDS:
      boxes = ""
      for k in range(4):
        archive.writestr(f"{root}/train/{wnid}/images/{wnid}_{k}.JPEG", _jpeg(_COLOURS[wnid]))
        boxes += f"{wnid}_{k}.JPEG\t0\t0\t63\t63\n"
      archive.writestr(f"{root}/train/{wnid}/{wnid}_boxes.txt", boxes)
    annotations = ""
    for k in range(6):
      wnid = _WNIDS[k % 3]
      val_wnids[f"val_{k}.JPEG"] = wnid
      # One grayscale source, as in the real archive.
      archive.writestr(f"{root}/val/images/val_{k}.JPEG", _jpeg(_COLOURS[wnid], grayscale=(k == 5)))
      annotations += f"val_{k}.JPEG\t{wnid}\t1\t2\t60\t61\n"
    archive.writestr(f"{root}/val/val_annotations.txt", annotations)
    archive.writestr(f"{root}/test/images/test_0.JPEG", _jpeg((9, 9, 9)))
  return val_wnids


def _wnid_of_colour(image):
  """The wnid whose colour (or its grayscale version, for the 'L' source)
  the pixels show; grey uses PIL's documented ITU-R 601-2 luma transform."""
  mean = image.reshape(-1, 3).astype(np.float64).mean(axis=0)
  candidates = []
  for wnid, (red, green, blue) in _COLOURS.items():
    grey = (red * 299 + green * 587 + blue * 114) / 1000
    candidates += [
      (np.abs(mean - (red, green, blue)).max(), wnid),
      (np.abs(mean - grey).max(), wnid),
    ]
  distance, wnid = min(candidates)
  assert distance < 10, f"unexpected colour {mean}"
  return wnid


@pytest.mark.slow
def test_tiny_imagenet_builder_on_a_synthetic_zip(tmp_path):
  manual_dir, data_dir = tmp_path / "manual", str(tmp_path / "tfds")
  manual_dir.mkdir()
  val_wnids = _write_synthetic_tiny_imagenet(manual_dir / "tiny-imagenet-200.zip")

  from ega_jax.data import tiny_imagenet  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  tiny_imagenet.main([f"--manual_dir={manual_dir}", f"--data_dir={data_dir}"])
  version_dir = os.path.join(data_dir, "tiny_imagenet", "1.0.0")
  assert any(".array_record" in f for f in os.listdir(version_dir))

  sorted_wnids = sorted(_WNIDS)
  validation = tfds.data_source(
    "tiny_imagenet", split="validation", data_dir=data_dir, download=False
  )
  assert len(validation) == 6
  assert validation.dataset_info.features["label"].names == sorted_wnids
  for key in range(6):
    record = validation[key]
    file_name = record["file_name"].decode()
    wnid = sorted_wnids[int(record["label"])]
    assert wnid == val_wnids[file_name]
    assert record["image"].shape == (64, 64, 3)
    if file_name == "val_5.JPEG":  # the grayscale source, stored as RGB
      np.testing.assert_array_equal(record["image"][..., 0], record["image"][..., 1])
    assert _wnid_of_colour(record["image"]) == wnid

  # Train labels: 4 per class, and each index's label matches its pixels.
  labels = data.train_labels("tiny_imagenet", data_dir)
  assert sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
  loader = data.create_train_loader(
    "tiny_imagenet", data_dir, global_batch_size=4, seed=0, num_epochs=1
  )
  batches = list(iter(loader))
  assert len(batches) == 3
  assert sorted(_indices(batches)) == list(range(12))
  for batch in batches:
    assert batch["image"].shape == (4, 64, 64, 3)
    np.testing.assert_array_equal(batch["label"], labels[batch["index"]])
    for row in range(4):
      # Solid colours: the crop's non-padding pixels keep the class colour.
      image = batch["image"][row]
      inside = image[image.sum(axis=-1) > 0]
      assert _wnid_of_colour(inside) == sorted_wnids[batch["label"][row]]

  # The extracted folder instead of the zip builds the same dataset.
  extracted_dir, folder_data_dir = tmp_path / "extracted", str(tmp_path / "f")
  with zipfile.ZipFile(manual_dir / "tiny-imagenet-200.zip") as archive:
    archive.extractall(extracted_dir)
  tiny_imagenet.prepare(str(extracted_dir), folder_data_dir)
  np.testing.assert_array_equal(data.train_labels("tiny_imagenet", folder_data_dir), labels)
  with pytest.raises(FileNotFoundError, match="manual_dir"):
    tiny_imagenet.prepare(str(tmp_path / "empty"), str(tmp_path / "never"))

  evaluation = data.create_eval_loader("tiny_imagenet", data_dir, global_batch_size=4)
  eval_batches = list(evaluation)
  assert len(eval_batches) == 2
  masks = np.concatenate([batch["mask"] for batch in eval_batches])
  assert masks.tolist() == [True] * 6 + [False] * 2
  for batch in eval_batches:
    for row in np.flatnonzero(batch["mask"]):
      assert _wnid_of_colour(batch["image"][row]) == sorted_wnids[batch["label"][row]]


def test_max_examples_keeps_a_prefix_of_the_split():
  from ega_jax import data as data_lib

  loader = data_lib.create_eval_loader("fashion_mnist", None, global_batch_size=32, max_examples=70)
  batches = list(loader)
  assert len(batches) == 3
  assert int(sum(b["mask"].sum() for b in batches)) == 70
  labels = data_lib.train_labels("fashion_mnist", None, max_examples=50)
  assert labels.shape == (50,)
  np.testing.assert_array_equal(labels, data_lib.train_labels("fashion_mnist", None)[:50])
  train_loader = data_lib.create_train_loader(
    "fashion_mnist", None, global_batch_size=10, seed=0, max_examples=40
  )
  iterator = iter(train_loader)
  indices = np.concatenate([next(iterator)["index"] for _ in range(4)])
  assert sorted(indices.tolist()) == list(range(40))


@pytest.mark.parametrize("cpus, threads", [(1, 1), (2, 1), (8, 4), (64, 16), (240, 16)])
def test_reader_threads_scale_with_the_hosts_cores(cpus, threads):
  from ega_jax.data import pipeline

  options = pipeline.default_train_read_options(cpus)
  assert options.num_threads == threads
  assert options.prefetch_buffer_size == 2 * threads
