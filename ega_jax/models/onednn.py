"""oneDNN's CPU convolution, called from XLA through its FFI (`jax.ffi`).

XLA:CPU in jaxlib 0.10.2 runs every convolution through YNNPACK, which computes a convolution
that sits alone in its fusion on one core; on the project's 2-core VM a 3x3 64 -> 64 conv at
32x32, batch 64, took 53 ms there against 23 ms in oneDNN (its input gradient 52 vs 23 ms, its
weight gradient 120 vs 27 ms; docs/performance.md, "oneDNN through the FFI"). oneDNN is the
library PyTorch's CPU convolutions use. `conv.py` sends float32 ungrouped convolutions on CPU
here (`conv.CPU_CONV_LIBRARY`).

The kernels are `onednn_conv.cc` (three FFI handlers: forward, input gradient, weight gradient),
compiled on first use with the C++ compiler (`$CXX`, default `g++`) against the headers and
library of the `onednn-devel-cpu-gomp` / `onednn-cpu-gomp` wheels (requirements.txt), and
cached as `$XDG_CACHE_HOME/ega_jax/onednn_conv-<hash>.so` (default `~/.cache`), the hash
covering the source, the oneDNN library and jaxlib's version (a temporary directory's
`ega_jax-<uid>` when that is not writable). `make venv` builds it once, as does
`python -c "from ega_jax.models import onednn; print(onednn.register())"`, which prints its path.

Shapes: activations NHWC (B, H, W, C), kernels HWIO (k, k, C, O), float32.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax
import jaxlib
import numpy as np

SOURCE = Path(__file__).with_name("onednn_conv.cc")
# The FFI targets, each registered under the name of the symbol onednn_conv.cc exports for it.
TARGETS = ("ega_onednn_conv_forward", "ega_onednn_conv_input_grad", "ega_onednn_conv_kernel_grad")
_LIBRARY_NAME = "libdnnl.so.3"
_WHEELS = "onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0"


class OneDNNUnavailable(RuntimeError):
  """oneDNN's convolution cannot be built or loaded here (the message says why)."""


def onednn_prefix() -> Path:
  """The install prefix holding oneDNN's `include/dnnl.hpp` and `lib/libdnnl.so.3`.

  The wheels install into the environment's prefix (`sys.prefix`); `$DNNL_ROOT` overrides.
  """
  candidates = [Path(os.environ["DNNL_ROOT"])] if os.environ.get("DNNL_ROOT") else []
  candidates += [Path(sys.prefix), Path(sys.base_prefix)]
  for prefix in candidates:
    if (prefix / "include" / "dnnl.hpp").is_file() and (prefix / "lib" / _LIBRARY_NAME).is_file():
      return prefix
  raise OneDNNUnavailable(
    f"oneDNN not found under {', '.join(str(c) for c in candidates)} (need include/dnnl.hpp and "
    f"lib/{_LIBRARY_NAME}); install it with `pip install {_WHEELS}` or set DNNL_ROOT, or set "
    "ega_jax.models.conv.CPU_CONV_LIBRARY = 'xla'."
  )


def _cache_dir() -> Path:
  root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ega_jax"
  try:
    root.mkdir(parents=True, exist_ok=True)
    if os.access(root, os.W_OK):
      return root
  except OSError:
    pass
  return Path(tempfile.gettempdir()) / f"ega_jax-{os.getuid()}"


def library_path() -> Path:
  """Where the compiled kernels for this source, oneDNN and jaxlib live (built or not)."""
  prefix = onednn_prefix()
  digest = hashlib.sha256()
  digest.update(SOURCE.read_bytes())
  digest.update(str((prefix / "lib" / _LIBRARY_NAME).resolve()).encode())
  digest.update(jaxlib.__version__.encode())
  return _cache_dir() / f"onednn_conv-{digest.hexdigest()[:16]}.so"


