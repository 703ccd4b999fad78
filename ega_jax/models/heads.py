"""Distillation heads: the node-embedding heads and the classifiers on the embeddings.

EGA (and every baseline here) compares the teacher and the student in a shared
space of width `feature_dim`: a linear "node embedding" head maps each backbone
feature into it, and a linear classifier on the embedding gives the logits
(the student's own backbone fc is unused). All layers use PyTorch's `nn.Linear`
default initialisation (uniform in +-1/sqrt(fan_in) for weight and bias) so a
run starts from the same distribution as the released PyTorch code.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def torch_linear_kernel_init() -> nn.initializers.Initializer:
  """PyTorch's default Linear weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  # kaiming_uniform(a=sqrt(5)) == variance_scaling(1/3, fan_in, uniform).
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default Linear bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / jnp.sqrt(jnp.asarray(fan_in, jnp.float32))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class TorchLinear(nn.Module):
  """A Dense layer with PyTorch's default initialisation.

  Attributes:
    features: output width.
    dtype: computation dtype (params stay float32).
  """

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """(B, D_in) -> (B, features)."""
    return nn.Dense(
      self.features,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=torch_linear_kernel_init(),
      bias_init=torch_linear_bias_init(x.shape[-1]),
    )(x)


class EmbeddingClassifierHead(nn.Module):
  """Node-embedding head plus the classifier that sits on the embedding.

  `embedding = W g + b` maps a backbone feature `g` (B, D_backbone) to the
  shared space (B, feature_dim); `logits = C embedding + c` (B, num_classes).

  Attributes:
    feature_dim: width of the shared embedding space (256 in the paper).
    num_classes: number of classes of the classifier on the embedding.
    dtype: computation dtype.
  """

  feature_dim: int
  num_classes: int
  dtype: Any = jnp.float32

  def setup(self):
    self.embed = TorchLinear(self.feature_dim, dtype=self.dtype)
    self.classifier = TorchLinear(self.num_classes, dtype=self.dtype)

  def __call__(self, backbone_feature: jnp.ndarray):
    """(B, D_backbone) -> (embedding (B, feature_dim), logits (B, num_classes))."""
    embedding = self.embed(backbone_feature)
    logits = self.classifier(embedding)
    return embedding, logits

  def classify(self, embedding: jnp.ndarray) -> jnp.ndarray:
    """(B, feature_dim) -> (B, num_classes)."""
    return self.classifier(embedding)


class ContrastiveProjection(nn.Module):
  """CRD's projection ("Embed" in RepDistiller): Linear to `dim`, then L2 norm.

  Attributes:
    dim: output width (128 in CRD).
    dtype: computation dtype.
  """

  dim: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """(B, D) -> (B, dim), each row of unit L2 norm."""
    projected = TorchLinear(self.dim, dtype=self.dtype)(x).astype(jnp.float32)
    # RepDistiller's Normalize: x / ||x||_2 (no epsilon); a tiny floor keeps a
    # zero row finite instead of NaN.
    norm = jnp.sqrt(jnp.sum(projected * projected, axis=-1, keepdims=True))
    return projected / jnp.maximum(norm, 1e-12)
