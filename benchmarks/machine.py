"""What machine a benchmark ran on: CPU model, cores, vector/matrix extensions, load."""

from __future__ import annotations

import os

# The x86 extensions that decide XLA:CPU's and oneDNN's matmul speed.
_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def describe(cpuinfo_path: str = "/proc/cpuinfo") -> dict:
  """{'cpu_model', 'logical_cpus', 'usable_cpus', 'cpu_flags', 'vector_kind', 'load_average'}.

  `vector_kind` is 'AMX', 'AVX-512', 'AVX2' or 'other': the widest of the
  kinds these machines come in. Fields read from /proc/cpuinfo are None where
  it is missing (not Linux).
  """
  model, flags = None, set()
  try:
    with open(cpuinfo_path) as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
          model = value.strip()
        elif key == "flags" and not flags:
          flags = set(value.split())
  except OSError:
    pass
  present = [flag for flag in _FLAGS_OF_INTEREST if flag in flags]
  if "amx_tile" in flags:
    kind = "AMX"
  elif "avx512f" in flags:
    kind = "AVX-512"
  elif "avx2" in flags:
    kind = "AVX2"
  else:
    kind = "other"
  return {
    "cpu_model": model,
    "logical_cpus": os.cpu_count(),
    "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    "cpu_flags": present,
    "vector_kind": kind,
    "load_average": [round(x, 2) for x in os.getloadavg()],
  }


def one_line(machine: dict) -> str:
  """e.g. 'Intel(R) Xeon(R) ... , 2 usable CPUs, AVX-512 (avx2 avx512f), load 0.10'."""
  flags = " ".join(machine["cpu_flags"]) or "none of avx2/avx512/amx"
  return (
    f"{machine['cpu_model'] or 'unknown CPU'}, {machine['usable_cpus']} usable CPUs, "
    f"{machine['vector_kind']} ({flags}), load {machine['load_average'][0]:.2f}"
  )
