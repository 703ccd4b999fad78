"""Label-efficient mode: the labelled subset, the mixed batches, and the losses that
count labelled rows only (cross-entropy) or every row (distillation).

References are independent: class counts by np.bincount, the stream layout by
sets of indices, the cross-entropy by float64 NumPy log-softmax over the
labelled rows of the student's own logits.
"""

import json

import jax
import numpy as np
import pytest

from ega_jax import data
from ega_jax import models as models_lib
from ega_jax.data import labelled
from ega_jax.data import idx
from run_configs import fashion_mnist_config
from run_configs import needs_fashion_mnist


def test_subset_is_class_balanced_sorted_and_fixed_by_the_seed():
  labels = np.repeat(np.arange(10), 50)[np.random.default_rng(0).permutation(500)]
  subset = labelled.choose_labelled(labels, 25, seed=3, num_classes=10)
  assert len(subset) == 25 and len(set(subset.tolist())) == 25
  assert np.all(np.diff(subset) > 0)
  counts = np.bincount(labels[subset], minlength=10)
  assert set(counts.tolist()) == {2, 3} and counts.sum() == 25  # 25 // 10 each, 5 get one more
  np.testing.assert_array_equal(subset, labelled.choose_labelled(labels, 25, 3, 10))
  assert not np.array_equal(subset, labelled.choose_labelled(labels, 25, 4, 10))


def test_subset_errors_name_the_problem():
  labels = np.array([0] * 5 + [1] * 95)
  with pytest.raises(ValueError, match="between the number of classes"):
    labelled.choose_labelled(labels, 1, 0, 2)
  with pytest.raises(ValueError, match="class 0, which has only 5"):
    labelled.choose_labelled(labels, 20, 0, 2)


def test_instance_labels_keep_known_classes_and_give_each_unknown_image_its_own():
  labels = np.array([3, -1, 0, -1])
  indices = np.array([7, 7, 9, 11])
  np.testing.assert_array_equal(labelled.instance_labels(labels, indices, 10), [3, 17, 0, 21])


@pytest.fixture(scope="module")
def fashion_labels():
  return idx.read_fashion_mnist(idx.DEBIAN_FASHION_MNIST_DIR, "train")[1][:120]


def _loader(subset, **kwargs):
  return data.create_train_loader(
    "fashion_mnist",
    None,
    global_batch_size=10,
    seed=5,
    max_examples=120,
    labelled_indices=subset,
    labelled_share=0.4,
    **kwargs,
  )


@needs_fashion_mnist
def test_batches_mix_the_labelled_stream_with_all_images(fashion_labels):
  subset = labelled.choose_labelled(fashion_labels, 20, seed=5, num_classes=10)
  iterator = iter(_loader(subset))
  batches = [next(iterator) for _ in range(12)]
  labelled_rows = np.concatenate([b["index"][:4] for b in batches])  # round(0.4 * 10) = 4
  other_rows = np.concatenate([b["index"][4:] for b in batches])
  # The labelled stream: each run of 20 positions is the whole subset once.
  for start in range(0, 40, 20):
    assert sorted(labelled_rows[start : start + 20].tolist()) == subset.tolist()
  # The other rows: the first 72 positions of a permutation of all 120 images.
  assert len(set(other_rows.tolist())) == 72 and other_rows.max() < 120
  in_subset = np.isin(other_rows, subset)
  assert 0 < in_subset.sum() < 72  # Some labelled images also come through here.
  for batch in batches:
    known = np.isin(batch["index"], subset)
    np.testing.assert_array_equal(batch["label"][known], fashion_labels[batch["index"][known]])
    assert np.all(batch["label"][~known] == -1)  # No label leaks from outside the subset.


@needs_fashion_mnist
def test_mixed_batches_do_not_depend_on_the_process_count(fashion_labels):
  subset = labelled.choose_labelled(fashion_labels, 20, seed=5, num_classes=10)
  single = iter(_loader(subset))
  halves = [iter(_loader(subset, process_index=p, process_count=2)) for p in range(2)]
  for _ in range(5):
    whole = next(single)
    parts = [next(h) for h in halves]
    for key in ("image", "label", "index"):
      np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))


@needs_fashion_mnist
def test_mixed_stream_resumes_from_its_saved_position(fashion_labels):
  subset = labelled.choose_labelled(fashion_labels, 20, seed=5, num_classes=10)
  original = iter(_loader(subset))
  for _ in range(3):
    next(original)
  state = original.get_state()
  expected = [next(original) for _ in range(4)]
  resumed = iter(_loader(subset))
  resumed.set_state(state)
  for batch in expected:
    again = next(resumed)
    for key in ("image", "label", "index"):
      np.testing.assert_array_equal(again[key], batch[key])


