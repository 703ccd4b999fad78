"""Heads: shapes, PyTorch-default initialisation ranges, and the linear maps."""

import jax
import jax.numpy as jnp
import numpy as np

from ega_jax.models import heads


def test_embedding_classifier_head_is_two_affine_maps():
  head = heads.EmbeddingClassifierHead(feature_dim=16, num_classes=5)
  features = jax.random.normal(jax.random.PRNGKey(0), (7, 40))
  params = head.init(jax.random.PRNGKey(1), features)["params"]
  embedding, logits = head.apply({"params": params}, features)
  assert embedding.shape == (7, 16) and logits.shape == (7, 5)

  w_embed = np.asarray(params["embed"]["Dense_0"]["kernel"], np.float64)
  b_embed = np.asarray(params["embed"]["Dense_0"]["bias"], np.float64)
  w_cls = np.asarray(params["classifier"]["Dense_0"]["kernel"], np.float64)
  b_cls = np.asarray(params["classifier"]["Dense_0"]["bias"], np.float64)
  expected_embedding = np.asarray(features, np.float64) @ w_embed + b_embed
  np.testing.assert_allclose(embedding, expected_embedding, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits, expected_embedding @ w_cls + b_cls, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    head.apply({"params": params}, embedding, method="classify"), logits, rtol=1e-6
  )


def test_head_init_matches_torch_linear_default_range():
  fan_in = 400
  head = heads.TorchLinear(features=300)
  params = head.init(jax.random.PRNGKey(0), jnp.zeros((1, fan_in)))["params"]["Dense_0"]
  bound = 1.0 / np.sqrt(fan_in)
  for name in ("kernel", "bias"):
    values = np.asarray(params[name])
    assert np.abs(values).max() <= bound
    # Uniform on [-bound, bound]: the extremes are approached and the std is bound/sqrt(3).
    assert np.abs(values).max() > 0.9 * bound
  kernel = np.asarray(params["kernel"])
  assert abs(kernel.std() - bound / np.sqrt(3)) < 0.05 * bound


def test_contrastive_projection_unit_norm():
  projection = heads.ContrastiveProjection(dim=128)
  x = jax.random.normal(jax.random.PRNGKey(2), (9, 256))
  params = projection.init(jax.random.PRNGKey(3), x)
  out = projection.apply(params, x)
  assert out.shape == (9, 128)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=1), np.ones(9), rtol=1e-5)
  zeros = projection.apply(params, jnp.zeros((2, 256)))
  assert np.all(np.isfinite(np.asarray(zeros)))
