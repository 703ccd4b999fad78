"""Strict matching of a read checkpoint against a family's rules: choosing the key prefix,
building the Flax variables with every missing / unexpected / mis-shaped key reported at once, and
the report lines on what was ignored.
"""

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ega_jax.convert.errors import ConversionError
from ega_jax.convert.layout import CheckpointFormat, FlaxPath, Rule
from ega_jax.convert.reading import Checkpoint

# When several prefixes fit a checkpoint equally well (MoCo holds a query and a key encoder, MoCo v3
# a base and a momentum encoder), the earliest of these wins.
PREFERRED_PREFIXES = (
  "",
  "module.",
  "module.encoder_q.",
  "module.base_encoder.",
  "backbone.",
  "module.backbone.",
  "encoder.",
  "visual.",
  "module.visual.",
)

REPORT_EXAMPLES = 3  # keys shown per ignored group
REPORT_LIMIT = 20  # problems shown per category in a mismatch report


# ----------------------------------------------------------------------------------------------
# Prefix selection.


def expected_keys(rules: Sequence[Rule]) -> list[str]:
  return [key for rule in rules for key in rule.torch_keys]


def prefix_counts(keys: Sequence[str], wanted: Sequence[str]) -> collections.Counter:
  """For each prefix p (empty or ending in '.'), how many keys are p + (a wanted key)."""
  wanted = set(wanted)
  counts = collections.Counter()
  for key in keys:
    for position in [0] + [i + 1 for i, char in enumerate(key) if char == "."]:
      if key[position:] in wanted:
        counts[key[:position]] += 1
  return counts


def describe_top_level(keys: Sequence[str], limit: int = 8) -> str:
  """'visual. (150 keys), transformer. (144 keys), ...' for error messages."""
  heads = collections.Counter(key.split(".")[0] + ("." if "." in key else "") for key in keys)
  return ", ".join(f"{head!r} ({count})" for head, count in heads.most_common(limit))


def select_prefix(checkpoint: Checkpoint, rules: Sequence[Rule], requested: str, arch: str) -> str:
  """The key prefix in front of the rules' torch keys.

  Args:
    requested: 'auto', or the literal prefix ('' or 'none' for no prefix).
  """
  keys = list(checkpoint.tensors)
  if requested != "auto":
    prefix = "" if requested == "none" else requested
    if not any(key.startswith(prefix) for key in keys):
      raise ConversionError(
        f"No key of {checkpoint.path} starts with --prefix {prefix!r}; its keys "
        f"start with: {describe_top_level(keys)}."
      )
    return prefix
  counts = prefix_counts(keys, expected_keys(rules))
  if not counts:
    raise ConversionError(
      f"No key of {checkpoint.path} matches the {arch} layout under any prefix; its keys start "
      f"with: {describe_top_level(keys)}. Check --arch (or use --arch auto)."
    )
  best = max(counts.values())
  tied = [prefix for prefix, count in counts.items() if count == best]
  if len(tied) == 1:
    return tied[0]
  preferred = [prefix for prefix in PREFERRED_PREFIXES if prefix in tied]
  if preferred:
    return preferred[0]
  raise ConversionError(
    f"Several prefixes of {checkpoint.path} fit {arch} equally well ({', '.join(map(repr, tied))}"
    "); choose one with --prefix."
  )


# ----------------------------------------------------------------------------------------------
# Strict matching.


@dataclasses.dataclass
class MatchResult:
  """Flax variables built from a checkpoint, and what was left out on purpose.

  Attributes:
    variables: {'params': ..., 'batch_stats'?: ...} nested dicts of float32 arrays.
    consumed: number of checkpoint tensors used.
    ignored: {reason: [keys]} for every tensor not used.
  """

  variables: dict[str, Any]
  consumed: int
  ignored: dict[str, list[str]]


def _format_shape(shape) -> str:
  return "(" + ", ".join(map(str, shape)) + ")"


def _limited(lines: list[str]) -> list[str]:
  if len(lines) > REPORT_LIMIT:
    return lines[:REPORT_LIMIT] + [f"... and {len(lines) - REPORT_LIMIT} more"]
  return lines


