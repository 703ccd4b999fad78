r"""Before/after timing of the convolution rewrites in ega_jax/models/conv.py and of the
students' hand-differentiated BatchNorm (ega_jax/models/batch_norm.py).

  python -m benchmarks.conv_ablation [--students resnet8x4 vgg8 MobileNetV2 ShuffleV1 ShuffleV2 | all]
                                     [--variants lax xla_weight_grad patch_weight_grad
                                                 flax_batch_norm conv.py]
                                     [--batch_size 64] [--rounds 5] [--json OUT]

For each student: the train-mode forward + backward (cross-entropy on random 32x32 images,
BatchNorm batch statistics, gradients of every parameter) -- the part of a cached EGA step that
the student owns -- compiled once per variant in one process:

  * "lax": every conv sent to XLA's own convolution (`conv.lax_conv`), forward and gradients;
  * "xla_weight_grad": `conv_nhwc`'s depthwise, grouped 1x1 and tiny-map rewrites, the other
    convs left to XLA, weight gradient included (`conv.PATCH_MATMUL_WEIGHT_GRAD_ON_CPU` off,
    `conv.CPU_CONV_LIBRARY` "xla"): conv.py before the weight-gradient rewrite;
  * "patch_weight_grad": the same with the patch-matmul weight gradient on CPU
    (`CPU_CONV_LIBRARY` "xla"): conv.py before oneDNN;
  * "flax_batch_norm": conv.py as shipped, every BatchNorm flax's `nn.BatchNorm` differentiated
    by JAX (the students before `models/batch_norm.py`);
  * "conv.py": `conv_nhwc` and the BatchNorm as shipped (oneDNN's float32 convolutions on CPU).

The first three keep the shipped BatchNorm.

`--variants` picks some of them ("conv.py" is always timed). They are timed in alternating
rounds (benchmarks/timing.py) so that all see the same machine load; the table gives the median
step time of each, the speed-up of conv.py over each, and the largest relative L2 distance
between conv.py's gradient tree and another's (float rounding only: ~1e-3 in float32 through
train-mode BatchNorm). Run it from the repository root.
"""

import argparse
import functools
import json
import statistics

import jax
import numpy as np

from benchmarks import jax_harness
from benchmarks import timing
from flax import linen as nn

from ega_jax import host_memory
from ega_jax.models import conv as conv_lib
from ega_jax.models.students import layers
from ega_jax.models.students import STUDENT_NAMES, create_student

DEFAULT_STUDENTS = ("resnet8x4", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2")


def _compiled_grad_step(student, variables, images, labels, variant):
  """jit-compiled (loss, grads) of the student with `VARIANTS[variant]` in every TorchConv
  (and BatchNorm)."""
  conv_function, patch_weight_grad, cpu_library, batch_norm = VARIANTS[variant]
  loss_fn = jax_harness.student_cross_entropy(student, variables["batch_stats"], images, labels)
  shipped = (
    conv_lib.conv_nhwc,
    conv_lib.PATCH_MATMUL_WEIGHT_GRAD_ON_CPU,
    conv_lib.CPU_CONV_LIBRARY,
    layers.batch_norm,
  )
  # All four are read at trace time by TorchConv / conv_nhwc / the students' blocks.
  conv_lib.conv_nhwc = conv_function
  conv_lib.PATCH_MATMUL_WEIGHT_GRAD_ON_CPU = patch_weight_grad
  conv_lib.CPU_CONV_LIBRARY = cpu_library or shipped[2]
  layers.batch_norm = batch_norm or shipped[3]
  try:
    compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(variables["params"]).compile()
  finally:
    (
      conv_lib.conv_nhwc,
      conv_lib.PATCH_MATMUL_WEIGHT_GRAD_ON_CPU,
      conv_lib.CPU_CONV_LIBRARY,
      layers.batch_norm,
    ) = shipped
  return compiled


def flax_batch_norm(*, name: str, train: bool, axis_name, dtype) -> nn.BatchNorm:
  """`layers.batch_norm`'s layer as flax's `nn.BatchNorm` (same variables and statistics)."""
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=layers.BATCH_NORM_MOMENTUM,
    epsilon=layers.BATCH_NORM_EPSILON,
    axis_name=axis_name,
    use_fast_variance=False,
    dtype=dtype,
    name=name,
  )


