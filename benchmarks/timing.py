"""The one timing helper of the benchmarks, FLOP counts and the measured peak.

Everything the benchmarks time goes through `time_interleaved`: each call is
waited for (`block_until_ready`, `torch.cuda.synchronize`, ...) inside its
timing, and several calls are timed in rounds, one of each per round, so on a
machine shared with other jobs they all see the same load.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class TimedCall:
  """One thing to time.

  Attributes:
    name: key of its times in the result of `time_interleaved`.
    call: () -> result; runs it once (it may update state it closes over).
    wait: result -> None; blocks until the result is computed (e.g.
      jax.block_until_ready), so each time covers the whole computation.
  """

  name: str
  call: Callable[[], Any]
  wait: Callable[[Any], None]


def time_interleaved(
  calls: list[TimedCall], num_warmup: int, num_timed: int
) -> dict[str, list[float]]:
  """Seconds of each call in `num_timed` rounds, after `num_warmup` untimed calls of each.

  Every round times each call once, in order, so on a machine shared with
  other jobs all the timings (the step, its parts, the peak matmul, PyTorch)
  see the same load, and their ratios stay meaningful when it changes.

  Returns:
    {name: [seconds of round 0, round 1, ...]} for each call.
  """
  for timed in calls:
    for _ in range(num_warmup):
      timed.wait(timed.call())
  times = {timed.name: [] for timed in calls}
  for _ in range(num_timed):
    for timed in calls:
      start = time.perf_counter()
      timed.wait(timed.call())
      times[timed.name].append(time.perf_counter() - start)
  return times


def median_ms(
  call: Callable[[], Any],
  num_timed: int,
  wait: Callable[[Any], None] = lambda _: None,
  num_warmup: int = 0,
) -> float:
  """Median milliseconds of `call` timed alone (`time_interleaved` of one call)."""
  times = time_interleaved([TimedCall("call", call, wait)], num_warmup, num_timed)["call"]
  return 1e3 * statistics.median(times)


def summarise_times(times: list[float]) -> dict:
  """{'median_s', 'min_s', 'max_s', 'all_s'} of a list of seconds."""
  return {
    "median_s": statistics.median(times),
    "min_s": min(times),
    "max_s": max(times),
    "all_s": times,
  }


def peak_host_memory_mb() -> float:
  """Peak resident memory of this process so far (getrusage maxrss), in MiB."""
  maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  # Linux reports KiB, macOS bytes.
  return maxrss / (1024.0 * 1024.0) if sys.platform == "darwin" else maxrss / 1024.0


def xla_flops(compiled) -> float:
  """FLOPs of a compiled JAX computation, from XLA's cost analysis.

  `jax.stages.Compiled.cost_analysis()` returns a dict in jax 0.10 (older
  versions: a list with one dict per program); under shard_map the program is
  the per-device one, so this is the FLOP count of one device.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, dict):
    analysis = [analysis]
  if not analysis or any(not entry or "flops" not in entry for entry in analysis):
    raise RuntimeError(f"XLA's cost analysis gave no 'flops' entry: {analysis!r}.")
  return float(sum(entry["flops"] for entry in analysis))


# ---------------------------------------------------------------------------
# The measured peak: a large matmul, timed like the step.


def prepare_peak_matmul(size: int, dtype_name: str) -> tuple[TimedCall, dict]:
  """A jitted (size, size) @ (size, size) matmul on the default device, compiled.

  Returns:
    its TimedCall ('peak_matmul') and {'size', 'dtype', 'flops' (2 size^3),
    'xla_flops' (XLA's count of the compiled matmul)}.
  """
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
  key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(key_a, (size, size), jnp.float32).astype(dtype)
  b = jax.random.normal(key_b, (size, size), jnp.float32).astype(dtype)
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  timed = TimedCall("peak_matmul", lambda: compiled(a, b), jax.block_until_ready)
  return timed, {
    "size": size,
    "dtype": dtype_name,
    "flops": 2.0 * size**3,
    "xla_flops": xla_flops(compiled),
  }


def peak_matmul_result(info: dict, times: list[float]) -> dict:
  """The matmul's facts, its times and 'flops_per_sec' (2 size^3 / median time)."""
  median = statistics.median(times)
  return {**info, **summarise_times(times), "flops_per_sec": info["flops"] / median}


def measure_peak_matmul(size: int, dtype_name: str, num_warmup: int, num_timed: int) -> dict:
  """Times the matmul of `prepare_peak_matmul` on its own.

  Returns:
    'size', 'dtype', 'flops', 'xla_flops', the times ('median_s', ...) and
    'flops_per_sec' (2 size^3 / median time).
  """
  timed, info = prepare_peak_matmul(size, dtype_name)
  times = time_interleaved([timed], num_warmup, num_timed)
  return peak_matmul_result(info, times["peak_matmul"])
