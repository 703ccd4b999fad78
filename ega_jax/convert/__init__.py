"""PyTorch checkpoint -> converted Flax teacher directory (see docs/converting.md).

    result = convert_checkpoint('ViT-B-32.pt', 'teachers/clip_vit_b32')           # arch inferred
    module, variables, meta = ega_jax.models.load_teacher('teachers/clip_vit_b32')

Only ega-convert imports this package; torch is imported when a file is read.
"""

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax

import ega_jax
from ega_jax.convert import clip, hf_clip, timm_vit, torchvision_resnet
from ega_jax.convert.errors import ConversionError
from ega_jax.convert.layout import CheckpointFormat
from ega_jax.convert.matching import (
  describe_ignored,
  describe_top_level,
  expected_keys,
  match_checkpoint,
  prefix_counts,
  select_prefix,
)
from ega_jax.convert.reading import Checkpoint, checkpoint_from_state_dict, read_checkpoint
from ega_jax.models.teachers import specs
from ega_jax.models.teachers.registry import abstract_variables, check_image_size, create_teacher
from ega_jax.models.teachers.storage import file_sha256, save_teacher

FORMATS: tuple[CheckpointFormat, ...] = (
  clip.FORMAT,
  hf_clip.FORMAT,
  torchvision_resnet.FORMAT,
  timm_vit.FORMAT,
)
ARCH_CHOICES = ("auto", *specs.TEACHER_SPECS)

__all__ = [
  "ARCH_CHOICES",
  "FORMATS",
  "Checkpoint",
  "ConversionError",
  "ConversionResult",
  "ConvertedTeacher",
  "checkpoint_from_state_dict",
  "convert_checkpoint",
  "convert_tensors",
  "infer_arch",
  "read_checkpoint",
]


@dataclasses.dataclass(frozen=True)
class ConversionResult:
  """What convert_checkpoint did.

  Attributes:
    arch: the teacher arch written.
    checkpoint_format: name of the checkpoint family, e.g. 'OpenAI CLIP'.
    prefix: the key prefix stripped from the checkpoint.
    output_dir: the directory written.
    metadata: the contents of teacher.json.
    ignored: {reason: [checkpoint keys]} for tensors left out on purpose.
  """

  arch: str
  checkpoint_format: str
  prefix: str
  output_dir: str
  metadata: dict[str, Any]
  ignored: dict[str, list[str]]


def infer_arch(checkpoint: Checkpoint) -> tuple[str, CheckpointFormat, str]:
  """Recognises the architecture from keys and shapes.

  Returns:
    (arch, its checkpoint format, a sentence saying what was recognised and where).

  Raises:
    ConversionError: nothing recognised, or more than one architecture fits.
  """
  shapes = checkpoint.shapes
  found = [
    (checkpoint_format, inference)
    for checkpoint_format in FORMATS
    for inference in checkpoint_format.infer(shapes)
  ]
  archs = sorted({(fmt.name, inference.arch) for fmt, inference in found})
  if not found:
    raise ConversionError(
      f"Could not recognise a teacher architecture in {checkpoint.path} (its keys start with: "
      f"{describe_top_level(list(shapes))}); pass --arch, one of: "
      f"{', '.join(specs.TEACHER_SPECS)}."
    )
  if len(archs) > 1:
    options = "; ".join(
      f"{inference.arch} ({inference.evidence}, prefix {inference.prefix!r})"
      for _, inference in found
    )
    raise ConversionError(f"{checkpoint.path} is ambiguous, it fits: {options}; pass --arch.")
  checkpoint_format, inference = found[0]
  prefixes = sorted({inference.prefix for _, inference in found})
  where = ", ".join(repr(prefix) for prefix in prefixes)
  return inference.arch, checkpoint_format, f"{inference.evidence} at prefix {where}"


