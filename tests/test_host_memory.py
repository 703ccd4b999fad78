"""ega_jax.host_memory: the entry points restart once with glibc's malloc tunables."""

import os
import subprocess
import sys

import pytest

from ega_jax import host_memory

_PRINT_TUNABLES = (
  "from ega_jax import host_memory; host_memory.reexec_with_malloc_tuning(); "
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
  assert not host_memory.applied(env)
  assert host_memory.applied(host_memory.environment_with_malloc_tuning(env))
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
  users_own = _clean_environment(GLIBC_TUNABLES="glibc.malloc.arena_max=4")
  assert _run(_PRINT_TUNABLES, users_own) == repr("glibc.malloc.arena_max=4")
  assert "already sets" in host_memory.why_not(users_own)


def test_the_tunables_keep_a_large_buffer_mapped_between_allocations():
  # What the restart is for: a 64 MiB buffer malloc'd, filled and freed five times faults
  # 16,384 pages of 4 KiB every time by default (a fresh mapping each time), once with them.
  env = _clean_environment()
  reason = host_memory.why_not(env)
  if reason is not None:
    pytest.skip(f"the malloc tunables do not apply on this machine: {reason}")
  plain = int(_run(_COUNT_FAULTS, env))
  tuned = int(_run(_COUNT_FAULTS, host_memory.environment_with_malloc_tuning(env)))
  assert plain > 5 * 16_000, plain
  assert tuned < 2 * 16_384, (tuned, plain)


def test_an_attached_accelerator_keeps_the_defaults(monkeypatch, tmp_path):
  fake_gpu = tmp_path / "nvidia0"
  fake_gpu.touch()
  monkeypatch.setattr(host_memory, "ACCELERATOR_DEVICES", (str(tmp_path / "nvidia[0-9]*"),))
  assert "an accelerator is attached" in host_memory.why_not({})
  forced_cpu = host_memory.why_not({"JAX_PLATFORMS": "cpu"})
  monkeypatch.setattr(host_memory, "ACCELERATOR_DEVICES", ())
  assert forced_cpu == host_memory.why_not({})
