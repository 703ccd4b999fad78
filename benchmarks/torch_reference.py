"""The EGA train step in PyTorch, written independently of ega_jax, to time against.

The frozen teacher (clip-anytorch for clip_*, torchvision for resnet*, timm
for vit_*) in eval mode under no_grad on the image bicubic-resized to its
resolution and normalised, a CIFAR ResNet student (RepDistiller layout) in
train mode, the same heads (Linear to feature_dim + classifier on each side),
EGA + cross-entropy for the student and the teacher head's own cross-entropy,
each with its own SGD (momentum, weight decay), float32.

`TorchCifarResNet` is also the PyTorch reference of tests/test_students.py.
Import this module before anything imports tensorflow (the reverse order
segfaults on this stack).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable
import warnings

import torch
from torch import nn
import torch.nn.functional as F

from benchmarks import timing

# PyTorch CIFAR students: name -> (depth, (stem, stage1, stage2, stage3) widths).
TORCH_STUDENTS = {
  **{f"resnet{depth}": (depth, (16, 16, 32, 64)) for depth in (8, 14, 20, 32, 44, 56, 110)},
  "resnet8x4": (8, (32, 64, 128, 256)),
  "resnet32x4": (32, (32, 64, 128, 256)),
}
# timm model names of the timm/DINO teachers.
TIMM_NAMES = {
  "vit_s16": "vit_small_patch16_224",
  "vit_s8": "vit_small_patch8_224",
  "vit_b16": "vit_base_patch16_224",
  "vit_b8": "vit_base_patch8_224",
}


class TorchCifarBasicBlock(nn.Module):
  """RepDistiller's BasicBlock: conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU."""

  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or in_planes != planes:
      self.downsample = nn.Sequential(
        nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
      )

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    shortcut = x if self.downsample is None else self.downsample(x)
    return F.relu(out + shortcut)


class TorchCifarResNet(nn.Module):
  """RepDistiller's CIFAR ResNet (depth 6n + 2, basic blocks), its parameter names included.

  Its state_dict keys (conv1, bn1, layer{1,2,3}.{i}.*, fc) are those of
  RepDistiller's checkpoints and of ega_jax's students under the students'
  naming rule.
  """

  def __init__(self, depth: int, widths, num_classes: int):
    super().__init__()
    blocks_per_stage = (depth - 2) // 6
    self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(widths[0])
    in_planes = widths[0]
    for index, (planes, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
      blocks = []
      for block in range(blocks_per_stage):
        blocks.append(TorchCifarBasicBlock(in_planes, planes, stride if block == 0 else 1))
        in_planes = planes
      setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
    self.fc = nn.Linear(widths[3], num_classes)
    for module in self.modules():
      if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, images, is_feat: bool = False):
    """(B, 3, H, W) -> (logits (B, num_classes), feature (B, widths[3])).

    With is_feat (as RepDistiller's flag), also the list of maps: the stem's
    output and each stage's, (B, C, h, w).
    """
    x = F.relu(self.bn1(self.conv1(images)))
    maps = [x]
    for layer in (self.layer1, self.layer2, self.layer3):
      x = layer(x)
      maps.append(x)
    # Pool the whole final map (RepDistiller's AvgPool2d(8) at 32x32; the
    # JAX students pool the whole map too, so 28-px images work as well).
    feature = x.mean(dim=(2, 3))
    logits = self.fc(feature)
    return (logits, feature, maps) if is_feat else (logits, feature)


def build_torch_student(arch: str, num_classes: int) -> TorchCifarResNet:
  """The TORCH_STUDENTS entry `arch` with a `num_classes` classifier."""
  depth, widths = TORCH_STUDENTS[arch]
  return TorchCifarResNet(depth, widths, num_classes)


class TorchEmbeddingHead(nn.Module):
  """Linear node embedding to feature_dim, then the classifier on the embedding."""

  def __init__(self, in_features: int, feature_dim: int, num_classes: int):
    super().__init__()
    self.embed = nn.Linear(in_features, feature_dim)
    self.classifier = nn.Linear(feature_dim, num_classes)

  def forward(self, feature):
    """(B, in_features) -> (embedding (B, feature_dim), logits (B, num_classes))."""
    embedding = self.embed(feature)
    return embedding, self.classifier(embedding)


def torch_pearson_graph(x, eps: float = 1e-8):
  """(n, d) -> (n, n) Pearson correlation of the rows (variance floor eps)."""
  centred = x - x.mean(dim=1, keepdim=True)
  covariance = centred @ centred.t() / (x.shape[1] - 1)
  std = torch.sqrt(centred.pow(2).sum(dim=1) / (x.shape[1] - 1) + eps)
  return covariance / (std[:, None] * std[None, :])


