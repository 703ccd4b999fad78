"""CIFAR-100, the paper's setting: CLIP ViT-B/32 teacher, resnet8x4 student.

Prepare the data once:  tfds build cifar100 --data_dir=DATA --file_format=array_record
Convert the teacher:    ega-convert --arch clip_vit_b32 \
                          --checkpoint ViT-B-32.pt --output teachers/clip_vit_b32
"""

from ega_jax.configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = "cifar100"
  config.teacher.arch = "clip_vit_b32"
  config.student.arch = "resnet8x4"
  config.batch_size = 64
  config.num_epochs = 240
  config.learning_rate = 0.05  # use 0.01 for ShuffleV1/ShuffleV2/MobileNetV2
  config.lr_decay_epochs = (150, 180, 210)
  return config
