"""Teacher modules: registry, sizes against the reference PyTorch models, building blocks against
float64 NumPy written from the formulas, dtype handling, and load_teacher's error messages.

Numerical parity of whole converted teachers against PyTorch lives in test_convert.py.
"""

import dataclasses
import json
import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

with warnings.catch_warnings():
  warnings.simplefilter("ignore")  # clip imports the deprecated pkg_resources.
  import clip
import timm

from ega_jax.models.teachers import (
  TEACHER_SPECS,
  TeacherSpec,
  abstract_variables,
  create_teacher,
  load_teacher,
  save_teacher,
)
from ega_jax.models.teachers.clip_resnet import AttentionPool
from ega_jax.models.teachers.vit import SelfAttention, exact_gelu, quick_gelu

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def reference_torch_model(arch):
  """The third-party PyTorch module each arch mirrors, built on the meta device (no memory)."""
  with torch.device("meta"):
    if arch.startswith("clip_vit"):
      patch, width, layers, output = {
        "clip_vit_b32": (32, 768, 12, 512),
        "clip_vit_b16": (16, 768, 12, 512),
        "clip_vit_l14": (14, 1024, 24, 768),
      }[arch]
      return clip.model.VisionTransformer(224, patch, width, layers, width // 64, output)
    if arch.startswith("clip_rn"):
      stages, output = {"clip_rn50": ((3, 4, 6, 3), 1024), "clip_rn101": ((3, 4, 23, 3), 512)}[arch]
      return clip.model.ModifiedResNet(stages, output, 32, 224, 64)
    if arch.startswith("resnet"):
      model = getattr(torchvision.models, arch)()
      model.fc = torch.nn.Identity()
      return model
    timm_name = {
      "vit_s16": "vit_small_patch16_224",
      "vit_s8": "vit_small_patch8_224",
      "vit_b16": "vit_base_patch16_224",
      "vit_b8": "vit_base_patch8_224",
    }[arch]
    return timm.create_model(timm_name, pretrained=False, num_classes=0)


def random_variables(module, image_size, seed=0):
  """Well-scaled random float32 variables for `module` without running its (slow on CPU) init."""
  rng = np.random.default_rng(seed)

  def sample(path, leaf):
    name = path[-1].key
    if name in ("kernel", "projection"):
      return rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, size=leaf.shape)
    return rng.normal(size=leaf.shape) * 0.1

  return jax.tree.map_with_path(
    lambda path, leaf: sample(path, leaf).astype(np.float32), abstract_variables(module, image_size)
  )


def test_registry_lists_every_issue_arch_with_its_preprocessing():
  assert set(TEACHER_SPECS) == {
    "clip_vit_b32",
    "clip_vit_b16",
    "clip_vit_l14",
    "clip_rn50",
    "clip_rn101",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "vit_s16",
    "vit_s8",
    "vit_b16",
    "vit_b8",
  }
  expected_dims = {
    "clip_vit_b32": 512,
    "clip_vit_b16": 512,
    "clip_vit_l14": 768,
    "clip_rn50": 1024,
    "clip_rn101": 512,
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet101": 2048,
    "resnet152": 2048,
    "vit_s16": 384,
    "vit_s8": 384,
    "vit_b16": 768,
    "vit_b8": 768,
  }
  for arch, spec in TEACHER_SPECS.items():
    assert isinstance(spec, TeacherSpec) and spec.arch == arch
    assert spec.embed_dim == expected_dims[arch], arch
    assert spec.image_size == 224
    clip_arch = arch.startswith("clip_")
    assert spec.mean == (CLIP_MEAN if clip_arch else IMAGENET_MEAN), arch
    assert spec.std == (CLIP_STD if clip_arch else IMAGENET_STD), arch
  with pytest.raises(dataclasses.FrozenInstanceError):
    TEACHER_SPECS["resnet50"].embed_dim = 1


def test_unknown_arch_lists_valid_names():
  with pytest.raises(ValueError, match=r"'resnet51'.*clip_vit_b32.*resnet50"):
    create_teacher("resnet51")


@pytest.mark.parametrize("arch", sorted(TEACHER_SPECS))
def test_sizes_match_reference_pytorch_model(arch):
  """Embedding size from the Flax module and variable count equal to the torch module's
  parameters + BatchNorm running statistics (the torch module built independently, on meta)."""
  spec = TEACHER_SPECS[arch]
  module = create_teacher(arch)
  variables = abstract_variables(module, spec.image_size)
  images = jax.ShapeDtypeStruct((2, spec.image_size, spec.image_size, 3), jnp.float32)
  embedding = jax.eval_shape(module.apply, variables, images)
  assert embedding.shape == (2, spec.embed_dim) and embedding.dtype == jnp.float32
  reference = reference_torch_model(arch)
  reference_count = sum(p.numel() for p in reference.parameters()) + sum(
    b.numel()
    for name, b in reference.named_buffers()
    if name.endswith(("running_mean", "running_var"))
  )
  assert sum(leaf.size for leaf in jax.tree.leaves(variables)) == reference_count


