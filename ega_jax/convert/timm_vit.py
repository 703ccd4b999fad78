"""timm / DINO VisionTransformer checkpoints -> vit_s16, vit_s8, vit_b16, vit_b8 teachers.

DINO's released backbones (dino_deitsmall16_pretrain.pth, ...) and timm's vit_*_patch{8,16}_224
weights share these key names; full DINO training checkpoints keep the backbone under
'teacher' -> 'backbone.' (found automatically). A classifier or DINO projection `head` is ignored.
"""

from ega_jax.convert import common
from ega_jax.models.teachers import specs


def rules(spec: specs.TeacherSpec) -> list[common.Rule]:
  config = spec.config
  rules = common.conv_rules(('patch_embed',), 'patch_embed.proj', bias=True)
  rules += [
      # timm keeps a leading batch axis: cls_token (1, 1, D), pos_embed (1, N + 1, D).
      common.Rule(('params', 'class_token'), ('cls_token',), common.squeeze_leading(2)),
      common.Rule(('params', 'position_embedding'), ('pos_embed',), common.squeeze_leading(1),
                  hint=common.position_embedding_hint(config['patch_size'])),
  ]
  for index in range(config['depth']):
    block, torch_block = f'block_{index}', f'blocks.{index}'
    rules += common.layer_norm_rules((block, 'norm1'), f'{torch_block}.norm1')
    rules += common.dense_rules((block, 'attention', 'qkv'), f'{torch_block}.attn.qkv')
    rules += common.dense_rules((block, 'attention', 'out'), f'{torch_block}.attn.proj')
    rules += common.layer_norm_rules((block, 'norm2'), f'{torch_block}.norm2')
    rules += common.dense_rules((block, 'fc1'), f'{torch_block}.mlp.fc1')
    rules += common.dense_rules((block, 'fc2'), f'{torch_block}.mlp.fc2')
  rules += common.layer_norm_rules(('final_norm',), 'norm')
  return rules


def infer(shapes) -> list[common.Inference]:
  keys = list(shapes)
  found = []
  for prefix in common.prefixes_with(keys, 'patch_embed.proj.weight'):
    conv = shapes[prefix + 'patch_embed.proj.weight']
    if prefix + 'cls_token' not in shapes or len(conv) != 4:
      continue
    depth = common.count_indices(keys, prefix + 'blocks.')
    config = dict(patch_size=conv[-1], width=conv[0], depth=depth)
    evidence = 'timm/DINO ViT: patch {patch_size}, width {width}, {depth} blocks'.format(**config)
    for arch in common.matching_archs(specs.TIMM_VIT, **config):
      found.append(common.Inference(arch, prefix, evidence))
  return found


FORMAT = common.CheckpointFormat(
    name='timm/DINO ViT',
    archs=tuple(arch for arch, spec in specs.TEACHER_SPECS.items() if spec.family == specs.TIMM_VIT),
    rules=rules,
    ignored=((r'^head\.', 'classifier / DINO head'),),
    infer=infer,
)
