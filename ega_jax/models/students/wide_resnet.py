"""Wide ResNets (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2): RepDistiller's wrn.py.

Pre-activation blocks (BN-ReLU before each conv), a bare 3x3 stem conv, and a
final BN-ReLU before pooling; dropout rate 0 as RepDistiller builds them.
"""

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from ega_jax.models.students import layers


class WideBasicBlock(nn.Module):
  """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with identity or 1x1-conv shortcut.

  When the width changes, the shortcut conv reads the *pre-activated* input
  (BN-ReLU applied), as in RepDistiller; when it does not, the identity
  shortcut carries the raw input.
  """

  out_planes: int
  stride: int = 1
  bn_axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """(B, H, W, C_in) -> (B, H / stride, W / stride, out_planes)."""
    conv = functools.partial(layers.conv2d, dtype=self.dtype)
    norm = functools.partial(
      layers.batch_norm, train=train, axis_name=self.bn_axis_name, dtype=self.dtype
    )
    same_width = x.shape[-1] == self.out_planes
    preactivated = nn.relu(norm(name="bn1")(x))
    out = conv(self.out_planes, 3, stride=self.stride, name="conv1")(preactivated)
    out = nn.relu(norm(name="bn2")(out))
    out = conv(self.out_planes, 3, name="conv2")(out)
    if same_width:
      shortcut = x
    else:
      shortcut = conv(self.out_planes, 1, stride=self.stride, name="convShortcut")(preactivated)
    return shortcut + out


class WideResNet(nn.Module):
  """WRN-depth-widen_factor, depth = 6n + 4.

  Attributes:
    num_classes: width of the final fc.
    depth: 16 or 40 in the zoo; each stage has (depth - 4) / 6 blocks.
    widen_factor: stage widths are (16, 32, 64) times this.
    bn_axis_name: mesh axis over which train-mode BatchNorm averages.
    dtype: computation dtype (params stay float32).
  """

  num_classes: int
  depth: int
  widen_factor: int
  bn_axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False):
    """Runs the network.

    Args:
      images: (B, H, W, 3) normalised float images.
      train: batch statistics (and their running-average update) if True.

    Returns:
      logits (B, num_classes) and, with k = widen_factor,
      {'penultimate': (B, 64k), 'stages': (stem conv (B, H, W, 16),
      block1 (B, H, W, 16k), block2 (B, H/2, W/2, 32k),
      block3 (B, H/4, W/4, 64k))}; stage maps are block outputs before the
      following pre-activation BN, as RepDistiller's ``feat`` list.
    """
    layers.check_images(images, type(self).__name__)
    if self.depth < 10 or (self.depth - 4) % 6:
      raise ValueError(
        f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...); got {self.depth}."
      )
    blocks_per_stage = (self.depth - 4) // 6
    widths = (16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor)
    x = jnp.asarray(images, self.dtype)
    x = layers.conv2d(16, 3, dtype=self.dtype, name="conv1")(x)
    stages = [x]
    for stage_index, (width, first_stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
      for block_index in range(blocks_per_stage):
        x = WideBasicBlock(
          width,
          stride=first_stride if block_index == 0 else 1,
          bn_axis_name=self.bn_axis_name,
          dtype=self.dtype,
          name=f"block{stage_index}.layer.{block_index}",
        )(x, train)
      stages.append(x)
    x = layers.batch_norm(name="bn1", train=train, axis_name=self.bn_axis_name, dtype=self.dtype)(x)
    penultimate = layers.global_average_pool(nn.relu(x))
    # RepDistiller zeroes the fc bias and leaves PyTorch's default weight.
    logits = layers.dense(
      self.num_classes,
      fan_in=widths[-1],
      bias_init=nn.initializers.zeros,
      dtype=self.dtype,
      name="fc",
    )(penultimate)
    return logits, {"penultimate": penultimate, "stages": tuple(stages)}