def torch_ega_loss(teacher_emb, student_emb, node_weight: float = 0.8, edge_weight: float = 0.24):
  """EGA on (B, D) embeddings: node_weight ||N - I||_F + edge_weight ||E_t - E_s||_F."""
  batch = teacher_emb.shape[0]
  graph = torch_pearson_graph(torch.cat([teacher_emb, student_emb], dim=0))
  teacher_edges, student_edges = graph[:batch, :batch], graph[batch:, batch:]
  node_matrix = graph[:batch, batch:]
  identity = torch.eye(batch, dtype=graph.dtype, device=graph.device)
  return node_weight * torch.linalg.matrix_norm(
    node_matrix - identity
  ) + edge_weight * torch.linalg.matrix_norm(teacher_edges - student_edges)


def build_torch_teacher(arch: str, image_size: int) -> nn.Module:
  """A random-weight PyTorch teacher returning (B, embed_dim) embeddings."""
  from ega_jax.models.teachers import specs

  spec = specs.get_spec(arch)
  config = spec.config
  if spec.family in (specs.CLIP_VIT, specs.CLIP_RESNET):
    with warnings.catch_warnings():  # clip imports the deprecated pkg_resources.
      warnings.simplefilter("ignore")
      from clip import model as clip_model
    if spec.family == specs.CLIP_VIT:
      return clip_model.VisionTransformer(
        input_resolution=image_size,
        patch_size=config["patch_size"],
        width=config["width"],
        layers=config["depth"],
        heads=config["num_heads"],
        output_dim=config["output_dim"],
      )
    return clip_model.ModifiedResNet(
      layers=config["stage_sizes"],
      output_dim=config["output_dim"],
      heads=config["num_heads"],
      input_resolution=image_size,
      width=config["width"],
    )
  if spec.family == specs.TORCHVISION_RESNET:
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None)
    model.fc = nn.Identity()
    return model
  if spec.family == specs.TIMM_VIT:
    import timm

    return timm.create_model(TIMM_NAMES[arch], pretrained=False, num_classes=0, img_size=image_size)
  raise AssertionError(f"no PyTorch teacher for family {spec.family!r}")


