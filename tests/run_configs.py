"""Small, fast run configurations shared by the loop tests."""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fashion_mnist_config(teacher_dir, **overrides):
  sys.path.insert(0, REPO)
  from configs import fashion_mnist

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
