"""timm / DINO VisionTransformer checkpoints -> vit_s16, vit_s8, vit_b16, vit_b8 teachers.

DINO's released backbones (dino_deitsmall16_pretrain.pth, ...) and timm's vit_*_patch{8,16}_224
weights share these key names; full DINO training checkpoints keep the backbone under
'teacher' -> 'backbone.' (found automatically). A classifier or DINO projection `head` is ignored.
"""

from ega_jax.convert import layout
from ega_jax.models.teachers import specs


def rules(spec: specs.TeacherSpec) -> list[layout.Rule]:
  config = spec.config
  rules = layout.conv_rules(("patch_embed",), "patch_embed.proj", bias=True)
  rules += [
    # timm keeps a leading batch axis: cls_token (1, 1, D), pos_embed (1, N + 1, D).
    layout.Rule(("params", "class_token"), ("cls_token",), layout.squeeze_leading(2)),
    layout.Rule(
      ("params", "position_embedding"),
      ("pos_embed",),
      layout.squeeze_leading(1),
      hint=layout.position_embedding_hint(config["patch_size"]),
    ),
  ]
  for index in range(config["depth"]):
    block, torch_block = f"block_{index}", f"blocks.{index}"
    rules += layout.layer_norm_rules((block, "norm1"), f"{torch_block}.norm1")
    rules += layout.dense_rules((block, "attention", "qkv"), f"{torch_block}.attn.qkv")
    rules += layout.dense_rules((block, "attention", "out"), f"{torch_block}.attn.proj")
    rules += layout.layer_norm_rules((block, "norm2"), f"{torch_block}.norm2")
    rules += layout.dense_rules((block, "fc1"), f"{torch_block}.mlp.fc1")
    rules += layout.dense_rules((block, "fc2"), f"{torch_block}.mlp.fc2")
  rules += layout.layer_norm_rules(("final_norm",), "norm")
  return rules


def infer(shapes) -> list[layout.Inference]:
  keys = list(shapes)
  found = []
  for prefix in layout.prefixes_with(keys, "patch_embed.proj.weight"):
    conv = shapes[prefix + "patch_embed.proj.weight"]
    if prefix + "cls_token" not in shapes or len(conv) != 4:
      continue
    depth = layout.count_indices(keys, prefix + "blocks.")
    config = dict(patch_size=conv[-1], width=conv[0], depth=depth)
    evidence = "timm/DINO ViT: patch {patch_size}, width {width}, {depth} blocks".format(**config)
    for arch in layout.matching_archs(specs.TIMM_VIT, **config):
      found.append(layout.Inference(arch, prefix, evidence))
  return found


FORMAT = layout.CheckpointFormat(
  name="timm/DINO ViT",
  archs=tuple(arch for arch, spec in specs.TEACHER_SPECS.items() if spec.family == specs.TIMM_VIT),
  rules=rules,
  ignored=((r"^head\.", "classifier / DINO head"),),
  infer=infer,
)
