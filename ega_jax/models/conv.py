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

Everything else goes to `lax.conv_general_dilated`, forward and input gradient unchanged. Its
**weight gradient** is XLA:CPU's slowest part of a student's backward pass (resnet8x4, batch 64:
258 ms over its ten convs against PyTorch/oneDNN's 120 ms, while the forward and input
gradients run at 0.9x and 1.3x oneDNN's; `python -m benchmarks.conv_layers`): XLA computes it as
a convolution with an H x W window over transposed copies of the input and of the output
gradient. On CPU `conv_nhwc` computes it instead as patches^T @ output gradient, a few images at
a time under a `lax.scan` so that each image's patch matrix stays in cache
(`_patch_gemm_weight_grad`); other backends keep XLA's. Only the summation order differs.

The rewrites are plain jnp (the weight-gradient one a `jax.custom_vjp`), so `jit`, `vmap`,
`shard_map` and bfloat16 work as for any other op; the depthwise, grouped and tiny-map forms are
used on every backend (the same function; only the summation order differs, at float rounding
level). A custom_vjp has no second derivative: nothing here differentiates a student twice.
"""

import functools
import logging
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ega_jax.models import onednn

Dtype = Any

# Output maps of at most this many pixels are convolved as one matmul over gathered patches.
SMALL_MAP_PIXELS = 4

# On CPU, the weight gradient's patch matmuls cover about this many output pixels each
# (images * H' * W' <= this): ~1,000 rows of k*k*C patch values stay in L2/L3 while they are
# multiplied. Measured on resnet8x4 (batch 64): 1,024 and 2,048 equally fast, 4,096 slower.
WEIGHT_GRAD_PIXELS = 1024
# False sends the weight gradient of ungrouped convs back to XLA on CPU too (read at trace time;
# `python -m benchmarks.conv_ablation` times both).
PATCH_MATMUL_WEIGHT_GRAD_ON_CPU = True
# Who computes float32 ungrouped convs (forward and both gradients) on CPU (read at trace time):
#   "onednn": oneDNN through the FFI (`onednn.py`); an error if it cannot be built or loaded;
#   "xla":    XLA's convolution, with the patch-matmul weight gradient above;
#   "auto":   "onednn" where it can be built and loaded, else "xla" with a logged warning.
# XLA:CPU's YNNPACK runs a lone convolution on one core; oneDNN on all (docs/performance.md).
CPU_CONV_LIBRARY = "auto"
CPU_CONV_LIBRARIES = ("auto", "onednn", "xla")


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


def images_per_weight_grad_matmul(batch: int, out_pixels: int) -> int:
  """The largest divisor n of `batch` with n * out_pixels <= WEIGHT_GRAD_PIXELS (at least 1)."""
  fitting = [
    n for n in range(1, batch + 1) if batch % n == 0 and n * out_pixels <= WEIGHT_GRAD_PIXELS
  ]
  return max(fitting, default=1)


def _patch_gemm_weight_grad(
  x: jax.Array, out_grad: jax.Array, k: int, stride: int, padding: int
) -> jax.Array:
  """The weight gradient of an ungrouped conv as sum over images of patches^T @ out_grad.

  Args:
    x: (B, H, W, C), the conv's input.
    out_grad: (B, H', W', O), the gradient of the conv's output.

  Returns:
    (k, k, C, O) in x's dtype, summed in float32 (or wider).

  The images are taken `images_per_weight_grad_matmul` at a time by a `lax.scan`: for each
  group, its (n * H' * W', k * k * C) patch matrix (taps row-major, then channels: the HWIO
  order) is built from x and multiplied by the group's output gradient, so no whole-batch
  patch matrix (k * k times the input) is ever written to memory, and no operand is transposed
  in memory (out_grad's block is the small side of the product).
  """
  batch, height, width, channels = x.shape
  _, out_h, out_w, out_features = out_grad.shape
  per_step = images_per_weight_grad_matmul(batch, out_h * out_w)
  steps = batch // per_step
  accumulator = jnp.promote_types(x.dtype, jnp.float32)
  images = x.reshape(steps, per_step, height, width, channels)
  grads = out_grad.reshape(steps, per_step * out_h * out_w, out_features)

  def group_product(group_images, group_grad):
    windows = _tap_windows(group_images, k, stride, padding)
    patches = windows[0] if len(windows) == 1 else jnp.concatenate(windows, axis=-1)
    patches = patches.reshape(-1, k * k * channels)
    # (O, n H' W') @ (n H' W', k k C): the transposed operand is the small one.
    return jnp.matmul(group_grad.T, patches, preferred_element_type=accumulator)

  def add_group(total, group):
    return total + group_product(*group), None

  # The first group's product starts the sum: a zeros carry would not have the inputs'
  # varying-over-devices type inside shard_map.
  total = group_product(images[0], grads[0])
  if steps > 1:
    total, _ = lax.scan(add_group, total, (images[1:], grads[1:]))
  return total.T.reshape(k, k, channels, out_features).astype(x.dtype)


def _varying_axes(value: jax.Array) -> frozenset:
  """The shard_map mesh axes over which `value` differs between devices (empty outside)."""
  return jax.typeof(value).manual_axis_type.varying


@functools.cache
def _warn_onednn_unavailable(reason: str) -> None:
  logging.warning(
    "conv.CPU_CONV_LIBRARY='auto': oneDNN's convolution is unavailable, XLA's runs on CPU "
    "(about 2x slower per convolution): %s",
    reason,
  )


def onednn_on_cpu(x: jax.Array, kernel: jax.Array) -> bool:
  """Whether `_ungrouped_conv` sends this (float32) conv to oneDNN when it runs on CPU."""
  if CPU_CONV_LIBRARY not in CPU_CONV_LIBRARIES:
    raise ValueError(
      f"ega_jax.models.conv.CPU_CONV_LIBRARY={CPU_CONV_LIBRARY!r}; valid: {CPU_CONV_LIBRARIES}."
    )
  if CPU_CONV_LIBRARY == "xla" or x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
    return False
  if CPU_CONV_LIBRARY == "onednn":
    onednn.register()  # raises OneDNNUnavailable with the reason
    return True
  reason = onednn.unavailable_reason()
  if reason is not None and jax.default_backend() == "cpu":
    _warn_onednn_unavailable(reason)
  return reason is None


def _device_summed(grad: jax.Array, like: jax.Array) -> jax.Array:
  """`grad` of a replicated operand summed over the shard_map axes it varies over and `like`
  does not.

  Inside shard_map a replicated kernel meets per-device data through an implicit broadcast,
  whose transpose sums the gradient over the devices (what autodiff gives XLA's branch); a
  hand-written or library product must be summed the same way.
  """
  summed_axes = tuple(sorted(_varying_axes(grad) - _varying_axes(like)))
  return lax.psum(grad, summed_axes) if summed_axes else grad


def _xla_or_onednn_forward(x, kernel, stride, padding):
  """`lax_conv` (groups=1), computed by oneDNN on CPU when `onednn_on_cpu`."""
  xla = functools.partial(lax_conv, stride=stride, padding=padding)
  if not onednn_on_cpu(x, kernel):
    return xla(x, kernel)
  k = kernel.shape[0]
  out_shape = (
    x.shape[0],
    output_size(x.shape[1], k, stride, padding),
    output_size(x.shape[2], k, stride, padding),
    kernel.shape[-1],
  )
  cpu = functools.partial(onednn.conv_forward, out_shape=out_shape, stride=stride, padding=padding)
  return lax.platform_dependent(x, kernel, cpu=cpu, default=xla)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _ungrouped_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """`lax_conv` with groups=1. On CPU: float32 convs by oneDNN (`CPU_CONV_LIBRARY`), the rest
  by XLA with `_patch_gemm_weight_grad` as the weight gradient."""
  return _xla_or_onednn_forward(x, kernel, stride, padding)


def _ungrouped_conv_forward(x, kernel, stride, padding):
  return _xla_or_onednn_forward(x, kernel, stride, padding), (x, kernel)


def _ungrouped_conv_backward(stride, padding, residuals, out_grad):
  x, kernel = residuals

  def xla_input_grad(out_grad, kernel):
    _, input_vjp = jax.vjp(lambda x: lax_conv(x, kernel, stride=stride, padding=padding), x)
    return input_vjp(out_grad)[0]

  def xla_weight_grad(x, out_grad):
    _, kernel_vjp = jax.vjp(lambda w: lax_conv(x, w, stride=stride, padding=padding), kernel)
    return kernel_vjp(out_grad)[0]

  def patch_gemm_weight_grad(x, out_grad):
    grad = _patch_gemm_weight_grad(x, out_grad, kernel.shape[0], stride, padding)
    return _device_summed(grad, kernel)

  if onednn_on_cpu(x, kernel):

    def onednn_input_grad(out_grad, kernel):
      return onednn.conv_input_grad(out_grad, kernel, x.shape, stride, padding)

    def onednn_weight_grad(x, out_grad):
      grad = onednn.conv_kernel_grad(x, out_grad, kernel.shape, stride, padding)
      return _device_summed(grad, kernel)

    x_grad = lax.platform_dependent(out_grad, kernel, cpu=onednn_input_grad, default=xla_input_grad)
    cpu_weight_grad = onednn_weight_grad
  else:
    x_grad = xla_input_grad(out_grad, kernel)
    cpu_weight_grad = patch_gemm_weight_grad if PATCH_MATMUL_WEIGHT_GRAD_ON_CPU else xla_weight_grad
  kernel_grad = lax.platform_dependent(x, out_grad, cpu=cpu_weight_grad, default=xla_weight_grad)
  return x_grad, kernel_grad.astype(kernel.dtype)


_ungrouped_conv.defvjp(_ungrouped_conv_forward, _ungrouped_conv_backward)


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
  if groups == 1 and (PATCH_MATMUL_WEIGHT_GRAD_ON_CPU or CPU_CONV_LIBRARY != "xla"):
    return _ungrouped_conv(x, kernel, stride, padding)
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
