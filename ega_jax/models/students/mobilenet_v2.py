"""MobileNetV2 student ("MobileNetV2" = RepDistiller's ``mobile_half``).

Expansion T = 6, width multiplier 0.5, a stride-2 stem, seven stages of
inverted residuals and a 1x1 conv to 1280 channels (not scaled down, as
RepDistiller keeps 1280 for width multipliers <= 1).
"""

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from ega_jax.models.students import layers

# (expansion, output channels before width scaling, blocks, first stride); an
# expansion of None means "the network's T".
_INVERTED_RESIDUAL_SETTING = (
  (1, 16, 1, 1),
  (None, 24, 2, 1),
  (None, 32, 3, 2),
  (None, 64, 4, 2),
  (None, 96, 3, 1),
  (None, 160, 3, 2),
  (None, 320, 1, 1),
)

# RepDistiller's feat list: the stem, then the outputs of stages 1, 2, 4, 6.
_STAGES_IN_FEATURES = (1, 2, 4, 6)


class InvertedResidual(nn.Module):
  """1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 project-BN (+ identity)."""

  out_channels: int
  stride: int
  expansion: int
  bn_axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """(B, H, W, C_in) -> (B, H / stride, W / stride, out_channels)."""
    conv = functools.partial(layers.conv2d, dtype=self.dtype)
    norm = functools.partial(
      layers.batch_norm, train=train, axis_name=self.bn_axis_name, dtype=self.dtype
    )
    in_channels = x.shape[-1]
    hidden = in_channels * self.expansion
    # Names are the indices in RepDistiller's `conv` nn.Sequential.
    out = nn.relu(norm(name="conv.1")(conv(hidden, 1, name="conv.0")(x)))
    out = conv(hidden, 3, stride=self.stride, groups=hidden, name="conv.3")(out)
    out = nn.relu(norm(name="conv.4")(out))
    out = norm(name="conv.7")(conv(self.out_channels, 1, name="conv.6")(out))
    if self.stride == 1 and in_channels == self.out_channels:
      out = x + out
    return out


class MobileNetV2(nn.Module):
  """MobileNetV2 for 32x32 inputs.

  Attributes:
    num_classes: width of the classifier.
    expansion: T, the inverted-residual expansion (6).
    width_multiplier: scales every width except the last 1280 (0.5).
    bn_axis_name: mesh axis over which train-mode BatchNorm averages.
    dtype: computation dtype (params stay float32).
  """

  num_classes: int
  expansion: int = 6
  width_multiplier: float = 0.5
  bn_axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False):
    """Runs the network.

    Args:
      images: (B, H, W, 3) normalised float images.
      train: batch statistics (and their running-average update) if True.

    Returns:
      logits (B, num_classes) and, at width 0.5 and 32x32,
      {'penultimate': (B, 1280), 'stages': ((B, 16, 16, 16),
      (B, 16, 16, 12), (B, 8, 8, 16), (B, 4, 4, 48), (B, 2, 2, 160))}
      (spatial sizes scale with the input; strides round up).
    """
    layers.check_images(images, type(self).__name__)
    conv = functools.partial(layers.conv2d, dtype=self.dtype)
    norm = functools.partial(
      layers.batch_norm, train=train, axis_name=self.bn_axis_name, dtype=self.dtype
    )
    x = jnp.asarray(images, self.dtype)
    stem_width = int(32 * self.width_multiplier)
    x = nn.relu(norm(name="conv1.1")(conv(stem_width, 3, stride=2, name="conv1.0")(x)))
    stages = [x]
    for stage_index, (expansion, channels, num_blocks, first_stride) in enumerate(
      _INVERTED_RESIDUAL_SETTING
    ):
      for block_index in range(num_blocks):
        x = InvertedResidual(
          int(channels * self.width_multiplier),
          stride=first_stride if block_index == 0 else 1,
          expansion=self.expansion if expansion is None else expansion,
          bn_axis_name=self.bn_axis_name,
          dtype=self.dtype,
          name=f"blocks.{stage_index}.{block_index}",
        )(x, train)
      if stage_index in _STAGES_IN_FEATURES:
        stages.append(x)
    last_width = int(1280 * self.width_multiplier) if self.width_multiplier > 1.0 else 1280
    x = nn.relu(norm(name="conv2.1")(conv(last_width, 1, name="conv2.0")(x)))
    penultimate = layers.global_average_pool(x)
    logits = layers.dense(
      self.num_classes,
      fan_in=last_width,
      kernel_init=layers.classifier_normal_init,
      bias_init=nn.initializers.zeros,
      dtype=self.dtype,
      name="classifier.0",
    )(penultimate)
    return logits, {"penultimate": penultimate, "stages": tuple(stages)}
