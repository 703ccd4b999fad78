"""OpenAI CLIP's modified ResNet image encoder (RN50, RN101).

Differences from a torchvision ResNet, all of which change the numbers:
  * a three-conv stem (3x3 s2, 3x3, 3x3) followed by a 2x2 average pool instead of 7x7 + max pool;
  * anti-aliased downsampling: every conv has stride 1, a stride-s bottleneck average-pools
    (kernel = stride = s) after its 3x3 conv, and its shortcut average-pools before the 1x1 conv;
  * attention pooling instead of global average pooling: the spatial mean is prepended as a query
    token, a learned position embedding is added to all H*W+1 tokens, and one multi-head attention
    step (query = that token only) followed by the output projection gives the embedding.

Submodule names mirror the OpenAI checkpoint (`layer3_5` is `visual.layer3.5`).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ega_jax.models.teachers.resnet import frozen_batch_norm, torch_conv
from ega_jax.models.teachers.vit import check_square_input


def average_pool(x: jax.Array, window: int) -> jax.Array:
  """torch AvgPool2d(window): kernel = stride = window, no padding, floor mode."""
  return nn.avg_pool(x, (window, window), strides=(window, window), padding="VALID")


class AntiAliasedBottleneck(nn.Module):
  """CLIP's Bottleneck: stride realised as an average pool after conv2 and before the shortcut."""

  planes: int
  stride: int
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C) -> (B, H / stride, W / stride, 4 * planes)."""
    out_features = self.planes * self.expansion
    out = nn.relu(
      frozen_batch_norm(self.dtype, "bn1")(torch_conv(self.planes, 1, 1, 0, self.dtype, "conv1")(x))
    )
    out = nn.relu(
      frozen_batch_norm(self.dtype, "bn2")(
        torch_conv(self.planes, 3, 1, 1, self.dtype, "conv2")(out)
      )
    )
    if self.stride > 1:
      out = average_pool(out, self.stride)
    out = frozen_batch_norm(self.dtype, "bn3")(
      torch_conv(out_features, 1, 1, 0, self.dtype, "conv3")(out)
    )
    if self.stride > 1 or x.shape[-1] != out_features:
      if self.stride > 1:
        x = average_pool(x, self.stride)
      x = torch_conv(out_features, 1, 1, 0, self.dtype, "downsample_conv")(x)
      x = frozen_batch_norm(self.dtype, "downsample_bn")(x)
    return nn.relu(out + x)


class AttentionPool(nn.Module):
  """CLIP's AttentionPool2d: one attention step from the mean token over all positions.

  Attributes:
    num_heads: attention heads.
    output_dim: size of the output projection (`c_proj`).
  """

  num_heads: int
  output_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    """features: (B, h, w, C) -> (B, output_dim)."""
    batch, height, width, channels = features.shape
    head_dim = channels // self.num_heads
    tokens = features.reshape(batch, height * width, channels)
    tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
    position_embedding = self.param(
      "positional_embedding", nn.initializers.normal(channels**-0.5), (height * width + 1, channels)
    )
    tokens = tokens + position_embedding.astype(self.dtype)
    dense = lambda features_out, name: nn.Dense(features_out, dtype=self.dtype, name=name)
    split_heads = lambda x: x.reshape(batch, x.shape[1], self.num_heads, head_dim)
    query = split_heads(dense(channels, "q_proj")(tokens[:, :1]))  # (B, 1, H, Dh)
    key = split_heads(dense(channels, "k_proj")(tokens))  # (B, L, H, Dh)
    value = split_heads(dense(channels, "v_proj")(tokens))
    logits = jnp.einsum("bqhd,bkhd->bhqk", query * head_dim**-0.5, key)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    pooled = jnp.einsum("bhqk,bkhd->bqhd", weights, value).reshape(batch, channels)
    return dense(self.output_dim, "c_proj")(pooled)


class CLIPModifiedResNet(nn.Module):
  """The CLIP RN image encoder; returns `encode_image` (B, output_dim).

  Attributes:
    image_size: square input resolution; fixes the attention pool's (image_size/32)^2 + 1
      position embeddings.
    stage_sizes: bottlenecks per stage, (3, 4, 6, 3) for RN50, (3, 4, 23, 3) for RN101.
    width: stem width (64 for RN50/RN101); stage i has width * 2^i planes.
    num_heads: attention-pool heads (width * 32 // 64 in OpenAI's build).
    output_dim: embedding size.
    dtype: computation dtype; parameters and statistics stay float32.
  """

  image_size: int
  stage_sizes: Sequence[int]
  width: int
  num_heads: int
  output_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """images: (B, image_size, image_size, 3) normalised -> (B, output_dim) float32."""
    check_square_input(images, self.image_size, "The CLIP ResNet")
    if self.image_size % 32:
      raise ValueError(f"CLIP ResNet image_size must be a multiple of 32, got {self.image_size}.")
    x = images.astype(self.dtype)
    stem = ((self.width // 2, 2), (self.width // 2, 1), (self.width, 1))
    for index, (features, stride) in enumerate(stem, start=1):
      x = torch_conv(features, 3, stride, 1, self.dtype, f"conv{index}")(x)
      x = nn.relu(frozen_batch_norm(self.dtype, f"bn{index}")(x))
    x = average_pool(x, 2)
    for stage, num_blocks in enumerate(self.stage_sizes):
      for index in range(num_blocks):
        stride = 2 if stage > 0 and index == 0 else 1
        x = AntiAliasedBottleneck(
          self.width * 2**stage, stride, self.dtype, name=f"layer{stage + 1}_{index}"
        )(x)
    embedding = AttentionPool(self.num_heads, self.output_dim, self.dtype, name="attnpool")(x)
    return embedding.astype(jnp.float32)