# name -> (conv function, patch-matmul weight gradient on CPU, CPU_CONV_LIBRARY, BatchNorm
# factory; None: shipped)
VARIANTS = {
  "lax": (conv_lib.lax_conv, False, "xla", None),
  "xla_weight_grad": (conv_lib.conv_nhwc, False, "xla", None),
  "patch_weight_grad": (conv_lib.conv_nhwc, True, "xla", None),
  "flax_batch_norm": (conv_lib.conv_nhwc, True, None, flax_batch_norm),
  "conv.py": (conv_lib.conv_nhwc, True, None, None),
}


def flat_float64(tree) -> np.ndarray:
  """Every leaf of `tree`, raveled and concatenated in float64 (leaf order)."""
  return np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree.leaves(tree)])


def measure(
  name: str, batch_size: int, rounds: int, steps_per_round: int = 3, variants=tuple(VARIANTS)
) -> dict:
  """Median step times (ms) of `variants` (and conv.py) for one student, and their agreement.

  The variants alternate call by call, `rounds * steps_per_round` timed calls each.
  """
  variants = [key for key in VARIANTS if key in variants or key == "conv.py"]
  student = create_student(name, 100)
  images = jax.random.normal(jax.random.PRNGKey(0), (batch_size, 32, 32, 3))
  labels = jax.random.randint(jax.random.PRNGKey(1), (batch_size,), 0, 100)
  variables = student.init(jax.random.PRNGKey(2), images[:2], train=False)
  steps = {key: _compiled_grad_step(student, variables, images, labels, key) for key in variants}
  outputs = {key: jax.block_until_ready(step(variables["params"])) for key, step in steps.items()}
  times = timing.time_interleaved(
    [
      timing.TimedCall(key, functools.partial(step, variables["params"]), jax.block_until_ready)
      for key, step in steps.items()
    ],
    0,
    rounds * steps_per_round,
  )
  shipped_grads = flat_float64(outputs["conv.py"][1])
  ms = {key: 1e3 * statistics.median(value) for key, value in times.items()}
  row = {"student": name, "batch_size": batch_size, "conv_py_ms": ms["conv.py"]}
  for key in variants[:-1]:
    row[f"{key}_ms"] = ms[key]
    row[f"speedup_over_{key}"] = ms[key] / ms["conv.py"]
  return {
    **row,
    "losses": {key: float(out[0]) for key, out in outputs.items()},
    # Relative L2 distance of each other variant's gradients from conv.py's: rounding only.
    "relative_grad_difference": max(
      float(np.linalg.norm(flat_float64(out[1]) - shipped_grads) / np.linalg.norm(shipped_grads))
      for key, out in outputs.items()
      if key != "conv.py"
    )
    if len(outputs) > 1
    else 0.0,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--students",
    nargs="+",
    default=list(DEFAULT_STUDENTS),
    help="CIFAR-zoo student names (ega_jax.models.STUDENT_NAMES), or 'all'",
  )
  parser.add_argument(
    "--variants",
    nargs="+",
    default=list(VARIANTS),
    choices=list(VARIANTS),
    help="which variants to time beside conv.py (default: all)",
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

  if args.students == ["all"]:
    args.students = list(STUDENT_NAMES)
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
  others = [key for key in VARIANTS if key in args.variants and key != "conv.py"]
  print(
    f"{'student':<14}"
    + "".join(f"{key + ' ms':>22}" for key in others)
    + f"{'conv.py ms':>12}"
    + "".join(f"{'vs ' + key:>22}" for key in others)
    + f"{'grad diff':>11}",
    flush=True,
  )
  results = []
  for name in args.students:
    row = measure(name, args.batch_size, args.rounds, variants=others)
    results.append(row)
    print(
      f"{name:<14}"
      + "".join(f"{row[key + '_ms']:>22.1f}" for key in others)
      + f"{row['conv_py_ms']:>12.1f}"
      + "".join(f"{row['speedup_over_' + key]:>21.2f}x" for key in others)
      + f"{row['relative_grad_difference']:>11.1e}",
      flush=True,
    )
  if args.json:
    with open(args.json, "w") as handle:
      json.dump(results, handle, indent=2)
  return results


if __name__ == "__main__":
  # Timed as training runs it: malloc keeps the step's temporary buffers (ega_jax/host_memory.py).
  host_memory.reexec_with_malloc_tuning()
  main()
