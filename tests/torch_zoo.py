"""PyTorch re-statements of the 22 CIFAR students, the references of tests/test_students.py.

`build_torch_zoo_student(name, num_classes)` builds, for every name in
ega_jax.models.students.STUDENT_NAMES, a small PyTorch module with the
architecture of the released class and exactly its `state_dict()` keys:

* the CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4): the class of
  EGA's release (yccm/EGA, models/resnet.py), which is RepDistiller's with the
  final `fc` commented out, so no fc.* keys and no logits;
* ResNet50, wrn_*, vgg* (the *_bn variants RepDistiller's model_dict maps them
  to), MobileNetV2 (RepDistiller's mobile_half), ShuffleV1, ShuffleV2: the
  classes of HobbitLong/RepDistiller's models/ (resnetv2.py, wrn.py, vgg.py,
  mobilenetv2.py, ShuffleNetv1.py, ShuffleNetv2.py), final classifier included
  under its name there (CLASSIFIER_PREFIXES).

The key names come from those classes' attribute names and nn.Sequential /
nn.ModuleList indices; parameter-free parts (ReLUs, pools, shuffles, empty
shortcuts) add none. The modules are written here from the architectures (no
code is copied) and only run the forward pass: no RepDistiller initialisation,
the tests load Flax weights into them.

Every module's `forward(x)` takes (B, 3, H, W) float images and returns
`(pooled, logits)`: `pooled` (B, D) is the input of the final classifier
(RepDistiller's feat[-1]) and `logits` (B, num_classes) or None where the class
has no classifier. `forward(x, is_feat=True)` appends the list of NCHW maps of
RepDistiller's feat[:-1] (post-ReLU). The final map is pooled whole, which is
RepDistiller's fixed window (AvgPool2d(8), avg_pool2d(4), ...) at 32x32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.torch_reference import TORCH_STUDENTS, TorchCifarResNet

# name -> key prefix of the final classifier in the released class's
# state_dict, None where the class has none (EGA's CIFAR ResNets).
CLASSIFIER_PREFIXES: dict[str, str | None] = {
  **{name: None for name in TORCH_STUDENTS},
  "ResNet50": "linear",
  **{name: "fc" for name in ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2")},
  **{name: "classifier" for name in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")},
  # A one-element nn.Sequential in RepDistiller (a Dropout before it is
  # commented out), hence the index.
  "MobileNetV2": "classifier.0",
  "ShuffleV1": "linear",
  "ShuffleV2": "linear",
}


def _pool(x: torch.Tensor) -> torch.Tensor:
  """(B, C, h, w) -> (B, C): the mean of the whole final map."""
  return x.mean(dim=(2, 3))


def _outputs(pooled, logits, maps, is_feat):
  return (pooled, logits, maps) if is_feat else (pooled, logits)


def _bn_conv(in_planes, out_planes, kernel_size, stride=1, groups=1):
  """(conv without bias, BatchNorm) with PyTorch's `kernel_size // 2` padding."""
  conv = nn.Conv2d(
    in_planes, out_planes, kernel_size, stride, kernel_size // 2, groups=groups, bias=False
  )
  return conv, nn.BatchNorm2d(out_planes)


# ------------------------------------------------------------ CIFAR ResNets


class ReleasedCifarResNet(TorchCifarResNet):
  """EGA's released CIFAR ResNet: benchmarks' RepDistiller layout without the fc.

  The fc becomes a parameter-free identity, so the state_dict holds no fc.*
  key (EGA comments `self.fc` out) and the parent's forward passes the pooled
  feature through unchanged.
  """

  def __init__(self, depth: int, widths):
    super().__init__(depth, widths, num_classes=1)
    self.fc = nn.Identity()

  def forward(self, x, is_feat: bool = False):
    _, pooled, maps = super().forward(x, is_feat=True)
    return _outputs(pooled, None, maps, is_feat)


# ----------------------------------------------------------------- ResNet50


