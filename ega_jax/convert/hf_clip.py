"""Hugging Face transformers CLIP checkpoints (`CLIPModel`, `CLIPVisionModelWithProjection`;
pytorch_model.bin or model.safetensors) -> clip_vit_* teachers.

The embedding is `visual_projection(post_layernorm(class token))`, i.e. OpenAI's encode_image, so
a `CLIPVisionModel` file (no visual_projection) cannot be converted. q/k/v are separate Linear
layers here and are fused into the teacher's qkv kernel.
"""

import json
import os

from ega_jax.convert import errors, layout
from ega_jax.models.teachers import specs

_VISION = "vision_model"


def rules(spec: specs.TeacherSpec) -> list[layout.Rule]:
  config = spec.config
  embeddings = f"{_VISION}.embeddings"
  rules = layout.conv_rules(("patch_embed",), f"{embeddings}.patch_embedding")
  rules += [
    layout.Rule(("params", "class_token"), (f"{embeddings}.class_embedding",)),
    layout.Rule(
      ("params", "position_embedding"),
      (f"{embeddings}.position_embedding.weight",),
      hint=layout.position_embedding_hint(config["patch_size"]),
    ),
  ]
  # Sic: transformers spells it 'pre_layrnorm'.
  rules += layout.layer_norm_rules(("pre_norm",), f"{_VISION}.pre_layrnorm")
  for index in range(config["depth"]):
    block, torch_block = f"block_{index}", f"{_VISION}.encoder.layers.{index}"
    attention = f"{torch_block}.self_attn"
    rules += layout.layer_norm_rules((block, "norm1"), f"{torch_block}.layer_norm1")
    rules += [
      layout.Rule(
        ("params", block, "attention", "qkv", "kernel"),
        tuple(f"{attention}.{name}_proj.weight" for name in "qkv"),
        layout.CONCAT_LINEAR,
      ),
      layout.Rule(
        ("params", block, "attention", "qkv", "bias"),
        tuple(f"{attention}.{name}_proj.bias" for name in "qkv"),
        layout.CONCAT,
      ),
    ]
    rules += layout.dense_rules((block, "attention", "out"), f"{attention}.out_proj")
    rules += layout.layer_norm_rules((block, "norm2"), f"{torch_block}.layer_norm2")
    rules += layout.dense_rules((block, "fc1"), f"{torch_block}.mlp.fc1")
    rules += layout.dense_rules((block, "fc2"), f"{torch_block}.mlp.fc2")
  rules += layout.layer_norm_rules(("final_norm",), f"{_VISION}.post_layernorm")
  rules.append(layout.Rule(("params", "projection"), ("visual_projection.weight",), layout.LINEAR))
  return rules


def check_config(checkpoint_path: str, spec: specs.TeacherSpec) -> list[str]:
  """Checks the config.json saved beside the weights: the activation, LayerNorm eps and head
  count are not visible in the tensors (LAION's Hugging Face CLIPs, for one, use exact GELU)."""
  config_path = os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), "config.json")
  if not os.path.isfile(config_path):
    return [
      f"No config.json beside {checkpoint_path}: assuming OpenAI CLIP's QuickGELU, "
      f"LayerNorm eps 1e-5 and {spec.config['num_heads']} heads."
    ]
  try:
    with open(config_path) as handle:
      config = json.load(handle)
  except (OSError, json.JSONDecodeError) as error:
    raise errors.ConversionError(f"{config_path} is not readable JSON ({error}).") from None
  vision = config.get("vision_config", config)
  # transformers writes only the fields that differ from CLIPVisionConfig's defaults.
  found = {
    "hidden_act": vision.get("hidden_act", "quick_gelu"),
    "layer_norm_eps": vision.get("layer_norm_eps", 1e-5),
    "num_attention_heads": vision.get("num_attention_heads", 12),
  }
  needed = {
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "num_attention_heads": spec.config["num_heads"],
  }
  problems = [
    f"{field} {found[field]!r} (the teacher uses {needed[field]!r})"
    for field in needed
    if found[field] != needed[field]
  ]
  if problems:
    raise errors.ConversionError(
      f"{config_path} describes a model that {spec.arch} does not compute: {'; '.join(problems)}."
    )
  return [
    f"Checked {config_path}: quick_gelu, LayerNorm eps 1e-5, {spec.config['num_heads']} heads."
  ]


def infer(shapes) -> list[layout.Inference]:
  keys = list(shapes)
  found = []
  for prefix in layout.prefixes_with(keys, f"{_VISION}.embeddings.patch_embedding.weight"):
    conv = shapes[prefix + f"{_VISION}.embeddings.patch_embedding.weight"]
    projection = shapes.get(prefix + "visual_projection.weight")
    if projection is None or len(conv) != 4 or len(projection) != 2:
      continue
    depth = layout.count_indices(keys, f"{prefix}{_VISION}.encoder.layers.")
    config = dict(patch_size=conv[-1], width=conv[0], depth=depth, output_dim=projection[0])
    evidence = (
      "Hugging Face CLIP vision model: patch {patch_size}, width {width}, {depth} "
      "layers, projection {output_dim}"
    ).format(**config)
    for arch in layout.matching_archs(specs.CLIP_VIT, **config):
      found.append(layout.Inference(arch, prefix, evidence))
  return found


FORMAT = layout.CheckpointFormat(
  name="Hugging Face CLIP",
  archs=tuple(arch for arch, spec in specs.TEACHER_SPECS.items() if spec.family == specs.CLIP_VIT),
  rules=rules,
  ignored=(
    (r"^(text_model\.|text_projection\.|logit_scale$)", "CLIP text tower"),
    (r"(^|\.)position_ids$", "position-id buffers"),
  ),
  infer=infer,
  check_source=check_config,
)