def prepare_torch(
  config,
  local_batches: list[dict],
  teacher_image_size: int,
  *,
  num_threads: int | None = None,
  with_cached_step: bool = False,
) -> tuple[list[timing.TimedCall], Callable[..., dict]]:
  """Builds the PyTorch EGA step on the same synthetic batches (float32).

  Args:
    local_batches: the batches the JAX step gets ({'image', 'teacher_image':
      (b, H, W, 3) uint8, 'label', 'index': (b,)}).
    num_threads: torch.set_num_threads (None: os.cpu_count()).
    with_cached_step: also time the step fed float16 embeddings instead of
      running the teacher.

  Returns:
    its TimedCalls ('torch_step', 'torch_student_forward',
    'torch_student_forward_backward' [+ 'torch_cached_step']) and a function of
    their step times giving the result (images/s, the teacher's share of the
    step, losses).
  """
  from ega_jax import data as data_lib
  from ega_jax.models.teachers import specs

  torch.set_num_threads(num_threads or os.cpu_count())
  torch.manual_seed(config.seed)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  info = data_lib.get_dataset_info(config.dataset)
  spec = specs.get_spec(config.teacher.arch)
  student = build_torch_student(config.student.arch, info.num_classes).to(device).train()
  student_head = TorchEmbeddingHead(
    student.fc.in_features, config.feature_dim, info.num_classes
  ).to(device)
  teacher = build_torch_teacher(config.teacher.arch, teacher_image_size).to(device).eval()
  for parameter in teacher.parameters():
    parameter.requires_grad_(False)
  teacher_head = TorchEmbeddingHead(spec.embed_dim, config.feature_dim, info.num_classes).to(device)
  student_opt = torch.optim.SGD(
    list(student.parameters()) + list(student_head.parameters()),
    lr=config.learning_rate,
    momentum=config.momentum,
    weight_decay=config.weight_decay,
  )
  teacher_head_opt = torch.optim.SGD(
    teacher_head.parameters(),
    lr=config.teacher_head_learning_rate,
    momentum=config.teacher_head_momentum,
    weight_decay=config.teacher_head_weight_decay,
  )

  def channel_constant(values):
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)

  data_mean, data_std = channel_constant(info.mean), channel_constant(info.std)
  teacher_mean, teacher_std = channel_constant(spec.mean), channel_constant(spec.std)
  batches = [
    {key: torch.from_numpy(value) for key, value in batch.items()} for batch in local_batches
  ]
  batch_size = local_batches[0]["image"].shape[0]
  d = config.distill
  synchronise = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  step_count = [0]
  teacher_seconds = []
  losses = []

  generator = torch.Generator().manual_seed(config.seed + 1)
  cached_features = [
    torch.randn(batch_size, spec.embed_dim, generator=generator).half() for _ in batches
  ]

  def teacher_feature_of(batch):
    """The frozen teacher on the teacher view; its time goes to teacher_seconds."""
    start = time.perf_counter()
    with torch.no_grad():
      images = batch["teacher_image"].to(device).permute(0, 3, 1, 2).float() / 255.0
      if images.shape[-1] != teacher_image_size:
        images = F.interpolate(
          images, size=(teacher_image_size,) * 2, mode="bicubic", align_corners=False
        ).clamp_(0.0, 1.0)
      feature = teacher((images - teacher_mean) / teacher_std).float()
    synchronise()
    teacher_seconds.append(time.perf_counter() - start)
    return feature

  def run_step(cached: bool = False):
    index = step_count[0] % len(batches)
    batch = batches[index]
    step_count[0] += 1
    images = batch["image"].to(device).permute(0, 3, 1, 2).float() / 255.0
    labels = batch["label"].to(device).long()
    student_images = (images - data_mean) / data_std
    # As the JAX cached step: float16 embeddings read instead of the teacher.
    teacher_feature = (
      cached_features[index].to(device).float() if cached else teacher_feature_of(batch)
    )
    _, student_feature = student(student_images)
    student_emb, student_logits = student_head(student_feature)
    teacher_emb, teacher_logits = teacher_head(teacher_feature)
    ce = F.cross_entropy(student_logits, labels)
    teacher_ce = F.cross_entropy(teacher_logits, labels)
    distill = torch_ega_loss(teacher_emb.detach(), student_emb, d.node_weight, d.edge_weight)
    loss = d.gamma * ce + d.beta * distill
    student_opt.zero_grad()
    teacher_head_opt.zero_grad()
    # One backward: the teacher head only sees its CE (its embedding is
    # detached in the distillation term), the student only CE + EGA.
    (loss + teacher_ce).backward()
    student_opt.step()
    teacher_head_opt.step()
    return loss

  def wait(loss):
    synchronise()
    losses.append(loss.item())

  def result(times: list[float], cached_times: list[float] | None = None) -> dict:
    step_s = statistics.median(times)
    extra = {}
    if cached_times:
      extra["cached"] = {
        "step_time": timing.summarise_times(cached_times),
        "images_per_sec": batch_size / statistics.median(cached_times),
      }
    return {
      **extra,
      "device": str(device),
      "num_threads": torch.get_num_threads(),
      "torch_version": torch.__version__,
      "dtype": "float32",
      "step_time": timing.summarise_times(times),
      "steps_per_sec": 1.0 / step_s,
      "images_per_sec": batch_size / step_s,
      "teacher_forward_time_fraction": (statistics.median(teacher_seconds[-len(times) :]) / step_s),
      "first_loss": losses[0],
      "last_loss": losses[-1],
    }

  calls = [timing.TimedCall("torch_step", run_step, wait)]
  first_images = batches[0]["image"].to(device).permute(0, 3, 1, 2).float() / 255.0
  calls += student_calls(
    config.student.arch,
    info.num_classes,
    (first_images - data_mean) / data_std,
    batches[0]["label"].to(device).long(),
    synchronise,
  )
  if with_cached_step:
    calls.append(timing.TimedCall("torch_cached_step", lambda: run_step(cached=True), wait))
  return calls, result


def student_calls(
  arch: str, num_classes: int, images, labels, synchronise: Callable[[], None] = lambda: None
) -> list[timing.TimedCall]:
  """The PyTorch student alone, as `jax_harness.student_calls` times the JAX one.

  'torch_student_forward': the train-mode forward under no_grad (BatchNorm on
  batch statistics); 'torch_student_forward_backward': the forward and the
  gradient of the cross-entropy with respect to every parameter
  (`torch.autograd.grad`), ending with the loss's `.item()`.

  Args:
    images: (B, 3, H, W) float32, normalised; labels: (B,) int64.
  """
  student = build_torch_student(arch, num_classes).to(images.device).train()
  parameters = list(student.parameters())

  def forward():
    with torch.no_grad():
      logits, _ = student(images)
    synchronise()
    return logits

  def forward_backward():
    logits, _ = student(images)
    loss = F.cross_entropy(logits, labels)
    torch.autograd.grad(loss, parameters)
    return loss.item()

  return [
    timing.TimedCall("torch_student_forward", forward, lambda _: None),
    timing.TimedCall("torch_student_forward_backward", forward_backward, lambda _: None),
  ]
