"""Tests for the CIFAR student zoo (ega_jax.models.students).

References: the parameter counts and feature shapes of RepDistiller's PyTorch
models (HobbitLong/RepDistiller, models/), float64 NumPy for BatchNorm and the
final linear layer, and PyTorch re-statements of all 22 released classes
(tests/torch_zoo.py) loaded with the same weights under their state_dict keys.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from ega_jax.models.students import STUDENT_NAMES, create_student, student_feature_dim
from torch_zoo import CLASSIFIER_PREFIXES, build_torch_zoo_student

# RepDistiller, models/__init__.py model_dict with num_classes=100:
# sum(p.numel() for p in model.parameters()).
REPDISTILLER_PARAM_COUNTS = {
  "resnet8": 83_892,
  "resnet14": 181_108,
  "resnet20": 278_324,
  "resnet32": 472_756,
  "resnet44": 667_188,
  "resnet56": 861_620,
  "resnet110": 1_736_564,
  "resnet8x4": 1_233_540,
  "resnet32x4": 7_433_860,
  "ResNet50": 23_705_252,
  "wrn_16_1": 180_916,
  "wrn_16_2": 703_284,
  "wrn_40_1": 569_780,
  "wrn_40_2": 2_255_156,
  "vgg8": 3_965_028,
  "vgg11": 9_277_284,
  "vgg13": 9_462_180,
  "vgg16": 14_774_436,
  "vgg19": 20_086_692,
  "MobileNetV2": 812_836,
  "ShuffleV1": 949_258,
  "ShuffleV2": 1_355_528,
}

# RepDistiller's forward(x, is_feat=True) at 32x32: (height, channels) of each
# map in feat[:-1] (all maps are square), and the width of feat[-1].
_RESNET_STAGES = ((32, 16), (32, 16), (16, 32), (8, 64))
_RESNET_X4_STAGES = ((32, 32), (32, 64), (16, 128), (8, 256))
_VGG_STAGES = ((32, 64), (16, 128), (8, 256), (4, 512), (4, 512))
REPDISTILLER_FEATURES_AT_32 = {
  **{
    name: (_RESNET_STAGES, 64)
    for name in (
      "resnet8",
      "resnet14",
      "resnet20",
      "resnet32",
      "resnet44",
      "resnet56",
      "resnet110",
      "wrn_16_1",
      "wrn_40_1",
    )
  },
  "resnet8x4": (_RESNET_X4_STAGES, 256),
  "resnet32x4": (_RESNET_X4_STAGES, 256),
  "ResNet50": (((32, 64), (32, 256), (16, 512), (8, 1024), (4, 2048)), 2048),
  "wrn_16_2": (((32, 16), (32, 32), (16, 64), (8, 128)), 128),
  "wrn_40_2": (((32, 16), (32, 32), (16, 64), (8, 128)), 128),
  **{name: (_VGG_STAGES, 512) for name in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")},
  "MobileNetV2": (((16, 16), (16, 12), (8, 16), (4, 48), (2, 160)), 1280),
  "ShuffleV1": (((32, 24), (16, 240), (8, 480), (4, 960)), 960),
  "ShuffleV2": (((32, 24), (16, 116), (8, 232), (4, 464)), 1024),
}


def _abstract_variables(model, image_size=32):
  """Shapes/dtypes of model.init without computing anything."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))