def _cross_entropy_reference(logits, labels, rows):
  logits = np.asarray(logits, np.float64)[rows]
  shifted = logits - logits.max(1, keepdims=True)
  log_softmax = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
  return -np.mean(log_softmax[np.arange(len(rows)), np.asarray(labels)[rows]])


def test_cross_entropy_counts_labelled_rows_and_distillation_every_row():
  from ega_jax.configs import default
  from ega_jax.train import run as run_lib
  from ega_jax.train import state as state_lib

  config = default.get_config()
  config.dataset.name = "fashion_mnist"
  config.student.arch = "resnet8"
  config.teacher.arch = "resnet18"
  config.distill.method = "ega"
  config.feature_dim = 16
  config.batch_size = 8
  config.num_train_steps = 1
  teacher = models_lib.create_teacher("resnet18")
  teacher_variables = teacher.init(jax.random.PRNGKey(1), np.zeros((1, 32, 32, 3), np.float32))
  meta = {"image_size": 32, "mean": (0.3,) * 3, "std": (0.35,) * 3}
  mesh = state_lib.data_mesh()
  run = run_lib.build_run(
    config,
    mesh,
    teacher_module=teacher,
    teacher_variables=teacher_variables,
    teacher_meta=meta,
    num_classes=10,
    num_train_examples=64,
    image_shape=(28, 28, 3),
    donate_state=False,
  )
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8, 28, 28, 3), dtype=np.uint8)
  labels = np.array([1, 4, 0, 9, 2, 2, 7, 5], np.int32)
  known = np.array([True, False, True, False, False, True, False, False])
  batch = {"image": images, "teacher_image": images, "index": np.arange(8, dtype=np.int32)}
  all_known = dict(batch, label=labels)
  some_known = dict(batch, label=np.where(known, labels, -1).astype(np.int32))

  def step(local):
    _, metrics = run.train_step(
      run.state, run.teacher_variables, state_lib.global_batch_from_local(mesh, local), {}
    )
    return jax.device_get(metrics)

  full, partial = step(all_known), step(some_known)

  # The student's logits on this batch (BatchNorm in train mode, as in the step).
  models, state = run.models, jax.device_get(run.state)
  from ega_jax.models import preprocess

  student_images = preprocess.normalize_images(images, models.data_mean, models.data_std)
  # The same student without the mesh axis (one device: the same statistics).
  student = models_lib.create_student("resnet8", 10)
  (_, features), _ = student.apply(
    {"params": state.student_params["backbone"], "batch_stats": state.student_batch_stats},
    student_images,
    train=True,
    mutable=["batch_stats"],
  )
  _, logits = models.student_head.apply(
    {"params": state.student_params["head"]}, features["penultimate"]
  )
  rows = np.flatnonzero(known)
  np.testing.assert_allclose(full["ce"], _cross_entropy_reference(logits, labels, range(8)), 1e-5)
  np.testing.assert_allclose(partial["ce"], _cross_entropy_reference(logits, labels, rows), 1e-5)
  assert abs(partial["ce"] - full["ce"]) > 1e-3  # The mask really changed the term.
  np.testing.assert_allclose(partial["distill"], full["distill"], rtol=1e-6)  # Label-free.
  predictions = np.asarray(logits).argmax(1)
  np.testing.assert_allclose(partial["top1"], np.mean(predictions[rows] == labels[rows]), 1e-6)


@needs_fashion_mnist
def test_label_efficient_run_records_its_subset_and_trains(converted_resnet18, tmp_path):
  from ega_jax import train

  config = fashion_mnist_config(
    converted_resnet18, **{"dataset.num_labelled": 30, "distill.method": "nce"}
  )
  config.num_train_steps = 2
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  record = json.loads((tmp_path / "run" / "labelled.json").read_text())
  assert record["num_labelled"] == 30 and record["labelled_share"] == 0.5
  labels = idx.read_fashion_mnist(idx.DEBIAN_FASHION_MNIST_DIR, "train")[1][:256]
  assert record["indices"] == labelled.choose_labelled(labels, 30, 0, 10).tolist()
  assert np.isfinite(summary["best_top1"])
  # The same workdir with another subset is refused in one sentence.
  config.dataset.num_labelled = 40
  with pytest.raises(Exception, match="labelled.json records another labelled subset"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