def match_checkpoint(
  checkpoint: Checkpoint,
  checkpoint_format: CheckpointFormat,
  rules: Sequence[Rule],
  flax_shapes: Mapping[FlaxPath, tuple[int, ...]],
  prefix: str,
  arch: str,
) -> MatchResult:
  """Builds the Flax variables, consuming every needed tensor, or raises one ConversionError
  listing all missing keys, unexpected keys and shape mismatches.

  Args:
    flax_shapes: {flax path: shape} of a fresh init of the arch (jax.eval_shape).
  """
  rule_paths = [rule.flax_path for rule in rules]
  if sorted(rule_paths) != sorted(flax_shapes) or len(set(rule_paths)) != len(rule_paths):
    # A converter bug, not a user mistake: the rules must cover the Flax tree exactly.
    uncovered = sorted(set(flax_shapes) - set(rule_paths))
    spurious = sorted(set(rule_paths) - set(flax_shapes))
    raise AssertionError(
      f"{checkpoint_format.name} rules for {arch} do not cover the Flax tree: "
      f"uncovered {uncovered[:5]}, spurious {spurious[:5]}."
    )

  tensors = checkpoint.tensors
  missing, mismatched, consumed = [], [], set()
  flat_variables = {}
  for rule in rules:
    flax_shape = tuple(flax_shapes[rule.flax_path])
    torch_shapes = rule.transform.torch_shapes(flax_shape, len(rule.torch_keys))
    keys = [prefix + key for key in rule.torch_keys]
    arrays = []
    for key, torch_shape in zip(keys, torch_shapes):
      if key not in tensors:
        missing.append(f"{key} (expected shape {_format_shape(torch_shape)})")
        continue
      consumed.add(key)
      found_shape = tuple(tensors[key].shape)
      if found_shape != tuple(torch_shape):
        line = (
          f"{key}: checkpoint has {_format_shape(found_shape)}, {arch} needs "
          f"{_format_shape(torch_shape)}"
        )
        explanation = rule.hint(found_shape) if rule.hint else None
        mismatched.append(line + (f" ({explanation})" if explanation else ""))
        continue
      arrays.append(np.asarray(tensors[key], np.float32))
    if len(arrays) == len(keys):
      flat_variables[rule.flax_path] = np.ascontiguousarray(
        rule.transform.to_flax(arrays, flax_shape)
      )

  unexpected, ignored = [], collections.defaultdict(list)
  for key in tensors:
    if key in consumed:
      continue
    if key.startswith(prefix):
      reason = checkpoint_format.ignore_reason(key[len(prefix) :])
      if reason is None:
        unexpected.append(f"{key} {_format_shape(tensors[key].shape)}")
      else:
        ignored[reason].append(key)
    else:
      ignored[checkpoint_format.outside_label(key, prefix)].append(key)
  for key in checkpoint.non_tensor_keys:
    ignored["non-tensor entries"].append(key)

  if missing or unexpected or mismatched:
    lines = [
      f"{checkpoint.path} does not fit {arch} ({checkpoint_format.name} layout, prefix {prefix!r}):"
    ]
    for title, problems in (
      ("missing keys", missing),
      ("unexpected keys", unexpected),
      ("shape mismatches", mismatched),
    ):
      if problems:
        lines.append(f"  {title} ({len(problems)}):")
        lines.extend(f"    {problem}" for problem in _limited(problems))
    if ignored:
      lines.append(
        "  (ignored on purpose: "
        + "; ".join(f"{reason}: {len(keys)}" for reason, keys in ignored.items())
        + ")"
      )
    raise ConversionError("\n".join(lines))

  variables = {}
  for path, array in flat_variables.items():
    node = variables
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = array
  return MatchResult(variables, len(consumed), dict(ignored))


def describe_ignored(ignored: Mapping[str, list[str]]) -> list[str]:
  """Report lines: one per reason, with the count and a few example keys."""
  lines = []
  for reason, keys in ignored.items():
    examples = ", ".join(keys[:REPORT_EXAMPLES]) + (", ..." if len(keys) > REPORT_EXAMPLES else "")
    lines.append(f"{reason}: {len(keys)} ({examples})")
  return lines
