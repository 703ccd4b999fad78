"""Small, fast run configurations and helpers shared by the tests."""

import os

import pytest

from ega_jax.data.idx import DEBIAN_FASHION_MNIST_DIR as FASHION_MNIST_DIR

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_fashion_mnist = pytest.mark.skipif(
  not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
  reason=f"Fashion-MNIST idx files not installed in {FASHION_MNIST_DIR} (make fashion-mnist)",
)


def fashion_mnist_config(teacher_dir, **overrides):
  from ega_jax.configs import fashion_mnist

  config = fashion_mnist.get_config()
  config.teacher.checkpoint = str(teacher_dir)
  config.dataset.max_train_examples = 256
  config.dataset.max_eval_examples = 100
  config.batch_size = 32
  config.eval_batch_size = 64
  config.feature_dim = 32
  config.num_train_steps = 4
  config.log_every_steps = 1
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  config.graph_picture_batch = 16
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config