class _Bottleneck(nn.Module):
  """resnetv2.py's Bottleneck: 1x1, 3x3 (strided), 1x1 to 4 * planes, shortcut."""

  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    out_planes = 4 * planes
    self.conv1, self.bn1 = _bn_conv(in_planes, planes, 1)
    self.conv2, self.bn2 = _bn_conv(planes, planes, 3, stride)
    self.conv3, self.bn3 = _bn_conv(planes, out_planes, 1)
    # An empty nn.Sequential is the identity and holds no keys, as RepDistiller's.
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != out_planes:
      self.shortcut = nn.Sequential(*_bn_conv(in_planes, out_planes, 1, stride))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return F.relu(out + self.shortcut(x))


class ResNet50(nn.Module):
  """resnetv2.py's ResNet50: 3x3 stem, no max-pool, [3, 4, 6, 3] bottlenecks."""

  def __init__(self, num_classes: int):
    super().__init__()
    self.conv1, self.bn1 = _bn_conv(3, 64, 3)
    in_planes = 64
    for index, (planes, num_blocks, stride) in enumerate(
      zip((64, 128, 256, 512), (3, 4, 6, 3), (1, 2, 2, 2)), start=1
    ):
      blocks = []
      for block in range(num_blocks):
        blocks.append(_Bottleneck(in_planes, planes, stride if block == 0 else 1))
        in_planes = 4 * planes
      setattr(self, f"layer{index}", nn.Sequential(*blocks))
    self.linear = nn.Linear(2048, num_classes)

  def forward(self, x, is_feat: bool = False):
    x = F.relu(self.bn1(self.conv1(x)))
    maps = [x]
    for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
      x = layer(x)
      maps.append(x)
    pooled = _pool(x)
    return _outputs(pooled, self.linear(pooled), maps, is_feat)


# ------------------------------------------------------------- Wide ResNets


class _WideBlock(nn.Module):
  """wrn.py's pre-activation BasicBlock (dropout 0, as the zoo builds it).

  Where the width changes, both the 3x3 branch and the 1x1 shortcut read the
  pre-activated input; where it does not, the shortcut is the raw input.
  """

  def __init__(self, in_planes: int, out_planes: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_planes)
    self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
    # None (no keys) for the identity shortcut, as in RepDistiller.
    self.convShortcut = None
    if in_planes != out_planes:
      self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

  def forward(self, x):
    preactivated = F.relu(self.bn1(x))
    out = self.conv1(preactivated)
    out = self.conv2(F.relu(self.bn2(out)))
    shortcut = x if self.convShortcut is None else self.convShortcut(preactivated)
    return shortcut + out


class _NetworkBlock(nn.Module):
  """One WRN stage; its blocks sit under `.layer`, as in wrn.py."""

  def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int):
    super().__init__()
    self.layer = nn.Sequential(
      *(
        _WideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
        for i in range(num_blocks)
      )
    )

  def forward(self, x):
    return self.layer(x)


class WideResNet(nn.Module):
  """wrn.py's WideResNet: bare 3x3 stem, three stages, final BN-ReLU, fc."""

  def __init__(self, depth: int, widen_factor: int, num_classes: int):
    super().__init__()
    num_blocks = (depth - 4) // 6
    widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
    self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
    self.block1 = _NetworkBlock(num_blocks, widths[0], widths[1], 1)
    self.block2 = _NetworkBlock(num_blocks, widths[1], widths[2], 2)
    self.block3 = _NetworkBlock(num_blocks, widths[2], widths[3], 2)
    self.bn1 = nn.BatchNorm2d(widths[3])
    self.fc = nn.Linear(widths[3], num_classes)

  def forward(self, x, is_feat: bool = False):
    x = self.conv1(x)
    maps = [x]
    for block in (self.block1, self.block2, self.block3):
      x = block(x)
      maps.append(x)
    # feat holds the stage outputs before this final BN-ReLU.
    pooled = _pool(F.relu(self.bn1(x)))
    return _outputs(pooled, self.fc(pooled), maps, is_feat)


