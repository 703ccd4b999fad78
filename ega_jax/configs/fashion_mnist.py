"""Fashion-MNIST offline demo, every label known: sized to finish on a 2-core CPU in minutes.

The teacher is the SimCLR ResNet-18 shipped in experiments/demo_teacher/ (trained
in PyTorch by `python -m experiments.pretrain_demo_teacher`) and converted by
`ega-convert` (image_size 32); `ega-cache`
caches its embeddings so the teacher does not run during training. The data
come from Debian's dataset-fashion-mnist (no download). The demo's headline,
label-scarce setting is configs/fashion_mnist_few_labels.py.

  python -m ega_jax.main --config=configs/fashion_mnist.py --workdir=/tmp/run \
      --config.teacher.checkpoint=demo_out/teacher/flax \
      --config.teacher.cache=demo_out/teacher/cache
"""

from ega_jax.configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = "fashion_mnist"
  config.teacher.arch = "resnet18"
  config.teacher.checkpoint = "demo_out/teacher/flax"
  config.student.arch = "resnet8"
  # A few CPU minutes: 400 steps of 64 (the released batch size) drawn from
  # all 60,000 train images (0.43 epochs of 937 steps), one learning-rate drop
  # (x0.1) at step 281 (70% of the run, epoch 0.3); the full 10k test set.
  config.batch_size = 64
  config.eval_batch_size = 500
  config.num_train_steps = 400
  config.learning_rate = 0.05
  config.lr_decay_epochs = (0.3,)
  config.log_every_steps = 25
  config.eval_every_steps = -1
  config.checkpoint_every_steps = 200
  config.graph_picture_batch = 48
  return config