def _random_variables(model, seed=0):
  """Variables filled from NumPy (no init compile): He-scaled kernels,
  non-trivial BatchNorm affine and running statistics."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    leaf_name = path[-1].key
    shape = leaf.shape
    if leaf_name == "kernel":
      value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
    elif leaf_name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # bias, mean
      value = rng.normal(0.0, 0.1, shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, _abstract_variables(model))


def _images(batch, size, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, size, size, 3)), jnp.float32)


def _assert_trees_close(actual, expected, **tolerances):
  assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
  for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), **tolerances)


# ------------------------------------------------------------------ registry


def test_student_names_are_the_repdistiller_zoo():
  assert STUDENT_NAMES == tuple(REPDISTILLER_PARAM_COUNTS)


def test_feature_dims():
  expected = {name: width for name, (_, width) in REPDISTILLER_FEATURES_AT_32.items()}
  assert {name: student_feature_dim(name) for name in STUDENT_NAMES} == expected


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match=r"'resnet9'.*resnet8x4.*ShuffleV2"):
    create_student("resnet9", 100)
  with pytest.raises(ValueError, match=r"'vgg13_bn'.*vgg13"):
    student_feature_dim("vgg13_bn")


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True, "100"])
def test_bad_num_classes(num_classes):
  with pytest.raises(ValueError, match="num_classes"):
    create_student("resnet8", num_classes)


def test_bad_image_shapes():
  model = create_student("resnet8", 10)
  nchw = jnp.zeros((2, 3, 32, 32))
  with pytest.raises(
    ValueError,
    match=r"\(batch, height, width, 3\).*"
    r"\(2, 3, 32, 32\)",
  ):
    jax.eval_shape(lambda: model.init(jax.random.key(0), nchw))
  vgg = create_student("vgg8", 10)
  with pytest.raises(ValueError, match="at least 8x8; got 4x4"):
    jax.eval_shape(lambda: vgg.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3))))


# ---------------------------------------------------- architecture (abstract)


@pytest.mark.parametrize("name", STUDENT_NAMES)
def test_parameter_count_and_output_shapes(name):
  num_classes = 100
  model = create_student(name, num_classes)
  variables = _abstract_variables(model)
  param_count = sum(
    int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(variables["params"])
  )
  assert param_count == REPDISTILLER_PARAM_COUNTS[name]
  assert set(variables) == {"params", "batch_stats"}

  stage_shapes, feature_dim = REPDISTILLER_FEATURES_AT_32[name]
  logits, features = jax.eval_shape(
    functools.partial(model.apply, train=False), variables, jnp.zeros((3, 32, 32, 3), jnp.float32)
  )
  assert logits.shape == (3, num_classes)
  assert features["penultimate"].shape == (3, feature_dim)
  assert tuple(stage.shape for stage in features["stages"]) == tuple(
    (3, size, size, channels) for size, channels in stage_shapes
  )

  # The same weights apply at other input sizes (whole-map pooling).
  for size in (28, 64, 96):
    logits, features = jax.eval_shape(
      functools.partial(model.apply, train=False),
      variables,
      jnp.zeros((2, size, size, 3), jnp.float32),
    )
    assert logits.shape == (2, num_classes)
    assert features["penultimate"].shape == (2, feature_dim)


@pytest.mark.parametrize("name", ["resnet8x4", "ShuffleV1"])
def test_bfloat16_computes_in_bfloat16_with_float32_variables(name):
  model = create_student(name, 10, dtype=jnp.bfloat16)
  variables = _abstract_variables(model)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
  (logits, features), updates = jax.eval_shape(
    functools.partial(model.apply, train=True, mutable=["batch_stats"]),
    variables,
    jnp.zeros((2, 32, 32, 3), jnp.float32),
  )
  assert logits.dtype == jnp.bfloat16
  assert features["penultimate"].dtype == jnp.bfloat16
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(updates)} == {jnp.dtype(jnp.float32)}


def test_vgg_pools_before_last_block_from_64_pixels():
  # RepDistiller pools between blocks 3 and 4 at 64x64 but not at 32x32.
  model = create_student("vgg8", 10)
  variables = _abstract_variables(model)
  for size, last_block_size in ((32, 4), (64, 4), (96, 6), (28, 3)):
    _, features = jax.eval_shape(
      functools.partial(model.apply, train=False),
      variables,
      jnp.zeros((1, size, size, 3), jnp.float32),
    )
    assert features["stages"][-1].shape == (1, last_block_size, last_block_size, 512)


# ------------------------------------------------------------ real forwards


def _final_dense(params):
  """(kernel, bias) of the one 2-D kernel in the tree: the classifier."""
  flat = traverse_util.flatten_dict(params)
  dense = [path for path, leaf in flat.items() if path[-1] == "kernel" and leaf.ndim == 2]
  assert len(dense) == 1
  (kernel_path,) = dense
  bias_path = kernel_path[:-1] + ("bias",)
  return (np.asarray(flat[kernel_path], np.float64), np.asarray(flat[bias_path], np.float64))


@pytest.mark.parametrize(
  "name",
  [
    "resnet8",
    "wrn_16_1",
    pytest.param("MobileNetV2", marks=pytest.mark.slow),
    pytest.param("ShuffleV1", marks=pytest.mark.slow),
  ],
)
def test_forward_at_several_input_sizes(name):
  model = create_student(name, 10)
  variables = _random_variables(model)
  kernel, bias = _final_dense(variables["params"])
  for size in (28, 32, 64):
    logits, features = model.apply(variables, _images(2, size), train=False)
    assert logits.shape == (2, 10)
    assert np.all(np.isfinite(np.asarray(logits)))
    penultimate = np.asarray(features["penultimate"], np.float64)
    assert penultimate.shape == (2, student_feature_dim(name))
    # 'penultimate' is exactly what the classifier reads.
    np.testing.assert_allclose(
      np.asarray(logits), penultimate @ kernel + bias, rtol=1e-4, atol=1e-4
    )
    # ... and it is the spatial mean of a ReLU output, so non-negative.
    assert penultimate.min() >= 0.0


@pytest.mark.parametrize("name", ["resnet8", "MobileNetV2"])
def test_batch_norm_modes(name):
  model = create_student(name, 10)
  variables = _random_variables(model)
  first, second, third = (_images(1, 32, seed) for seed in (1, 2, 3))
  batch_a = jnp.concatenate([first, second])
  batch_b = jnp.concatenate([first, third])

  # Eval: running statistics, nothing updated, each example on its own.
  (logits_a, _), state = model.apply(variables, batch_a, train=False, mutable=["batch_stats"])
  _assert_trees_close(state["batch_stats"], variables["batch_stats"], rtol=0, atol=0)
  logits_b, _ = model.apply(variables, batch_b, train=False)
  np.testing.assert_allclose(logits_a[0], logits_b[0], rtol=1e-5, atol=1e-5)

  # Train: batch statistics, so example 0 depends on its batch-mates, and
  # every running statistic moves.
  (train_a, _), updates = model.apply(variables, batch_a, train=True, mutable=["batch_stats"])
  (train_b, _), _ = model.apply(variables, batch_b, train=True, mutable=["batch_stats"])
  assert not np.allclose(train_a[0], train_b[0], rtol=1e-3, atol=1e-3)
  for old, new in zip(
    jax.tree_util.tree_leaves(variables["batch_stats"]),
    jax.tree_util.tree_leaves(updates["batch_stats"]),
  ):
    assert not np.allclose(old, new)


def test_running_statistics_follow_pytorch_momentum():
  model = create_student("resnet8", 10)
  variables = _random_variables(model)
  images = _images(4, 32)
  _, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])

  # The stem BatchNorm sees conv1(images): 3x3, stride 1, zero padding 1.
  kernel = np.asarray(variables["params"]["conv1"]["kernel"], np.float64)
  padded = np.pad(np.asarray(images, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  conv = sum(
    np.einsum("bhwc,co->bhwo", padded[:, dy : dy + 32, dx : dx + 32], kernel[dy, dx])
    for dy in range(3)
    for dx in range(3)
  )
  old = variables["batch_stats"]["bn1"]
  new = updates["batch_stats"]["bn1"]
  np.testing.assert_allclose(
    new["mean"], 0.9 * np.asarray(old["mean"]) + 0.1 * conv.mean((0, 1, 2)), rtol=1e-5, atol=1e-6
  )
  # Biased batch variance (PyTorch stores the unbiased one; see layers.py).
  np.testing.assert_allclose(
    new["var"], 0.9 * np.asarray(old["var"]) + 0.1 * conv.var((0, 1, 2)), rtol=1e-5, atol=1e-6
  )


def test_initialisation_follows_repdistiller():
  model = create_student("resnet8", 100)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32))
  params = variables["params"]
  # kaiming_normal_(mode='fan_out'): std sqrt(2 / (3 * 3 * 64)), untruncated.
  kernel = np.asarray(params["layer3.0"]["conv2"]["kernel"])
  assert kernel.shape == (3, 3, 64, 64)
  np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (9 * 64)), rtol=0.03)
  assert np.abs(kernel).max() > 3.5 * np.sqrt(2.0 / (9 * 64))
  # PyTorch's default Linear init: U(-1/sqrt(64), 1/sqrt(64)) for both.
  bound = 1.0 / 8.0
  for leaf in (params["fc"]["kernel"], params["fc"]["bias"]):
    leaf = np.asarray(leaf)
    assert np.abs(leaf).max() <= bound
    assert np.abs(leaf).max() > 0.9 * bound
  fc_kernel = np.asarray(params["fc"]["kernel"])
  np.testing.assert_allclose(fc_kernel.std(), bound / np.sqrt(3), rtol=0.05)
  # BatchNorm: weight 1, bias 0, running mean 0, running variance 1.
  for path, leaf in traverse_util.flatten_dict(variables).items():
    expected = {"scale": 1.0, "var": 1.0, "mean": 0.0}.get(path[-1])
    if path[0] == "params" and path[-1] == "bias" and path[1] != "fc":
      expected = 0.0
    if expected is not None:
      np.testing.assert_array_equal(np.asarray(leaf), expected)


# -------------------------------------------------- cross-replica BatchNorm


def test_bn_axis_name_gives_cross_replica_statistics():
  num_replicas, per_replica = 2, 2
  images = _images(num_replicas * per_replica, 32)
  shards = images.reshape(num_replicas, per_replica, 32, 32, 3)
  local_model = create_student("resnet8", 10)
  synced_model = create_student("resnet8", 10, bn_axis_name="data")
  variables = _random_variables(local_model)

  (global_logits, _), global_updates = local_model.apply(
    variables, images, train=True, mutable=["batch_stats"]
  )

  def replica_step(model, shard):
    return model.apply(variables, shard, train=True, mutable=["batch_stats"])

  (synced_logits, _), synced_updates = jax.vmap(
    functools.partial(replica_step, synced_model), axis_name="data"
  )(shards)
  np.testing.assert_allclose(synced_logits.reshape(-1, 10), global_logits, rtol=1e-4, atol=1e-4)
  for replica in range(num_replicas):
    _assert_trees_close(
      jax.tree_util.tree_map(lambda leaf: leaf[replica], synced_updates),
      global_updates,
      rtol=1e-4,
      atol=1e-5,
    )

  # Control: without the axis name each replica normalises its own half.
  (local_logits, _), _ = jax.vmap(functools.partial(replica_step, local_model), axis_name="data")(
    shards
  )
  assert not np.allclose(local_logits.reshape(-1, 10), global_logits, rtol=1e-3, atol=1e-3)


# ------------------------------------- parity with PyTorch re-statements
# tests/torch_zoo.py restates each released class with its state_dict keys
# (the CIFAR ResNets without fc, as EGA releases them), so the Flax variables
# load into it strictly under the students' naming rule.


def _torch_state_dict(variables):
  """Flax variables -> PyTorch state_dict via the students' naming rule."""
  torch_leaf_names = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
  }
  state = {}
  for collection in ("params", "batch_stats"):
    for path, value in traverse_util.flatten_dict(variables[collection]).items():
      value = np.asarray(value)
      if path[-1] == "kernel":
        # HWIO -> OIHW for convs, (in, out) -> (out, in) for linears.
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
      key = ".".join(path[:-1] + (torch_leaf_names[path[-1]],))
      state[key] = torch.from_numpy(np.array(value, copy=True))
  return state


