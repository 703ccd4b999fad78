"""Runs a few distillation train steps on N forced CPU devices; writes the results.

Used by tests/test_train.py in a subprocess, because the device count is fixed
when jax is first imported:

  python tests/workers/train_steps_worker.py NUM_DEVICES METHOD STEPS OUT.npz
"""

import os
import sys

NUM_DEVICES, METHOD, STEPS, OUT = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={NUM_DEVICES}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from ega_jax import losses  # noqa: E402
from ega_jax import models as models_lib  # noqa: E402
from ega_jax import train  # noqa: E402

GLOBAL_BATCH = 16
NUM_CLASSES = 10
NUM_TRAIN = 64


def main():
  assert jax.device_count() == NUM_DEVICES, jax.devices()
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

  teacher = models_lib.create_teacher("resnet18")
  teacher_variables = teacher.init(jax.random.PRNGKey(42), np.zeros((1, 32, 32, 3), np.float32))
  meta = {"image_size": 32, "mean": (0.3, 0.3, 0.3), "std": (0.35, 0.35, 0.35)}
  models = train.build_models(config, teacher, meta, NUM_CLASSES)
  student_tx, teacher_head_tx = train.create_optimizers(config, NUM_TRAIN)
  mesh = Mesh(np.array(jax.devices()), (train.AXIS,))
  host_state = train.init_train_state(config, models, teacher_variables, jax.random.PRNGKey(0),
                                      (28, 28, 3), NUM_TRAIN, student_tx, teacher_head_tx)
  state = train.replicate(host_state, mesh)
  teacher_variables = train.replicate(teacher_variables, mesh)
  crd_tables = {}
  rng = np.random.RandomState(0)
  train_labels = rng.randint(0, NUM_CLASSES, size=NUM_TRAIN).astype(np.int32)
  if METHOD == "crd":
    crd_tables = train.replicate(losses.build_crd_class_tables(train_labels), mesh)
  train_fn, _, _ = train.compile_steps(mesh, models, config, student_tx, teacher_head_tx)

  results = {}
  for step in range(STEPS):
    index = rng.choice(NUM_TRAIN, GLOBAL_BATCH, replace=False).astype(np.int32)
    batch = {
        "image": rng.randint(0, 256, (GLOBAL_BATCH, 28, 28, 3)).astype(np.uint8),
        "teacher_image": rng.randint(0, 256, (GLOBAL_BATCH, 28, 28, 3)).astype(np.uint8),
        "label": train_labels[index],
        "index": index,
    }
    state, metrics = train_fn(state, teacher_variables, train.global_batch_from_local(mesh, batch),
                              crd_tables)
    for key, value in jax.device_get(metrics).items():
      results[f"metric/{step}/{key}"] = np.asarray(value)
  final = jax.device_get({"student": state.student_params,
                          "batch_stats": state.student_batch_stats,
                          "teacher_head": state.teacher_head_params})
  for path, leaf in jax.tree_util.tree_leaves_with_path(final):
    results["param/" + jax.tree_util.keystr(path)] = np.asarray(leaf)
  np.savez(OUT, **results)


if __name__ == "__main__":
  main()
