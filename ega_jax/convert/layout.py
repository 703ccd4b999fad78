"""What a checkpoint family declares, and the vocabulary it declares it in.

A family (clip.py, hf_clip.py, torchvision_resnet.py, timm_vit.py) only says which torch key(s)
feed each Flax array (`Rule`s built from `Transform`s), which keys are dropped on purpose
(`ignored`), and how to recognise its architectures from keys and shapes (`infer`, returning
`Inference`s), all bundled in one `CheckpointFormat`; reading.py reads the file and matching.py
does the strict matching.
"""

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ega_jax.models.teachers import specs

FlaxPath = tuple[str, ...]  # ('params', 'block_0', 'fc1', 'kernel'); first entry is the collection.


# ----------------------------------------------------------------------------------------------
# Transforms between torch tensors and Flax arrays.


@dataclasses.dataclass(frozen=True)
class Transform:
  """How torch tensor(s) become one Flax array.

  Attributes:
    name: for messages.
    to_flax: (list of torch-layout arrays, Flax shape) -> Flax array.
    torch_shapes: (Flax shape, number of torch keys) -> the torch shape each key must have.
  """

  name: str
  to_flax: Callable[[list[np.ndarray], tuple[int, ...]], np.ndarray]
  torch_shapes: Callable[[tuple[int, ...], int], list[tuple[int, ...]]]