def _flax_classifier_name(params):
  """'.'-joined module path of the one 2-D kernel: the classifier."""
  (path,) = [
    path
    for path, leaf in traverse_util.flatten_dict(params).items()
    if path[-1] == "kernel" and leaf.ndim == 2
  ]
  return ".".join(path[:-1])


def _loaded_restatement(name, variables, num_classes):
  """The torch_zoo module of `name` with the Flax variables loaded strictly."""
  reference = build_torch_zoo_student(name, num_classes)
  state = _torch_state_dict(variables)
  flax_classifier = _flax_classifier_name(variables["params"])
  torch_classifier = CLASSIFIER_PREFIXES[name]
  if torch_classifier is None:
    # The released class has no classifier: the Flax fc has nothing to go to.
    assert flax_classifier == "fc"
    state = {key: value for key, value in state.items() if not key.startswith("fc.")}
  else:
    assert flax_classifier == torch_classifier
  # Flax keeps no BatchNorm step counter: take PyTorch's own, and only those.
  expected = reference.state_dict()
  counters = set(expected) - set(state)
  assert all(key.endswith(".num_batches_tracked") for key in counters), sorted(counters)[:5]
  state.update({key: expected[key] for key in counters})
  reference.load_state_dict(state, strict=True)  # Unexpected keys or shapes raise.
  return reference


