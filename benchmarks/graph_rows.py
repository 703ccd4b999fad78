r"""A graph loss on several devices: the whole graph on every device vs rows split over them.

  python -m benchmarks.graph_rows [--method ega] [--devices 8] [--batches 256,512,...]
                                  [--json OUT]

Times one forward + backward of a graph loss (--method: ega, rkd, pkt, irg, nce,
ccl) as the train step runs it inside shard_map (local (B/n, D) embeddings,
all-gathered, loss, gradient back through the gather) with
config.distill.graph_rows 'replicated' (every device computes the whole loss)
and 'sharded' (each device its B/n rows of the graph, sums psum'd), in
alternating rounds. D = 256 (configs/default.py's feature_dim), float32.

Reported per batch: the wall time of the call (all n devices), the FLOPs of the
graph products per device (`_GRAPH_SHAPES`: forward of both sides, backward
about twice the student side), and XLA's temporary buffer size of the compiled
program (`memory_analysis().temp_size_in_bytes`), which holds the largest
intermediates. With forced CPU devices all n share this machine's cores,
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
  parser.add_argument(
    "--method", default="ega", choices=_GRAPH_SHAPES, help="the graph loss (default ega)"
  )
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


# Per method, for A anchor rows (B replicated, B/n sharded) of a batch of B and
# width D: (entries of the graph-sized intermediates, multiply-adds of the graph
# products), forward, student and teacher sides together.
_GRAPH_SHAPES = {
  # The (2B, 2B) Pearson graph whole; sharded, (B/n, B) rows of E_t, E_s and N.
  "ega": lambda a, b, d, whole: (
    ((2 * b) ** 2, (2 * b) ** 2 * d) if whole else (3 * a * b, 3 * a * b * d)
  ),
  # Per side, (A, B, D) difference directions and (A, B, B) angles.
  "rkd": lambda a, b, d, whole: (2 * (a * b * d + a * b * b), 2 * a * b * b * d),
  # Per side, one (A, B) similarity / distance matrix.
  "pkt": lambda a, b, d, whole: (2 * a * b, 2 * a * b * d),
  "irg": lambda a, b, d, whole: (2 * a * b, 2 * a * b * d),
  # One (A, B) student-teacher similarity.
  "nce": lambda a, b, d, whole: (a * b, a * b * d),
  "ccl": lambda a, b, d, whole: (a * b, a * b * d),
}


def _graph_shape(method: str, variant: str, batch: int, devices: int, dim: int):
  anchors = batch if variant == "replicated" else batch // devices
  return _GRAPH_SHAPES[method](anchors, batch, dim, variant == "replicated")


def _predicted_bytes(method: str, variant: str, batch: int, devices: int, dim: int) -> float:
  """About four float32 graph-sized intermediates per device (values, cotangents), all devices."""
  entries, _ = _graph_shape(method, variant, batch, devices, dim)
  return 4 * entries * 4 * devices


def _graph_flops(method: str, variant: str, batch: int, devices: int, dim: int) -> float:
  """Forward + backward FLOPs of the graph products on one device (backward ~2x forward)."""
  _, multiply_adds = _graph_shape(method, variant, batch, devices, dim)
  return 3 * 2 * multiply_adds


def main(argv=None) -> int:
  args = _parse_args(argv)
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
  )
  import jax
  import jax.numpy as jnp
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
      return losses.distill_loss(
        args.method,
        student_emb=gathered(student),
        teacher_emb=gathered(teacher),
        labels=labels,
        student_logits=logits,
        teacher_logits=logits,
        axis_name=None if variant == "replicated" else "data",
      )

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

  print(
    f"{args.method}: {args.devices} forced CPU devices on {machine.one_line(machine.describe())}",
    flush=True,
  )
  results = []
  rng = np.random.default_rng(0)
  for batch in [int(b) for b in args.batches.split(",")]:
    teacher = jax.device_put(rng.normal(size=(batch, args.feature_dim)).astype(np.float32), rows)
    student = jax.device_put(rng.normal(size=(batch, args.feature_dim)).astype(np.float32), rows)
    # Global labels and (constant) logits for nce / ccl: 100 classes.
    labels = jnp.asarray(rng.integers(0, 100, size=batch))
    logits = jnp.asarray(rng.normal(size=(batch, 100)).astype(np.float32))
    calls, row = [], {"batch": batch}
    for variant in ("replicated", "sharded"):
      predicted = _predicted_bytes(args.method, variant, batch, args.devices, args.feature_dim)
      row[f"{variant}_gflop_per_device"] = (
        _graph_flops(args.method, variant, batch, args.devices, args.feature_dim) / 1e9
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
  record = {
    "method": args.method,
    "devices": args.devices,
    "feature_dim": args.feature_dim,
    "machine": machine.describe(),
  }
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
