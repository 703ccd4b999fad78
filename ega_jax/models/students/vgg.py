"""VGG-BN students (vgg8, vgg11, vgg13, vgg16, vgg19): RepDistiller's vgg.py.

Five blocks of conv3x3(bias)-BN-ReLU separated by 2x2 max-pools, global average
pooling and one linear classifier (no VGG fc stack).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from ega_jax.models.students import layers

# Output channels of each conv, per block; RepDistiller's configs 'S', 'A',
# 'B', 'D', 'E'.
VGG_BLOCK_WIDTHS = {
  "vgg8": ((64,), (128,), (256,), (512,), (512,)),
  "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
  "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
  "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
  "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}

# RepDistiller skips the max-pool between blocks 3 and 4 at 32x32, so block 4
# runs at 4x4, and adds it for 64x64 inputs (TinyImageNet), so block 4 runs at
# 4x4 there too. It tests `height == 64`; this threshold keeps both of its
# cases and also pools at other inputs of 64 and more (e.g. 96: block 4 at 6x6).
POOL_BEFORE_LAST_BLOCK_MIN_SIZE = 64


def _max_pool(x: jax.Array) -> jax.Array:
  # 2x2 stride 2 with floor, like PyTorch's MaxPool2d(2, 2).
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class VGG(nn.Module):
  """VGG with BatchNorm for 32x32 inputs.

  Attributes:
    num_classes: width of the classifier.
    block_widths: per block, the output width of each conv (VGG_BLOCK_WIDTHS).
    bn_axis_name: mesh axis over which train-mode BatchNorm averages.
    dtype: computation dtype (params stay float32).
  """

  num_classes: int
  block_widths: Sequence[Sequence[int]]
  bn_axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False):
    """Runs the network.

    Args:
      images: (B, H, W, 3) normalised float images, H and W at least 8.
      train: batch statistics (and their running-average update) if True.

    Returns:
      logits (B, num_classes) and {'penultimate': (B, 512), 'stages': the
      five block outputs after ReLU, (B, H, W, w0), (B, H/2, W/2, w1),
      (B, H/4, W/4, w2), (B, H/8, W/8, 512), and block 4's (B, H/8, W/8, 512)
      or, for inputs of 64 and more, (B, H/16, W/16, 512)}.
    """
    # Three 2x2 floor pools must leave at least one pixel.
    layers.check_images(images, type(self).__name__, min_size=8)
    height = images.shape[1]
    x = jnp.asarray(images, self.dtype)
    stages = []
    for block_index, widths in enumerate(self.block_widths):
      if block_index in (1, 2, 3):
        x = _max_pool(x)
      elif block_index == 4 and height >= POOL_BEFORE_LAST_BLOCK_MIN_SIZE:
        x = _max_pool(x)
      for conv_index, width in enumerate(widths):
        # Indices of RepDistiller's nn.Sequential [conv, BN, ReLU, conv, ...].
        x = layers.conv2d(
          width, 3, use_bias=True, dtype=self.dtype, name=f"block{block_index}.{3 * conv_index}"
        )(x)
        x = layers.batch_norm(
          name=f"block{block_index}.{3 * conv_index + 1}",
          train=train,
          axis_name=self.bn_axis_name,
          dtype=self.dtype,
        )(x)
        x = nn.relu(x)
      stages.append(x)
    penultimate = layers.global_average_pool(x)
    logits = layers.dense(
      self.num_classes,
      fan_in=penultimate.shape[-1],
      kernel_init=layers.classifier_normal_init,
      bias_init=nn.initializers.zeros,
      dtype=self.dtype,
      name="classifier",
    )(penultimate)
    return logits, {"penultimate": penultimate, "stages": tuple(stages)}
