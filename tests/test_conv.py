"""models/conv.py: every path of `conv_nhwc` against a float64 NumPy grouped convolution.

The reference is written from PyTorch's definition of conv2d (cross-correlation, symmetric zero
padding, output channel o of group g = o // (O / G) reading input channels of group g), not from
the code under test; its gradients are the transposed sums written out directly.
"""

import functools
import logging
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ega_jax.models import conv as conv_lib
from ega_jax.models import onednn


def _reference_conv(x, kernel, stride, padding, groups):
  """float64 grouped conv: x (B, H, W, C), kernel (k, k, C/G, O) -> (B, H', W', O)."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  kernel = np.asarray(kernel, np.float64)
  k, _, group_in, out_features = kernel.shape
  group_out = out_features // groups
  out_h = (x.shape[1] - k) // stride + 1
  out_w = (x.shape[2] - k) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, out_features))
  for o in range(out_features):
    g = o // group_out
    inputs = x[..., g * group_in : (g + 1) * group_in]
    for i in range(out_h):
      for j in range(out_w):
        window = inputs[:, i * stride : i * stride + k, j * stride : j * stride + k, :]
        out[:, i, j, o] = np.einsum("bhwc,hwc->b", window, kernel[..., o])
  return out


def _reference_gradients(x, kernel, stride, padding, groups, upstream):
  """d sum(conv(x, kernel) * upstream) / d(x, kernel), float64."""
  x = np.asarray(x, np.float64)
  kernel = np.asarray(kernel, np.float64)
  upstream = np.asarray(upstream, np.float64)
  padded = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  grad_padded = np.zeros_like(padded)
  grad_kernel = np.zeros_like(kernel)
  k, _, group_in, out_features = kernel.shape
  group_out = out_features // groups
  for o in range(out_features):
    g = o // group_out
    channels = slice(g * group_in, (g + 1) * group_in)
    for i in range(upstream.shape[1]):
      for j in range(upstream.shape[2]):
        rows = slice(i * stride, i * stride + k)
        cols = slice(j * stride, j * stride + k)
        weight = upstream[:, i, j, o]  # (B,)
        grad_kernel[..., o] += np.einsum("b,bhwc->hwc", weight, padded[:, rows, cols, channels])
        grad_padded[:, rows, cols, channels] += np.einsum("b,hwc->bhwc", weight, kernel[..., o])
  height, width = x.shape[1], x.shape[2]
  return grad_padded[:, padding : padding + height, padding : padding + width, :], grad_kernel


# (name, size, channels, out_features, kernel, stride, padding, groups): every path of conv_nhwc.
CASES = [
  ("depthwise 3x3", 6, 5, 5, 3, 1, 1, 5),
  ("depthwise 3x3 stride 2", 7, 4, 4, 3, 2, 1, 4),
  ("depthwise 5x5 stride 2", 8, 3, 3, 5, 2, 2, 3),
  ("grouped 1x1", 5, 6, 9, 1, 1, 0, 3),
  ("grouped 1x1 stride 2", 5, 6, 4, 1, 2, 0, 2),
  ("small map 3x3 on 1x1", 1, 4, 5, 3, 1, 1, 1),
  ("small map 3x3 on 2x2", 2, 4, 5, 3, 1, 1, 1),
  ("small map 3x3 stride 2", 4, 4, 5, 3, 2, 1, 1),
  ("small map 1x1 stride 2", 2, 4, 5, 1, 2, 0, 1),
  ("small map unpadded", 3, 4, 5, 3, 1, 0, 1),
  ("lax 3x3", 6, 4, 5, 3, 1, 1, 1),
  ("lax 3x3 stride 2", 7, 4, 5, 3, 2, 1, 1),
  ("lax 1x1 stride 2", 6, 4, 5, 1, 2, 0, 1),
  ("lax 5x5 unpadded", 8, 3, 4, 5, 1, 0, 1),
  ("lax grouped 3x3 (not depthwise)", 5, 6, 4, 3, 1, 1, 2),
  ("lax depthwise multiplier 2", 5, 3, 6, 3, 1, 1, 3),
]


def _inputs(size, channels, out_features, kernel, groups, seed):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((3, size, size, channels)).astype(np.float32)
  weights = rng.standard_normal((kernel, kernel, channels // groups, out_features))
  return x, weights.astype(np.float32)


@pytest.fixture(params=["onednn", "xla"])
def cpu_conv_library(request, monkeypatch):
  """Each test once with oneDNN computing float32 ungrouped convs on CPU, once with XLA."""
  monkeypatch.setattr(conv_lib, "CPU_CONV_LIBRARY", request.param)
  return request.param


@pytest.mark.parametrize(
  "name,size,channels,out_features,kernel,stride,padding,groups",
  CASES,
  ids=[case[0] for case in CASES],
)
def test_conv_and_its_gradients_match_float64(
  cpu_conv_library, name, size, channels, out_features, kernel, stride, padding, groups
):
  x, weights = _inputs(size, channels, out_features, kernel, groups, seed=len(name))
  expected = _reference_conv(x, weights, stride, padding, groups)

  def conv(x, weights):
    return conv_lib.conv_nhwc(x, weights, stride=stride, padding=padding, groups=groups)

  got = np.asarray(jax.jit(conv)(x, weights))
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

  upstream = np.random.default_rng(7).standard_normal(expected.shape).astype(np.float32)
  grad_x, grad_kernel = jax.jit(
    jax.grad(lambda x, w: jnp.sum(conv(x, w) * upstream), argnums=(0, 1))
  )(x, weights)
  expected_x, expected_kernel = _reference_gradients(x, weights, stride, padding, groups, upstream)
  np.testing.assert_allclose(np.asarray(grad_x), expected_x, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(grad_kernel), expected_kernel, rtol=1e-5, atol=1e-4)


def test_bfloat16_depthwise_accumulates_in_float32():
  # Nine bfloat16 products summed in bfloat16 drift by several bf16 ulps; the float32 sum,
  # rounded once, stays within one ulp of the exact value.
  x, weights = _inputs(6, 8, 8, 3, 8, seed=3)
  x_bf16, w_bf16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(weights, jnp.bfloat16)
  got = conv_lib.conv_nhwc(x_bf16, w_bf16, stride=1, padding=1, groups=8)
  assert got.dtype == jnp.bfloat16
  exact = _reference_conv(np.asarray(x_bf16, np.float64), np.asarray(w_bf16, np.float64), 1, 1, 8)
  ulp = np.abs(exact) * 2.0**-7 + 1e-30
  assert np.all(np.abs(np.asarray(got, np.float64) - exact) <= ulp)


def test_torch_conv_has_the_parameters_and_values_of_flax_conv():
  # Same tree, shapes and initial values as nn.Conv with the same name and initialisers, so
  # checkpoints and RepDistiller state_dict renames are unaffected; same output on a big map.
  x = np.random.default_rng(0).standard_normal((2, 9, 9, 6)).astype(np.float32)
  ours = conv_lib.TorchConv(
    4, 3, stride=2, padding=1, groups=2, use_bias=True, bias_init=nn.initializers.normal(1.0)
  )
  flax_conv = nn.Conv(
    4,
    (3, 3),
    strides=(2, 2),
    padding=((1, 1), (1, 1)),
    feature_group_count=2,
    use_bias=True,
    bias_init=nn.initializers.normal(1.0),
  )
  ours_variables = ours.init(jax.random.PRNGKey(3), x)
  flax_variables = flax_conv.init(jax.random.PRNGKey(3), x)
  jax.tree.map(np.testing.assert_array_equal, ours_variables, flax_variables)
  np.testing.assert_allclose(
    ours.apply(ours_variables, x), flax_conv.apply(flax_variables, x), rtol=1e-5, atol=1e-5
  )


def test_mismatched_groups_name_the_layer():
  x = np.zeros((1, 4, 4, 6), np.float32)
  with pytest.raises(ValueError, match=r"TorchConv bad: groups=4 must divide the 6 input channels"):
    conv_lib.TorchConv(8, 3, padding=1, groups=4, name="bad").init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match=r"does not fit 6 input channels in 2 groups"):
    conv_lib.conv_nhwc(x, np.zeros((3, 3, 6, 4), np.float32), padding=1, groups=2)


def test_images_per_weight_grad_matmul_is_the_largest_fitting_divisor():
  limit = conv_lib.WEIGHT_GRAD_PIXELS
  assert conv_lib.images_per_weight_grad_matmul(64, limit) == 1
  assert conv_lib.images_per_weight_grad_matmul(64, limit // 4) == 4
  assert conv_lib.images_per_weight_grad_matmul(64, limit + 1) == 1  # Never fewer than one.
  assert conv_lib.images_per_weight_grad_matmul(6, limit // 5) == 3  # 5 does not divide 6.
  assert conv_lib.images_per_weight_grad_matmul(7, 1) == 7


@pytest.mark.parametrize("pixel_limit, batch", [(40, 3), (80, 4), (10_000, 5)])
def test_weight_grad_summed_over_several_scan_steps(monkeypatch, pixel_limit, batch):
  # 6x6 maps (36 output pixels): 3 steps of 1 image, 2 steps of 2, one step of 5.
  monkeypatch.setattr(conv_lib, "WEIGHT_GRAD_PIXELS", pixel_limit)
  monkeypatch.setattr(conv_lib, "CPU_CONV_LIBRARY", "xla")  # the patch matmuls, not oneDNN
  rng = np.random.default_rng(batch)
  x = rng.standard_normal((batch, 6, 6, 4)).astype(np.float32)
  weights = rng.standard_normal((3, 3, 4, 5)).astype(np.float32)
  upstream = rng.standard_normal((batch, 6, 6, 5)).astype(np.float32)

  def loss(x, w):
    return jnp.sum(conv_lib.conv_nhwc(x, w, padding=1) * upstream)

  grad_x, grad_kernel = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, weights)
  expected_x, expected_kernel = _reference_gradients(x, weights, 1, 1, 1, upstream)
  np.testing.assert_allclose(np.asarray(grad_x), expected_x, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(grad_kernel), expected_kernel, rtol=1e-5, atol=1e-4)


def test_weight_grad_equals_xlas_in_float64():
  # With float64 arrays only the summation order separates the two weight gradients.
  rng = np.random.default_rng(11)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.standard_normal((4, 9, 9, 6)))
    weights = jnp.asarray(rng.standard_normal((3, 3, 6, 7)))
    for stride in (1, 2):

      def loss(conv, w, stride=stride):
        return jnp.sum(jnp.sin(conv(x, w, stride=stride, padding=1)))

      ours = jax.grad(functools.partial(loss, conv_lib.conv_nhwc))(weights)
      xla = jax.grad(functools.partial(loss, conv_lib.lax_conv))(weights)
      assert ours.dtype == jnp.float64
      np.testing.assert_allclose(np.asarray(ours), np.asarray(xla), rtol=1e-12, atol=1e-12)


def test_bfloat16_weight_grad_keeps_the_dtype_and_sums_in_float32():
  x, weights = _inputs(6, 8, 4, 3, 1, seed=5)
  x_bf16, w_bf16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(weights, jnp.bfloat16)
  upstream = np.random.default_rng(2).standard_normal((3, 6, 6, 4)).astype(np.float32)
  upstream_bf16 = jnp.asarray(upstream, jnp.bfloat16)
  grad = jax.grad(
    lambda w: jnp.sum(
      (conv_lib.conv_nhwc(x_bf16, w, padding=1) * upstream_bf16).astype(jnp.float32)
    )
  )(w_bf16)
  assert grad.dtype == jnp.bfloat16
  _, exact = _reference_gradients(
    np.asarray(x_bf16, np.float64),
    np.asarray(w_bf16, np.float64),
    1,
    1,
    1,
    np.asarray(upstream_bf16, np.float64),
  )
  # One bfloat16 rounding of a float32 sum of 3 * 36 products: within 2 bf16 ulps.
  np.testing.assert_allclose(np.asarray(grad, np.float64), exact, rtol=2 * 2.0**-8, atol=1e-2)


@pytest.mark.parametrize(
  "library, platform, expected",
  [
    ("onednn", "cpu", "onednn"),
    ("xla", "cpu", "scan"),
    ("onednn", "cuda", "xla"),
    ("onednn", "tpu", "xla"),
  ],
)
def test_cpu_rewrites_only_lowered_for_cpu(monkeypatch, library, platform, expected):
  # Lowered (not run) for each platform. On CPU: oneDNN's forward and weight gradient as custom
  # calls (the input gradient of a constant input is dropped), or with "xla" XLA's forward and
  # the scan of patch matmuls; elsewhere XLA's forward and weight-gradient convolutions.
  monkeypatch.setattr(conv_lib, "CPU_CONV_LIBRARY", library)
  x = jnp.ones((4, 20, 20, 3))  # 400 output pixels: two images per patch matmul, two steps.
  grad = jax.jit(jax.grad(lambda w: jnp.sum(conv_lib.conv_nhwc(x, w, padding=1) ** 2)))
  lowered = grad.trace(jnp.ones((3, 3, 3, 4))).lower(lowering_platforms=(platform,))
  module = lowered.as_text()
  counts = (
    module.count("custom_call @ega_onednn_conv_"),
    module.count("stablehlo.convolution"),
    module.count("stablehlo.while"),
  )
  assert counts == {"onednn": (2, 0, 0), "scan": (0, 1, 1), "xla": (0, 2, 0)}[expected]


def test_onednn_kernels_build_and_load_here():
  # The project's environment (make venv) has oneDNN and a compiler: "auto" must not fall back
  # to XLA here, or the CPU speed the project promises would silently be lost.
  assert onednn.unavailable_reason() is None
  assert onednn.register().is_file()


def test_onednn_missing_names_the_wheels_and_the_switch(monkeypatch, tmp_path):
  monkeypatch.delenv("DNNL_ROOT", raising=False)
  monkeypatch.setattr(sys, "prefix", str(tmp_path))
  monkeypatch.setattr(sys, "base_prefix", str(tmp_path))
  with pytest.raises(onednn.OneDNNUnavailable, match=r"pip install onednn-cpu-gomp.*CPU_CONV_LIB"):
    onednn.onednn_prefix()


def test_auto_falls_back_to_xla_with_a_warning_and_onednn_raises(monkeypatch, caplog):
  reason = "oneDNN not found (test)"
  monkeypatch.setattr(onednn, "unavailable_reason", lambda: reason)
  conv_lib._warn_onednn_unavailable.cache_clear()
  x, w = jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 4))
  with caplog.at_level(logging.WARNING):
    module = jax.jit(lambda x, w: conv_lib.conv_nhwc(x, w, padding=1)).lower(x, w).as_text()
  assert "ega_onednn" not in module and "stablehlo.convolution" in module
  assert reason in caplog.text and "CPU_CONV_LIBRARY='auto'" in caplog.text
  conv_lib._warn_onednn_unavailable.cache_clear()

  def unavailable():
    raise onednn.OneDNNUnavailable(reason)

  monkeypatch.setattr(conv_lib, "CPU_CONV_LIBRARY", "onednn")
  monkeypatch.setattr(onednn, "register", unavailable)
  with pytest.raises(onednn.OneDNNUnavailable, match="test"):
    conv_lib.conv_nhwc(x, w, padding=1)
  monkeypatch.setattr(conv_lib, "CPU_CONV_LIBRARY", "mkl")
  with pytest.raises(
    ValueError, match=r"CPU_CONV_LIBRARY='mkl'; valid: \('auto', 'onednn', 'xla'\)"
  ):
    conv_lib.conv_nhwc(x, w, padding=1)


def test_onednn_conv_in_shard_map_sums_the_kernel_gradient_over_devices():
  # One device here (tests/test_train.py compares 1 and 8): the shard_map program has to
  # type-check (the FFI result varying over the mesh axis like its operands) and psum the
  # kernel gradient; the values against the float64 reference.
  mesh = jax.make_mesh((1,), ("data",))
  rng = np.random.default_rng(5)
  x = rng.standard_normal((2, 6, 6, 3)).astype(np.float32)
  w = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)

  def loss(x, w):
    return jax.lax.psum(jnp.sum(conv_lib.conv_nhwc(x, w, padding=1) ** 2), "data")

  @functools.partial(
    jax.shard_map, mesh=mesh, in_specs=(P("data"), P()), out_specs=(P("data"), P())
  )
  def grads(x, w):
    return jax.grad(loss, argnums=(0, 1))(x, w)

  sharded = jax.sharding.NamedSharding(mesh, P("data"))
  grad_x, grad_w = jax.jit(grads)(jax.device_put(x, sharded), w)
  upstream = 2 * _reference_conv(x, w, 1, 1, 1)
  expected_x, expected_w = _reference_gradients(x, w, 1, 1, 1, upstream)
  np.testing.assert_allclose(np.asarray(grad_x), expected_x, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(np.asarray(grad_w), expected_w, rtol=1e-5, atol=1e-3)
