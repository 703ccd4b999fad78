"""Vision transformers: the OpenAI CLIP visual tower and the timm/DINO ViT.

Both are pre-norm transformers over [class token; patch tokens] with learned absolute position
embeddings; they differ only in a few switches, so one module serves both:

  * CLIP: bias-free patch conv, a LayerNorm before the blocks (`ln_pre`), QuickGELU, LayerNorm
    eps 1e-5, and a bias-free projection of the normalised class token (`x @ proj`).
  * timm/DINO: patch conv with bias, no pre-norm, exact (erf) GELU, LayerNorm eps 1e-6, the
    normalised class token is the embedding.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: jax.Array) -> jax.Array:
  """GELU with the erf, as torch.nn.GELU() computes it (not the tanh approximation)."""
  return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": exact_gelu}


def check_square_input(images: jax.Array, image_size: int, what: str) -> None:
  """Raises ValueError unless images is (B, image_size, image_size, 3)."""
  if images.ndim != 4 or images.shape[1:] != (image_size, image_size, 3):
    raise ValueError(
      f"{what} expects NHWC images of shape (B, {image_size}, {image_size}, 3), got "
      f"{tuple(images.shape)}; resize to the teacher image_size first."
    )


class SelfAttention(nn.Module):
  """Multi-head self-attention with a fused q/k/v projection (torch in_proj / timm qkv layout).

  The fused kernel is (D, 3D) whose columns are [q | k | v], each split into heads of D / H
  consecutive features, which is how torch's MultiheadAttention and timm slice theirs.
  """

  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens: (B, L, D) -> (B, L, D)."""
    batch, length, width = tokens.shape
    head_dim = width // self.num_heads
    qkv = nn.Dense(3 * width, dtype=self.dtype, name="qkv")(tokens)
    qkv = qkv.reshape(batch, length, 3, self.num_heads, head_dim)
    query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each (B, L, H, Dh)
    logits = jnp.einsum("bqhd,bkhd->bhqk", query * head_dim**-0.5, key)
    # Softmax in float32 so a bf16 computation dtype does not lose the attention distribution.
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, value).reshape(batch, length, width)
    return nn.Dense(width, dtype=self.dtype, name="out")(attended)


class TransformerBlock(nn.Module):
  """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

  num_heads: int
  mlp_dim: int
  activation: str
  layer_norm_eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens: (B, L, D) -> (B, L, D)."""
    width = tokens.shape[-1]
    layer_norm = lambda name: nn.LayerNorm(
      epsilon=self.layer_norm_eps, use_fast_variance=False, dtype=self.dtype, name=name
    )
    tokens = tokens + SelfAttention(self.num_heads, self.dtype, name="attention")(
      layer_norm("norm1")(tokens)
    )
    hidden = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(layer_norm("norm2")(tokens))
    hidden = ACTIVATIONS[self.activation](hidden)
    return tokens + nn.Dense(width, dtype=self.dtype, name="fc2")(hidden)


class VisionTransformer(nn.Module):
  """ViT returning the (optionally projected) normalised class token.

  Attributes:
    image_size: square input resolution; fixes the number of position embeddings.
    patch_size: side of the square patches (the patch conv's kernel and stride).
    width: token dimension D.
    depth: number of transformer blocks.
    num_heads: attention heads per block.
    layer_norm_eps: 1e-5 for CLIP, 1e-6 for timm/DINO.
    activation: 'quick_gelu' (CLIP) or 'gelu' (timm/DINO).
    patch_bias: whether the patch conv has a bias (timm yes, CLIP no).
    pre_norm: LayerNorm on the tokens before the first block (CLIP's ln_pre).
    output_dim: if set, a bias-free (D, output_dim) projection of the class token (CLIP's proj).
    mlp_ratio: MLP hidden size over D.
    dtype: computation dtype; parameters stay float32.
  """

  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  layer_norm_eps: float
  activation: str
  patch_bias: bool
  pre_norm: bool
  output_dim: int | None = None
  mlp_ratio: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """images: (B, H, W, 3) normalised, H = W = image_size -> embedding (B, D_out) float32."""
    check_square_input(images, self.image_size, "This vision transformer")
    if self.image_size % self.patch_size:
      raise ValueError(
        f"image_size {self.image_size} is not a multiple of the patch size {self.patch_size}."
      )
    patches = nn.Conv(
      self.width,
      (self.patch_size, self.patch_size),
      strides=(self.patch_size,) * 2,
      padding="VALID",
      use_bias=self.patch_bias,
      dtype=self.dtype,
      name="patch_embed",
    )(images.astype(self.dtype))
    batch = patches.shape[0]
    # Row-major flattening of the (grid, grid) patches, as torch's flatten(2) of NCHW does.
    patches = patches.reshape(batch, -1, self.width)
    num_tokens = patches.shape[1] + 1
    class_token = self.param("class_token", nn.initializers.normal(0.02), (self.width,))
    position_embedding = self.param(
      "position_embedding", nn.initializers.normal(0.02), (num_tokens, self.width)
    )
    class_tokens = jnp.broadcast_to(class_token.astype(self.dtype), (batch, 1, self.width))
    tokens = jnp.concatenate([class_tokens, patches], axis=1)
    tokens = tokens + position_embedding.astype(self.dtype)
    layer_norm = lambda name: nn.LayerNorm(
      epsilon=self.layer_norm_eps, use_fast_variance=False, dtype=self.dtype, name=name
    )
    if self.pre_norm:
      tokens = layer_norm("pre_norm")(tokens)
    for index in range(self.depth):
      tokens = TransformerBlock(
        self.num_heads,
        self.mlp_ratio * self.width,
        self.activation,
        self.layer_norm_eps,
        self.dtype,
        name=f"block_{index}",
      )(tokens)
    embedding = layer_norm("final_norm")(tokens[:, 0])
    if self.output_dim is not None:
      projection = self.param(
        "projection", nn.initializers.normal(self.width**-0.5), (self.width, self.output_dim)
      )
      embedding = embedding @ projection.astype(self.dtype)
    return embedding.astype(jnp.float32)
