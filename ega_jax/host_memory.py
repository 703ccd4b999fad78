"""Keep malloc's memory between steps: XLA:CPU maps a fresh temporary buffer on every step.

XLA:CPU allocates each execution's temporary buffer with malloc, from one of its worker
threads. glibc serves a request that large (above its 32 MiB mmap-threshold ceiling, or too
big for a thread's arena) with a fresh anonymous mapping and unmaps it on free, so every step
gets that buffer back from the kernel page by page, zero-filled: resnet8x4's forward +
backward at batch 64 has a 260 MiB temporary buffer, 66,600 minor page faults and ~0.16 s of
kernel time per step on the project's 2-core VM (docs/performance.md, "Page faults on every
step"). PyTorch's tensors of the same student are 16 MiB each, below the threshold: malloc
keeps and reuses them.

`SETTING` makes glibc serve every thread from the main arena (`arena_max=1`), from the heap
(`mmap_max=0`), and keep freed memory (`trim_threshold` 64 GiB): the buffer is faulted in once
and reused, about 6,600 faults per step (the first touches of growth). The cost is that the
process keeps its peak heap until it exits. glibc reads its tunables once, when the process
starts, so `reexec_with_malloc_tuning()` restarts the current command (the same interpreter
and arguments, `sys.orig_argv`) with `SETTING` added to `GLIBC_TUNABLES`, once; the entry
points (`ega-train`, `ega-cache`, `python -m benchmarks.step`) call it before parsing flags.
`EGA_JAX_MALLOC_TUNING=0` turns it off; where it does not apply (not Linux, not glibc, a
`GLIBC_TUNABLES` that already sets one of these three, or an attached GPU/TPU unless
`JAX_PLATFORMS=cpu`) nothing happens.
"""

from __future__ import annotations

import glob
import os
import platform
import sys

TUNABLES = {
  "glibc.malloc.arena_max": "1",
  "glibc.malloc.mmap_max": "0",
  "glibc.malloc.trim_threshold": str(64 << 30),
}
SETTING = ":".join(f"{name}={value}" for name, value in TUNABLES.items())
OPT_OUT = "EGA_JAX_MALLOC_TUNING"
_MIN_GLIBC = (2, 26)  # the first glibc with tunables
# Device files of attached accelerators: there the step's buffers live on the device, and the
# host keeps glibc's defaults (its many threads would share the one arena for nothing).
ACCELERATOR_DEVICES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/kfd")


def _glibc_version() -> tuple[int, ...] | None:
  library, version = platform.libc_ver()
  if library != "glibc" or not version:
    return None
  try:
    return tuple(int(part) for part in version.split(".")[:2])
  except ValueError:
    return None


def why_not(environ=os.environ) -> str | None:
  """None when restarting with `SETTING` applies here, else the reason it does not."""
  if environ.get(OPT_OUT, "1") == "0":
    return f"{OPT_OUT}=0"
  already = [name for name in TUNABLES if name in environ.get("GLIBC_TUNABLES", "")]
  if already:
    return f"GLIBC_TUNABLES already sets {', '.join(already)}"
  if not sys.platform.startswith("linux"):
    return f"not Linux ({sys.platform})"
  if environ.get("JAX_PLATFORMS", "") != "cpu":
    attached = [path for pattern in ACCELERATOR_DEVICES for path in glob.glob(pattern)]
    if attached:
      return f"an accelerator is attached ({attached[0]}; JAX_PLATFORMS=cpu would apply it)"
  version = _glibc_version()
  if version is None or version < _MIN_GLIBC:
    return f"needs glibc >= {'.'.join(map(str, _MIN_GLIBC))} (found {platform.libc_ver()})"
  return None


def applied(environ=os.environ) -> bool:
  """Whether this process started with `SETTING` in its GLIBC_TUNABLES (glibc uses it)."""
  return SETTING in environ.get("GLIBC_TUNABLES", "")


def environment_with_malloc_tuning(environ=os.environ) -> dict[str, str]:
  """A copy of `environ` whose GLIBC_TUNABLES (':'-separated) also holds `SETTING`."""
  updated = dict(environ)
  existing = updated.get("GLIBC_TUNABLES", "")
  updated["GLIBC_TUNABLES"] = f"{existing}:{SETTING}" if existing else SETTING
  return updated


def reexec_with_malloc_tuning() -> None:
  """Replaces this process by the same command with `SETTING` in GLIBC_TUNABLES, if it helps.

  Returns (doing nothing) when `why_not()` gives a reason; otherwise does not return. Call it
  first thing in an entry point: anything done before it is done twice.
  """
  if why_not() is not None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment_with_malloc_tuning())
