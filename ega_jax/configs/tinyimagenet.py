"""TinyImageNet (200 classes, 100k train / 10k val at 64x64), the released recipe.

Prepare the data once (the builder lives in ega_jax/data/tiny_imagenet.py):
  python -m ega_jax.data.tiny_imagenet --manual_dir=DIR_WITH_ZIP --data_dir=DATA
"""

from ega_jax.configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = "tiny_imagenet"
  config.teacher.arch = "clip_vit_b32"
  config.student.arch = "resnet8x4"
  config.batch_size = 64
  config.num_epochs = 240
  config.lr_decay_epochs = (150, 180, 210)
  return config
