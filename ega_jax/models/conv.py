"""PyTorch-style 2-D convolution for the students and the ResNet teachers, fast on XLA:CPU.

`TorchConv` holds the same parameters as `flax.linen.Conv` (`kernel` (k, k, C / groups, O), HWIO,
and an optional `bias` (O,)), pads like PyTorch's ``padding=p`` (symmetric zeros) and computes
exactly the same function. What differs is how XLA is asked to compute it: XLA's CPU convolution
is slow for three shapes that the CIFAR students and a 32-pixel teacher are full of
(micro-benchmarks on a 2-core EPYC, batch 64, forward + both gradients; docs/performance.md):

- **depthwise** convs (groups == C == O: MobileNetV2, ShuffleNet V1/V2): 4-20x slower than nine
  shifted multiply-adds, which XLA fuses into one elementwise loop (`_depthwise`);
- **grouped 1x1** convs (ShuffleNet V1's group convs): 2-15x slower in the backward pass than a
  batched matmul over the groups (`_grouped_pointwise`);
- convs with **at most `SMALL_MAP_PIXELS` output pixels** (3x3 convs on 2x2 / 1x1 maps: VGG's last
  block, ResNet-18 layer3/4 at 32 px): ~3 GFLOP/s against ~300 for a matmul of the gathered
  patches (`_patch_matmul`).

Everything else goes to `lax.conv_general_dilated` unchanged. The rewrites are plain jnp, so
autodiff, `jit`, `shard_map` and bfloat16 work as for any other op; they are used on every
backend (the same function; only the summation order differs, at float rounding level).
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any

# Output maps of at most this many pixels are convolved as one matmul over gathered patches.
SMALL_MAP_PIXELS = 4


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
  """PyTorch's conv output length: (size + 2 * padding - kernel) // stride + 1."""
  return (size + 2 * padding - kernel) // stride + 1


def _tap_windows(x: jax.Array, k: int, stride: int, padding: int) -> list[jax.Array]:
  """x (B, H, W, C) -> k*k arrays (B, H', W', C), row-major over the taps: the inputs that
  kernel tap (i, j) meets at every output position, after symmetric zero padding."""
  out_h = output_size(x.shape[1], k, stride, padding)
  out_w = output_size(x.shape[2], k, stride, padding)
  padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  return [
    padded[
      :, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride, :
    ]
    for i in range(k)
    for j in range(k)
  ]


def _depthwise(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """x (B, H, W, C), kernel (k, k, 1, C) -> (B, H', W', C), one filter per channel.

  Accumulates in float32 (a bfloat16 sum of k*k products would lose bits lax's conv keeps).
  """
  k = kernel.shape[0]
  accumulator = jnp.promote_types(x.dtype, jnp.float32)
  taps = kernel.reshape(k * k, -1).astype(accumulator)
  total = None
  for window, tap in zip(_tap_windows(x, k, stride, padding), taps):
    term = window.astype(accumulator) * tap
    total = term if total is None else total + term
  return total.astype(x.dtype)


def _grouped_pointwise(x: jax.Array, kernel: jax.Array, stride: int, groups: int) -> jax.Array:
  """x (B, H, W, C), kernel (1, 1, C / G, O) -> (B, H', W', O), unpadded 1x1 conv in G groups.

  Output channel g * (O / G) + o reads input channels g * (C / G) ... (g + 1) * (C / G) - 1, as in
  PyTorch's and XLA's feature_group_count.
  """
  x = x[:, ::stride, ::stride, :]
  batch, height, width, channels = x.shape
  out_features = kernel.shape[-1]
  grouped_x = x.reshape(batch, height, width, groups, channels // groups)
  grouped_kernel = kernel[0, 0].reshape(channels // groups, groups, out_features // groups)
  out = jnp.einsum("bhwgc,cgo->bhwgo", grouped_x, grouped_kernel)
  return out.reshape(batch, height, width, out_features)


def _patch_matmul(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """x (B, H, W, C), kernel (k, k, C, O) -> (B, H', W', O) as one matmul of gathered patches."""
  k = kernel.shape[0]
  patches = jnp.stack(_tap_windows(x, k, stride, padding), axis=3)  # (B, H', W', k*k, C)
  return jnp.einsum("bhwpc,pco->bhwo", patches, kernel.reshape(k * k, x.shape[-1], -1))


def lax_conv(
  x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: int = 0, groups: int = 1
) -> jax.Array:
  """`conv_nhwc`'s function through XLA's own convolution (what `nn.Conv` runs)."""
  return lax.conv_general_dilated(
    x,
    kernel,
    (stride, stride),
    ((padding, padding), (padding, padding)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=groups,
  )


def conv_nhwc(
  x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: int = 0, groups: int = 1
) -> jax.Array:
  """PyTorch's conv2d (square kernel, symmetric zero padding) on NHWC / HWIO arrays.

  Args:
    x: (B, H, W, C).
    kernel: (k, k, C / groups, O) with O divisible by groups.
    stride: the same stride along H and W.
    padding: zeros added on every side of H and W.
    groups: PyTorch's `groups` (XLA's feature_group_count).

  Returns:
    (B, H', W', O), H' = (H + 2 * padding - k) // stride + 1 (likewise W').
  """
  k = kernel.shape[0]
  channels, out_features = x.shape[-1], kernel.shape[-1]
  if kernel.shape[1] != k or kernel.shape[2] * groups != channels or out_features % groups:
    raise ValueError(
      f"conv kernel shape {kernel.shape} does not fit {channels} input channels "
      f"in {groups} groups; expected (k, k, {channels // max(groups, 1)}, O) with "
      f"O divisible by {groups}."
    )
  out_pixels = output_size(x.shape[1], k, stride, padding) * output_size(
    x.shape[2], k, stride, padding
  )
  if groups > 1 and groups == channels == out_features:
    return _depthwise(x, kernel, stride, padding)
  if groups > 1 and k == 1 and padding == 0:
    return _grouped_pointwise(x, kernel, stride, groups)
  if groups == 1 and out_pixels <= SMALL_MAP_PIXELS:
    return _patch_matmul(x, kernel, stride, padding)
  return lax_conv(x, kernel, stride=stride, padding=padding, groups=groups)


class TorchConv(nn.Module):
  """A square conv with PyTorch's symmetric zero padding, computed by `conv_nhwc`.

  Parameters are `nn.Conv`'s: 'kernel' (k, k, C / groups, features) and, with `use_bias`,
  'bias' (features,), both in `param_dtype`; inputs and parameters are cast to `dtype`.
  """

  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  groups: int = 1
  use_bias: bool = False
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C) -> (B, H', W', features)."""
    channels = x.shape[-1]
    if channels % self.groups or self.features % self.groups:
      raise ValueError(
        f"TorchConv {self.name}: groups={self.groups} must divide the "
        f"{channels} input channels and the {self.features} output features."
      )
    kernel = self.param(
      "kernel",
      self.kernel_init,
      (self.kernel_size, self.kernel_size, channels // self.groups, self.features),
      self.param_dtype,
    )
    out = conv_nhwc(
      x.astype(self.dtype),
      kernel.astype(self.dtype),
      stride=self.stride,
      padding=self.padding,
      groups=self.groups,
    )
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      out = out + bias.astype(self.dtype)
    return out
