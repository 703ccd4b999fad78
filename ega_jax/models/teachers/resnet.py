"""torchvision-layout ResNets (v1.5: the stride sits on the 3x3 conv of a bottleneck).

This is the backbone layout of MoCo v1/v2/v3, SwAV, BYOL, Barlow Twins, DINO-ResNet and converted
SimCLR checkpoints. The embedding is the globally average-pooled layer4 output (what feeds `fc`),
so any input resolution works (the Fashion-MNIST demo teacher runs at 32x32).

Submodule names mirror torchvision's (`layer2_0` is `layer2.0`) so a converted tree reads like
the checkpoint it came from.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ega_jax.models.conv import TorchConv


def torch_conv(features: int, kernel: int, stride: int, padding: int, dtype: Any, name: str):
  """Bias-free conv with torch's explicit symmetric zero padding.

  `TorchConv` (models/conv.py) runs the 3x3 convs on 2x2 / 1x1 maps (layer3/4 at 32 px) as a
  patch matmul: 8x faster for ResNet-18 at 32 px on XLA:CPU.
  """
  return TorchConv(features, kernel, stride=stride, padding=padding, dtype=dtype, name=name)


def frozen_batch_norm(dtype: Any, name: str):
  """Inference-mode BatchNorm with torch's eps; statistics live in the `batch_stats` collection."""
  return nn.BatchNorm(use_running_average=True, epsilon=1e-5, dtype=dtype, name=name)


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34)."""

  planes: int
  stride: int
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C) -> (B, H / stride, W / stride, planes)."""
    out = torch_conv(self.planes, 3, self.stride, 1, self.dtype, "conv1")(x)
    out = nn.relu(frozen_batch_norm(self.dtype, "bn1")(out))
    out = torch_conv(self.planes, 3, 1, 1, self.dtype, "conv2")(out)
    out = frozen_batch_norm(self.dtype, "bn2")(out)
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = torch_conv(self.planes, 1, self.stride, 0, self.dtype, "downsample_conv")(x)
      x = frozen_batch_norm(self.dtype, "downsample_bn")(x)
    return nn.relu(out + x)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 with 4x expansion (ResNet-50/101/152)."""

  planes: int
  stride: int
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C) -> (B, H / stride, W / stride, 4 * planes)."""
    out_features = self.planes * self.expansion
    out = torch_conv(self.planes, 1, 1, 0, self.dtype, "conv1")(x)
    out = nn.relu(frozen_batch_norm(self.dtype, "bn1")(out))
    out = torch_conv(self.planes, 3, self.stride, 1, self.dtype, "conv2")(out)
    out = nn.relu(frozen_batch_norm(self.dtype, "bn2")(out))
    out = torch_conv(out_features, 1, 1, 0, self.dtype, "conv3")(out)
    out = frozen_batch_norm(self.dtype, "bn3")(out)
    if self.stride != 1 or x.shape[-1] != out_features:
      x = torch_conv(out_features, 1, self.stride, 0, self.dtype, "downsample_conv")(x)
      x = frozen_batch_norm(self.dtype, "downsample_bn")(x)
    return nn.relu(out + x)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
  """torchvision ResNet trunk returning the pooled pre-`fc` feature.

  Attributes:
    block: 'basic' or 'bottleneck'.
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
    dtype: computation dtype; parameters and statistics stay float32.
  """

  block: str
  stage_sizes: Sequence[int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """images: (B, H, W, 3) normalised -> embedding (B, 512 or 2048) float32."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"ResNet expects NHWC images (B, H, W, 3), got {tuple(images.shape)}.")
    block_class = BLOCKS[self.block]
    x = torch_conv(64, 7, 2, 3, self.dtype, "conv1")(images.astype(self.dtype))
    x = nn.relu(frozen_batch_norm(self.dtype, "bn1")(x))
    # nn.max_pool pads with -inf, as torch's MaxPool2d(3, 2, padding=1) does.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, num_blocks in enumerate(self.stage_sizes):
      for index in range(num_blocks):
        stride = 2 if stage > 0 and index == 0 else 1
        x = block_class(64 * 2**stage, stride, self.dtype, name=f"layer{stage + 1}_{index}")(x)
    # Global average pooling (torchvision's AdaptiveAvgPool2d(1)), so any resolution works.
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
