r"""How many cores XLA:CPU's YNNPACK convolutions use, and what the fusion option costs in accuracy.

  python -m benchmarks.ynn_threads [--batch_size 64] [--size 32] [--channels 64] [--calls 20]
                                   [--students resnet8x4 MobileNetV2 ShuffleV1]
                                   [--grad_batch_size 8] [--json OUT]

Part 1 times one 3x3 convolution (B, size, size, C) -> C, NHWC, float32, compiled several ways
(`CASES`), and reports for each the wall time per call and the process CPU time / wall time
(1.0: one core busy; about the core count: all of them). jaxlib 0.10.2 hands XLA:CPU's
convolutions to YNNPACK; a YNNPACK fusion that holds the convolution alone ran on one core here,
the same convolution fused with a consumer on both (docs/performance.md, "YNNPACK runs a lone
convolution on one core").

Part 2 measures what the option that lets XLA fuse elementwise consumers into YNNPACK
(`ELTWISE_FUSION_OPTIONS`) does to a student's gradients: the relative L2 distance of the
float32 gradient (train-mode forward + backward of the cross-entropy, as
`jax_harness.student_cross_entropy`) from the same computation in float64, compiled with XLA's
default options and with that option.

Every case's output is checked against a float64 NumPy convolution. Run it from the repository
root.
"""

from __future__ import annotations

import argparse
import json
import re
import time

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from benchmarks import jax_harness
from benchmarks.conv_ablation import flat_float64
from ega_jax.models.students import STUDENT_NAMES, create_student

