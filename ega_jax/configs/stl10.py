"""STL-10 (5k labelled train / 8k test at 96x96), the released recipe at its resolution.

Prepare the data once:  tfds build stl10 --data_dir=DATA --file_format=array_record
"""

from ega_jax.configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = "stl10"
  config.teacher.arch = "clip_vit_b32"
  config.student.arch = "resnet8x4"
  config.batch_size = 64
  config.num_epochs = 240
  config.lr_decay_epochs = (150, 180, 210)
  return config