def _choose_format(
  checkpoint: Checkpoint, spec: specs.TeacherSpec, prefix: str
) -> CheckpointFormat:
  """The checkpoint family whose key names fit best, among those that can produce `spec.arch`."""
  candidates = [fmt for fmt in FORMATS if spec.arch in fmt.archs]
  keys = list(checkpoint.tensors)

  def score(checkpoint_format):
    counts = prefix_counts(keys, expected_keys(checkpoint_format.rules(spec)))
    if prefix != "auto":
      return counts.get("" if prefix == "none" else prefix, 0)
    return max(counts.values(), default=0)

  return max(candidates, key=score)  # max keeps the first of equal scores.


def _check_statistics(name: str, values: Sequence[float] | None, positive: bool):
  if values is None:
    return None
  values = [float(v) for v in values]
  if len(values) != 3 or not all(math.isfinite(v) for v in values):
    raise ConversionError(f"--{name} needs 3 finite numbers (R G B), got {values}.")
  if positive and min(values) <= 0:
    raise ConversionError(f"--{name} values must be positive, got {values}.")
  return tuple(values)


@dataclasses.dataclass(frozen=True)
class ConvertedTeacher:
  """Flax variables built from a checkpoint, before anything is written.

  Attributes:
    arch: the teacher arch.
    checkpoint_format: name of the checkpoint family, e.g. 'OpenAI CLIP'.
    prefix: the key prefix stripped from the checkpoint.
    image_size: the resolution the variables were built for.
    variables: {'params': ..., 'batch_stats'?: ...} nested dicts of float32 NumPy arrays.
    tensors_used: number of checkpoint tensors consumed.
    ignored: {reason: [checkpoint keys]} for tensors left out on purpose.
  """

  arch: str
  checkpoint_format: str
  prefix: str
  image_size: int
  variables: dict[str, Any]
  tensors_used: int
  ignored: dict[str, list[str]]


def convert_tensors(
  checkpoint: Checkpoint,
  arch: str = "auto",
  prefix: str = "auto",
  image_size: int | None = None,
  log: Callable[[str], None] = print,
) -> ConvertedTeacher:
  """Strictly maps a read checkpoint onto a teacher's Flax variables (nothing is written).

  Args:
    checkpoint: from read_checkpoint or checkpoint_from_state_dict.
    arch: a TEACHER_SPECS name, or 'auto' to infer it from keys and shapes.
    prefix: 'auto', or the literal key prefix in front of the backbone's keys ('none' for none).
    image_size: input resolution to build for (default: the arch's).
    log: receives one line per step of the report.

  Raises:
    ConversionError: unknown arch, bad image size, or a checkpoint that does not fit (with the
      full list of missing / unexpected / mis-shaped keys).
  """
  if arch not in ARCH_CHOICES:
    raise ConversionError(f"Unknown --arch {arch!r}; valid: {', '.join(ARCH_CHOICES)}.")
  if arch == "auto":
    arch, checkpoint_format, evidence = infer_arch(checkpoint)
    log(f"Architecture: {arch} (inferred from {evidence})")
  else:
    checkpoint_format = _choose_format(checkpoint, specs.TEACHER_SPECS[arch], prefix)
    log(f"Architecture: {arch} (given)")
  spec = specs.TEACHER_SPECS[arch]
  try:
    image_size = check_image_size(arch, spec.image_size if image_size is None else image_size)
  except ValueError as error:
    raise ConversionError(f"--image_size: {error}") from None

  if checkpoint_format.check_source is not None and os.path.isfile(checkpoint.path):
    for line in checkpoint_format.check_source(checkpoint.path, spec):
      log(line)
  rules = checkpoint_format.rules(spec)
  prefix = select_prefix(checkpoint, rules, prefix, arch)
  module = create_teacher(arch, image_size=image_size)
  shapes = {
    tuple(str(getattr(entry, "key", entry)) for entry in path): tuple(leaf.shape)
    for path, leaf in jax.tree.flatten_with_path(abstract_variables(module, image_size))[0]
  }
  matched = match_checkpoint(checkpoint, checkpoint_format, rules, shapes, prefix, arch)
  log(
    f"Format: {checkpoint_format.name}, prefix {prefix!r}: used {matched.consumed} tensors for "
    f"{len(rules)} Flax arrays"
  )
  for line in describe_ignored(matched.ignored):
    log(f"Ignored {line}")
  return ConvertedTeacher(
    arch,
    checkpoint_format.name,
    prefix,
    image_size,
    matched.variables,
    matched.consumed,
    matched.ignored,
  )