# XLA:CPU's library fusion kinds: convolutions, reductions and dots (as jaxlib 0.10.2 does) plus
# elementwise ops, so that a convolution and its elementwise consumer form one YNNPACK fusion.
ELTWISE_FUSION_OPTIONS = {
  "xla_cpu_experimental_ynn_fusion_type": ",".join(
    f"LIBRARY_FUSION_TYPE_{kind}" for kind in ("INDIVIDUAL_CONVOLUTION", "ELTWISE", "REDUCE", "DOT")
  )
}
# No YNNPACK fusions at all: XLA's own emitters, and Eigen's convolution.
NO_YNN_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def _conv(x, kernel):
  return lax.conv_general_dilated(
    x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


# name -> (function of (x, kernel), compiler options, NumPy function of the float64 conv output)
CASES = {
  "conv alone": (_conv, {}, lambda y: y),
  "conv + relu": (lambda x, k: jax.nn.relu(_conv(x, k)), {}, lambda y: np.maximum(y, 0)),
  "conv + relu, eltwise fusion": (
    lambda x, k: jax.nn.relu(_conv(x, k)),
    ELTWISE_FUSION_OPTIONS,
    lambda y: np.maximum(y, 0),
  ),
  "conv + channel sum": (lambda x, k: jnp.sum(_conv(x, k), axis=-1), {}, lambda y: y.sum(-1)),
  "conv alone, no YNNPACK": (_conv, NO_YNN_OPTIONS, lambda y: y),
}


def _reference_conv(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """float64 'SAME' 3x3 (or k x k, odd k) correlation, NHWC / HWIO."""
  k = kernel.shape[0]
  pad = k // 2
  padded = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  height, width = x.shape[1:3]
  out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
  for i in range(k):
    for j in range(k):
      out += padded[:, i : i + height, j : j + width] @ kernel[i, j].astype(np.float64)
  return out


def ynn_fused_ops(hlo_text: str) -> list[str]:
  """The HLO opcodes inside the computations that a compiled program's YNNPACK fusions call."""
  called = re.findall(r"calls=%([\w.\-]+)[^\n]*__ynn_fusion", hlo_text)
  blocks = {
    match.group(1): match.group(2)
    for match in re.finditer(r"^%([\w.\-]+) \(.*?\n(.*?)\n}", hlo_text, re.S | re.M)
  }
  ops = set()
  for name in called:
    ops.update(re.findall(r"= \S+ ([a-z\-]+)\(", blocks.get(name, "")))
  return sorted(ops - {"parameter", "constant"})


def time_conv_cases(batch_size: int, size: int, channels: int, calls: int, seed: int = 0) -> dict:
  """{case: {'ms_per_call', 'cpu_over_wall', 'ynn_fusions', 'ynn_fused_ops', 'max_abs_error'}}."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch_size, size, size, channels)).astype(np.float32)
  kernel = (0.05 * rng.standard_normal((3, 3, channels, channels))).astype(np.float32)
  reference = _reference_conv(x, kernel)
  results = {}
  for name, (function, options, numpy_function) in CASES.items():
    compiled = jax.jit(function, compiler_options=options).lower(x, kernel).compile()
    out = np.asarray(jax.block_until_ready(compiled(x, kernel)), np.float64)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
      jax.block_until_ready(compiled(x, kernel))
    wall = time.perf_counter() - start_wall
    cpu = time.process_time() - start_cpu
    hlo_text = compiled.as_text()
    results[name] = {
      "ms_per_call": 1e3 * wall / calls,
      "cpu_over_wall": cpu / wall,
      "ynn_fusions": hlo_text.count('"__ynn_fusion"'),
      "ynn_fused_ops": ynn_fused_ops(hlo_text),
      "max_abs_error": float(np.max(np.abs(out - numpy_function(reference)))),
    }
  return results


def student_loss(arch: str, batch_size: int, dtype, seed: int = 0):
  """(loss_fn, params): the train-mode cross-entropy of `arch` on seeded random images, the
  whole network (convolutions included) built to compute in `dtype`; params -> scalar."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch_size, 32, 32, 3)).astype(np.float32)
  labels = rng.integers(0, 100, batch_size)
  # The student's layers cast their inputs to the dtype they were built with, so a float64
  # reference needs a float64 student, not only float64 parameters.
  student = create_student(arch, 100, dtype=dtype)
  variables = create_student(arch, 100).init(jax.random.PRNGKey(seed), images[:2], train=False)
  cast = jax.tree.map(lambda leaf: jnp.asarray(leaf, dtype), variables)
  loss_fn = jax_harness.student_cross_entropy(
    student, cast["batch_stats"], jnp.asarray(images, dtype), jnp.asarray(labels)
  )
  return loss_fn, cast["params"]


def student_gradient_errors(arch: str, batch_size: int, options: dict, seed: int = 0) -> dict:
  """{name: relative L2 distance of the float32 gradient, compiled with options[name], from
  the same gradient in float64} for one student; the float64 gradient is computed once."""

  def gradient(dtype, compiler_options):
    loss_fn, params = student_loss(arch, batch_size, dtype, seed)
    return flat_float64(jax.jit(jax.grad(loss_fn), compiler_options=compiler_options)(params))

  with jax.enable_x64(True):
    reference = gradient(np.float64, {})
  scale = np.linalg.norm(reference)
  return {
    name: float(np.linalg.norm(gradient(np.float32, compiler_options) - reference) / scale)
    for name, compiler_options in options.items()
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--size", type=int, default=32, help="height = width of the conv's input")
  parser.add_argument("--channels", type=int, default=64, help="input = output channels")
  parser.add_argument("--calls", type=int, default=20, help="timed calls per case")
  parser.add_argument(
    "--students",
    nargs="*",
    default=["resnet8x4", "MobileNetV2", "ShuffleV1"],
    help="students whose gradient error to measure (none: skip part 2)",
  )
  parser.add_argument("--grad_batch_size", type=int, default=8)
  parser.add_argument("--json", default=None, help="write every number to this file")
  args = parser.parse_args(argv)
  unknown = [name for name in args.students if name not in STUDENT_NAMES]
  if unknown:
    parser.error(
      f"--students: unknown {', '.join(unknown)}; valid names are: {', '.join(STUDENT_NAMES)}."
    )
  if min(args.batch_size, args.size, args.channels, args.calls, args.grad_batch_size) < 1:
    parser.error("--batch_size, --size, --channels, --calls and --grad_batch_size must be >= 1.")

  print(
    f"3x3 conv ({args.batch_size}, {args.size}, {args.size}, {args.channels}) -> {args.channels}, "
    f"float32, {jax.devices()[0].device_kind}, {args.calls} calls each",
    flush=True,
  )
  convs = time_conv_cases(args.batch_size, args.size, args.channels, args.calls)
  print(f"{'case':<30}{'ms/call':>9}{'CPU/wall':>10}{'max |err|':>11}  in YNNPACK fusions")
  for name, row in convs.items():
    print(
      f"{name:<30}{row['ms_per_call']:>9.1f}{row['cpu_over_wall']:>10.2f}"
      f"{row['max_abs_error']:>11.1e}  {', '.join(row['ynn_fused_ops']) or '-'}",
      flush=True,
    )
  gradients = {}
  if args.students:
    print(f"\nstudent gradient, batch {args.grad_batch_size}: relative L2 error against float64")
    print(f"{'student':<14}{'default':>10}{'eltwise fusion':>16}")
  for arch in args.students:
    gradients[arch] = student_gradient_errors(
      arch, args.grad_batch_size, {"default": {}, "eltwise_fusion": ELTWISE_FUSION_OPTIONS}
    )
    print(
      f"{arch:<14}{gradients[arch]['default']:>10.1e}{gradients[arch]['eltwise_fusion']:>16.1e}",
      flush=True,
    )
  report = {"convolution": convs, "student_gradient_error": gradients, "args": vars(args)}
  if args.json:
    with open(args.json, "w") as handle:
      json.dump(report, handle, indent=2)
  return report


if __name__ == "__main__":
  main()