# --------------------------------------------------------------------- VGG

# Convs per block (each 3x3 with bias, BN, ReLU): RepDistiller's cfg 'S', 'A',
# 'B', 'D', 'E'.
_VGG_CONFIGS = {
  "vgg8": ((64,), (128,), (256,), (512,), (512,)),
  "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
  "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
  "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
  "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


class VGG(nn.Module):
  """vgg.py's VGG with BatchNorm: five blocks, max-pools between, one Linear."""

  def __init__(self, config, num_classes: int):
    super().__init__()
    in_planes = 3
    for index, widths in enumerate(config):
      # [conv, BN, ReLU] per conv: the conv of the j-th sits at index 3j, its
      # BN at 3j + 1 (RepDistiller drops the block's last ReLU and applies it
      # in forward; keeping it here changes neither keys nor values).
      block = []
      for width in widths:
        block += [nn.Conv2d(in_planes, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU()]
        in_planes = width
      setattr(self, f"block{index}", nn.Sequential(*block))
    self.classifier = nn.Linear(512, num_classes)

  def forward(self, x, is_feat: bool = False):
    height = x.shape[2]
    maps = []
    for index in range(5):
      # No pool before block 4 at 32x32 (it runs at 4x4 like block 3); one
      # there only for 64-pixel inputs, RepDistiller's `h == 64` test.
      if index in (1, 2, 3) or (index == 4 and height == 64):
        x = F.max_pool2d(x, 2, 2)
      x = getattr(self, f"block{index}")(x)
      maps.append(x)
    pooled = _pool(x)
    return _outputs(pooled, self.classifier(pooled), maps, is_feat)


# -------------------------------------------------------------- MobileNetV2


class _InvertedResidual(nn.Module):
  """mobilenetv2.py's block: `conv` = [1x1, BN, ReLU, 3x3 dw, BN, ReLU, 1x1, BN]."""

  def __init__(self, in_planes: int, out_planes: int, stride: int, expansion: int):
    super().__init__()
    hidden = in_planes * expansion
    self.residual = stride == 1 and in_planes == out_planes
    # The expanding 1x1 exists even at expansion 1 (stage 0), as in RepDistiller.
    self.conv = nn.Sequential(
      *_bn_conv(in_planes, hidden, 1),
      nn.ReLU(),
      *_bn_conv(hidden, hidden, 3, stride, groups=hidden),
      nn.ReLU(),
      *_bn_conv(hidden, out_planes, 1),
    )

  def forward(self, x):
    out = self.conv(x)
    return x + out if self.residual else out


# (expansion, width before the 0.5 multiplier, blocks, first stride); None is T.
_MOBILENET_STAGES = (
  (1, 16, 1, 1),
  (None, 24, 2, 1),
  (None, 32, 3, 2),
  (None, 64, 4, 2),
  (None, 96, 3, 1),
  (None, 160, 3, 2),
  (None, 320, 1, 1),
)


class MobileNetV2(nn.Module):
  """mobilenetv2.py's mobile_half: T = 6, width 0.5, last conv kept at 1280."""

  def __init__(self, num_classes: int, expansion: int = 6, width_multiplier: float = 0.5):
    super().__init__()
    in_planes = int(32 * width_multiplier)
    self.conv1 = nn.Sequential(*_bn_conv(3, in_planes, 3, 2), nn.ReLU())
    self.blocks = nn.ModuleList()
    for stage_expansion, width, num_blocks, stride in _MOBILENET_STAGES:
      out_planes = int(width * width_multiplier)
      stage = []
      for block in range(num_blocks):
        stage.append(
          _InvertedResidual(
            in_planes,
            out_planes,
            stride if block == 0 else 1,
            expansion if stage_expansion is None else stage_expansion,
          )
        )
        in_planes = out_planes
      self.blocks.append(nn.Sequential(*stage))
    self.conv2 = nn.Sequential(*_bn_conv(in_planes, 1280, 1), nn.ReLU())
    self.classifier = nn.Sequential(nn.Linear(1280, num_classes))

  def forward(self, x, is_feat: bool = False):
    x = self.conv1(x)
    maps = [x]
    for index, stage in enumerate(self.blocks):
      x = stage(x)
      # RepDistiller's feat: after stages 1, 2, 4 and 6.
      if index in (1, 2, 4, 6):
        maps.append(x)
    # AvgPool2d(2, ceil_mode=True) there: the whole 2x2 map at 32x32.
    pooled = _pool(self.conv2(x))
    return _outputs(pooled, self.classifier(pooled), maps, is_feat)


# --------------------------------------------------------------- ShuffleNets


def _channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
  """(N, g * c, H, W): channel k * c + j (group k) moves to j * g + k."""
  n, channels, h, w = x.shape
  return x.view(n, groups, channels // groups, h, w).transpose(1, 2).reshape(n, channels, h, w)


class _ShuffleV1Unit(nn.Module):
  """ShuffleNetv1.py's Bottleneck: grouped 1x1, shuffle, 3x3 dw, grouped 1x1.

  With stride 2 the shortcut is a 3x3/2 average pool concatenated after the
  branch, otherwise it is added.
  """

  def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
    super().__init__()
    mid = out_planes // 4
    # The 24-channel stem output is not split into groups (RepDistiller tests
    # in_planes == 24).
    self.first_groups = 1 if in_planes == 24 else groups
    self.stride = stride
    self.conv1, self.bn1 = _bn_conv(in_planes, mid, 1, groups=self.first_groups)
    self.conv2, self.bn2 = _bn_conv(mid, mid, 3, stride, groups=mid)
    self.conv3, self.bn3 = _bn_conv(mid, out_planes, 1, groups=groups)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = _channel_shuffle(out, self.first_groups)
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.stride == 2:
      # count_include_pad=True: PyTorch's default, RepDistiller's AvgPool2d.
      return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
    return F.relu(out + x)


class ShuffleV1(nn.Module):
  """ShuffleNetv1.py's ShuffleV1 (g = 3): 1x1 stem, stages of (240, 480, 960)."""

  def __init__(self, num_classes: int, groups: int = 3):
    super().__init__()
    self.conv1, self.bn1 = _bn_conv(3, 24, 1)
    in_planes = 24
    for index, (out_planes, num_blocks) in enumerate(zip((240, 480, 960), (4, 8, 4)), start=1):
      units = []
      for block in range(num_blocks):
        # The stride-2 unit concatenates its input, so its branch makes only
        # the missing channels.
        concatenated = in_planes if block == 0 else 0
        units.append(
          _ShuffleV1Unit(in_planes, out_planes - concatenated, 2 if block == 0 else 1, groups)
        )
        in_planes = out_planes
      setattr(self, f"layer{index}", nn.Sequential(*units))
    self.linear = nn.Linear(960, num_classes)

  def forward(self, x, is_feat: bool = False):
    x = F.relu(self.bn1(self.conv1(x)))
    maps = [x]
    for layer in (self.layer1, self.layer2, self.layer3):
      x = layer(x)
      maps.append(x)
    pooled = _pool(x)
    return _outputs(pooled, self.linear(pooled), maps, is_feat)


class _ShuffleV2DownUnit(nn.Module):
  """ShuffleNetv2.py's DownBlock: two stride-2 branches, concatenated, shuffled.

  Left: 3x3/2 dw-BN, 1x1-BN-ReLU (conv1/bn1, conv2/bn2). Right: 1x1-BN-ReLU,
  3x3/2 dw-BN, 1x1-BN-ReLU (conv3/bn3 ... conv5/bn5).
  """

  def __init__(self, in_planes: int, out_planes: int):
    super().__init__()
    mid = out_planes // 2
    self.conv1, self.bn1 = _bn_conv(in_planes, in_planes, 3, 2, groups=in_planes)
    self.conv2, self.bn2 = _bn_conv(in_planes, mid, 1)
    self.conv3, self.bn3 = _bn_conv(in_planes, mid, 1)
    self.conv4, self.bn4 = _bn_conv(mid, mid, 3, 2, groups=mid)
    self.conv5, self.bn5 = _bn_conv(mid, mid, 1)

  def forward(self, x):
    left = self.bn1(self.conv1(x))
    left = F.relu(self.bn2(self.conv2(left)))
    right = F.relu(self.bn3(self.conv3(x)))
    right = self.bn4(self.conv4(right))
    right = F.relu(self.bn5(self.conv5(right)))
    return _channel_shuffle(torch.cat([left, right], 1), 2)


class _ShuffleV2Unit(nn.Module):
  """ShuffleNetv2.py's BasicBlock: the second half of the channels goes through
  1x1-BN-ReLU, 3x3 dw-BN, 1x1-BN-ReLU; halves concatenated (kept half first),
  shuffled."""

  def __init__(self, planes: int):
    super().__init__()
    half = planes // 2
    self.conv1, self.bn1 = _bn_conv(half, half, 1)
    self.conv2, self.bn2 = _bn_conv(half, half, 3, groups=half)
    self.conv3, self.bn3 = _bn_conv(half, half, 1)

  def forward(self, x):
    kept, transformed = x.chunk(2, dim=1)
    out = F.relu(self.bn1(self.conv1(transformed)))
    out = self.bn2(self.conv2(out))
    out = F.relu(self.bn3(self.conv3(out)))
    return _channel_shuffle(torch.cat([kept, out], 1), 2)


class ShuffleV2(nn.Module):
  """ShuffleNetv2.py's ShuffleV2 (net_size 1): 1x1 stem, (116, 232, 464), 1x1 to 1024."""

  def __init__(self, num_classes: int):
    super().__init__()
    self.conv1, self.bn1 = _bn_conv(3, 24, 1)
    in_planes = 24
    for index, (out_planes, num_blocks) in enumerate(zip((116, 232, 464), (3, 7, 3)), start=1):
      # Index 0 is the stride-2 unit, 1 ... num_blocks the stride-1 ones.
      units = [_ShuffleV2DownUnit(in_planes, out_planes)]
      units += [_ShuffleV2Unit(out_planes) for _ in range(num_blocks)]
      setattr(self, f"layer{index}", nn.Sequential(*units))
      in_planes = out_planes
    self.conv2, self.bn2 = _bn_conv(464, 1024, 1)
    self.linear = nn.Linear(1024, num_classes)

  def forward(self, x, is_feat: bool = False):
    x = F.relu(self.bn1(self.conv1(x)))
    maps = [x]
    for layer in (self.layer1, self.layer2, self.layer3):
      x = layer(x)
      maps.append(x)
    pooled = _pool(F.relu(self.bn2(self.conv2(x))))
    return _outputs(pooled, self.linear(pooled), maps, is_feat)


# ----------------------------------------------------------------- registry


def build_torch_zoo_student(name: str, num_classes: int) -> nn.Module:
  """The released PyTorch class of student `name` (STUDENT_NAMES), float32.

  Its state_dict keys are those of the released class (CLASSIFIER_PREFIXES
  names the classifier, None where there is none); its parameters are
  PyTorch's defaults, to be overwritten with load_state_dict.
  """
  if name in TORCH_STUDENTS:
    depth, widths = TORCH_STUDENTS[name]
    return ReleasedCifarResNet(depth, widths)
  if name == "ResNet50":
    return ResNet50(num_classes)
  if name.startswith("wrn_"):
    depth, widen_factor = (int(part) for part in name.split("_")[1:])
    return WideResNet(depth, widen_factor, num_classes)
  if name in _VGG_CONFIGS:
    return VGG(_VGG_CONFIGS[name], num_classes)
  if name == "MobileNetV2":
    return MobileNetV2(num_classes)
  if name == "ShuffleV1":
    return ShuffleV1(num_classes)
  if name == "ShuffleV2":
    return ShuffleV2(num_classes)
  raise ValueError(f"no PyTorch re-statement of student {name!r}")