def convert_checkpoint(
  checkpoint_path: str,
  output_dir: str,
  arch: str = "auto",
  prefix: str = "auto",
  image_size: int | None = None,
  mean: Sequence[float] | None = None,
  std: Sequence[float] | None = None,
  allow_pickle: bool = False,
  log: Callable[[str], None] = print,
) -> ConversionResult:
  """Converts a PyTorch checkpoint file into a teacher directory readable by load_teacher.

  Args:
    checkpoint_path: .pt/.pth/.pth.tar/.bin (plain, wrapped or TorchScript) or .safetensors.
    output_dir: directory to write variables.msgpack and teacher.json into (created).
    arch, prefix, image_size: as for convert_tensors.
    mean, std: per-channel normalisation to record (default: the arch's).
    allow_pickle: let torch.load unpickle arbitrary objects (trusted files only).
    log: receives one line per step of the report.

  Raises:
    ConversionError: unreadable file, unknown arch, bad override, or a checkpoint that does not
      fit; nothing is written then.
  """
  if arch not in ARCH_CHOICES:
    raise ConversionError(f"Unknown --arch {arch!r}; valid: {', '.join(ARCH_CHOICES)}.")
  mean = _check_statistics("mean", mean, positive=False)
  std = _check_statistics("std", std, positive=True)

  checkpoint = read_checkpoint(checkpoint_path, allow_pickle=allow_pickle)
  where = f" at checkpoint{checkpoint.location}" if checkpoint.location else ""
  log(
    f"Read {checkpoint_path}: {checkpoint.container}{where}, {len(checkpoint.tensors)} tensors"
    + (f", {checkpoint.upcast} upcast from 16-bit to float32" if checkpoint.upcast else "")
  )
  for skipped in checkpoint.skipped_wrappers:
    log(f"Ignored {skipped} (another state dict in the file; not used)")
  converted = convert_tensors(checkpoint, arch, prefix, image_size, log)
  spec = specs.TEACHER_SPECS[converted.arch]
  metadata = {
    "arch": converted.arch,
    "embed_dim": spec.embed_dim,
    "image_size": converted.image_size,
    "mean": list(mean or spec.mean),
    "std": list(std or spec.std),
    "source": {
      "file": os.path.basename(checkpoint_path),
      "sha256": file_sha256(checkpoint_path),
      "format": converted.checkpoint_format,
      "container": checkpoint.container,
      "location": checkpoint.location or None,
      "prefix": converted.prefix,
      "tensors_used": converted.tensors_used,
      "tensors_ignored": sum(len(keys) for keys in converted.ignored.values()),
    },
    "tool": {"name": "ega_jax.convert", "version": ega_jax.__version__},
  }
  try:
    metadata = save_teacher(output_dir, converted.variables, metadata)
  except OSError as error:
    raise ConversionError(f"Cannot write the teacher to {output_dir} ({error}).") from None
  log(
    f"Wrote {output_dir}: {converted.arch}, embed_dim {spec.embed_dim}, image_size "
    f"{converted.image_size}, mean {tuple(metadata['mean'])}, std {tuple(metadata['std'])}"
  )
  return ConversionResult(
    converted.arch,
    converted.checkpoint_format,
    converted.prefix,
    output_dir,
    metadata,
    converted.ignored,
  )
