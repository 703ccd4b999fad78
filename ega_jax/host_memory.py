"""Transparent huge pages for the host buffers XLA:CPU allocates on every step.

XLA:CPU allocates each execution's temporary buffer with malloc, and glibc serves any request
above 32 MiB (its largest mmap threshold) with a fresh anonymous mapping that it unmaps on free.
So every step touches that buffer again 4 KiB page by page: resnet8x4's forward + backward at
batch 64 has a 260 MiB temporary buffer, 66,600 minor page faults and ~0.15 s of kernel time
per step on the project's 2-core VM (docs/performance.md, "Page faults on every step").
glibc's tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) makes malloc advise transparent huge
pages (2 MiB) for its mappings: about 300 faults per step.

glibc reads its tunables once, when the process starts, so `reexec_with_huge_pages()` restarts
the current command (the same interpreter and arguments, `sys.orig_argv`) with the tunable
added to `GLIBC_TUNABLES`, once; the entry points (`ega-train`, `ega-cache`,
`python -m benchmarks.step`) call it before parsing flags. `EGA_JAX_HUGE_PAGES=0` turns it
off; where it cannot apply (not Linux, not glibc, an older glibc, huge pages disabled, or
`glibc.malloc.hugetlb` already set by the user) nothing happens.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
SETTING = f"{TUNABLE}=1"
OPT_OUT = "EGA_JAX_HUGE_PAGES"
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_MIN_GLIBC = (2, 35)


def _glibc_version() -> tuple[int, ...] | None:
  library, version = platform.libc_ver()
  if library != "glibc" or not version:
    return None
  try:
    return tuple(int(part) for part in version.split(".")[:2])
  except ValueError:
    return None


def _transparent_huge_pages_mode() -> str | None:
  """'always', 'madvise' or 'never' (the bracketed word of the kernel's setting), or None."""
  try:
    text = _THP_MODE.read_text()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1 : end] if 0 <= start < end else None


def why_not(environ=os.environ) -> str | None:
  """None when restarting with the tunable would help here, else the reason it would not."""
  if environ.get(OPT_OUT, "1") == "0":
    return f"{OPT_OUT}=0"
  if TUNABLE in environ.get("GLIBC_TUNABLES", ""):
    return f"GLIBC_TUNABLES already sets {TUNABLE}"
  if not sys.platform.startswith("linux"):
    return f"not Linux ({sys.platform})"
  version = _glibc_version()
  if version is None or version < _MIN_GLIBC:
    return f"needs glibc >= {'.'.join(map(str, _MIN_GLIBC))} (found {platform.libc_ver()})"
  mode = _transparent_huge_pages_mode()
  if mode not in ("always", "madvise"):
    return f"transparent huge pages are {mode or 'unavailable'} ({_THP_MODE})"
  return None


def environment_with_huge_pages(environ=os.environ) -> dict[str, str]:
  """A copy of `environ` whose GLIBC_TUNABLES (':'-separated) also holds `SETTING`."""
  updated = dict(environ)
  existing = updated.get("GLIBC_TUNABLES", "")
  updated["GLIBC_TUNABLES"] = f"{existing}:{SETTING}" if existing else SETTING
  return updated


def reexec_with_huge_pages() -> None:
  """Replaces this process by the same command with `SETTING` in GLIBC_TUNABLES, if it helps.

  Returns (doing nothing) when `why_not()` gives a reason; otherwise does not return. Call it
  first thing in an entry point: anything done before it is done twice.
  """
  if why_not() is not None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment_with_huge_pages())
