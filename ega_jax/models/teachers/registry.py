"""Builds teacher modules from registry names."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ega_jax.models.teachers import specs
from ega_jax.models.teachers.clip_resnet import CLIPModifiedResNet
from ega_jax.models.teachers.resnet import ResNet
from ega_jax.models.teachers.vit import VisionTransformer


def check_image_size(arch: str, image_size: Any) -> int:
  """Returns image_size if `arch` can run at it, else raises ValueError saying why."""
  spec = specs.get_spec(arch)
  if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
    raise ValueError(f"image_size must be a positive integer, got {image_size!r}.")
  if spec.family in (specs.CLIP_VIT, specs.TIMM_VIT):
    patch_size = spec.config["patch_size"]
    if image_size % patch_size:
      raise ValueError(
        f"image_size {image_size} is not a multiple of the {arch} patch size {patch_size}."
      )
  if spec.family == specs.CLIP_RESNET and image_size % 32:
    raise ValueError(f"image_size {image_size} is not a multiple of 32, which {arch} needs.")
  return image_size


def create_teacher(arch: str, dtype: Any = jnp.float32, image_size: int | None = None) -> nn.Module:
  """Returns the Flax module for `arch` (inference only).

  `module.apply(variables, images)` maps NHWC float images, already resized to the teacher's
  resolution and normalised with its mean/std, to embeddings (B, TEACHER_SPECS[arch].embed_dim)
  in float32.

  Args:
    arch: a TEACHER_SPECS name; anything else raises ValueError listing the valid names.
    dtype: computation dtype (e.g. jnp.bfloat16); parameters are float32 regardless.
    image_size: input resolution if not the spec's. ViTs and CLIP ResNets size their position
      embeddings from it, so it must match the checkpoint; torchvision ResNets take any size.
  """
  spec = specs.get_spec(arch)
  image_size = check_image_size(arch, spec.image_size if image_size is None else image_size)
  config = spec.config
  if spec.family == specs.CLIP_VIT:
    return VisionTransformer(
      image_size=image_size,
      layer_norm_eps=1e-5,
      activation="quick_gelu",
      patch_bias=False,
      pre_norm=True,
      dtype=dtype,
      **config,
    )
  if spec.family == specs.TIMM_VIT:
    return VisionTransformer(
      image_size=image_size,
      layer_norm_eps=1e-6,
      activation="gelu",
      patch_bias=True,
      pre_norm=False,
      dtype=dtype,
      **config,
    )
  if spec.family == specs.CLIP_RESNET:
    return CLIPModifiedResNet(image_size=image_size, dtype=dtype, **config)
  if spec.family == specs.TORCHVISION_RESNET:
    return ResNet(dtype=dtype, **config)
  raise AssertionError(f"TEACHER_SPECS[{arch!r}] has unhandled family {spec.family!r}.")


def abstract_variables(module: nn.Module, image_size: int) -> Any:
  """Shapes/dtypes of `module`'s variables ({'params': ..., 'batch_stats'?: ...}), no compute."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), images)
