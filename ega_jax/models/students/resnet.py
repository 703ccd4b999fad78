"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4) and ResNet50.

The layouts of RepDistiller's ``models/resnet.py`` (three stages of basic
blocks, 1x1-conv + BN downsample) and ``models/resnetv2.py`` (ResNet50: a 3x3
stem without max-pool and four stages of bottlenecks, for 32x32 inputs).
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from ega_jax.models.students import layers


class CifarBasicBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN, plus identity or 1x1-conv-BN shortcut, ReLU."""

  planes: int
  stride: int = 1
  bn_axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """(B, H, W, C_in) -> (B, H / stride, W / stride, planes)."""
    conv = functools.partial(layers.conv2d, dtype=self.dtype)
    norm = functools.partial(
      layers.batch_norm, train=train, axis_name=self.bn_axis_name, dtype=self.dtype
    )
    out = conv(self.planes, 3, stride=self.stride, name="conv1")(x)
    out = nn.relu(norm(name="bn1")(out))
    out = conv(self.planes, 3, name="conv2")(out)
    out = norm(name="bn2")(out)
    residual = x
    if self.stride != 1 or x.shape[-1] != self.planes:
      residual = conv(self.planes, 1, stride=self.stride, name="downsample.0")(x)
      residual = norm(name="downsample.1")(residual)
    return nn.relu(out + residual)


class CifarResNet(nn.Module):
  """RepDistiller's CIFAR ResNet with basic blocks, depth = 6n + 2.

  Attributes:
    num_classes: width of the final fc.
    depth: 8, 14, 20, 32, ...; each of the three stages has (depth - 2) / 6
      blocks.
    stage_widths: (stem, stage1, stage2, stage3) channel counts, e.g.
      (16, 16, 32, 64), or (32, 64, 128, 256) for the "x4" variants.
    bn_axis_name: mesh axis over which train-mode BatchNorm averages.
    dtype: computation dtype (params stay float32).
  """

  num_classes: int
  depth: int
  stage_widths: Sequence[int]
  bn_axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False):
    """Runs the network.

    Args:
      images: (B, H, W, 3) normalised float images.
      train: batch statistics (and their running-average update) if True.

    Returns:
      logits (B, num_classes) and {'penultimate': (B, stage_widths[3]),
      'stages': (stem (B, H, W, w0), stage1 (B, H, W, w1),
      stage2 (B, H/2, W/2, w2), stage3 (B, H/4, W/4, w3))}.
    """
    layers.check_images(images, type(self).__name__)
    if self.depth < 8 or (self.depth - 2) % 6:
      raise ValueError(
        f"CifarResNet depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...); got {self.depth}."
      )
    blocks_per_stage = (self.depth - 2) // 6
    x = jnp.asarray(images, self.dtype)
    x = layers.conv2d(self.stage_widths[0], 3, dtype=self.dtype, name="conv1")(x)
    x = layers.batch_norm(name="bn1", train=train, axis_name=self.bn_axis_name, dtype=self.dtype)(x)
    x = nn.relu(x)
    stages = [x]
    for stage_index, (planes, first_stride) in enumerate(
      zip(self.stage_widths[1:], (1, 2, 2)), start=1
    ):
      for block_index in range(blocks_per_stage):
        x = CifarBasicBlock(
          planes,
          stride=first_stride if block_index == 0 else 1,
          bn_axis_name=self.bn_axis_name,
          dtype=self.dtype,
          name=f"layer{stage_index}.{block_index}",
        )(x, train)
      stages.append(x)
    penultimate = layers.global_average_pool(x)
    logits = layers.dense(
      self.num_classes, fan_in=self.stage_widths[3], dtype=self.dtype, name="fc"
    )(penultimate)
    return logits, {"penultimate": penultimate, "stages": tuple(stages)}


class Bottleneck(nn.Module):
  """1x1-3x3-1x1 bottleneck (stride on the 3x3), output 4 * planes channels."""

  planes: int
  stride: int = 1
  bn_axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """(B, H, W, C_in) -> (B, H / stride, W / stride, 4 * planes)."""
    conv = functools.partial(layers.conv2d, dtype=self.dtype)
    norm = functools.partial(
      layers.batch_norm, train=train, axis_name=self.bn_axis_name, dtype=self.dtype
    )
    out_channels = self.expansion * self.planes
    out = nn.relu(norm(name="bn1")(conv(self.planes, 1, name="conv1")(x)))
    out = conv(self.planes, 3, stride=self.stride, name="conv2")(out)
    out = nn.relu(norm(name="bn2")(out))
    out = norm(name="bn3")(conv(out_channels, 1, name="conv3")(out))
    residual = x
    if self.stride != 1 or x.shape[-1] != out_channels:
      residual = conv(out_channels, 1, stride=self.stride, name="shortcut.0")(x)
      residual = norm(name="shortcut.1")(residual)
    return nn.relu(out + residual)


class ResNet50(nn.Module):
  """RepDistiller's CIFAR ResNet50 (``resnetv2.py``): 3x3 stem, [3, 4, 6, 3].

  Attributes:
    num_classes: width of the final linear layer.
    blocks_per_stage: bottlenecks in each of the four stages.
    bn_axis_name: mesh axis over which train-mode BatchNorm averages.
    dtype: computation dtype (params stay float32).
  """

  num_classes: int
  blocks_per_stage: Sequence[int] = (3, 4, 6, 3)
  bn_axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False):
    """Runs the network.

    Args:
      images: (B, H, W, 3) normalised float images.
      train: batch statistics (and their running-average update) if True.

    Returns:
      logits (B, num_classes) and {'penultimate': (B, 2048), 'stages':
      (stem (B, H, W, 64), (B, H, W, 256), (B, H/2, W/2, 512),
      (B, H/4, W/4, 1024), (B, H/8, W/8, 2048))} (strides round up).
    """
    layers.check_images(images, type(self).__name__)
    x = jnp.asarray(images, self.dtype)
    x = layers.conv2d(64, 3, dtype=self.dtype, name="conv1")(x)
    x = layers.batch_norm(name="bn1", train=train, axis_name=self.bn_axis_name, dtype=self.dtype)(x)
    x = nn.relu(x)
    stages = [x]
    for stage_index, (planes, num_blocks, first_stride) in enumerate(
      zip((64, 128, 256, 512), self.blocks_per_stage, (1, 2, 2, 2)), start=1
    ):
      for block_index in range(num_blocks):
        x = Bottleneck(
          planes,
          stride=first_stride if block_index == 0 else 1,
          bn_axis_name=self.bn_axis_name,
          dtype=self.dtype,
          name=f"layer{stage_index}.{block_index}",
        )(x, train)
      stages.append(x)
    penultimate = layers.global_average_pool(x)
    logits = layers.dense(
      self.num_classes, fan_in=penultimate.shape[-1], dtype=self.dtype, name="linear"
    )(penultimate)
    return logits, {"penultimate": penultimate, "stages": tuple(stages)}
