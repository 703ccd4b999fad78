"""What every checkpoint family shares: reading files, unwrapping, prefix selection, strict
key/shape matching and the report.

A family (clip.py, hf_clip.py, torchvision_resnet.py, timm_vit.py) only says which torch key(s)
feed each Flax array (`Rule`s), which keys are dropped on purpose (`ignored`), and how to
recognise its architectures from keys and shapes (`infer`). torch is imported lazily, only when a
file is read.
"""

import argparse
import collections
import dataclasses
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ega_jax.models.teachers import specs

FlaxPath = tuple[str, ...]  # ('params', 'block_0', 'fc1', 'kernel'); first entry is the collection.

# Checkpoint wrappers, searched in this order (DINO files hold both 'teacher' and 'student'; the
# teacher is the one its authors evaluate).
WRAPPER_KEYS = ('state_dict', 'model', 'teacher', 'student')

# When several prefixes fit a checkpoint equally well (MoCo holds a query and a key encoder, MoCo v3
# a base and a momentum encoder), the earliest of these wins.
PREFERRED_PREFIXES = ('', 'module.', 'module.encoder_q.', 'module.base_encoder.', 'backbone.',
                      'module.backbone.', 'encoder.', 'visual.', 'module.visual.')

REPORT_EXAMPLES = 3  # keys shown per ignored group
REPORT_LIMIT = 20    # problems shown per category in a mismatch report


class ConversionError(ValueError):
  """A checkpoint or a request that cannot be converted; the message is the whole report."""


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


IDENTITY = Transform('identity', lambda arrays, shape: arrays[0], lambda shape, n: [shape])
# torch Linear weight (out, in) -> Flax Dense kernel (in, out).
LINEAR = Transform('linear', lambda arrays, shape: arrays[0].T,
                   lambda shape, n: [(shape[1], shape[0])])
# torch Conv2d weight (O, I, kH, kW) -> Flax Conv kernel (kH, kW, I, O).
CONV = Transform('conv', lambda arrays, shape: arrays[0].transpose(2, 3, 1, 0),
                 lambda shape, n: [(shape[3], shape[2], shape[0], shape[1])])
