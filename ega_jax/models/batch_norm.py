"""Train-mode BatchNorm with a hand-written backward pass, for the students.

flax's `nn.BatchNorm` differentiated by JAX costs, per layer on XLA:CPU, six reductions over
the activation (two forward, four backward) and three activation-sized intermediates written
to memory (x - mean in the forward, two products in the backward), because autodiff keeps
x - mean as a residual and transposes each op on its own. The same gradient needs two
reductions each way and one pass to form the input gradient:

  forward   mean = sum(x) / n,  var = sum((x - mean)^2) / n,  y = x * a + (bias - mean * a)
            with a = scale * rsqrt(var + eps)
  backward  dbias = sum(dy),  dscale = sum(dy * (x - mean)) * rstd
            dx = a * (dy - dbias / n - (x - mean) * rstd^2 * dscale_sum / n)

(`docs/performance.md`, "BatchNorm's backward by hand"). Only x, mean and rstd are kept for
the backward pass; x - mean is recomputed inside the fused loops that read x anyway.

Cross-replica statistics: with `axis_name`, the sums are `psum`med over that mesh axis, so
mean and variance are those of the global batch (n counts every device's examples), exactly
as flax's `axis_name` does. The parameter gradients are the local sums: `scale` and `bias`
enter as values varying over the axis (`lax.pcast`), so JAX's transpose of that cast sums
them over the devices, as it does for flax's layer. The backward pass holds collectives, so
differentiate inside the mapped function (the train step's shard_map body; `vmap(grad(...))`,
not `grad(vmap(...))`, whose transpose runs where the axis is no longer bound).

The variables, their names and initial values are `nn.BatchNorm`'s (params `scale`, `bias`;
batch_stats `mean`, `var`), and the running averages are updated the same way (`momentum`,
the biased batch variance), so checkpoints and converted RepDistiller weights load
unchanged. Eval mode normalises with the running statistics.

Shapes: x (..., C) with the features last; statistics (C,).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

Dtype = Any


def _sum_over_batch(values: jax.Array, axis_name: str | None) -> jax.Array:
  """(..., C) -> (C,): the sum over every axis but the last, and over `axis_name`'s devices."""
  total = jnp.sum(values, axis=tuple(range(values.ndim - 1)))
  return lax.psum(total, axis_name) if axis_name is not None else total


def _count(x: jax.Array, axis_name: str | None) -> float | jax.Array:
  """How many values each channel's statistics average over (all devices of `axis_name`)."""
  local = x.size // x.shape[-1]
  return local * lax.psum(1, axis_name) if axis_name is not None else local


def _forward(x, scale, bias, epsilon, axis_name):
  n = _count(x, axis_name)
  mean = _sum_over_batch(x, axis_name) / n
  # Two-pass variance, as PyTorch computes it; x - mean is fused into the reduction.
  var = _sum_over_batch(jnp.square(x - mean), axis_name) / n
  rstd = lax.rsqrt(var + epsilon)
  multiplier = scale * rstd
  # x * a + b rather than (x - mean) * a + bias: it shares no x - mean with the reduction
  # above, which XLA would otherwise keep in memory for both.
  y = x * multiplier + (bias - mean * multiplier)
  return (y, mean, var), (x, mean, rstd, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x, scale, bias, epsilon: float, axis_name: str | None):
  """x (..., C) float32, scale and bias (C,) -> (y like x, batch mean (C,), batch var (C,)).

  The mean and variance are returned for the running averages and carry no gradient: the
  backward pass treats their cotangents as zero, so callers must `lax.stop_gradient` them
  (`BatchNorm` does).
  """
  return _forward(x, scale, bias, epsilon, axis_name)[0]


def _backward(epsilon, axis_name, residuals, cotangents):
  del epsilon
  x, mean, rstd, scale = residuals
  dy = cotangents[0]  # the statistics' cotangents are zero (see batch_norm_train)
  n = _count(x, axis_name)
  centred = x - mean
  local_dy = jnp.sum(dy, axis=tuple(range(x.ndim - 1)))
  local_dy_centred = jnp.sum(dy * centred, axis=tuple(range(x.ndim - 1)))
  if axis_name is not None:
    total_dy, total_dy_centred = lax.psum((local_dy, local_dy_centred), axis_name)
  else:
    total_dy, total_dy_centred = local_dy, local_dy_centred
  multiplier = scale * rstd
  dx = multiplier * (dy - total_dy / n - centred * (jnp.square(rstd) * total_dy_centred / n))
  return dx, local_dy_centred * rstd, local_dy


batch_norm_train.defvjp(
  lambda x, scale, bias, epsilon, axis_name: _forward(x, scale, bias, epsilon, axis_name),
  _backward,
)


class BatchNorm(nn.Module):
  """`nn.BatchNorm` over the last axis with `batch_norm_train`'s backward pass in train mode.

  Attributes:
    use_running_average: eval mode (normalise with the running statistics).
    momentum: running = momentum * running + (1 - momentum) * batch statistic.
    epsilon: added to the variance.
    axis_name: mesh axis whose devices' examples the train-mode statistics cover; None for
      this device's batch alone. Ignored while initialising, as flax does.
    dtype: the output's dtype (statistics are computed in float32 at least).
    param_dtype: dtype of `scale` and `bias`.
  """

  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  axis_name: str | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (x.shape[-1],)
    scale = self.param("scale", nn.initializers.ones, features, self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, features, self.param_dtype)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
    out_dtype = self.dtype or jnp.result_type(x, scale)
    compute_dtype = jnp.promote_types(jnp.float32, x.dtype)
    x = x.astype(compute_dtype)
    scale, bias = scale.astype(compute_dtype), bias.astype(compute_dtype)
    if self.use_running_average:
      multiplier = scale * lax.rsqrt(ra_var.value.astype(compute_dtype) + self.epsilon)
      y = (x - ra_mean.value.astype(compute_dtype)) * multiplier + bias
      return y.astype(out_dtype)
    axis_name = None if self.is_initializing() else self.axis_name
    if axis_name is not None:
      # Replicated parameters meet a per-device batch: cast them varying here so the
      # transpose of the cast sums their (local) gradients over the devices.
      missing = jax.typeof(x).manual_axis_type.varying - jax.typeof(scale).manual_axis_type.varying
      if missing:
        scale, bias = lax.pcast((scale, bias), tuple(sorted(missing)), to="varying")
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, axis_name)
    if not self.is_initializing():
      mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.astype(out_dtype)