def build(destination: Path | None = None) -> Path:
  """Compiles onednn_conv.cc into `destination` (default `library_path()`) unless present.

  The compiler writes a temporary file that is renamed into place, so concurrent builds (test
  workers, processes of one job) never load a half-written library.
  """
  destination = destination or library_path()
  if destination.is_file():
    return destination
  prefix = onednn_prefix()
  compiler = os.environ.get("CXX", "g++")
  if shutil.which(compiler) is None:
    raise OneDNNUnavailable(
      f"no C++ compiler {compiler!r} on PATH to build {SOURCE.name}; install g++ (or set CXX), "
      "or set ega_jax.models.conv.CPU_CONV_LIBRARY = 'xla'."
    )
  destination.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=destination.parent) as scratch:
    partial = Path(scratch) / destination.name
    command = [
      compiler,
      "-O2",
      "-std=c++17",
      "-shared",
      "-fPIC",
      "-w",
      f"-I{prefix / 'include'}",
      f"-I{jax.ffi.include_dir()}",
      str(SOURCE),
      f"-L{prefix / 'lib'}",
      f"-l:{_LIBRARY_NAME}",
      f"-Wl,-rpath,{prefix / 'lib'}",
      "-o",
      str(partial),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
      raise OneDNNUnavailable(
        f"building {SOURCE.name} failed ({' '.join(command)}):\n{result.stderr[-4000:]}"
      )
    os.replace(partial, destination)
  return destination


@functools.cache
def register() -> Path:
  """Builds (if needed) and loads the kernels and registers their FFI targets on CPU, once."""
  path = build()
  # oneDNN's OpenMP threads wait passively between calls unless told otherwise: spinning
  # threads would take the cores from XLA's own thread pool (libgomp reads this at load).
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  library = ctypes.cdll.LoadLibrary(str(path))
  for target in TARGETS:
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)), "cpu")
  return path


@functools.cache
def unavailable_reason() -> str | None:
  """None when the kernels are registered (building them if needed), else why not.

  Asked once per process (conv.py asks at every conv it traces): a missing oneDNN or compiler
  is not searched for again.
  """
  try:
    register()
  except OneDNNUnavailable as error:
    return str(error)
  return None


def _call(target: str, shape, a: jax.Array, b: jax.Array, stride: int, padding: int):
  attributes = {
    name: np.int64(value)
    for name, value in (
      ("stride", stride),
      ("pad_top", padding),
      ("pad_bottom", padding),
      ("pad_left", padding),
      ("pad_right", padding),
    )
  }
  result = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
  out = jax.ffi.ffi_call(target, result, vmap_method="sequential")(a, b, **attributes)
  # Inside shard_map the call's result would be typed as replicated; it varies over the
  # devices wherever an operand does (XLA's own conv is typed so).
  varying = jax.typeof(a).manual_axis_type.varying | jax.typeof(b).manual_axis_type.varying
  return lax.pcast(out, tuple(sorted(varying)), to="varying") if varying else out


def conv_forward(
  x: jax.Array, kernel: jax.Array, out_shape, stride: int, padding: int
) -> jax.Array:
  """x (B, H, W, C), kernel (k, k, C, O) -> `out_shape` (B, H', W', O); PyTorch's conv2d with
  symmetric zero padding."""
  return _call("ega_onednn_conv_forward", out_shape, x, kernel, stride, padding)


def conv_input_grad(
  out_grad: jax.Array, kernel: jax.Array, x_shape, stride: int, padding: int
) -> jax.Array:
  """out_grad (B, H', W', O), kernel (k, k, C, O) -> the input's gradient, shape `x_shape`."""
  return _call("ega_onednn_conv_input_grad", x_shape, out_grad, kernel, stride, padding)


def conv_kernel_grad(
  x: jax.Array, out_grad: jax.Array, kernel_shape, stride: int, padding: int
) -> jax.Array:
  """x (B, H, W, C), out_grad (B, H', W', O) -> the kernel's gradient, shape `kernel_shape`."""
  return _call("ega_onednn_conv_kernel_grad", kernel_shape, x, out_grad, stride, padding)