# Separate q/k/v Linear weights, each (out, in) -> one fused kernel (in, n * out).
CONCAT_LINEAR = Transform(
    'concat_linear', lambda arrays, shape: np.concatenate(arrays, axis=0).T,
    lambda shape, n: [(shape[1] // n, shape[0])] * n)
# Separate q/k/v biases, each (out,) -> (n * out,).
CONCAT = Transform('concat', lambda arrays, shape: np.concatenate(arrays, axis=0),
                   lambda shape, n: [(shape[0] // n,)] * n)


def squeeze_leading(count: int) -> Transform:
  """torch shape (1,) * count + s -> Flax shape s (timm's cls_token (1, 1, D), pos_embed (1, N, D))."""
  return Transform(f'squeeze{count}', lambda arrays, shape: arrays[0].reshape(shape),
                   lambda shape, n: [(1,) * count + tuple(shape)])


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
  rules = [Rule(('params', *flax_path, 'kernel'), (f'{torch_name}.weight',), LINEAR)]
  if bias:
    rules.append(Rule(('params', *flax_path, 'bias'), (f'{torch_name}.bias',)))
  return rules


def conv_rules(flax_path: FlaxPath, torch_name: str, bias: bool = False) -> list[Rule]:
  """torch Conv2d `torch_name` -> Flax Conv at params/flax_path."""
  rules = [Rule(('params', *flax_path, 'kernel'), (f'{torch_name}.weight',), CONV)]
  if bias:
    rules.append(Rule(('params', *flax_path, 'bias'), (f'{torch_name}.bias',)))
  return rules


def layer_norm_rules(flax_path: FlaxPath, torch_name: str) -> list[Rule]:
  return [Rule(('params', *flax_path, 'scale'), (f'{torch_name}.weight',)),
          Rule(('params', *flax_path, 'bias'), (f'{torch_name}.bias',))]


def batch_norm_rules(flax_path: FlaxPath, torch_name: str) -> list[Rule]:
  """BatchNorm2d affine parameters to params/, running statistics to batch_stats/."""
  return [Rule(('params', *flax_path, 'scale'), (f'{torch_name}.weight',)),
          Rule(('params', *flax_path, 'bias'), (f'{torch_name}.bias',)),
          Rule(('batch_stats', *flax_path, 'mean'), (f'{torch_name}.running_mean',)),
          Rule(('batch_stats', *flax_path, 'var'), (f'{torch_name}.running_var',))]


def position_embedding_hint(patch_size: int, num_prefix_tokens: int = 1):
  """Explains a position-embedding shape mismatch as the input resolution it was trained for."""
  def hint(found_shape):
    if len(found_shape) < 2:
      return None
    grid = round((found_shape[-2] - num_prefix_tokens) ** 0.5)
    if grid * grid + num_prefix_tokens != found_shape[-2]:
      return None
    return (f'the checkpoint\'s position embedding is for a {grid}x{grid} grid, i.e. '
            f'--image_size {grid * patch_size}')
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
    return _first_match(self.outside_labels, key) or f'outside the prefix {prefix!r}'


def _first_match(patterns: Sequence[tuple[str, str]], key: str) -> str | None:
  for pattern, reason in patterns:
    if re.search(pattern, key):
      return reason
  return None


def matching_archs(family: str, **config) -> list[str]:
  """Registry names of `family` whose module config agrees with every given field."""
  return [spec.arch for spec in specs.TEACHER_SPECS.values()
          if spec.family == family and all(spec.config[k] == v for k, v in config.items())]


def prefixes_with(keys: Sequence[str], suffix: str) -> list[str]:
  """Every prefix p (empty or ending in '.') such that p + suffix is a key."""
  found = []
  for key in keys:
    if key.endswith(suffix):
      prefix = key[:len(key) - len(suffix)]
      if prefix == '' or prefix.endswith('.'):
        found.append(prefix)
  return found


def count_indices(keys: Sequence[str], prefix: str) -> int:
  """Number of distinct integers i such that some key starts with prefix + f'{i}.'."""
  pattern = re.compile(re.escape(prefix) + r'(\d+)\.')
  return len({match.group(1) for key in keys if (match := pattern.match(key))})


# ----------------------------------------------------------------------------------------------
# Reading checkpoint files.


@dataclasses.dataclass
class Checkpoint:
  """A checkpoint's tensors as NumPy arrays plus notes on how it was read.

  Attributes:
    path: the file.
    tensors: {key: array}; floating tensors are float32 (fp16/bf16 were upcast).
    container: 'TorchScript archive', 'safetensors file' or 'torch.save file'.
    location: where in the file the state dict was found, e.g. "['state_dict']".
    upcast: number of fp16/bf16 tensors converted to float32.
    non_tensor_keys: entries of the state dict that were not tensors (ignored, reported).
    skipped_wrappers: other state dicts the file holds that were not used, e.g.
      "checkpoint['student']" when the teacher was taken.
  """
  path: str
  tensors: dict[str, np.ndarray]
  container: str
  location: str
  upcast: int = 0
  non_tensor_keys: list[str] = dataclasses.field(default_factory=list)
  skipped_wrappers: list[str] = dataclasses.field(default_factory=list)

  @property
  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in self.tensors.items()}


def _is_torchscript_archive(path: str) -> bool:
  # TorchScript zips carry compiled code and constants.pkl; torch.save zips only data.pkl + data/.
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    return any(name.endswith('/constants.pkl') or '/code/' in name for name in archive.namelist())


def _to_numpy(tensor) -> tuple[np.ndarray, bool]:
  """torch tensor -> (NumPy array, whether it was upcast from a 16-bit float)."""
  import torch  # pylint: disable=g-import-not-at-top
  tensor = tensor.detach().cpu()
  if tensor.is_floating_point():
    upcast = tensor.dtype in (torch.float16, torch.bfloat16)
    return tensor.to(torch.float32).numpy(), upcast
  return tensor.numpy(), False


def _unwrap(obj: Any, path: str) -> tuple[Mapping[str, Any], str, list[str]]:
  """Descends through wrapper dicts ({'state_dict': ...}, {'teacher': ..., 'student': ...}) to
  the mapping that holds the tensors.

  Returns:
    (that mapping, where it was, e.g. "['teacher']", the wrappers passed over).
  """
  import torch  # pylint: disable=g-import-not-at-top
  location, skipped = '', []
  for _ in range(8):  # Real checkpoints nest at most two or three levels.
    if isinstance(obj, torch.nn.Module):
      return obj.state_dict(), location + '.state_dict()', skipped
    if not isinstance(obj, Mapping):
      raise ConversionError(f'{path} holds a {type(obj).__name__} at checkpoint{location}, not a '
                            'state dict.')
    wrappers = [key for key in WRAPPER_KEYS if isinstance(obj.get(key), Mapping)]
    if wrappers:
      skipped += [f'checkpoint{location}[{other!r}]' for other in wrappers[1:]]
      location += f'[{wrappers[0]!r}]'
      obj = obj[wrappers[0]]
      continue
    if any(isinstance(value, torch.Tensor) for value in obj.values()):
      return obj, location, skipped
    keys = ', '.join(map(str, list(obj)[:10]))
    raise ConversionError(
        f'{path} has no tensors at checkpoint{location} (keys: {keys}) and none of the wrapper '
        f'keys {", ".join(WRAPPER_KEYS)}.')
  raise ConversionError(f'{path} nests wrapper dicts too deeply to find a state dict.')


def read_checkpoint(path: str, allow_pickle: bool = False) -> Checkpoint:
  """Reads a plain or wrapped state dict (.pt/.pth/.pth.tar/.bin), a TorchScript archive or a
  safetensors file into NumPy arrays.

  Args:
    path: the checkpoint file.
    allow_pickle: load torch.save files with weights_only=False (runs arbitrary pickled code; only
      for trusted files whose extra objects torch's safe loader refuses).
  """
  if not os.path.isfile(path):
    raise ConversionError(f'Checkpoint file {path} does not exist.')
  import torch  # pylint: disable=g-import-not-at-top

  skipped = []
  if path.endswith('.safetensors'):
    import safetensors.torch  # pylint: disable=g-import-not-at-top
    try:
      state_dict = safetensors.torch.load_file(path, device='cpu')
    except Exception as error:  # safetensors raises its own error types.
      raise ConversionError(f'{path} is not a readable safetensors file ({error}).') from None
    container, location = 'safetensors file', ''
  elif _is_torchscript_archive(path):
    try:
      state_dict = torch.jit.load(path, map_location='cpu').state_dict()
    except Exception as error:  # torch.jit raises RuntimeError and friends.
      raise ConversionError(f'{path} looks like a TorchScript archive but torch.jit.load failed '
                            f'({error}).') from None
    container, location = 'TorchScript archive', ''
  else:
    try:
      # argparse.Namespace is what DINO/MoCo-style training scripts store as 'args'.
      with torch.serialization.safe_globals([argparse.Namespace]):
        loaded = torch.load(path, map_location='cpu', weights_only=not allow_pickle)
    except pickle.UnpicklingError as error:
      # torch's message is a page long; the object it refused is named after 'Unsupported global:'.
      refused = re.search(r'Unsupported global: GLOBAL (\S+)', str(error))
      if refused is None:
        raise ConversionError(f'{path} is not a readable PyTorch checkpoint (the unpickler '
                              'stopped on unexpected data).') from None
      raise ConversionError(
          f'{path} holds a Python object ({refused.group(1)}) that torch\'s safe loader refuses; '
          'if you trust the file, rerun with --allow_pickle.') from None
    except Exception as error:  # torch.load raises RuntimeError, EOFError, ... on damaged files.
      raise ConversionError(f'{path} is not a readable PyTorch checkpoint ({error}).') from None
    state_dict, location, skipped = _unwrap(loaded, path)
    container = 'torch.save file'

  checkpoint = checkpoint_from_state_dict(state_dict, path, container, location)
  checkpoint.skipped_wrappers = skipped
  return checkpoint


def checkpoint_from_state_dict(state_dict: Mapping[str, Any], path: str = '<state dict>',
                               container: str = 'in-memory state dict',
                               location: str = '') -> Checkpoint:
  """Wraps a {key: torch tensor} mapping (e.g. `model.state_dict()`) as a Checkpoint.

  float32 tensors are shared with torch, not copied; 16-bit floats are upcast.
  """
  import torch  # pylint: disable=g-import-not-at-top
  tensors, non_tensor_keys, upcast = {}, [], 0
  for key, value in state_dict.items():
    if isinstance(value, torch.Tensor):
      tensors[str(key)], was_upcast = _to_numpy(value)
      upcast += was_upcast
    else:
      non_tensor_keys.append(str(key))
  if not tensors:
    raise ConversionError(f'{path} contains no tensors.')
  return Checkpoint(path, tensors, container, location, upcast, non_tensor_keys)


# ----------------------------------------------------------------------------------------------
# Prefix selection.


def expected_keys(rules: Sequence[Rule]) -> list[str]:
  return [key for rule in rules for key in rule.torch_keys]


def prefix_counts(keys: Sequence[str], wanted: Sequence[str]) -> collections.Counter:
  """For each prefix p (empty or ending in '.'), how many keys are p + (a wanted key)."""
  wanted = set(wanted)
  counts = collections.Counter()
  for key in keys:
    for position in [0] + [i + 1 for i, char in enumerate(key) if char == '.']:
      if key[position:] in wanted:
        counts[key[:position]] += 1
  return counts


def describe_top_level(keys: Sequence[str], limit: int = 8) -> str:
  """'visual. (150 keys), transformer. (144 keys), ...' for error messages."""
  heads = collections.Counter(key.split('.')[0] + ('.' if '.' in key else '') for key in keys)
  return ', '.join(f'{head!r} ({count})' for head, count in heads.most_common(limit))


def select_prefix(checkpoint: Checkpoint, rules: Sequence[Rule], requested: str, arch: str) -> str:
  """The key prefix in front of the rules' torch keys.

  Args:
    requested: 'auto', or the literal prefix ('' or 'none' for no prefix).
  """
  keys = list(checkpoint.tensors)
  if requested != 'auto':
    prefix = '' if requested == 'none' else requested
    if not any(key.startswith(prefix) for key in keys):
      raise ConversionError(f'No key of {checkpoint.path} starts with --prefix {prefix!r}; its keys '
                            f'start with: {describe_top_level(keys)}.')
    return prefix
  counts = prefix_counts(keys, expected_keys(rules))
  if not counts:
    raise ConversionError(
        f'No key of {checkpoint.path} matches the {arch} layout under any prefix; its keys start '
        f'with: {describe_top_level(keys)}. Check --arch (or use --arch auto).')
  best = max(counts.values())
  tied = [prefix for prefix, count in counts.items() if count == best]
  if len(tied) == 1:
    return tied[0]
  preferred = [prefix for prefix in PREFERRED_PREFIXES if prefix in tied]
  if preferred:
    return preferred[0]
  raise ConversionError(
      f'Several prefixes of {checkpoint.path} fit {arch} equally well ({", ".join(map(repr, tied))}'
      '); choose one with --prefix.')


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
  return '(' + ', '.join(map(str, shape)) + ')'


def _limited(lines: list[str]) -> list[str]:
  if len(lines) > REPORT_LIMIT:
    return lines[:REPORT_LIMIT] + [f'... and {len(lines) - REPORT_LIMIT} more']
  return lines


def match_checkpoint(checkpoint: Checkpoint, checkpoint_format: CheckpointFormat,
                     rules: Sequence[Rule], flax_shapes: Mapping[FlaxPath, tuple[int, ...]],
                     prefix: str, arch: str) -> MatchResult:
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
    raise AssertionError(f'{checkpoint_format.name} rules for {arch} do not cover the Flax tree: '
                         f'uncovered {uncovered[:5]}, spurious {spurious[:5]}.')

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
        missing.append(f'{key} (expected shape {_format_shape(torch_shape)})')
        continue
      consumed.add(key)
      found_shape = tuple(tensors[key].shape)
      if found_shape != tuple(torch_shape):
        line = (f'{key}: checkpoint has {_format_shape(found_shape)}, {arch} needs '
                f'{_format_shape(torch_shape)}')
        explanation = rule.hint(found_shape) if rule.hint else None
        mismatched.append(line + (f' ({explanation})' if explanation else ''))
        continue
      arrays.append(np.asarray(tensors[key], np.float32))
    if len(arrays) == len(keys):
      flat_variables[rule.flax_path] = np.ascontiguousarray(
          rule.transform.to_flax(arrays, flax_shape))

  unexpected, ignored = [], collections.defaultdict(list)
  for key in tensors:
    if key in consumed:
      continue
    if key.startswith(prefix):
      reason = checkpoint_format.ignore_reason(key[len(prefix):])
      if reason is None:
        unexpected.append(f'{key} {_format_shape(tensors[key].shape)}')
      else:
        ignored[reason].append(key)
    else:
      ignored[checkpoint_format.outside_label(key, prefix)].append(key)
  for key in checkpoint.non_tensor_keys:
    ignored['non-tensor entries'].append(key)

  if missing or unexpected or mismatched:
    lines = [f'{checkpoint.path} does not fit {arch} ({checkpoint_format.name} layout, prefix '
             f'{prefix!r}):']
    for title, problems in (('missing keys', missing), ('unexpected keys', unexpected),
                            ('shape mismatches', mismatched)):
      if problems:
        lines.append(f'  {title} ({len(problems)}):')
        lines.extend(f'    {problem}' for problem in _limited(problems))
    if ignored:
      lines.append('  (ignored on purpose: ' + '; '.join(
          f'{reason}: {len(keys)}' for reason, keys in ignored.items()) + ')')
    raise ConversionError('\n'.join(lines))

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
    examples = ', '.join(keys[:REPORT_EXAMPLES]) + (', ...' if len(keys) > REPORT_EXAMPLES else '')
    lines.append(f'{reason}: {len(keys)} ({examples})')
  return lines