def test_quick_gelu_and_exact_gelu_follow_their_formulas():
  x = np.linspace(-6, 6, 101)
  np.testing.assert_allclose(
    np.asarray(quick_gelu(jnp.asarray(x, jnp.float32))),
    x / (1 + np.exp(-1.702 * x)),
    rtol=1e-5,
    atol=1e-6,
  )
  erf_gelu = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
  np.testing.assert_allclose(
    np.asarray(exact_gelu(jnp.asarray(x, jnp.float32))), erf_gelu, rtol=1e-5, atol=1e-6
  )
  # The tanh approximation differs by more than this; make sure it is not what we compute.
  assert np.abs(np.asarray(jax.nn.gelu(x, approximate=True)) - erf_gelu).max() > 1e-4


def _softmax(logits):
  logits = logits - logits.max(axis=-1, keepdims=True)
  weights = np.exp(logits)
  return weights / weights.sum(axis=-1, keepdims=True)


def test_self_attention_matches_float64_formula():
  batch, length, width, heads = 2, 5, 12, 3
  tokens = np.random.default_rng(0).normal(size=(batch, length, width))
  module = SelfAttention(num_heads=heads)
  variables = jax.jit(module.init)(jax.random.PRNGKey(1), jnp.asarray(tokens, jnp.float32))
  with jax.default_matmul_precision("highest"):
    out = np.asarray(jax.jit(module.apply)(variables, jnp.asarray(tokens, jnp.float32)))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  qkv = tokens @ p["qkv"]["kernel"] + p["qkv"]["bias"]
  head_dim = width // heads
  split = lambda x: x.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3)
  q, k, v = (split(qkv[..., i * width : (i + 1) * width]) for i in range(3))
  weights = _softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim))
  attended = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, length, width)
  expected = attended @ p["out"]["kernel"] + p["out"]["bias"]
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_attention_pool_matches_float64_formula():
  """CLIP AttentionPool2d: query = mean token only, keys/values = mean + all positions."""
  batch, side, channels, heads, output = 2, 3, 8, 2, 6
  features = np.random.default_rng(0).normal(size=(batch, side, side, channels))
  module = AttentionPool(num_heads=heads, output_dim=output)
  variables = jax.jit(module.init)(jax.random.PRNGKey(2), jnp.asarray(features, jnp.float32))
  with jax.default_matmul_precision("highest"):
    out = np.asarray(jax.jit(module.apply)(variables, jnp.asarray(features, jnp.float32)))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  tokens = features.reshape(batch, side * side, channels)
  tokens = np.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
  tokens = tokens + p["positional_embedding"]
  project = lambda x, name: x @ p[name]["kernel"] + p[name]["bias"]
  head_dim = channels // heads
  split = lambda x: x.reshape(batch, x.shape[1], heads, head_dim).transpose(0, 2, 1, 3)
  q = split(project(tokens[:, :1], "q_proj"))
  k, v = split(project(tokens, "k_proj")), split(project(tokens, "v_proj"))
  weights = _softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim))  # (B, H, 1, L)
  pooled = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, channels)
  np.testing.assert_allclose(out, project(pooled, "c_proj"), rtol=1e-5, atol=1e-5)


def test_torchvision_resnet_runs_at_any_resolution():
  module = create_teacher("resnet18")
  variables = abstract_variables(module, 224)
  for size in (32, 64, 97):
    images = jax.ShapeDtypeStruct((3, size, size, 3), jnp.float32)
    assert jax.eval_shape(module.apply, variables, images).shape == (3, 512)


def test_position_embedding_archs_reject_wrong_inputs_and_sizes():
  module = create_teacher("vit_s16", image_size=32)
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  assert variables["params"]["position_embedding"].shape == (5, 384)  # 2x2 patches + class.
  with pytest.raises(ValueError, match=r"\(B, 32, 32, 3\)"):
    module.apply(variables, jnp.zeros((1, 48, 48, 3)))
  with pytest.raises(ValueError, match="multiple of the vit_s16 patch size 16"):
    create_teacher("vit_s16", image_size=40)
  with pytest.raises(ValueError, match="multiple of 32"):
    create_teacher("clip_rn50", image_size=48)
  with pytest.raises(ValueError, match="positive integer"):
    create_teacher("resnet18", image_size=0)


