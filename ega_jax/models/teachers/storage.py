"""On-disk format of a converted teacher: a directory holding

  variables.msgpack  the Flax variables {'params': ..., 'batch_stats': ...} as float32 arrays
                     (flax.serialization msgpack);
  teacher.json       arch, embed_dim, image_size, mean, std, the variables file's sha256, and
                     where the weights came from (source file name and sha256, tool version).

Only `ega_jax.convert` writes it; training reads it with `load_teacher`.
"""

import json
import os
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from ega_jax.checksums import file_sha256  # noqa: F401  (re-exported for ega_jax.convert)
from ega_jax.models.teachers import specs
from ega_jax.models.teachers.registry import abstract_variables, create_teacher

VARIABLES_FILE = "variables.msgpack"
METADATA_FILE = "teacher.json"
FORMAT_VERSION = 1
REQUIRED_METADATA = ("arch", "embed_dim", "image_size", "mean", "std", "variables_sha256")


def flatten_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'params/block_0/fc1/kernel': shape, ...} for a nested dict of arrays or ShapeDtypeStructs."""
  flat = {}
  for path, leaf in jax.tree.flatten_with_path(tree)[0]:
    flat["/".join(str(getattr(entry, "key", entry)) for entry in path)] = tuple(leaf.shape)
  return flat


def tree_differences(found: Any, expected: Any, limit: int = 5) -> list[str]:
  """Human-readable differences between two variable trees' paths and shapes."""
  found_shapes, expected_shapes = flatten_shapes(found), flatten_shapes(expected)
  differences = [f"missing {path}" for path in expected_shapes if path not in found_shapes]
  differences += [f"unexpected {path}" for path in found_shapes if path not in expected_shapes]
  differences += [
    f"{path} has shape {found_shapes[path]}, expected {shape}"
    for path, shape in expected_shapes.items()
    if path in found_shapes and found_shapes[path] != shape
  ]
  if len(differences) > limit:
    differences = differences[:limit] + [f"... ({len(differences) - limit} more)"]
  return differences


def save_teacher(directory: str, variables: Any, metadata: dict[str, Any]) -> dict[str, Any]:
  """Writes `variables` and teacher.json (metadata + format version + variables sha256).

  Returns the metadata as written.
  """
  os.makedirs(directory, exist_ok=True)
  variables_path = os.path.join(directory, VARIABLES_FILE)
  numpy_variables = jax.tree.map(lambda x: np.asarray(x, np.float32), variables)
  with open(variables_path, "wb") as handle:
    handle.write(flax.serialization.msgpack_serialize(numpy_variables))
  metadata = dict(
    metadata,
    format_version=FORMAT_VERSION,
    variables_file=VARIABLES_FILE,
    variables_sha256=file_sha256(variables_path),
  )
  with open(os.path.join(directory, METADATA_FILE), "w") as handle:
    json.dump(metadata, handle, indent=2)
    handle.write("\n")
  return metadata


def _read_metadata(metadata_path: str) -> dict[str, Any]:
  try:
    with open(metadata_path) as handle:
      metadata = json.load(handle)
  except json.JSONDecodeError as error:
    raise ValueError(f"{metadata_path} is not valid JSON ({error}).") from None
  if not isinstance(metadata, dict):
    raise ValueError(f"{metadata_path} must hold a JSON object, found {type(metadata).__name__}.")
  missing = [key for key in REQUIRED_METADATA if key not in metadata]
  if missing:
    raise ValueError(
      f"{metadata_path} lacks the field(s) {', '.join(missing)}; reconvert the "
      "teacher with ega-convert."
    )
  arch = metadata["arch"]
  if arch not in specs.TEACHER_SPECS:
    raise ValueError(
      f"{metadata_path} names arch {arch!r}, which is not a known teacher; valid "
      f"teacher archs are: {', '.join(specs.TEACHER_SPECS)}."
    )
  for field in ("mean", "std"):
    value = metadata[field]
    if (
      not isinstance(value, list)
      or len(value) != 3
      or not all(isinstance(v, (int, float)) for v in value)
    ):
      raise ValueError(
        f"{metadata_path} field {field!r} must be a list of 3 numbers, got {value!r}."
      )
  if any(v <= 0 for v in metadata["std"]):
    raise ValueError(f"{metadata_path} field 'std' must be positive, got {metadata['std']!r}.")
  return metadata


def load_teacher(directory: str, dtype: Any = jnp.float32) -> tuple[nn.Module, Any, dict[str, Any]]:
  """Loads a teacher written by ega-convert.

  Args:
    directory: the converter's output directory.
    dtype: computation dtype of the returned module (parameters stay float32).

  Returns:
    (module, variables, meta): `module.apply(variables, images)` maps (B, S, S, 3) images with
    S = meta['image_size'], normalised with meta['mean'] / meta['std'], to (B, meta['embed_dim'])
    float32 embeddings; `meta` is the parsed teacher.json.

  Raises:
    FileNotFoundError / ValueError: one sentence naming the missing or unusable file.
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f"Teacher directory {directory} does not exist (convert a checkpoint "
      "into it with ega-convert)."
    )
  metadata_path = os.path.join(directory, METADATA_FILE)
  if not os.path.isfile(metadata_path):
    raise FileNotFoundError(
      f"{metadata_path} does not exist; {directory} is not a converted teacher directory."
    )
  metadata = _read_metadata(metadata_path)
  variables_path = os.path.join(directory, metadata.get("variables_file", VARIABLES_FILE))
  if not os.path.isfile(variables_path):
    raise FileNotFoundError(f"{variables_path} does not exist (named by {metadata_path}).")
  if file_sha256(variables_path) != metadata["variables_sha256"]:
    raise ValueError(
      f"{variables_path} is corrupt: its sha256 differs from the one recorded in {metadata_path}."
    )
  try:
    with open(variables_path, "rb") as handle:
      variables = flax.serialization.msgpack_restore(handle.read())
  except Exception as error:  # msgpack raises several unrelated types on damaged input.
    raise ValueError(f"{variables_path} is not a readable Flax msgpack file ({error}).") from None

  image_size = metadata["image_size"]
  try:
    module = create_teacher(metadata["arch"], dtype=dtype, image_size=image_size)
  except ValueError as error:
    raise ValueError(f"{metadata_path} is inconsistent: {error}") from None
  expected = abstract_variables(module, image_size)
  differences = tree_differences(variables, expected)
  if differences:
    raise ValueError(
      f"{variables_path} does not fit {metadata['arch']} at image_size "
      f"{image_size}: {'; '.join(differences)}."
    )
  spec_dim = specs.TEACHER_SPECS[metadata["arch"]].embed_dim
  if metadata["embed_dim"] != spec_dim:
    raise ValueError(
      f"{metadata_path} says embed_dim {metadata['embed_dim']}, but "
      f"{metadata['arch']} returns {spec_dim}."
    )
  variables = jax.tree.map(jnp.asarray, variables)
  return module, variables, metadata
