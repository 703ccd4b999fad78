"""Frozen teacher backbones in Flax (inference only) and their converted on-disk form.

Families (see specs.TEACHER_SPECS for every name):
  clip_vit_b32, clip_vit_b16, clip_vit_l14   OpenAI CLIP visual transformers (encode_image)
  clip_rn50, clip_rn101                      OpenAI CLIP modified ResNets (encode_image)
  resnet18 ... resnet152                     torchvision-layout ResNets (pooled pre-fc feature)
  vit_s16, vit_s8, vit_b16, vit_b8           timm/DINO ViTs (normalised class token)

Nothing here imports torch; checkpoints are converted by ega_jax.convert.
"""

from ega_jax.models.teachers.registry import abstract_variables, create_teacher
from ega_jax.models.teachers.specs import TEACHER_SPECS, TeacherSpec, get_spec
from ega_jax.models.teachers.storage import load_teacher, save_teacher

__all__ = [
  "TEACHER_SPECS",
  "TeacherSpec",
  "abstract_variables",
  "create_teacher",
  "get_spec",
  "load_teacher",
  "save_teacher",
]
