"""ega_jax.models.batch_norm: train-mode BatchNorm with a hand-written backward pass.

References: PyTorch's own `F.batch_norm` (training=True) differentiated by its autograd in
float64, and the global-batch gradient for the cross-replica statistics.
"""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ega_jax.models.batch_norm import BatchNorm, batch_norm_train


def _inputs(shape=(4, 5, 6, 3), seed=0):
  rng = np.random.default_rng(seed)
  channels = shape[-1]
  # An offset mean and unequal scales per channel, so centring and the variance both matter.
  x = rng.standard_normal(shape) * rng.uniform(0.5, 3.0, channels) + rng.uniform(-4, 4, channels)
  scale = rng.uniform(0.5, 2.0, channels)
  bias = rng.standard_normal(channels)
  weights = rng.standard_normal(shape)  # the loss is sum(y * weights): dy = weights
  return x, scale, bias, weights


def _torch_reference(x, scale, bias, weights, epsilon=1e-5):
  """y, batch mean, biased batch variance, dx, dscale, dbias from PyTorch in float64."""
  x_t = torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float64, requires_grad=True)
  scale_t = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
  bias_t = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
  y = F.batch_norm(x_t, None, None, scale_t, bias_t, training=True, eps=epsilon)
  (y * torch.tensor(weights.transpose(0, 3, 1, 2))).sum().backward()
  nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)  # noqa: E731
  batch = x_t.detach().numpy()
  return {
    "y": nhwc(y),
    "mean": batch.mean((0, 2, 3)),
    "var": batch.var((0, 2, 3)),
    "dx": nhwc(x_t.grad),
    "dscale": scale_t.grad.numpy(),
    "dbias": bias_t.grad.numpy(),
  }


def test_forward_and_gradients_match_pytorch_in_float64():
  x, scale, bias, weights = _inputs()
  expected = _torch_reference(x, scale, bias, weights)
  with jax.enable_x64(True):

    def loss(x, scale, bias):
      y, mean, var = batch_norm_train(x, scale, bias, 1e-5, None)
      return jnp.sum(y * weights), (y, mean, var)

    (dx, dscale, dbias), (y, mean, var) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(
      x, scale, bias
    )
  actual = {"y": y, "mean": mean, "var": var, "dx": dx, "dscale": dscale, "dbias": dbias}
  for name, value in expected.items():
    np.testing.assert_allclose(
      np.asarray(actual[name]), value, rtol=1e-10, atol=1e-12, err_msg=name
    )


def test_module_gradient_and_running_statistics_match_flax_batch_norm():
  # The module against flax's own layer: same variables, same running averages, and the
  # same parameter and input gradients (float64, so only the formulation could differ).
  from flax import linen as nn

  x, _, _, weights = _inputs(seed=1)
  ours = BatchNorm(momentum=0.9, epsilon=1e-5)
  theirs = nn.BatchNorm(
    use_running_average=False, momentum=0.9, epsilon=1e-5, use_fast_variance=False
  )
  with jax.enable_x64(True):
    variables = theirs.init(jax.random.key(0), x)
    rng = np.random.default_rng(2)
    variables = jax.tree.map(lambda v: v + rng.uniform(0.1, 0.5, v.shape), variables)
    assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(variables)

    def loss(module, params, x):
      y, updates = module.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"]
      )
      return jnp.sum(y * weights), updates

    results = {
      name: jax.grad(functools.partial(loss, module), argnums=(0, 1), has_aux=True)(
        variables["params"], x
      )
      for name, module in (("ours", ours), ("flax", theirs))
    }
  ours_leaves = jax.tree.leaves(results["ours"])
  flax_leaves = jax.tree.leaves(results["flax"])
  assert len(ours_leaves) == len(flax_leaves) == 5  # dscale, dbias, dx, mean, var
  for a, b in zip(ours_leaves, flax_leaves):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)