# One arch per module class (the CLIP ViT shares vit_s16's module).
@pytest.mark.parametrize("arch,image_size", [("resnet18", 32), ("vit_s16", 32), ("clip_rn50", 64)])
def test_bfloat16_computation_keeps_float32_params_and_output(arch, image_size):
  images = jax.random.normal(jax.random.PRNGKey(0), (2, image_size, image_size, 3))
  float32_module = create_teacher(arch, image_size=image_size)
  variables = random_variables(float32_module, image_size)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  bf16_module = create_teacher(arch, dtype=jnp.bfloat16, image_size=image_size)
  bf16_variables = jax.eval_shape(bf16_module.init, jax.random.PRNGKey(1), images)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(bf16_variables))
  reference = np.asarray(jax.jit(float32_module.apply)(variables, images))
  low_precision = jax.jit(bf16_module.apply)(variables, images)
  assert low_precision.dtype == jnp.float32
  relative = np.abs(np.asarray(low_precision) - reference).max() / np.abs(reference).max()
  assert relative < 0.1, relative


# ---------------------------------------------------------------------------------------------
# The converted-teacher directory.


@pytest.fixture
def saved_resnet18(tmp_path):
  variables = random_variables(create_teacher("resnet18", image_size=32), 32)
  metadata = {
    "arch": "resnet18",
    "embed_dim": 512,
    "image_size": 32,
    "mean": [0.3, 0.3, 0.3],
    "std": [0.4, 0.4, 0.4],
  }
  directory = str(tmp_path / "teacher")
  save_teacher(directory, variables, metadata)
  return directory, variables


def _rewrite_json(directory, **changes):
  path = os.path.join(directory, "teacher.json")
  with open(path) as handle:
    metadata = json.load(handle)
  metadata.update(changes)
  with open(path, "w") as handle:
    json.dump(metadata, handle)
  return path


def test_save_then_load_round_trips(saved_resnet18):
  directory, variables = saved_resnet18
  module, loaded, meta = load_teacher(directory)
  assert meta["arch"] == "resnet18" and meta["image_size"] == 32 and meta["mean"] == [0.3] * 3
  for path_and_leaf, loaded_leaf in zip(
    jax.tree.leaves_with_path(variables), jax.tree.leaves(loaded)
  ):
    np.testing.assert_array_equal(np.asarray(loaded_leaf), path_and_leaf[1])
  images = jnp.ones((1, 32, 32, 3))
  apply = jax.jit(module.apply)
  np.testing.assert_array_equal(apply(loaded, images), apply(variables, images))


def test_load_missing_directory_or_metadata(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
    load_teacher(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="teacher.json does not exist"):
    load_teacher(str(tmp_path))


def test_load_rejects_bad_metadata(saved_resnet18):
  directory, _ = saved_resnet18
  path = os.path.join(directory, "teacher.json")
  _rewrite_json(directory, arch="resnet19")
  with pytest.raises(ValueError, match=r"teacher.json names arch 'resnet19'.*valid.*resnet18"):
    load_teacher(directory)
  _rewrite_json(directory, arch="resnet18", std=[0.4, 0.4])
  with pytest.raises(ValueError, match="teacher.json field 'std' must be a list of 3 numbers"):
    load_teacher(directory)
  with open(path, "w") as handle:
    handle.write('{"arch": ')
  with pytest.raises(ValueError, match="teacher.json is not valid JSON"):
    load_teacher(directory)


def test_load_rejects_corrupt_or_mismatched_variables(saved_resnet18):
  directory, _ = saved_resnet18
  variables_path = os.path.join(directory, "variables.msgpack")
  with open(variables_path, "r+b") as handle:
    handle.seek(1000)
    handle.write(b"\x00\x01\x02\x03")
  with pytest.raises(ValueError, match="variables.msgpack is corrupt"):
    load_teacher(directory)
  os.remove(variables_path)
  with pytest.raises(FileNotFoundError, match="variables.msgpack does not exist"):
    load_teacher(directory)
  # A consistent file holding another arch's tree: caught by the tree check, not the hash.
  other = create_teacher("resnet34", image_size=32)
  other_variables = jax.tree.map(
    np.zeros_like, jax.eval_shape(other.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  )
  save_teacher(
    directory,
    other_variables,
    {"arch": "resnet18", "embed_dim": 512, "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
  )
  with pytest.raises(ValueError, match=r"variables.msgpack does not fit resnet18.*unexpected"):
    load_teacher(directory)
