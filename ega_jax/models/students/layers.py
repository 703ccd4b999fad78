"""Building blocks shared by the CIFAR student zoo.

Every student is NHWC and returns ``(logits, features)``. Sub-module names are
chosen so that ``'.'.join(path)`` of a parameter equals the key of the same
tensor in RepDistiller's PyTorch ``state_dict`` once the leaf is renamed
(``kernel``/``scale`` -> ``weight``, ``mean``/``var`` -> ``running_mean``/
``running_var``; conv kernels are HWIO here and OIHW there, dense kernels are
transposed). That keeps a RepDistiller checkpoint loadable by a plain rename.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ega_jax.models.batch_norm import BatchNorm
from ega_jax.models.conv import TorchConv

Dtype = Any

# PyTorch's BatchNorm2d defaults: running = 0.9 * running + 0.1 * batch.
BATCH_NORM_MOMENTUM = 0.9
BATCH_NORM_EPSILON = 1e-5

# kaiming_normal_(mode='fan_out', nonlinearity='relu'), and equally the manual
# normal_(0, sqrt(2 / (k * k * out_channels))) of RepDistiller's WRN, VGG and
# MobileNetV2: fan_out counts output channels times the kernel window (PyTorch
# does not divide by groups there, and neither does flax), untruncated normal.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# PyTorch's default Conv2d/Linear weight init, kaiming_uniform_(a=sqrt(5)),
# is U(-1/sqrt(fan_in), 1/sqrt(fan_in)); a uniform of that bound has variance
# 1 / (3 * fan_in). fan_in for a grouped conv is (in / groups) * k * k in both.
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# RepDistiller's VGG and MobileNetV2 classifiers: normal_(0, 0.01).
classifier_normal_init = nn.initializers.normal(stddev=0.01)


def torch_default_bias_init(fan_in: int):
  """PyTorch's default bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  flax bias initialisers do not see the fan-in, so it is bound here.
  """
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def conv2d(
  features: int,
  kernel_size: int,
  *,
  name: str,
  dtype: Dtype,
  stride: int = 1,
  groups: int = 1,
  use_bias: bool = False,
  kernel_init=kaiming_normal_fan_out,
  bias_init=nn.initializers.zeros,
) -> TorchConv:
  """A square conv padded like PyTorch's ``padding=kernel_size // 2``.

  Explicit symmetric padding matters for strided convs: flax's 'SAME' pads
  (0, 1) on even inputs where PyTorch pads (1, 1), which shifts every window.
  `TorchConv` has `nn.Conv`'s parameters; it computes depthwise, grouped 1x1
  and tiny-map convs in forms XLA:CPU runs several times faster (models/conv.py).
  """
  return TorchConv(
    features,
    kernel_size,
    stride=stride,
    padding=kernel_size // 2,
    groups=groups,
    use_bias=use_bias,
    kernel_init=kernel_init,
    bias_init=bias_init,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


def batch_norm(*, name: str, train: bool, axis_name: str | None, dtype: Dtype) -> BatchNorm:
  """BatchNorm with PyTorch's momentum/epsilon, optionally cross-replica.

  In train mode the batch statistics are averaged over the named mesh axis
  (``axis_name``), so inside a ``shard_map`` over 'data' they are the
  statistics of the global batch. Variance is taken two-pass, E[(x - mean)^2],
  as PyTorch does, rather than E[x^2] - mean^2, which loses precision when the
  mean is large. Running variance is the biased batch variance (PyTorch keeps
  the unbiased one; the two differ by n / (n - 1) with n = batch * H * W).
  """
  return BatchNorm(
    use_running_average=not train,
    momentum=BATCH_NORM_MOMENTUM,
    epsilon=BATCH_NORM_EPSILON,
    axis_name=axis_name,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


def dense(
  features: int,
  *,
  fan_in: int,
  name: str,
  dtype: Dtype,
  kernel_init=torch_default_kernel_init,
  bias_init=None,
) -> nn.Dense:
  """A linear layer; the bias defaults to PyTorch's fan-in uniform init."""
  if bias_init is None:
    bias_init = torch_default_bias_init(fan_in)
  return nn.Dense(
    features,
    kernel_init=kernel_init,
    bias_init=bias_init,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """ShuffleNet channel shuffle on NHWC.

  Channel ``k * (C // groups) + j`` (group k, index j) moves to position
  ``j * groups + k``: the same order as PyTorch's NCHW
  view(N, g, C/g, H, W).permute(0, 2, 1, 3, 4).

  Args:
    x: (B, H, W, C) with C divisible by ``groups``.
    groups: number of channel groups.

  Returns:
    (B, H, W, C).
  """
  if groups == 1:
    return x
  batch, height, width, channels = x.shape
  x = x.reshape(batch, height, width, groups, channels // groups)
  x = jnp.swapaxes(x, 3, 4)
  return x.reshape(batch, height, width, channels)


def global_average_pool(x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, C).

  RepDistiller pools with a fixed window (AvgPool2d(8), avg_pool2d(4), ...)
  sized so that at 32x32 it covers the whole final map; pooling the whole map
  is the same there and keeps the fc input width fixed at other input sizes.
  """
  return jnp.mean(x, axis=(1, 2))


def check_images(images: jax.Array, model_name: str, min_size: int = 1) -> None:
  """Raises ValueError unless images is (B, H, W, 3) with H, W >= min_size."""
  shape = tuple(images.shape)
  if len(shape) != 4 or shape[-1] != 3:
    raise ValueError(
      f"{model_name} expects images of shape (batch, height, width, 3) "
      f"(NHWC, RGB); got shape {shape}."
    )
  if min(shape[1], shape[2]) < min_size:
    raise ValueError(
      f"{model_name} needs images at least {min_size}x{min_size}; got {shape[1]}x{shape[2]}."
    )
