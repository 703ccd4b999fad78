"""Converter tests: parity against the real PyTorch modules (random weights, no downloads),
release-shaped checkpoint files through the CLI, `--arch auto`, and strict key/shape matching.

Parity metric: max|flax - torch| / max|torch| <= 1e-4 in float32. The randomly initialised torch
modules get their constant tensors (BatchNorm statistics and affine parameters, LayerNorm
parameters, zero biases, CLIP's zero-initialised bn3) replaced by random values first, so every
tensor influences the output.
"""

import argparse
import fractions
import hashlib
import json
import os
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
import torchvision

with warnings.catch_warnings():
  warnings.simplefilter("ignore")  # clip imports the deprecated pkg_resources.
  import clip
import timm
import transformers

import ega_jax
from ega_jax.convert import (
  ConversionError,
  checkpoint_from_state_dict,
  convert_checkpoint,
  convert_tensors,
)
from ega_jax.models.teachers import abstract_variables, create_teacher, load_teacher
from ega_jax.models.teachers.storage import flatten_shapes
from launch import convert_teacher

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------------
# Helpers.


def randomize_constant_tensors(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Replaces every constant floating tensor (all elements equal) with random values."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
      if not tensor.is_floating_point() or tensor.numel() < 2:
        continue
      if torch.all(tensor == tensor.flatten()[0]):
        if name.endswith("running_var") or tensor.flatten()[0] == 1:
          tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
        else:
          tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
  return model.eval()


def random_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
  return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def torch_embeddings(forward, images: torch.Tensor) -> np.ndarray:
  with torch.no_grad():
    return forward(images).float().numpy()


def flax_embeddings(module, variables, images: torch.Tensor) -> np.ndarray:
  with jax.default_matmul_precision("highest"):
    return np.asarray(jax.jit(module.apply)(variables, images.numpy().transpose(0, 2, 3, 1)))


def assert_parity(flax_output: np.ndarray, torch_output: np.ndarray):
  assert flax_output.shape == torch_output.shape
  relative = np.abs(flax_output - torch_output).max() / np.abs(torch_output).max()
  assert relative <= TOLERANCE, f"relative error {relative:.2e}"


def assert_tree_matches_fresh_init(variables, arch: str, image_size: int):
  fresh = abstract_variables(create_teacher(arch, image_size=image_size), image_size)
  assert flatten_shapes(variables) == flatten_shapes(fresh)


def run_cli(capsys, *args) -> tuple[int, str, str]:
  code = convert_teacher.main([str(arg) for arg in args])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def convert_and_load(capsys, checkpoint, output, *flags):
  """CLI conversion that must succeed; returns (module, variables, meta, stdout)."""
  code, out, err = run_cli(capsys, "--checkpoint", checkpoint, "--output", output, *flags)
  assert code == 0, err
  module, variables, meta = load_teacher(str(output))
  assert_tree_matches_fresh_init(variables, meta["arch"], meta["image_size"])
  return module, variables, meta, out


def tiny_text_clip(vision_layers, vision_width, patch_size, embed_dim, image_resolution=224):
  """A real clip.model.CLIP whose text tower is tiny (it is ignored by the converter anyway)."""
  return clip.model.CLIP(
    embed_dim,
    image_resolution,
    vision_layers,
    vision_width,
    patch_size,
    context_length=77,
    vocab_size=1000,
    transformer_width=64,
    transformer_heads=1,
    transformer_layers=1,
  )


@pytest.fixture(scope="module")
def resnet18_model():
  return randomize_constant_tensors(torchvision.models.resnet18(), seed=0)


@pytest.fixture
def resnet18_checkpoint(tmp_path, resnet18_model):
  path = tmp_path / "resnet18.pth"
  torch.save(resnet18_model.state_dict(), path)
  return path


# ---------------------------------------------------------------------------------------------
# Fast: the demo teacher, strictness, prefixes, errors.


def test_demo_resnet18_at_32px_records_overrides(tmp_path, capsys, resnet18_model):
  """The offline demo's shape: torchvision ResNet-18 with a SimCLR MLP as fc, 32x32 inputs."""
  model = randomize_constant_tensors(torchvision.models.resnet18(), seed=3)
  model.fc = torch.nn.Sequential(
    torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128)
  )
  checkpoint = tmp_path / "fashion_mnist_resnet18.pth"
  torch.save(model.state_dict(), checkpoint)
  module, variables, meta, out = convert_and_load(
    capsys,
    checkpoint,
    tmp_path / "teacher",
    "--image_size",
    32,
    "--mean",
    0.2860,
    0.2860,
    0.2860,
    "--std",
    "0.3530,0.3530,0.3530",
  )
  assert "resnet18 (inferred" in out and "fc.0.weight" in out and "fc.2.weight" in out
  assert meta["arch"] == "resnet18" and meta["embed_dim"] == 512 and meta["image_size"] == 32
  assert meta["mean"] == [0.286] * 3 and meta["std"] == [0.353] * 3
  assert meta["source"]["file"] == "fashion_mnist_resnet18.pth"
  assert meta["source"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
  assert meta["tool"]["version"] == ega_jax.__version__
  model.fc = torch.nn.Identity()
  images = random_images(2, 32)
  assert_parity(flax_embeddings(module, variables, images), torch_embeddings(model, images))


@pytest.mark.parametrize(
  "damage,category,named",
  [
    ("missing", "missing keys (1)", "layer3.1.bn2.running_var (expected shape (256))"),
    ("unexpected", "unexpected keys (1)", "layer2.0.extra.weight (3)"),
    (
      "reshaped",
      "shape mismatches (1)",
      "layer4.0.conv1.weight: checkpoint has (256, 512, 3, 3), resnet18 needs (512, 256, 3, 3)",
    ),
  ],
)
def test_damaged_checkpoint_fails_naming_the_key(
  tmp_path, capsys, resnet18_model, damage, category, named
):
  state_dict = dict(resnet18_model.state_dict())
  if damage == "missing":
    del state_dict["layer3.1.bn2.running_var"]
  elif damage == "unexpected":
    state_dict["layer2.0.extra.weight"] = torch.zeros(3)
  else:
    state_dict["layer4.0.conv1.weight"] = state_dict["layer4.0.conv1.weight"].reshape(
      256, 512, 3, 3
    )
  checkpoint = tmp_path / "damaged.pth"
  torch.save(state_dict, checkpoint)
  output = tmp_path / "teacher"
  code, _, err = run_cli(
    capsys, "--arch", "resnet18", "--checkpoint", checkpoint, "--output", output
  )
  assert code == 1
  assert category in err and named in err
  assert sum(title in err for title in ("missing keys", "unexpected keys", "shape mismatches")) == 1
  assert "ignored on purpose: " in err and "classifier / projection MLP (fc): 2" in err
  assert not output.exists()


def test_prefix_selection(tmp_path, resnet18_model):
  state_dict = resnet18_model.state_dict()
  checkpoint = tmp_path / "two_encoders.pth"
  torch.save(
    {
      "model": {
        **{f"online.{k}": v for k, v in state_dict.items()},
        **{f"target.{k}": v for k, v in state_dict.items()},
      }
    },
    checkpoint,
  )
  with pytest.raises(ConversionError, match=r"Several prefixes .*'online\.'.*--prefix"):
    convert_checkpoint(str(checkpoint), str(tmp_path / "a"), arch="resnet18", log=lambda _: None)
  result = convert_checkpoint(
    str(checkpoint), str(tmp_path / "b"), arch="resnet18", prefix="target.", log=lambda _: None
  )
  assert result.prefix == "target." and result.metadata["source"]["location"] == "['model']"
  assert len(result.ignored["outside the prefix 'target.'"]) == len(state_dict)
  with pytest.raises(ConversionError, match=r"No key .* starts with --prefix 'student\.'"):
    convert_checkpoint(str(checkpoint), str(tmp_path / "c"), prefix="student.", log=lambda _: None)


def test_unknown_arch_and_unrecognised_checkpoint(tmp_path, capsys):
  checkpoint = tmp_path / "mystery.pth"
  torch.save({"encoder.weight": torch.ones(4, 4)}, checkpoint)
  code, _, err = run_cli(capsys, "--checkpoint", checkpoint, "--output", tmp_path / "out")
  assert code == 1 and "Could not recognise a teacher architecture" in err and "--arch" in err
  assert "resnet50" in err  # lists the valid names
  with pytest.raises(SystemExit):
    run_cli(capsys, "--arch", "resnet51", "--checkpoint", checkpoint, "--output", tmp_path / "out")
  assert "invalid choice: 'resnet51'" in capsys.readouterr().err
  with pytest.raises(ConversionError, match="Unknown --arch 'resnet51'; valid: auto, clip_vit_b32"):
    convert_checkpoint(str(checkpoint), str(tmp_path / "out"), arch="resnet51")
  code, _, err = run_cli(
    capsys, "--checkpoint", tmp_path / "absent.pth", "--output", tmp_path / "o"
  )
  assert code == 1 and "absent.pth does not exist" in err
  (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
  code, _, err = run_cli(
    capsys, "--checkpoint", tmp_path / "garbage.pth", "--output", tmp_path / "o"
  )
  assert code == 1 and "garbage.pth is not a readable PyTorch checkpoint" in err
  code, _, err = run_cli(
    capsys, "--checkpoint", checkpoint, "--output", tmp_path / "o", "--std", "1", "0", "1"
  )
  assert code == 1 and "--std values must be positive" in err


def test_pickled_objects_need_allow_pickle(tmp_path, resnet18_model):
  checkpoint = tmp_path / "with_objects.pth"
  torch.save(
    {"state_dict": resnet18_model.state_dict(), "ratio": fractions.Fraction(1, 3)}, checkpoint
  )
  with pytest.raises(ConversionError, match=r"object \(fractions.Fraction\).*--allow_pickle"):
    convert_checkpoint(str(checkpoint), str(tmp_path / "a"), log=lambda _: None)
  result = convert_checkpoint(
    str(checkpoint), str(tmp_path / "b"), allow_pickle=True, log=lambda _: None
  )
  assert result.arch == "resnet18"


def test_cli_runs_as_a_script(tmp_path, resnet18_checkpoint):
  output = tmp_path / "teacher"
  completed = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.convert_teacher",
      "--checkpoint",
      str(resnet18_checkpoint),
      "--output",
      str(output),
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert completed.returncode == 0, completed.stderr
  assert "Architecture: resnet18 (inferred" in completed.stdout
  assert "BatchNorm step counters: 20" in completed.stdout
  with open(output / "teacher.json") as handle:
    assert json.load(handle)["arch"] == "resnet18"
  assert (output / "variables.msgpack").is_file()


# ---------------------------------------------------------------------------------------------
# torchvision-layout ResNets.


@pytest.mark.slow
def test_moco_v2_resnet50_release_checkpoint(tmp_path, capsys):
  """{'state_dict': {'module.encoder_q.*', 'module.encoder_k.*', queue}} with the MLP head."""

  def encoder(seed):
    model = randomize_constant_tensors(torchvision.models.resnet50(), seed)
    model.fc = torch.nn.Sequential(
      torch.nn.Linear(2048, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 128)
    )
    return model

  query, key = encoder(1), encoder(2)
  state_dict = {f"module.encoder_q.{k}": v for k, v in query.state_dict().items()}
  state_dict.update({f"module.encoder_k.{k}": v for k, v in key.state_dict().items()})
  state_dict["module.queue"] = torch.randn(128, 4096)
  state_dict["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
  checkpoint = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
  torch.save(
    {
      "epoch": 800,
      "arch": "resnet50",
      "state_dict": state_dict,
      "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "params": [0, 1]}]},
    },
    checkpoint,
  )
  module, variables, meta, out = convert_and_load(capsys, checkpoint, tmp_path / "teacher")
  assert "resnet50 (inferred" in out and "prefix 'module.encoder_q.'" in out
  assert "module.encoder_q.fc.0.weight" in out
  assert meta["arch"] == "resnet50" and meta["source"]["location"] == "['state_dict']"
  query.fc = torch.nn.Identity()
  images = random_images(1, 224)
  assert_parity(flax_embeddings(module, variables, images), torch_embeddings(query, images))


@pytest.mark.slow
@pytest.mark.parametrize(
  "arch,forward", [("resnet34", True), ("resnet101", True), ("resnet152", False)]
)
def test_deeper_torchvision_resnets(arch, forward):
  """Converted tree vs a fresh init for all; parity at 64px where compiling the forward is
  affordable (ResNet-152 has ResNet-101's blocks, only more of them in stages 2 and 3)."""
  model = randomize_constant_tensors(getattr(torchvision.models, arch)(), seed=4)
  converted = convert_tensors(checkpoint_from_state_dict(model.state_dict()), log=lambda _: None)
  assert converted.arch == arch
  assert_tree_matches_fresh_init(converted.variables, arch, 224)
  if forward:
    model.fc = torch.nn.Identity()
    images = random_images(1, 64)
    assert_parity(
      flax_embeddings(create_teacher(arch), converted.variables, images),
      torch_embeddings(model, images),
    )


# ---------------------------------------------------------------------------------------------
# OpenAI CLIP.


@pytest.mark.slow
def test_openai_clip_vit_b32_torchscript_fp16_release(tmp_path, capsys):
  """Whole CLIP, fp16 weights, traced and saved as TorchScript like OpenAI's ViT-B-32.pt."""
  model = randomize_constant_tensors(tiny_text_clip(12, 768, 32, 512), seed=5)
  text = torch.randint(0, 1000, (1, 77))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # tracer warnings about Python control flow.
    traced = torch.jit.trace(model, (random_images(1, 224), text), check_trace=False)
  # The traced module shares the parameters, so this makes the archive's weights fp16 exactly as
  # OpenAI's build_model does (LayerNorms and embeddings stay fp32).
  clip.model.convert_weights(model)
  checkpoint = tmp_path / "ViT-B-32.pt"
  torch.jit.save(traced, str(checkpoint))
  module, variables, meta, out = convert_and_load(capsys, checkpoint, tmp_path / "teacher")
  assert "TorchScript archive" in out and "upcast from 16-bit" in out
  assert "clip_vit_b32 (inferred" in out and "Ignored CLIP text tower" in out
  assert meta["mean"] == [0.48145466, 0.4578275, 0.40821073]
  images = random_images(1, 224)
  assert_parity(
    flax_embeddings(module, variables, images), torch_embeddings(model.float().encode_image, images)
  )


@pytest.mark.slow
def test_openai_clip_rn50_fp16_state_dict(tmp_path, capsys):
  model = randomize_constant_tensors(tiny_text_clip((3, 4, 6, 3), 64, None, 1024), seed=6)
  clip.model.convert_weights(model)
  checkpoint = tmp_path / "RN50.pt"
  torch.save(model.state_dict(), checkpoint)
  module, variables, meta, out = convert_and_load(capsys, checkpoint, tmp_path / "teacher")
  assert "clip_rn50 (inferred" in out and "prefix 'visual.'" in out
  assert meta["embed_dim"] == 1024
  images = random_images(1, 224)
  assert_parity(
    flax_embeddings(module, variables, images), torch_embeddings(model.float().encode_image, images)
  )


@pytest.mark.slow
def test_openai_clip_vit_b16_visual_tower(tmp_path, capsys):
  visual = randomize_constant_tensors(clip.model.VisionTransformer(224, 16, 768, 12, 12, 512), 7)
  checkpoint = tmp_path / "visual.pth"
  torch.save(visual.state_dict(), checkpoint)
  module, variables, _, out = convert_and_load(
    capsys, checkpoint, tmp_path / "teacher", "--arch", "clip_vit_b16"
  )
  assert "OpenAI CLIP" in out
  images = random_images(1, 224)
  assert_parity(flax_embeddings(module, variables, images), torch_embeddings(visual, images))


@pytest.mark.slow
@pytest.mark.parametrize("arch,image_size", [("clip_vit_l14", 56), ("clip_rn101", 64)])
def test_openai_clip_large_towers_at_reduced_resolution(arch, image_size):
  """Full depth and width, fewer positions (the position embeddings follow the resolution)."""
  if arch == "clip_vit_l14":
    visual = clip.model.VisionTransformer(image_size, 14, 1024, 24, 16, 768)
  else:
    visual = clip.model.ModifiedResNet((3, 4, 23, 3), 512, 32, image_size, 64)
  randomize_constant_tensors(visual, seed=8)
  images = random_images(1, image_size)
  expected = torch_embeddings(visual, images)
  checkpoint = checkpoint_from_state_dict(
    {f"visual.{k}": v for k, v in visual.state_dict().items()}
  )
  converted = convert_tensors(checkpoint, image_size=image_size, log=lambda _: None)
  assert converted.arch == arch and converted.prefix == "visual."
  del visual, checkpoint
  assert_tree_matches_fresh_init(converted.variables, arch, image_size)
  module = create_teacher(arch, image_size=image_size)
  assert_parity(flax_embeddings(module, converted.variables, images), expected)


# ---------------------------------------------------------------------------------------------
# timm / DINO ViTs.


@pytest.mark.slow
def test_dino_vit_s16_release_state_dict(tmp_path, capsys):
  model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
  randomize_constant_tensors(model, seed=9)
  checkpoint = tmp_path / "dino_deitsmall16_pretrain.pth"
  torch.save(model.state_dict(), checkpoint)
  module, variables, meta, out = convert_and_load(capsys, checkpoint, tmp_path / "teacher")
  assert "vit_s16 (inferred" in out and meta["embed_dim"] == 384
  images = random_images(1, 224)
  assert_parity(flax_embeddings(module, variables, images), torch_embeddings(model, images))


@pytest.mark.slow
def test_timm_vit_b16_safetensors_with_classifier(tmp_path, capsys):
  model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
  randomize_constant_tensors(model, seed=10)
  checkpoint = tmp_path / "model.safetensors"
  safetensors.torch.save_file(model.state_dict(), str(checkpoint))
  module, variables, _, out = convert_and_load(capsys, checkpoint, tmp_path / "teacher")
  assert "vit_b16 (inferred" in out and "classifier / DINO head: 2" in out
  images = random_images(1, 224)
  pre_logits = lambda x: model.forward_head(model.forward_features(x), pre_logits=True)
  assert_parity(flax_embeddings(module, variables, images), torch_embeddings(pre_logits, images))


@pytest.mark.slow
def test_dino_vit_s8_full_training_checkpoint_at_64px(tmp_path, capsys):
  """DINO's checkpoint.pth: {'student', 'teacher': {'backbone.*', 'head.*'}, 'args', ...}."""
  model = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0, img_size=64)
  randomize_constant_tensors(model, seed=11)
  backbone = {f"backbone.{k}": v for k, v in model.state_dict().items()}
  head = {"head.mlp.0.weight": torch.randn(2048, 384), "head.last_layer.weight_g": torch.ones(1)}
  checkpoint = tmp_path / "checkpoint.pth"
  torch.save(
    {
      "student": {f"module.{k}": torch.zeros_like(v) for k, v in backbone.items()},
      "teacher": {**backbone, **head},
      "epoch": 100,
      "args": argparse.Namespace(arch="vit_small", patch_size=8),
    },
    checkpoint,
  )
  code, _, err = run_cli(capsys, "--checkpoint", checkpoint, "--output", tmp_path / "wrong")
  assert code == 1 and "pos_embed" in err and "--image_size 64" in err
  module, variables, meta, out = convert_and_load(
    capsys, checkpoint, tmp_path / "teacher", "--image_size", 64
  )
  assert "checkpoint['teacher']" in out and "prefix 'backbone.'" in out
  assert "Ignored checkpoint['student'] (another state dict" in out
  assert "outside the prefix 'backbone.': 2 (head.mlp.0.weight" in out
  assert meta["arch"] == "vit_s8" and meta["image_size"] == 64
  images = random_images(2, 64)
  assert_parity(flax_embeddings(module, variables, images), torch_embeddings(model, images))


@pytest.mark.slow
def test_timm_vit_b8_at_64px():
  model = timm.create_model("vit_base_patch8_224", pretrained=False, num_classes=0, img_size=64)
  randomize_constant_tensors(model, seed=12)
  converted = convert_tensors(
    checkpoint_from_state_dict(model.state_dict()), image_size=64, log=lambda _: None
  )
  assert converted.arch == "vit_b8"
  images = random_images(1, 64)
  assert_parity(
    flax_embeddings(create_teacher("vit_b8", image_size=64), converted.variables, images),
    torch_embeddings(model, images),
  )


# ---------------------------------------------------------------------------------------------
# Hugging Face CLIP.


def _hf_vision_config(image_size):
  return transformers.CLIPVisionConfig(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=image_size,
    patch_size=32,
    projection_dim=512,
  )


@pytest.mark.slow
def test_hf_clip_vision_model_with_projection_safetensors(tmp_path, capsys):
  model = transformers.CLIPVisionModelWithProjection(_hf_vision_config(224))
  randomize_constant_tensors(model, seed=13)
  model.save_pretrained(str(tmp_path / "hf"))
  module, variables, meta, out = convert_and_load(
    capsys, tmp_path / "hf" / "model.safetensors", tmp_path / "teacher"
  )
  assert "clip_vit_b32 (inferred" in out and "Hugging Face CLIP" in out
  assert "Checked" in out and "config.json: quick_gelu" in out
  images = random_images(1, 224)
  assert_parity(
    flax_embeddings(module, variables, images),
    torch_embeddings(lambda x: model(pixel_values=x).image_embeds, images),
  )
  # Exact-GELU CLIPs (LAION's) have the same tensors; only config.json tells them apart.
  config_path = tmp_path / "hf" / "config.json"
  config = json.loads(config_path.read_text())
  config["hidden_act"] = "gelu"
  config_path.write_text(json.dumps(config))
  code, _, err = run_cli(
    capsys, "--checkpoint", tmp_path / "hf" / "model.safetensors", "--output", tmp_path / "gelu"
  )
  assert code == 1 and "hidden_act 'gelu' (the teacher uses 'quick_gelu')" in err


@pytest.mark.slow
def test_hf_clip_model_pytorch_bin_with_text_tower(tmp_path, capsys):
  text_config = transformers.CLIPTextConfig(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=1,
    max_position_embeddings=77,
    projection_dim=512,
  )
  config = transformers.CLIPConfig(
    text_config=text_config.to_dict(),
    vision_config=_hf_vision_config(64).to_dict(),
    projection_dim=512,
  )
  model = randomize_constant_tensors(transformers.CLIPModel(config), seed=14)
  checkpoint = tmp_path / "pytorch_model.bin"
  torch.save(model.state_dict(), checkpoint)
  module, variables, _, out = convert_and_load(
    capsys, checkpoint, tmp_path / "teacher", "--arch", "clip_vit_b32", "--image_size", 64
  )
  assert "Hugging Face CLIP" in out and "Ignored CLIP text tower" in out
  images = random_images(2, 64)
  image_features = lambda x: model.get_image_features(pixel_values=x).pooler_output
  assert_parity(
    flax_embeddings(module, variables, images), torch_embeddings(image_features, images)
  )
