"""Fashion-MNIST offline demo: sized to finish on a 2-core CPU in minutes.

The teacher is the SimCLR ResNet-18 that `python -m experiments.pretrain_demo_teacher`
trains in PyTorch and `python -m launch.convert_teacher` converts (image_size 32).
The data come from Debian's dataset-fashion-mnist (no download).

  python -m ega_jax.main --config=configs/fashion_mnist.py --workdir=/tmp/run \
      --config.teacher.checkpoint=demo_out/teacher/flax
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = "fashion_mnist"
  config.teacher.arch = "resnet18"
  config.teacher.checkpoint = "demo_out/teacher/flax"
  config.student.arch = "resnet8"
  # A few CPU minutes: 200 steps of 128 over the first 25,600 train images,
  # one learning-rate drop (x0.1) at 70% of the run; the full 10k test set.
  config.dataset.max_train_examples = 25600
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 1
  config.learning_rate = 0.05
  config.lr_decay_epochs = (0.7,)
  config.log_every_steps = 20
  config.eval_every_steps = -1
  config.checkpoint_every_steps = 100
  config.graph_picture_batch = 48
  return config