def _nchw(images):
  return torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())


def _assert_close_relative(actual, expected):
  """Within 1e-4 of the reference, relative to its largest magnitude."""
  expected = np.asarray(expected)
  np.testing.assert_allclose(
    np.asarray(actual), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
  )


# The eval-mode parity of all 22 students, through the export's PyTorch layout, is
# tests/test_export.py::test_released_layout_of_every_student_matches_pytorch.


def test_train_mode_matches_pytorch_restatement():
  # Train mode: batch statistics, and the same running-mean update (PyTorch
  # stores the unbiased running variance, so only the means are compared).
  model = create_student("resnet8", 10)
  variables = _random_variables(model, seed=1)
  reference = _loaded_restatement("resnet8", variables, 10).train()
  images = _images(2, 32, seed=4)
  with torch.no_grad():
    ref_pooled, _ = reference(_nchw(images))
  (_, features), updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
  _assert_close_relative(features["penultimate"], ref_pooled.numpy())
  ref_state = reference.state_dict()
  for path, mean in traverse_util.flatten_dict(updates["batch_stats"]).items():
    if path[-1] == "mean":
      np.testing.assert_allclose(
        mean, ref_state[".".join(path[:-1]) + ".running_mean"].numpy(), rtol=1e-4, atol=1e-5
      )
