"""The CIFAR student zoo of RepDistiller (CRD), in Flax linen.

``create_student(name, num_classes)`` builds one of STUDENT_NAMES with the
architecture and parameter count of RepDistiller's ``models/`` (100 classes:
resnet8 83,892 ... ResNet50 23,705,252). Every student maps NHWC images to
``(logits, features)``:

    logits, features = model.apply(variables, images, train=False)
    (logits, features), updates = model.apply(
        variables, images, train=True, mutable=['batch_stats'])

with ``features['penultimate']`` the (B, student_feature_dim(name)) pooled
vector that feeds the final fc (RepDistiller's ``feat[-1]``) and
``features['stages']`` the tuple of intermediate NHWC maps (the rest of its
``is_feat=True`` list, for hint losses).

Where RepDistiller pools with a fixed window sized for 32x32 (AvgPool2d(8),
avg_pool2d(4), MobileNetV2's AvgPool2d(input_size // 16)), these models pool
the whole final map: identical at 32x32 and valid at any input size. VGG adds
the max-pool before its last block for inputs of 64 and more, where
RepDistiller tests ``height == 64``.
"""

import functools
import numbers
from collections.abc import Callable

import jax.numpy as jnp
from flax import linen as nn

from ega_jax.models.students.mobilenet_v2 import MobileNetV2
from ega_jax.models.students.resnet import CifarResNet, ResNet50
from ega_jax.models.students.shufflenet import ShuffleNetV1, ShuffleNetV2
from ega_jax.models.students.vgg import VGG, VGG_BLOCK_WIDTHS
from ega_jax.models.students.wide_resnet import WideResNet

_CIFAR_RESNET_WIDTHS = (16, 16, 32, 64)
_CIFAR_RESNET_X4_WIDTHS = (32, 64, 128, 256)

# name -> (constructor taking num_classes, bn_axis_name and dtype,
#          width of features['penultimate'])
_STUDENTS: dict[str, tuple[Callable[..., nn.Module], int]] = {
  **{
    f"resnet{depth}": (
      functools.partial(CifarResNet, depth=depth, stage_widths=_CIFAR_RESNET_WIDTHS),
      64,
    )
    for depth in (8, 14, 20, 32, 44, 56, 110)
  },
  "resnet8x4": (functools.partial(CifarResNet, depth=8, stage_widths=_CIFAR_RESNET_X4_WIDTHS), 256),
  "resnet32x4": (
    functools.partial(CifarResNet, depth=32, stage_widths=_CIFAR_RESNET_X4_WIDTHS),
    256,
  ),
  "ResNet50": (ResNet50, 2048),
  "wrn_16_1": (functools.partial(WideResNet, depth=16, widen_factor=1), 64),
  "wrn_16_2": (functools.partial(WideResNet, depth=16, widen_factor=2), 128),
  "wrn_40_1": (functools.partial(WideResNet, depth=40, widen_factor=1), 64),
  "wrn_40_2": (functools.partial(WideResNet, depth=40, widen_factor=2), 128),
  **{
    name: (functools.partial(VGG, block_widths=block_widths), 512)
    for name, block_widths in VGG_BLOCK_WIDTHS.items()
  },
  "MobileNetV2": (MobileNetV2, 1280),
  "ShuffleV1": (ShuffleNetV1, 960),
  "ShuffleV2": (ShuffleNetV2, 1024),
}

STUDENT_NAMES: tuple[str, ...] = tuple(_STUDENTS)


def _check_name(name: str) -> None:
  if name not in _STUDENTS:
    raise ValueError(f"Unknown student {name!r}; valid names are: {', '.join(STUDENT_NAMES)}.")


def create_student(
  name: str, num_classes: int, *, bn_axis_name: str | None = None, dtype=jnp.float32
) -> nn.Module:
  """Builds a RepDistiller CIFAR student.

  Args:
    name: one of STUDENT_NAMES, e.g. 'resnet8x4', 'vgg13', 'ShuffleV1'.
    num_classes: width of the final fc (logits).
    bn_axis_name: named mesh axis (e.g. 'data') over which train-mode
      BatchNorm statistics are averaged; None for per-device statistics.
    dtype: computation dtype; parameters and BatchNorm statistics stay
      float32.

  Returns:
    A linen Module; ``apply(variables, images (B, H, W, 3), train=...)``
    returns ``(logits (B, num_classes), {'penultimate': (B, D),
    'stages': (NHWC maps, ...)})`` with D = student_feature_dim(name).
  """
  _check_name(name)
  if (
    isinstance(num_classes, bool)
    or not isinstance(num_classes, numbers.Integral)
    or num_classes < 1
  ):
    raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}.")
  constructor, _ = _STUDENTS[name]
  return constructor(num_classes=int(num_classes), bn_axis_name=bn_axis_name, dtype=dtype)


def student_feature_dim(name: str) -> int:
  """Width of ``features['penultimate']`` (the fc input) of student ``name``.

  Raises ValueError for a name not in STUDENT_NAMES.
  """
  _check_name(name)
  return _STUDENTS[name][1]


__all__ = ["STUDENT_NAMES", "create_student", "student_feature_dim"]
