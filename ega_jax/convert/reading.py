"""Reading checkpoint files (torch.save, TorchScript, safetensors) into NumPy arrays, through
the wrapper dicts training scripts put around the state dict.

torch is imported lazily, only when a file or state dict is read.
"""

import argparse
import dataclasses
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from ega_jax.convert.errors import ConversionError

# Checkpoint wrappers, searched in this order (DINO files hold both 'teacher' and 'student'; the
# teacher is the one its authors evaluate).
WRAPPER_KEYS = ("state_dict", "model", "teacher", "student")


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
    return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


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

  location, skipped = "", []
  for _ in range(8):  # Real checkpoints nest at most two or three levels.
    if isinstance(obj, torch.nn.Module):
      return obj.state_dict(), location + ".state_dict()", skipped
    if not isinstance(obj, Mapping):
      raise ConversionError(
        f"{path} holds a {type(obj).__name__} at checkpoint{location}, not a state dict."
      )
    wrappers = [key for key in WRAPPER_KEYS if isinstance(obj.get(key), Mapping)]
    if wrappers:
      skipped += [f"checkpoint{location}[{other!r}]" for other in wrappers[1:]]
      location += f"[{wrappers[0]!r}]"
      obj = obj[wrappers[0]]
      continue
    if any(isinstance(value, torch.Tensor) for value in obj.values()):
      return obj, location, skipped
    keys = ", ".join(map(str, list(obj)[:10]))
    raise ConversionError(
      f"{path} has no tensors at checkpoint{location} (keys: {keys}) and none of the wrapper "
      f"keys {', '.join(WRAPPER_KEYS)}."
    )
  raise ConversionError(f"{path} nests wrapper dicts too deeply to find a state dict.")


def read_checkpoint(path: str, allow_pickle: bool = False) -> Checkpoint:
  """Reads a plain or wrapped state dict (.pt/.pth/.pth.tar/.bin), a TorchScript archive or a
  safetensors file into NumPy arrays.

  Args:
    path: the checkpoint file.
    allow_pickle: load torch.save files with weights_only=False (runs arbitrary pickled code; only
      for trusted files whose extra objects torch's safe loader refuses).
  """
  if not os.path.isfile(path):
    raise ConversionError(f"Checkpoint file {path} does not exist.")
  import torch  # pylint: disable=g-import-not-at-top

  skipped = []
  if path.endswith(".safetensors"):
    import safetensors.torch  # pylint: disable=g-import-not-at-top

    try:
      state_dict = safetensors.torch.load_file(path, device="cpu")
    except Exception as error:  # safetensors raises its own error types.
      raise ConversionError(f"{path} is not a readable safetensors file ({error}).") from None
    container, location = "safetensors file", ""
  elif _is_torchscript_archive(path):
    try:
      state_dict = torch.jit.load(path, map_location="cpu").state_dict()
    except Exception as error:  # torch.jit raises RuntimeError and friends.
      raise ConversionError(
        f"{path} looks like a TorchScript archive but torch.jit.load failed ({error})."
      ) from None
    container, location = "TorchScript archive", ""
  else:
    try:
      # argparse.Namespace is what DINO/MoCo-style training scripts store as 'args'.
      with torch.serialization.safe_globals([argparse.Namespace]):
        loaded = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as error:
      # torch's message is a page long; the object it refused is named after 'Unsupported global:'.
      refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
      if refused is None:
        raise ConversionError(
          f"{path} is not a readable PyTorch checkpoint (the unpickler stopped on unexpected data)."
        ) from None
      raise ConversionError(
        f"{path} holds a Python object ({refused.group(1)}) that torch's safe loader refuses; "
        "if you trust the file, rerun with --allow_pickle."
      ) from None
    except Exception as error:  # torch.load raises RuntimeError, EOFError, ... on damaged files.
      raise ConversionError(f"{path} is not a readable PyTorch checkpoint ({error}).") from None
    state_dict, location, skipped = _unwrap(loaded, path)
    container = "torch.save file"

  checkpoint = checkpoint_from_state_dict(state_dict, path, container, location)
  checkpoint.skipped_wrappers = skipped
  return checkpoint


def checkpoint_from_state_dict(
  state_dict: Mapping[str, Any],
  path: str = "<state dict>",
  container: str = "in-memory state dict",
  location: str = "",
) -> Checkpoint:
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
    raise ConversionError(f"{path} contains no tensors.")
  return Checkpoint(path, tensors, container, location, upcast, non_tensor_keys)