def test_cross_replica_gradient_equals_the_global_batch_gradient():
  # Two replicas of two examples each, statistics over "data", each replica differentiating
  # its own part of the loss (as the train step does inside shard_map): the input gradients
  # together are the one-batch gradient, the parameter gradients sum to it.
  x, scale, bias, weights = _inputs((4, 3, 3, 2), seed=3)
  expected = _torch_reference(x, scale, bias, weights)

  def replica_loss(scale, bias, x, weights):
    y, _, _ = batch_norm_train(x, scale, bias, 1e-5, "data")
    return jnp.sum(y * weights)

  replica_grads = jax.vmap(
    jax.grad(replica_loss, argnums=(0, 1, 2)), in_axes=(None, None, 0, 0), axis_name="data"
  )
  with jax.enable_x64(True):
    dscale, dbias, dx = replica_grads(
      scale, bias, x.reshape(2, 2, 3, 3, 2), weights.reshape(2, 2, 3, 3, 2)
    )
  np.testing.assert_allclose(
    np.asarray(dx).reshape(x.shape), expected["dx"], rtol=1e-10, atol=1e-12
  )
  np.testing.assert_allclose(np.asarray(dscale).sum(0), expected["dscale"], rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(np.asarray(dbias).sum(0), expected["dbias"], rtol=1e-10, atol=1e-12)
  # Each replica's parameter gradient is its own (local) part, not the total.
  assert not np.allclose(np.asarray(dbias)[0], expected["dbias"])


def test_gradient_takes_two_reductions_each_way():
  # The point of the module: two reductions over the activation in the forward pass and two
  # in the backward (flax's layer differentiated by JAX takes six; docs/performance.md).
  x, _, _, weights = _inputs()
  x, weights = jnp.asarray(x, jnp.float32), jnp.asarray(weights, jnp.float32)

  def count_reductions(module):
    variables = module.init(jax.random.key(0), x)

    def loss(params, x):
      y, _ = module.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"]
      )
      return jnp.sum(y * weights)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(variables["params"], x)
    full_size = [
      eqn
      for eqn in _all_eqns(jaxpr.jaxpr)
      if eqn.primitive.name == "reduce_sum" and eqn.invars[0].aval.shape == x.shape
    ]
    return len(full_size)

  from flax import linen as nn

  # One more in each count: the loss's own sum(y * weights).
  assert count_reductions(BatchNorm(epsilon=1e-5)) == 1 + 4
  assert count_reductions(nn.BatchNorm(use_running_average=False, use_fast_variance=False)) > 5


def _all_eqns(jaxpr):
  """Every equation of `jaxpr` and of the jaxprs nested in it (custom_vjp, pjit)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          sub = sub.jaxpr
        if isinstance(sub, jax.extend.core.Jaxpr):
          yield from _all_eqns(sub)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_eval_mode_uses_running_statistics(dtype):
  x, _, _, _ = _inputs(seed=4)
  module = BatchNorm(use_running_average=True, epsilon=1e-5, dtype=dtype)
  variables = module.init(jax.random.key(0), jnp.asarray(x, jnp.float32))
  variables = {
    "params": {"scale": jnp.array([1.5, 0.5, 2.0]), "bias": jnp.array([0.1, -0.2, 0.3])},
    "batch_stats": {"mean": jnp.array([1.0, -2.0, 0.5]), "var": jnp.array([4.0, 0.25, 1.0])},
  }
  y = module.apply(variables, jnp.asarray(x, dtype))
  assert y.dtype == dtype
  stats = {k: np.asarray(v, np.float64) for k, v in variables["batch_stats"].items()}
  params = {k: np.asarray(v, np.float64) for k, v in variables["params"].items()}
  x_in = np.asarray(jnp.asarray(x, dtype), np.float64)
  expected = (x_in - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * params["scale"] + params[
    "bias"
  ]
  tolerance = 1e-5 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=tolerance, atol=tolerance)
