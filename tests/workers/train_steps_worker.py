"""Runs a few distillation train steps on N forced CPU devices; writes the results.

Used by tests/test_train.py in a subprocess, because the device count is fixed
when jax is first imported:

  python tests/workers/train_steps_worker.py NUM_DEVICES METHOD[,METHOD...] STEPS OUT_PREFIX

writes OUT_PREFIX<method>.npz for each method. METHOD@labelled runs METHOD in
label-efficient mode: only even train indices keep their labels (-1 for the rest).
METHOD@replicated computes its graph loss whole on every device
(graph_rows='replicated'); otherwise graph losses take the default 'auto', split
by rows over several devices.
"""

import os
import sys

NUM_DEVICES, METHODS, STEPS, OUT_PREFIX = (
  int(sys.argv[1]),
  sys.argv[2].split(","),
  int(sys.argv[3]),
  sys.argv[4],
)
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={NUM_DEVICES}"

import jax  # noqa: E402

# Float64 computation (params stay float32): separates real sharding errors
# from float32 cancellation in ill-conditioned gradients.
X64 = os.environ.get("EGA_WORKER_X64") == "1"
if X64:
  jax.config.update("jax_enable_x64", True)
import numpy as np  # noqa: E402

from ega_jax.configs import default  # noqa: E402
from ega_jax import config as config_lib  # noqa: E402
from ega_jax.data import labelled  # noqa: E402
from ega_jax import models as models_lib  # noqa: E402
from ega_jax.train import run as run_lib  # noqa: E402
from ega_jax.train import state as state_lib  # noqa: E402

GLOBAL_BATCH = 16
NUM_CLASSES = 10
NUM_TRAIN = 64


def distinct_images(rng):
  """(GLOBAL_BATCH, 28, 28, 3) uint8 images that differ in colour and layout.

  Pure per-pixel noise gives nearly identical embeddings at initialisation, and
  then losses built on pairwise differences (RKD) lose float32 digits to
  cancellation in a way that has nothing to do with sharding.
  """
  base = rng.uniform(0, 255, (GLOBAL_BATCH, 1, 1, 3))
  ramp = np.linspace(-1, 1, 28)
  direction = rng.uniform(-60, 60, (GLOBAL_BATCH, 1, 1, 1))
  pattern = direction * (ramp[None, :, None, None] + ramp[None, None, :, None])
  noise = rng.normal(0, 20, (GLOBAL_BATCH, 28, 28, 3))
  return np.clip(base + pattern + noise, 0, 255).astype(np.uint8)


def run(METHOD, OUT):
  METHOD, _, variant = METHOD.partition("@")
  config = default.get_config()
  config.dataset.name = "fashion_mnist"
  config.student.arch = "resnet8"
  config.teacher.arch = "resnet18"
  config.distill.method = METHOD
  config.distill.alpha = 0.5  # exercise the KD term too
  config.distill.crd_num_negatives = 32
  config.feature_dim = 32
  config.batch_size = GLOBAL_BATCH
  config.num_train_steps = STEPS
  if X64:
    config_lib.DTYPES["float64"] = jax.numpy.float64
    config.dtype = "float64"

  teacher = models_lib.create_teacher("resnet18")
  teacher_variables = teacher.init(jax.random.PRNGKey(42), np.zeros((1, 32, 32, 3), np.float32))
  meta = {"image_size": 32, "mean": (0.3, 0.3, 0.3), "std": (0.35, 0.35, 0.35)}
  mesh = state_lib.data_mesh()
  rng = np.random.RandomState(0)
  train_labels = rng.randint(0, NUM_CLASSES, size=NUM_TRAIN).astype(np.int32)
  crd_labels = train_labels
  if variant == "replicated":
    config.distill.graph_rows = "replicated"
  if variant == "labelled":
    train_labels = np.where(np.arange(NUM_TRAIN) % 2 == 0, train_labels, -1).astype(np.int32)
    crd_labels = labelled.instance_labels(train_labels, np.arange(NUM_TRAIN), NUM_CLASSES)
  run = run_lib.build_run(
    config,
    mesh,
    teacher_module=teacher,
    teacher_variables=teacher_variables,
    teacher_meta=meta,
    num_classes=NUM_CLASSES,
    num_train_examples=NUM_TRAIN,
    image_shape=(28, 28, 3),
    crd_train_labels=crd_labels,
  )
  state, teacher_variables, crd_tables = run.state, run.teacher_variables, run.crd_tables

  results = {}
  for step in range(STEPS):
    index = rng.choice(NUM_TRAIN, GLOBAL_BATCH, replace=False).astype(np.int32)
    batch = {
      "image": distinct_images(rng),
      "teacher_image": distinct_images(rng),
      "label": train_labels[index],
      "index": index,
    }
    state, metrics = run.train_step(
      state, teacher_variables, state_lib.global_batch_from_local(mesh, batch), crd_tables
    )
    for key, value in jax.device_get(metrics).items():
      results[f"metric/{step}/{key}"] = np.asarray(value)
  final = jax.device_get(
    {
      "student": state.student_params,
      "batch_stats": state.student_batch_stats,
      "teacher_head": state.teacher_head_params,
    }
  )
  for path, leaf in jax.tree_util.tree_leaves_with_path(final):
    results["param/" + jax.tree_util.keystr(path)] = np.asarray(leaf)
  np.savez(OUT, **results)


def main():
  assert jax.device_count() == NUM_DEVICES, jax.devices()
  for method in METHODS:
    run(method, f"{OUT_PREFIX}{method.replace('@', '_')}.npz")


if __name__ == "__main__":
  main()