IDENTITY = Transform("identity", lambda arrays, shape: arrays[0], lambda shape, n: [shape])
# torch Linear weight (out, in) -> Flax Dense kernel (in, out).
LINEAR = Transform(
  "linear", lambda arrays, shape: arrays[0].T, lambda shape, n: [(shape[1], shape[0])]
)
# torch Conv2d weight (O, I, kH, kW) -> Flax Conv kernel (kH, kW, I, O).
CONV = Transform(
  "conv",
  lambda arrays, shape: arrays[0].transpose(2, 3, 1, 0),
  lambda shape, n: [(shape[3], shape[2], shape[0], shape[1])],
)
# Separate q/k/v Linear weights, each (out, in) -> one fused kernel (in, n * out).
CONCAT_LINEAR = Transform(
  "concat_linear",
  lambda arrays, shape: np.concatenate(arrays, axis=0).T,
  lambda shape, n: [(shape[1] // n, shape[0])] * n,
)
# Separate q/k/v biases, each (out,) -> (n * out,).
CONCAT = Transform(
  "concat",
  lambda arrays, shape: np.concatenate(arrays, axis=0),
  lambda shape, n: [(shape[0] // n,)] * n,
)


def squeeze_leading(count: int) -> Transform:
  """torch shape (1,) * count + s -> Flax shape s (timm's cls_token (1, 1, D), pos_embed (1, N, D))."""
  return Transform(
    f"squeeze{count}",
    lambda arrays, shape: arrays[0].reshape(shape),
    lambda shape, n: [(1,) * count + tuple(shape)],
  )


@dataclasses.dataclass(frozen=True)
class Rule:
  """One Flax array and the torch key(s) (relative to the prefix) it is made from.

  `hint(found_shape)` may explain a shape mismatch in the user's terms (e.g. which --image_size a
  position embedding implies).
  """

  flax_path: FlaxPath
  torch_keys: tuple[str, ...]
  transform: Transform = IDENTITY
  hint: Callable[[tuple[int, ...]], str | None] | None = None


def dense_rules(flax_path: FlaxPath, torch_name: str, bias: bool = True) -> list[Rule]:
  """torch Linear `torch_name` -> Flax Dense at params/flax_path."""
  rules = [Rule(("params", *flax_path, "kernel"), (f"{torch_name}.weight",), LINEAR)]
  if bias:
    rules.append(Rule(("params", *flax_path, "bias"), (f"{torch_name}.bias",)))
  return rules


def conv_rules(flax_path: FlaxPath, torch_name: str, bias: bool = False) -> list[Rule]:
  """torch Conv2d `torch_name` -> Flax Conv at params/flax_path."""
  rules = [Rule(("params", *flax_path, "kernel"), (f"{torch_name}.weight",), CONV)]
  if bias:
    rules.append(Rule(("params", *flax_path, "bias"), (f"{torch_name}.bias",)))
  return rules


def layer_norm_rules(flax_path: FlaxPath, torch_name: str) -> list[Rule]:
  return [
    Rule(("params", *flax_path, "scale"), (f"{torch_name}.weight",)),
    Rule(("params", *flax_path, "bias"), (f"{torch_name}.bias",)),
  ]


def batch_norm_rules(flax_path: FlaxPath, torch_name: str) -> list[Rule]:
  """BatchNorm2d affine parameters to params/, running statistics to batch_stats/."""
  return [
    Rule(("params", *flax_path, "scale"), (f"{torch_name}.weight",)),
    Rule(("params", *flax_path, "bias"), (f"{torch_name}.bias",)),
    Rule(("batch_stats", *flax_path, "mean"), (f"{torch_name}.running_mean",)),
    Rule(("batch_stats", *flax_path, "var"), (f"{torch_name}.running_var",)),
  ]


def position_embedding_hint(patch_size: int, num_prefix_tokens: int = 1):
  """Explains a position-embedding shape mismatch as the input resolution it was trained for."""

  def hint(found_shape):
    if len(found_shape) < 2:
      return None
    grid = round((found_shape[-2] - num_prefix_tokens) ** 0.5)
    if grid * grid + num_prefix_tokens != found_shape[-2]:
      return None
    return (
      f"the checkpoint's position embedding is for a {grid}x{grid} grid, i.e. "
      f"--image_size {grid * patch_size}"
    )

  return hint


# ----------------------------------------------------------------------------------------------
# Checkpoint formats and inference results.


@dataclasses.dataclass(frozen=True)
class Inference:
  """An architecture recognised in a checkpoint: where, and from what evidence."""

  arch: str
  prefix: str
  evidence: str


@dataclasses.dataclass(frozen=True)
class CheckpointFormat:
  """A checkpoint family.

  Attributes:
    name: e.g. 'OpenAI CLIP'.
    archs: the registry names it converts.
    rules: spec -> the list of Rules covering every Flax array of that arch.
    ignored: (regex on a key relative to the prefix, reason) for keys under the prefix that are
      dropped on purpose (an fc, a projection head); any other unused key there is unexpected.
    infer: {key: shape} -> the architectures recognised in it.
    outside_labels: (regex on the full key, label) naming groups of keys outside the prefix in
      the report (e.g. the CLIP text tower); such keys are always ignored.
    check_source: optional (checkpoint path, spec) -> report lines; checks what the weights
      cannot show (e.g. the activation in a config.json beside them) and raises ConversionError
      if the teacher would compute something else.
  """

  name: str
  archs: tuple[str, ...]
  rules: Callable[[Any], list[Rule]]
  ignored: tuple[tuple[str, str], ...]
  infer: Callable[[Mapping[str, tuple[int, ...]]], list[Inference]]
  outside_labels: tuple[tuple[str, str], ...] = ()
  check_source: Callable[[str, Any], list[str]] | None = None

  def ignore_reason(self, relative_key: str) -> str | None:
    return _first_match(self.ignored, relative_key)

  def outside_label(self, key: str, prefix: str) -> str:
    return _first_match(self.outside_labels, key) or f"outside the prefix {prefix!r}"


def _first_match(patterns: Sequence[tuple[str, str]], key: str) -> str | None:
  for pattern, reason in patterns:
    if re.search(pattern, key):
      return reason
  return None


def matching_archs(family: str, **config) -> list[str]:
  """Registry names of `family` whose module config agrees with every given field."""
  return [
    spec.arch
    for spec in specs.TEACHER_SPECS.values()
    if spec.family == family and all(spec.config[k] == v for k, v in config.items())
  ]


def prefixes_with(keys: Sequence[str], suffix: str) -> list[str]:
  """Every prefix p (empty or ending in '.') such that p + suffix is a key."""
  found = []
  for key in keys:
    if key.endswith(suffix):
      prefix = key[: len(key) - len(suffix)]
      if prefix == "" or prefix.endswith("."):
        found.append(prefix)
  return found


def count_indices(keys: Sequence[str], prefix: str) -> int:
  """Number of distinct integers i such that some key starts with prefix + f'{i}.'."""
  pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
  return len({match.group(1) for key in keys if (match := pattern.match(key))})
