"""OpenAI CLIP checkpoints (the TorchScript/state-dict files of github.com/openai/CLIP) ->
clip_vit_* and clip_rn* teachers.

Whole-model files hold the image tower under 'visual.' and the text tower at the top level; the
text tower is reported as ignored. A file holding only the visual tower works too (empty prefix).
"""

from ega_jax.convert import layout
from ega_jax.models.teachers import specs

# Keys of the text tower (and the scalars OpenAI's JIT archives carry), relative to the model root.
_TEXT_TOWER = (
  r"^(transformer\.|token_embedding\.|positional_embedding$|ln_final\.|"
  r"text_projection$|logit_scale$|input_resolution$|context_length$|vocab_size$)"
)


def vit_rules(spec: specs.TeacherSpec) -> list[layout.Rule]:
  config = spec.config
  rules = layout.conv_rules(("patch_embed",), "conv1")
  rules += [
    layout.Rule(("params", "class_token"), ("class_embedding",)),
    layout.Rule(
      ("params", "position_embedding"),
      ("positional_embedding",),
      hint=layout.position_embedding_hint(config["patch_size"]),
    ),
  ]
  rules += layout.layer_norm_rules(("pre_norm",), "ln_pre")
  for index in range(config["depth"]):
    block, torch_block = f"block_{index}", f"transformer.resblocks.{index}"
    rules += layout.layer_norm_rules((block, "norm1"), f"{torch_block}.ln_1")
    # nn.MultiheadAttention's fused in_proj is [q; k; v] stacked on the output axis.
    rules += [
      layout.Rule(
        ("params", block, "attention", "qkv", "kernel"),
        (f"{torch_block}.attn.in_proj_weight",),
        layout.LINEAR,
      ),
      layout.Rule(
        ("params", block, "attention", "qkv", "bias"), (f"{torch_block}.attn.in_proj_bias",)
      ),
    ]
    rules += layout.dense_rules((block, "attention", "out"), f"{torch_block}.attn.out_proj")
    rules += layout.layer_norm_rules((block, "norm2"), f"{torch_block}.ln_2")
    rules += layout.dense_rules((block, "fc1"), f"{torch_block}.mlp.c_fc")
    rules += layout.dense_rules((block, "fc2"), f"{torch_block}.mlp.c_proj")
  rules += layout.layer_norm_rules(("final_norm",), "ln_post")
  # `proj` is applied as x @ proj, so it is already (in, out).
  rules.append(layout.Rule(("params", "projection"), ("proj",)))
  return rules


def resnet_rules(spec: specs.TeacherSpec) -> list[layout.Rule]:
  config = spec.config
  rules = []
  for index in (1, 2, 3):
    rules += layout.conv_rules((f"conv{index}",), f"conv{index}")
    rules += layout.batch_norm_rules((f"bn{index}",), f"bn{index}")
  for stage, num_blocks in enumerate(config["stage_sizes"], start=1):
    for index in range(num_blocks):
      block, torch_block = f"layer{stage}_{index}", f"layer{stage}.{index}"
      for layer in (1, 2, 3):
        rules += layout.conv_rules((block, f"conv{layer}"), f"{torch_block}.conv{layer}")
        rules += layout.batch_norm_rules((block, f"bn{layer}"), f"{torch_block}.bn{layer}")
      # The first block of every stage changes width (64 -> 256 in stage 1) or stride, so it has
      # the shortcut Sequential('-1': AvgPool2d, '0': conv, '1': BN).
      if index == 0:
        rules += layout.conv_rules((block, "downsample_conv"), f"{torch_block}.downsample.0")
        rules += layout.batch_norm_rules((block, "downsample_bn"), f"{torch_block}.downsample.1")
  rules.append(
    layout.Rule(
      ("params", "attnpool", "positional_embedding"),
      ("attnpool.positional_embedding",),
      hint=layout.position_embedding_hint(32),
    )
  )
  for projection in ("q_proj", "k_proj", "v_proj", "c_proj"):
    rules += layout.dense_rules(("attnpool", projection), f"attnpool.{projection}")
  return rules


def rules(spec: specs.TeacherSpec) -> list[layout.Rule]:
  return vit_rules(spec) if spec.family == specs.CLIP_VIT else resnet_rules(spec)


def infer(shapes) -> list[layout.Inference]:
  keys = list(shapes)
  found = []
  for prefix in layout.prefixes_with(keys, "class_embedding"):
    conv, proj = shapes.get(prefix + "conv1.weight"), shapes.get(prefix + "proj")
    if conv is None or proj is None or len(conv) != 4 or len(proj) != 2:
      continue
    depth = layout.count_indices(keys, prefix + "transformer.resblocks.")
    config = dict(patch_size=conv[-1], width=conv[0], depth=depth, output_dim=proj[1])
    evidence = (
      "OpenAI CLIP visual transformer: patch {patch_size}, width {width}, {depth} "
      "blocks, output {output_dim}"
    ).format(**config)
    for arch in layout.matching_archs(specs.CLIP_VIT, **config):
      found.append(layout.Inference(arch, prefix, evidence))
  for prefix in layout.prefixes_with(keys, "attnpool.positional_embedding"):
    layer1 = shapes.get(prefix + "layer1.0.conv1.weight")
    c_proj = shapes.get(prefix + "attnpool.c_proj.weight")
    if layer1 is None or c_proj is None:
      continue
    stage_sizes = tuple(
      layout.count_indices(keys, f"{prefix}layer{stage}.") for stage in (1, 2, 3, 4)
    )
    config = dict(stage_sizes=stage_sizes, width=layer1[0], output_dim=c_proj[0])
    evidence = (
      "OpenAI CLIP modified ResNet: blocks {stage_sizes}, width {width}, output {output_dim}"
    ).format(**config)
    for arch in layout.matching_archs(specs.CLIP_RESNET, **config):
      found.append(layout.Inference(arch, prefix, evidence))
  return found


FORMAT = layout.CheckpointFormat(
  name="OpenAI CLIP",
  archs=tuple(
    arch
    for arch, spec in specs.TEACHER_SPECS.items()
    if spec.family in (specs.CLIP_VIT, specs.CLIP_RESNET)
  ),
  rules=rules,
  ignored=((r"(^|\.)num_batches_tracked$", "BatchNorm step counters"),),
  infer=infer,
  outside_labels=((_TEXT_TOWER, "CLIP text tower"),),
)
