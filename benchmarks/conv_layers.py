r"""Each convolution of a student, timed alone in JAX and in PyTorch: forward, input and weight gradients.

  python -m benchmarks.conv_layers [--student resnet8x4] [--batch_size 64] [--rounds 7] [--json OUT]

The convolutions are read from the student itself (every `TorchConv` call of a
train-mode forward on 32x32 images, with its input shape, kernel, stride,
padding and groups; repeated shapes are timed once and counted). For each, in
alternating rounds (benchmarks/timing.py) so that both see the same load:

  * JAX, each part compiled on its own: the forward `conv.conv_nhwc` (what the
    students run), its input gradient and its weight gradient (`jax.vjp`);
  * PyTorch (oneDNN on CPU): `F.conv2d`, `torch.nn.grad.conv2d_input` and
    `torch.nn.grad.conv2d_weight` on NCHW tensors of the same shapes.

This is where the student's forward + backward (`benchmarks.step --compare_torch`)
spends its time and which part of it loses to PyTorch (docs/performance.md).
Parts timed alone see warm caches and no neighbouring ops, so their sum is not
the network's time. Run it from the repository root.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics

import torch  # noqa: I001  (before anything could import tensorflow)
import torch.nn.functional as F

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from ega_jax.models import conv as conv_lib
from ega_jax.models.students import STUDENT_NAMES, create_student

# (height, width, in channels, out channels, kernel, stride, padding, groups)
ConvShape = tuple[int, int, int, int, int, int, int, int]


def student_convs(name: str, batch_size: int) -> collections.Counter:
  """Counter of the ConvShape of every TorchConv call in `name`'s train-mode forward."""
  student = create_student(name, 100)
  images = jnp.zeros((batch_size, 32, 32, 3), jnp.float32)
  found = collections.Counter()

  def record(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, conv_lib.TorchConv) and context.method_name == "__call__":
      _, height, width, channels = args[0].shape
      found[
        (
          height,
          width,
          channels,
          module.features,
          module.kernel_size,
          module.stride,
          module.padding,
          module.groups,
        )
      ] += 1
    return next_fun(*args, **kwargs)

  variables = jax.eval_shape(lambda: student.init(jax.random.key(0), images[:2], train=False))
  with nn.intercept_methods(record):
    jax.eval_shape(
      lambda v: student.apply(v, images, train=True, mutable=["batch_stats"]), variables
    )
  return found


