"""Registry of teacher architectures: what each one is, what it expects, what it returns."""

import dataclasses
from typing import Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Families group architectures that share one Flax module and one checkpoint layout.
CLIP_VIT = "clip_vit"  # OpenAI CLIP visual transformer (also Hugging Face CLIP).
CLIP_RESNET = "clip_resnet"  # OpenAI CLIP modified ResNet with attention pooling.
TORCHVISION_RESNET = "resnet"  # torchvision ResNet layout (MoCo, SwAV, BYOL, DINO-ResNet, ...).
TIMM_VIT = "timm_vit"  # timm / DINO VisionTransformer layout.
FAMILIES = (CLIP_VIT, CLIP_RESNET, TORCHVISION_RESNET, TIMM_VIT)


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
  """Everything needed to build a teacher and feed it.

  Attributes:
    arch: registry name, e.g. 'clip_vit_b32'.
    family: one of FAMILIES; selects the Flax module and the checkpoint layout.
    embed_dim: size D of the embedding the teacher returns, shape (B, D).
    image_size: native square input resolution (pixels per side).
    mean: per-channel RGB mean used to normalise [0, 1] images for this teacher.
    std: per-channel RGB standard deviation, same convention.
    description: one line saying what the architecture is and which public checkpoints fit it.
    module_config: (name, value) pairs passed to the family's Flax module (kept as a tuple so the
      spec stays hashable); read it through `config`.
  """

  arch: str
  family: str
  embed_dim: int
  image_size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  description: str
  module_config: tuple[tuple[str, Any], ...]

  @property
  def config(self) -> dict[str, Any]:
    return dict(self.module_config)


def _clip_vit(arch, patch_size, width, depth, num_heads, embed_dim, description):
  return TeacherSpec(
    arch=arch,
    family=CLIP_VIT,
    embed_dim=embed_dim,
    image_size=224,
    mean=CLIP_MEAN,
    std=CLIP_STD,
    description=description,
    module_config=(
      ("patch_size", patch_size),
      ("width", width),
      ("depth", depth),
      ("num_heads", num_heads),
      ("output_dim", embed_dim),
    ),
  )


def _clip_resnet(arch, stage_sizes, embed_dim, description):
  # OpenAI's RN50/RN101 use width 64 and width * 32 // 64 = 32 attention-pool heads.
  return TeacherSpec(
    arch=arch,
    family=CLIP_RESNET,
    embed_dim=embed_dim,
    image_size=224,
    mean=CLIP_MEAN,
    std=CLIP_STD,
    description=description,
    module_config=(
      ("stage_sizes", stage_sizes),
      ("width", 64),
      ("num_heads", 32),
      ("output_dim", embed_dim),
    ),
  )


def _resnet(arch, block, stage_sizes, description):
  return TeacherSpec(
    arch=arch,
    family=TORCHVISION_RESNET,
    embed_dim=512 if block == "basic" else 2048,
    image_size=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    description=description,
    module_config=(("block", block), ("stage_sizes", stage_sizes)),
  )


def _timm_vit(arch, patch_size, width, num_heads, description):
  return TeacherSpec(
    arch=arch,
    family=TIMM_VIT,
    embed_dim=width,
    image_size=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    description=description,
    module_config=(
      ("patch_size", patch_size),
      ("width", width),
      ("depth", 12),
      ("num_heads", num_heads),
    ),
  )


_SELF_SUPERVISED_RESNET50 = (
  "MoCo v1/v2/v3, SwAV, BYOL, Barlow Twins, DINO-ResNet, SimCLR (converted) and torchvision "
  "ImageNet checkpoints"
)

TEACHER_SPECS: dict[str, TeacherSpec] = {
  spec.arch: spec
  for spec in (
    _clip_vit("clip_vit_b32", 32, 768, 12, 12, 512, "OpenAI CLIP ViT-B/32 image encoder"),
    _clip_vit("clip_vit_b16", 16, 768, 12, 12, 512, "OpenAI CLIP ViT-B/16 image encoder"),
    _clip_vit("clip_vit_l14", 14, 1024, 24, 16, 768, "OpenAI CLIP ViT-L/14 image encoder"),
    _clip_resnet("clip_rn50", (3, 4, 6, 3), 1024, "OpenAI CLIP RN50 image encoder"),
    _clip_resnet("clip_rn101", (3, 4, 23, 3), 512, "OpenAI CLIP RN101 image encoder"),
    _resnet("resnet18", "basic", (2, 2, 2, 2), "torchvision-layout ResNet-18"),
    _resnet("resnet34", "basic", (3, 4, 6, 3), "torchvision-layout ResNet-34"),
    _resnet(
      "resnet50",
      "bottleneck",
      (3, 4, 6, 3),
      f"torchvision-layout ResNet-50 ({_SELF_SUPERVISED_RESNET50})",
    ),
    _resnet("resnet101", "bottleneck", (3, 4, 23, 3), "torchvision-layout ResNet-101"),
    _resnet("resnet152", "bottleneck", (3, 8, 36, 3), "torchvision-layout ResNet-152"),
    _timm_vit("vit_s16", 16, 384, 6, "timm/DINO ViT-S/16"),
    _timm_vit("vit_s8", 8, 384, 6, "timm/DINO ViT-S/8"),
    _timm_vit("vit_b16", 16, 768, 12, "timm/DINO ViT-B/16"),
    _timm_vit("vit_b8", 8, 768, 12, "timm/DINO ViT-B/8"),
  )
}


def get_spec(arch: str) -> TeacherSpec:
  """Returns TEACHER_SPECS[arch], or raises ValueError listing the valid names."""
  if arch not in TEACHER_SPECS:
    raise ValueError(
      f"Unknown teacher arch {arch!r}; valid teacher archs are: {', '.join(TEACHER_SPECS)}."
    )
  return TEACHER_SPECS[arch]
