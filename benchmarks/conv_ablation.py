r"""Before/after timing of the convolution rewrites in ega_jax/models/conv.py.

  python -m benchmarks.conv_ablation [--students resnet8x4 vgg8 MobileNetV2 ShuffleV1 ShuffleV2]
                                     [--batch_size 64] [--rounds 5] [--json OUT]

For each student: the train-mode forward + backward (cross-entropy on random 32x32 images,
BatchNorm batch statistics, gradients of every parameter) -- the part of a cached EGA step that
the student owns -- compiled twice in one process: "after" with `conv_nhwc` as shipped
(depthwise as shifted multiply-adds, grouped 1x1 as a batched matmul, tiny maps as a patch
matmul), "before" with every conv sent to XLA's own convolution (`conv.lax_conv`). The two
are timed in alternating rounds (benchmarks/timing.py) so that both see the same machine
load; the table gives the median step time of each, the speed-up, and the relative L2
distance between the two gradient trees (float rounding only: ~1e-3 in float32, ~1e-14 when
the same students compute in float64). Run it from the repository root.
"""

import argparse
import functools
import json
import statistics

import jax
import numpy as np

from benchmarks import jax_harness
from benchmarks import timing
from ega_jax.models import conv as conv_lib
from ega_jax.models.students import STUDENT_NAMES, create_student

DEFAULT_STUDENTS = ("resnet8x4", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2")


def _compiled_grad_step(student, variables, images, labels, conv_function):
  """jit-compiled (loss, grads) of the student with `conv_function` in every TorchConv."""
  loss_fn = jax_harness.student_cross_entropy(student, variables["batch_stats"], images, labels)
  shipped = conv_lib.conv_nhwc
  conv_lib.conv_nhwc = conv_function  # read at trace time by TorchConv
  try:
    compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(variables["params"]).compile()
  finally:
    conv_lib.conv_nhwc = shipped
  return compiled


def measure(name: str, batch_size: int, rounds: int, steps_per_round: int = 3) -> dict:
  """Median step times (ms) before/after the rewrites for one student, and their agreement.

  The two variants alternate call by call, `rounds * steps_per_round` timed calls each.
  """
  student = create_student(name, 100)
  images = jax.random.normal(jax.random.PRNGKey(0), (batch_size, 32, 32, 3))
  labels = jax.random.randint(jax.random.PRNGKey(1), (batch_size,), 0, 100)
  variables = student.init(jax.random.PRNGKey(2), images[:2], train=False)
  steps = {
    "before": _compiled_grad_step(student, variables, images, labels, conv_lib.lax_conv),
    "after": _compiled_grad_step(student, variables, images, labels, conv_lib.conv_nhwc),
  }
  outputs = {key: jax.block_until_ready(step(variables["params"])) for key, step in steps.items()}
  times = timing.time_interleaved(
    [
      timing.TimedCall(key, functools.partial(step, variables["params"]), jax.block_until_ready)
      for key, step in steps.items()
    ],
    0,
    rounds * steps_per_round,
  )
  (loss_before, grads_before), (loss_after, grads_after) = outputs["before"], outputs["after"]
  # Relative L2 distance of the two gradient trees. In float32 it is ~1e-3 (rounding,
  # amplified through train-mode BatchNorm); with float64 students it was ~6e-15.
  before, after = (
    np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree.leaves(grads)])
    for grads in (grads_before, grads_after)
  )
  grad_error = float(np.linalg.norm(before - after) / np.linalg.norm(before))
  before_ms = 1e3 * statistics.median(times["before"])
  after_ms = 1e3 * statistics.median(times["after"])
  return {
    "student": name,
    "batch_size": batch_size,
    "before_ms": before_ms,
    "after_ms": after_ms,
    "speedup": before_ms / after_ms,
    "loss_before": float(loss_before),
    "loss_after": float(loss_after),
    "relative_grad_difference": grad_error,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--students",
    nargs="+",
    default=list(DEFAULT_STUDENTS),
    help="CIFAR-zoo student names (ega_jax.models.STUDENT_NAMES)",
  )
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument(
    "--rounds",
    type=int,
    default=5,
    help="rounds of 3 timed steps per variant, the variants alternating",
  )
  parser.add_argument("--json", default=None, help="write every number to this file")
  args = parser.parse_args(argv)

  unknown = [name for name in args.students if name not in STUDENT_NAMES]
  if unknown:
    parser.error(
      f"--students: unknown {', '.join(unknown)}; valid names are: {', '.join(STUDENT_NAMES)}."
    )
  if args.batch_size < 1 or args.rounds < 1:
    parser.error("--batch_size and --rounds must be positive integers.")

  print(
    f"student forward + backward, batch {args.batch_size}, 32x32, float32, "
    f"{jax.devices()[0].device_kind} x {jax.device_count()}",
    flush=True,
  )
  print(
    f"{'student':<14}{'lax conv ms':>13}{'conv.py ms':>12}{'speed-up':>10}{'grad diff':>11}",
    flush=True,
  )
  results = []
  for name in args.students:
    row = measure(name, args.batch_size, args.rounds)
    results.append(row)
    print(
      f"{name:<14}{row['before_ms']:>13.1f}{row['after_ms']:>12.1f}"
      f"{row['speedup']:>9.2f}x{row['relative_grad_difference']:>11.1e}",
      flush=True,
    )
  if args.json:
    with open(args.json, "w") as handle:
      json.dump(results, handle, indent=2)
  return results


if __name__ == "__main__":
  main()