def conv_calls(shape: ConvShape, batch_size: int, seed: int = 0) -> list[timing.TimedCall]:
  """TimedCalls 'jax_forward', 'jax_input_grad', 'jax_weight_grad', 'torch_*' for one conv.

  Both frameworks get the same random input, kernel and output gradient (JAX's
  NHWC / HWIO arrays transposed to NCHW / OIHW), so each pair of calls returns
  the same tensor up to layout and float32 rounding.
  """
  height, width, channels, features, k, stride, padding, groups = shape
  keys = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(keys[0], (batch_size, height, width, channels))
  kernel = 0.1 * jax.random.normal(keys[1], (k, k, channels // groups, features))

  def forward(x, kernel):
    return conv_lib.conv_nhwc(x, kernel, stride=stride, padding=padding, groups=groups)

  dy = jax.random.normal(keys[2], jax.eval_shape(forward, x, kernel).shape)
  jax_forward = jax.jit(forward)
  input_grad = jax.jit(lambda x, kernel, dy: jax.vjp(lambda x: forward(x, kernel), x)[1](dy)[0])
  weight_grad = jax.jit(lambda x, kernel, dy: jax.vjp(lambda w: forward(x, w), kernel)[1](dy)[0])

  # The same numbers in PyTorch's layouts (NCHW, OIHW), so both compute the same function.
  x_t = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
  w_t = torch.from_numpy(np.asarray(kernel).transpose(3, 2, 0, 1).copy())
  dy_t = torch.from_numpy(np.asarray(dy).transpose(0, 3, 1, 2).copy())
  conv_args = {"stride": stride, "padding": padding, "groups": groups}

  def torch_forward():
    with torch.no_grad():
      return F.conv2d(x_t, w_t, **conv_args)

  calls = [
    timing.TimedCall("jax_forward", lambda: jax_forward(x, kernel), jax.block_until_ready),
    timing.TimedCall("jax_input_grad", lambda: input_grad(x, kernel, dy), jax.block_until_ready),
    timing.TimedCall("jax_weight_grad", lambda: weight_grad(x, kernel, dy), jax.block_until_ready),
    timing.TimedCall("torch_forward", torch_forward, lambda _: None),
    timing.TimedCall(
      "torch_input_grad",
      lambda: torch.nn.grad.conv2d_input(x_t.shape, w_t, dy_t, **conv_args),
      lambda _: None,
    ),
    timing.TimedCall(
      "torch_weight_grad",
      lambda: torch.nn.grad.conv2d_weight(x_t, w_t.shape, dy_t, **conv_args),
      lambda _: None,
    ),
  ]
  return calls


PARTS = ("forward", "input_grad", "weight_grad")


def measure(name: str, batch_size: int, rounds: int) -> dict:
  """Median ms of each part of each distinct conv of `name`, JAX and PyTorch, and the totals.

  The first conv's input gradient is timed too, though a step never needs it
  (the images are not trained); the totals leave it out.
  """
  convs = student_convs(name, batch_size)
  rows = []
  for index, (shape, count) in enumerate(convs.items()):
    times = timing.time_interleaved(conv_calls(shape, batch_size), 1, rounds)
    row = {
      "shape": dict(
        zip(("height", "width", "in", "out", "kernel", "stride", "padding", "groups"), shape)
      ),
      "count": count,
      **{key: 1e3 * statistics.median(value) for key, value in times.items()},
    }
    row["first"] = index == 0
    rows.append(row)
  totals = {}
  for framework in ("jax", "torch"):
    for part in PARTS:
      totals[f"{framework}_{part}"] = sum(
        row["count"] * row[f"{framework}_{part}"]
        for row in rows
        if not (part == "input_grad" and row["first"])
      )
  return {"student": name, "batch_size": batch_size, "convs": rows, "total_ms": totals}


def format_table(result: dict) -> str:
  """One line per distinct conv, then the totals (count x median), ms."""
  header = f"{'conv (HxW in->out kKsS gG) x count':<38}" + "".join(
    f"{f'{fw} {part}':>20}" for fw in ("jax", "torch") for part in PARTS
  )
  lines = [header]
  for row in result["convs"]:
    s = row["shape"]
    label = (
      f"{s['height']}x{s['width']} {s['in']}->{s['out']} k{s['kernel']}s{s['stride']}"
      f" g{s['groups']} x{row['count']}"
    )
    lines.append(
      f"{label:<38}"
      + "".join(f"{row[f'{fw}_{part}']:>20.2f}" for fw in ("jax", "torch") for part in PARTS)
    )
  totals = result["total_ms"]
  lines.append(
    f"{'total (first input grad left out)':<38}"
    + "".join(f"{totals[f'{fw}_{part}']:>20.1f}" for fw in ("jax", "torch") for part in PARTS)
  )
  ratios = ", ".join(
    f"{part} {totals[f'torch_{part}'] / totals[f'jax_{part}']:.2f}x" for part in PARTS
  )
  lines.append(f"JAX / PyTorch speed (PyTorch ms / JAX ms): {ratios}")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--student", default="resnet8x4", help="a name of ega_jax.models.STUDENT_NAMES"
  )
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=7, help="timed rounds per conv and part")
  parser.add_argument("--torch_threads", type=int, default=None, help="default: os.cpu_count()")
  parser.add_argument("--json", default=None, help="write every number to this file")
  args = parser.parse_args(argv)
  if args.student not in STUDENT_NAMES:
    parser.error(f"--student={args.student!r} is unknown; valid: {', '.join(STUDENT_NAMES)}.")
  if args.batch_size < 1 or args.rounds < 1:
    parser.error("--batch_size and --rounds must be positive integers.")
  torch.set_num_threads(args.torch_threads or os.cpu_count())
  print(
    f"{args.student}: each conv alone, batch {args.batch_size}, float32, median of "
    f"{args.rounds} rounds, ms; JAX on {jax.devices()[0].device_kind}, PyTorch "
    f"{torch.__version__} on {torch.get_num_threads()} threads",
    flush=True,
  )
  result = measure(args.student, args.batch_size, args.rounds)
  print(format_table(result), flush=True)
  if args.json:
    with open(args.json, "w") as handle:
      json.dump(result, handle, indent=2)
  return result


if __name__ == "__main__":
  main()
