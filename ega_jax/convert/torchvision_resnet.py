"""torchvision-layout ResNet checkpoints -> resnet18/34/50/101/152 teachers.

Covers torchvision's own weights and the self-supervised releases that keep its layout: MoCo v1/v2
('module.encoder_q.'), MoCo v3 ('module.base_encoder.'), SwAV, BYOL, Barlow Twins, DINO-ResNet
('backbone.' in full checkpoints) and SimCLR converted to torchvision names. The classifier or
projection MLP (`fc`, `fc.0`, `fc.2`, ...) and SwAV's projection head / prototypes are ignored.
"""

from ega_jax.convert import layout
from ega_jax.models.teachers import specs


def rules(spec: specs.TeacherSpec) -> list[layout.Rule]:
  config = spec.config
  expansion = 4 if config["block"] == "bottleneck" else 1
  layers = (1, 2, 3) if config["block"] == "bottleneck" else (1, 2)
  rules = layout.conv_rules(("conv1",), "conv1") + layout.batch_norm_rules(("bn1",), "bn1")
  for stage, num_blocks in enumerate(config["stage_sizes"], start=1):
    for index in range(num_blocks):
      block, torch_block = f"layer{stage}_{index}", f"layer{stage}.{index}"
      for layer in layers:
        rules += layout.conv_rules((block, f"conv{layer}"), f"{torch_block}.conv{layer}")
        rules += layout.batch_norm_rules((block, f"bn{layer}"), f"{torch_block}.bn{layer}")
      # torchvision adds a projection shortcut where the stride or the width changes: the first
      # block of stages 2-4, and of stage 1 too when the block expands (64 -> 256).
      if index == 0 and (stage > 1 or expansion > 1):
        rules += layout.conv_rules((block, "downsample_conv"), f"{torch_block}.downsample.0")
        rules += layout.batch_norm_rules((block, "downsample_bn"), f"{torch_block}.downsample.1")
  return rules


def infer(shapes) -> list[layout.Inference]:
  keys = list(shapes)
  found = []
  for prefix in layout.prefixes_with(keys, "layer1.0.conv1.weight"):
    # The 7x7 stem tells a torchvision ResNet from CLIP's three-conv 3x3 stem.
    if shapes.get(prefix + "conv1.weight") != (64, 3, 7, 7):
      continue
    block = "bottleneck" if prefix + "layer1.0.conv3.weight" in shapes else "basic"
    stage_sizes = tuple(
      layout.count_indices(keys, f"{prefix}layer{stage}.") for stage in (1, 2, 3, 4)
    )
    evidence = f"torchvision ResNet: {block} blocks {stage_sizes}"
    for arch in layout.matching_archs(
      specs.TORCHVISION_RESNET, block=block, stage_sizes=stage_sizes
    ):
      found.append(layout.Inference(arch, prefix, evidence))
  return found


FORMAT = layout.CheckpointFormat(
  name="torchvision ResNet",
  archs=tuple(
    arch for arch, spec in specs.TEACHER_SPECS.items() if spec.family == specs.TORCHVISION_RESNET
  ),
  rules=rules,
  ignored=(
    (r"^fc\.", "classifier / projection MLP (fc)"),
    (r"^(projection_head|prototypes|projector|predictor|head)\.", "projection head / prototypes"),
    (r"(^|\.)num_batches_tracked$", "BatchNorm step counters"),
  ),
  infer=infer,
)
