"""ShuffleNet students: ShuffleV1 (g = 3) and ShuffleV2 (1x), RepDistiller's
``ShuffleNetv1.py`` and ``ShuffleNetv2.py``.

Both use a 1x1 stem (no stride, no max-pool) so a 32x32 input ends at 4x4, and
PyTorch's default initialisers (RepDistiller does not re-initialise them).
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from ega_jax.models.students import layers

_STEM_WIDTH = 24

# RepDistiller leaves the ShuffleNet convs at PyTorch's default init.
_conv2d = functools.partial(layers.conv2d, kernel_init=layers.torch_default_kernel_init)


class ShuffleV1Unit(nn.Module):
  """Grouped 1x1, channel shuffle, 3x3 depthwise, grouped 1x1 (+ shortcut).

  With stride 2 the shortcut is a 3x3/2 average pool (zero padding counted)
  concatenated after the residual branch, so the unit outputs
  ``branch_channels + C_in`` channels; with stride 1 it is added.
  """

  branch_channels: int
  stride: int
  groups: int
  bn_axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """(B, H, W, C_in) -> (B, H / stride, W / stride, C_out)."""
    conv = functools.partial(_conv2d, dtype=self.dtype)
    norm = functools.partial(
      layers.batch_norm, train=train, axis_name=self.bn_axis_name, dtype=self.dtype
    )
    bottleneck = self.branch_channels // 4
    # The 24-channel stem is too narrow to split into groups (the ShuffleNet
    # paper's choice for the first pointwise conv; RepDistiller tests
    # in_planes == 24).
    first_groups = 1 if x.shape[-1] == _STEM_WIDTH else self.groups
    out = conv(bottleneck, 1, groups=first_groups, name="conv1")(x)
    out = nn.relu(norm(name="bn1")(out))
    out = layers.channel_shuffle(out, first_groups)
    out = conv(bottleneck, 3, stride=self.stride, groups=bottleneck, name="conv2")(out)
    out = nn.relu(norm(name="bn2")(out))
    out = conv(self.branch_channels, 1, groups=self.groups, name="conv3")(out)
    out = norm(name="bn3")(out)
    if self.stride == 2:
      shortcut = nn.avg_pool(
        x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), count_include_pad=True
      )
      return nn.relu(jnp.concatenate([out, shortcut], axis=-1))
    return nn.relu(out + x)


class ShuffleNetV1(nn.Module):
  """ShuffleNet v1 for 32x32 inputs.

  Attributes:
    num_classes: width of the final linear layer.
    stage_widths: output channels of the three stages ((240, 480, 960)).
    blocks_per_stage: units per stage ((4, 8, 4)); the first has stride 2.
    groups: pointwise-conv groups (3).
    bn_axis_name: mesh axis over which train-mode BatchNorm averages.
    dtype: computation dtype (params stay float32).
  """

  num_classes: int
  stage_widths: Sequence[int] = (240, 480, 960)
  blocks_per_stage: Sequence[int] = (4, 8, 4)
  groups: int = 3
  bn_axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False):
    """Runs the network.

    Args:
      images: (B, H, W, 3) normalised float images.
      train: batch statistics (and their running-average update) if True.

    Returns:
      logits (B, num_classes) and {'penultimate': (B, 960), 'stages':
      (stem (B, H, W, 24), (B, H/2, W/2, 240), (B, H/4, W/4, 480),
      (B, H/8, W/8, 960))} (strides round up).
    """
    layers.check_images(images, type(self).__name__)
    x = jnp.asarray(images, self.dtype)
    x = _conv2d(_STEM_WIDTH, 1, dtype=self.dtype, name="conv1")(x)
    x = layers.batch_norm(name="bn1", train=train, axis_name=self.bn_axis_name, dtype=self.dtype)(x)
    x = nn.relu(x)
    stages = [x]
    for stage_index, (width, num_blocks) in enumerate(
      zip(self.stage_widths, self.blocks_per_stage), start=1
    ):
      for block_index in range(num_blocks):
        downsample = block_index == 0
        # The stride-2 unit concatenates its input, so its branch makes only
        # the missing channels.
        branch_channels = width - x.shape[-1] if downsample else width
        x = ShuffleV1Unit(
          branch_channels,
          stride=2 if downsample else 1,
          groups=self.groups,
          bn_axis_name=self.bn_axis_name,
          dtype=self.dtype,
          name=f"layer{stage_index}.{block_index}",
        )(x, train)
      stages.append(x)
    penultimate = layers.global_average_pool(x)
    logits = layers.dense(
      self.num_classes, fan_in=self.stage_widths[-1], dtype=self.dtype, name="linear"
    )(penultimate)
    return logits, {"penultimate": penultimate, "stages": tuple(stages)}


class ShuffleV2DownUnit(nn.Module):
  """The stride-2 ShuffleNet v2 unit: two branches, concatenated, shuffled.

  Left: 3x3/2 depthwise-BN, 1x1-BN-ReLU. Right: 1x1-BN-ReLU, 3x3/2
  depthwise-BN, 1x1-BN-ReLU. Each branch makes out_channels / 2.
  """

  out_channels: int
  bn_axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """(B, H, W, C_in) -> (B, H / 2, W / 2, out_channels)."""
    conv = functools.partial(_conv2d, dtype=self.dtype)
    norm = functools.partial(
      layers.batch_norm, train=train, axis_name=self.bn_axis_name, dtype=self.dtype
    )
    in_channels = x.shape[-1]
    branch_channels = self.out_channels // 2
    left = norm(name="bn1")(conv(in_channels, 3, stride=2, groups=in_channels, name="conv1")(x))
    left = nn.relu(norm(name="bn2")(conv(branch_channels, 1, name="conv2")(left)))
    right = nn.relu(norm(name="bn3")(conv(branch_channels, 1, name="conv3")(x)))
    right = norm(name="bn4")(
      conv(branch_channels, 3, stride=2, groups=branch_channels, name="conv4")(right)
    )
    right = nn.relu(norm(name="bn5")(conv(branch_channels, 1, name="conv5")(right)))
    return layers.channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleV2Unit(nn.Module):
  """The stride-1 ShuffleNet v2 unit.

  Splits channels in half; the second half goes through 1x1-BN-ReLU,
  3x3 depthwise-BN, 1x1-BN-ReLU; the halves are concatenated (untouched half
  first) and shuffled with 2 groups.
  """

  bn_axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """(B, H, W, C) -> (B, H, W, C)."""
    conv = functools.partial(_conv2d, dtype=self.dtype)
    norm = functools.partial(
      layers.batch_norm, train=train, axis_name=self.bn_axis_name, dtype=self.dtype
    )
    split = x.shape[-1] // 2
    kept, transformed = x[..., :split], x[..., split:]
    width = transformed.shape[-1]
    out = nn.relu(norm(name="bn1")(conv(width, 1, name="conv1")(transformed)))
    out = norm(name="bn2")(conv(width, 3, groups=width, name="conv2")(out))
    out = nn.relu(norm(name="bn3")(conv(width, 1, name="conv3")(out)))
    return layers.channel_shuffle(jnp.concatenate([kept, out], axis=-1), 2)


class ShuffleNetV2(nn.Module):
  """ShuffleNet v2 (1x) for 32x32 inputs.

  Attributes:
    num_classes: width of the final linear layer.
    stage_widths: output channels of the three stages ((116, 232, 464)).
    blocks_per_stage: stride-1 units after each stage's stride-2 unit
      ((3, 7, 3)).
    last_width: channels of the final 1x1 conv (1024).
    bn_axis_name: mesh axis over which train-mode BatchNorm averages.
    dtype: computation dtype (params stay float32).
  """

  num_classes: int
  stage_widths: Sequence[int] = (116, 232, 464)
  blocks_per_stage: Sequence[int] = (3, 7, 3)
  last_width: int = 1024
  bn_axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False):
    """Runs the network.

    Args:
      images: (B, H, W, 3) normalised float images.
      train: batch statistics (and their running-average update) if True.

    Returns:
      logits (B, num_classes) and {'penultimate': (B, 1024), 'stages':
      (stem (B, H, W, 24), (B, H/2, W/2, 116), (B, H/4, W/4, 232),
      (B, H/8, W/8, 464))} (strides round up).
    """
    layers.check_images(images, type(self).__name__)
    norm = functools.partial(
      layers.batch_norm, train=train, axis_name=self.bn_axis_name, dtype=self.dtype
    )
    x = jnp.asarray(images, self.dtype)
    x = _conv2d(_STEM_WIDTH, 1, dtype=self.dtype, name="conv1")(x)
    x = nn.relu(norm(name="bn1")(x))
    stages = [x]
    for stage_index, (width, num_blocks) in enumerate(
      zip(self.stage_widths, self.blocks_per_stage), start=1
    ):
      x = ShuffleV2DownUnit(
        width, bn_axis_name=self.bn_axis_name, dtype=self.dtype, name=f"layer{stage_index}.0"
      )(x, train)
      for block_index in range(1, num_blocks + 1):
        x = ShuffleV2Unit(
          bn_axis_name=self.bn_axis_name, dtype=self.dtype, name=f"layer{stage_index}.{block_index}"
        )(x, train)
      stages.append(x)
    x = _conv2d(self.last_width, 1, dtype=self.dtype, name="conv2")(x)
    x = nn.relu(norm(name="bn2")(x))
    penultimate = layers.global_average_pool(x)
    logits = layers.dense(
      self.num_classes, fan_in=self.last_width, dtype=self.dtype, name="linear"
    )(penultimate)
    return logits, {"penultimate": penultimate, "stages": tuple(stages)}
