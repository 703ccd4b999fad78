r"""EGA's graph loss on several devices: the whole graph on every device vs rows split over them.

  python -m benchmarks.graph_rows [--devices 8] [--batches 256,512,...] [--json OUT]

Times one forward + backward of the EGA loss as the train step runs it inside
shard_map (local (B/n, D) embeddings, all-gathered, loss, gradient back through
the gather) with config.distill.graph_rows 'replicated' (every device builds the
(2B, 2B) graph) and 'sharded' (each device its (B/n, B) rows, norms psum'd), in
alternating rounds. D = 256 (configs/default.py's feature_dim), float32.

Reported per batch: the wall time of the call (all n devices), the FLOPs of the
graph products per device (replicated 2*(2B)^2*D forward; sharded 3*2*(B/n)*B*D
forward; backward about twice each), and XLA's temporary buffer size of the
compiled program (`memory_analysis().temp_size_in_bytes`), which holds the
largest intermediates. With forced CPU devices all n share this machine's cores,
so the wall time measures total work, not one device's; on real accelerators
each device runs its share in parallel. A replicated batch whose graph
intermediates would not fit in memory is skipped and marked so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--devices", type=int, default=8, help="forced CPU devices (default 8)")
  parser.add_argument(
    "--batches", default="256,512,1024,2048,4096,8192,16384", help="global batch sizes B"
  )
  parser.add_argument("--feature_dim", type=int, default=256)
  parser.add_argument("--rounds", type=int, default=5, help="timed rounds per batch size")
  parser.add_argument(
    "--memory_limit_gb",
    type=float,
    default=12.0,
    help="skip a variant whose predicted graph intermediates exceed this (all devices)",
  )
  parser.add_argument("--json", default=None, help="write every number to this file")
  return parser.parse_args(argv)


def _predicted_bytes(variant: str, batch: int, devices: int) -> int:
  """About four float32 graph-sized intermediates per device (graph, blocks, their cotangents)."""
  entries = (2 * batch) ** 2 if variant == "replicated" else 3 * (batch // devices) * batch
  return 4 * entries * 4 * devices


def _graph_flops(variant: str, batch: int, devices: int, dim: int) -> float:
  """Forward + backward FLOPs of the graph products on one device (backward ~2x forward)."""
  forward = (
    2 * (2 * batch) ** 2 * dim if variant == "replicated" else 3 * 2 * batch**2 * dim / devices
  )
  return 3 * forward


def main(argv=None) -> int:
  args = _parse_args(argv)
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
  )
  import jax
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from benchmarks import machine
  from benchmarks.timing import TimedCall, time_interleaved
  from ega_jax import losses

  if jax.device_count() != args.devices:
    print(
      f"error: asked for {args.devices} devices, jax has {jax.device_count()}.", file=sys.stderr
    )
    return 2
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  rows = NamedSharding(mesh, P("data"))

  def gathered(x):
    return jax.lax.all_gather(x, "data", axis=0, tiled=True)

  def per_device(variant):
    def loss(teacher, student):
      if variant == "replicated":
        return losses.ega_loss(gathered(teacher), gathered(student))
      return losses.ega_loss_row_sharded(gathered(teacher), gathered(student), "data")

    def value_and_grad(teacher, student):
      # The train step's convention: each device's share is loss / n.
      value, grad = jax.value_and_grad(lambda s: loss(teacher, s) / jax.lax.axis_size("data"))(
        student
      )
      return jax.lax.psum(value, "data"), grad

    return jax.jit(
      jax.shard_map(
        value_and_grad, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=(P(), P("data"))
      )
    )

  print(f"{args.devices} forced CPU devices on {machine.one_line(machine.describe())}", flush=True)
  results = []
  rng = np.random.default_rng(0)
  for batch in [int(b) for b in args.batches.split(",")]:
    teacher = jax.device_put(rng.normal(size=(batch, args.feature_dim)).astype(np.float32), rows)
    student = jax.device_put(rng.normal(size=(batch, args.feature_dim)).astype(np.float32), rows)
    calls, row = [], {"batch": batch}
    for variant in ("replicated", "sharded"):
      predicted = _predicted_bytes(variant, batch, args.devices)
      row[f"{variant}_gflop_per_device"] = (
        _graph_flops(variant, batch, args.devices, args.feature_dim) / 1e9
      )
      if predicted > args.memory_limit_gb * 2**30:
        row[f"{variant}_skipped"] = f"predicted {predicted / 2**30:.0f} GiB"
        continue
      step = per_device(variant)
      compiled = step.lower(teacher, student).compile()
      row[f"{variant}_temp_mib"] = compiled.memory_analysis().temp_size_in_bytes / 2**20
      row[f"{variant}_loss"] = float(step(teacher, student)[0])
      calls.append(
        TimedCall(variant, lambda step=step: step(teacher, student), jax.block_until_ready)
      )
    times = time_interleaved(calls, num_warmup=1, num_timed=args.rounds)
    for name, seconds in times.items():
      row[f"{name}_ms"] = 1e3 * float(np.median(seconds))
    if "replicated_ms" in row and "sharded_ms" in row:
      row["replicated_over_sharded"] = row["replicated_ms"] / row["sharded_ms"]
    results.append(row)
    print(_format_row(row), flush=True)
  record = {"devices": args.devices, "feature_dim": args.feature_dim, "machine": machine.describe()}
  record["rows"] = results
  if args.json:
    with open(args.json, "w") as f:
      json.dump(record, f, indent=2)
  return 0


def _format_row(row: dict) -> str:
  def cell(variant):
    if f"{variant}_skipped" in row:
      return f"{variant}: skipped ({row[f'{variant}_skipped']})"
    return (
      f"{variant}: {row[f'{variant}_ms']:9.1f} ms, temp {row[f'{variant}_temp_mib']:8.1f} MiB, "
      f"{row[f'{variant}_gflop_per_device']:7.2f} GFLOP/device"
    )

  ratio = row.get("replicated_over_sharded")
  tail = f"  replicated/sharded {ratio:.2f}x" if ratio else ""
  return f"B={row['batch']:6d}  {cell('replicated')}  |  {cell('sharded')}{tail}"


if __name__ == "__main__":
  sys.exit(main())
