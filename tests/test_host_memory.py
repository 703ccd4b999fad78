"""ega_jax.host_memory: the entry points restart once with glibc's huge-page malloc tunable."""

import os
import subprocess
import sys

import pytest

from ega_jax import host_memory

_PRINT_TUNABLES = (
  "from ega_jax import host_memory; host_memory.reexec_with_huge_pages(); "
  "import os; print(repr(os.environ.get('GLIBC_TUNABLES')))"
)
# Allocates and fills 64 MiB with malloc (above glibc's mmap threshold: a fresh mapping) five
# times and prints the minor page faults that took. (Not numpy: it advises huge pages itself.)
_COUNT_FAULTS = (
  "import ctypes, resource\n"
  "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p\n"
  "libc.free.argtypes = [ctypes.c_void_p]\n"
  "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
  "for _ in range(5):\n"
  "  p = libc.malloc(64 << 20); ctypes.memset(p, 1, 64 << 20); libc.free(p)\n"
  "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
)


def _clean_environment(**extra):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
  return {**env, **extra}


def _run(code, env):
  done = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
  )
  assert done.returncode == 0, done.stderr[-2000:]
  return done.stdout.strip()


def test_reexec_adds_the_tunable_once_where_it_applies():
  env = _clean_environment()
  reason = host_memory.why_not(env)
  printed = _run(_PRINT_TUNABLES, env)
  if reason is None:
    assert printed == repr(host_memory.SETTING)
  else:
    assert printed == "None", reason


def test_reexec_keeps_the_users_tunables_and_honours_the_opt_out():
  env = _clean_environment(GLIBC_TUNABLES="glibc.malloc.check=0")
  if host_memory.why_not(env) is None:
    assert _run(_PRINT_TUNABLES, env) == repr(f"glibc.malloc.check=0:{host_memory.SETTING}")
  opted_out = _clean_environment(**{host_memory.OPT_OUT: "0"})
  assert _run(_PRINT_TUNABLES, opted_out) == "None"
  assert host_memory.why_not(opted_out) == f"{host_memory.OPT_OUT}=0"
  users_own = _clean_environment(GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
  assert _run(_PRINT_TUNABLES, users_own) == repr("glibc.malloc.hugetlb=0")
  assert "already sets" in host_memory.why_not(users_own)


def test_the_tunable_cuts_the_page_faults_of_large_allocations():
  # What the restart is for: a large malloc'd buffer filled again and again faults in 4 KiB
  # pages without the tunable (16,384 per 64 MiB), in 2 MiB huge pages with it.
  env = _clean_environment()
  reason = host_memory.why_not(env)
  if reason is not None:
    pytest.skip(f"huge-page malloc does not apply on this machine: {reason}")
  plain = int(_run(_COUNT_FAULTS, env))
  huge = int(_run(_COUNT_FAULTS, host_memory.environment_with_huge_pages(env)))
  assert plain > 5 * 16_000, plain
  assert huge < plain / 10, (huge, plain)
