r"""Before/after measurements of the input-side speed work, on the real demo pipeline.

  python -m benchmarks.ablations [--steps 30] [--json OUT]

Setting: configs/fashion_mnist.py (Fashion-MNIST from Debian's files, grain
loader with augmentation, batch 128), a random-weight ResNet-18 teacher at
32 px, resnet8 student, EGA, set up by `train.run.build_run`. Each row turns
one thing off ("before") and keeps everything else as `python -m ega_jax.main`
runs it ("after"):

  loop       before: every step reads and augments its batch on the spot (no
             reader threads), ships it, runs, and reads the loss back (a host
             sync per step); after: the production loop (train/loop.py),
             grain's reader threads and its `ThreadPrefetchIterDataset`
             keeping 2 global batches in flight, no host sync except every
             log_every_steps (20 here);
  donation   the same compiled step with and without `donate_argnums` on the
             state (timed alone on one pre-shipped batch, in alternating rounds);
  traffic    what the host would ship and compute per step if the teacher's
             resize and normalisation ran on the host (float32 at the teacher's
             resolution, 32 px here and 224 px for CLIP) instead of the device
             (uint8 at the data's 28 px): bytes, the host-side bicubic resize
             (PIL, per image), and the transfer.

Prints a table; --json writes every number. Run it from the repository root.
"""

import argparse
import json
import os
import statistics
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from benchmarks import timing
from ega_jax.configs import fashion_mnist
from ega_jax import data as data_lib
from ega_jax import models as models_lib
from ega_jax.train import loop as loop_lib
from ega_jax.train import run as run_lib
from ega_jax.train import state as state_lib

TEACHER_SIZE = 32


def build_demo_run(config, donate_state: bool = True) -> run_lib.Run:
  """`build_run` of the demo setting with a random-weight ResNet-18 teacher at 32 px."""
  info = data_lib.get_dataset_info(config.dataset)
  teacher = models_lib.create_teacher("resnet18", image_size=TEACHER_SIZE)
  # 'unsafe_rbg': its initialisers compile ~3-4x faster on CPU than threefry's.
  teacher_variables = jax.jit(teacher.init)(
    jax.random.key(0, impl="unsafe_rbg"), jnp.zeros((1, TEACHER_SIZE, TEACHER_SIZE, 3))
  )
  meta = {"image_size": TEACHER_SIZE, "mean": [0.286] * 3, "std": [0.353] * 3}
  return run_lib.build_run(
    config,
    state_lib.data_mesh(),
    teacher_module=teacher,
    teacher_variables=teacher_variables,
    teacher_meta=meta,
    num_classes=info.num_classes,
    num_train_examples=config.dataset.max_train_examples,
    image_shape=(info.image_size, info.image_size, 3),
    donate_state=donate_state,
    init_rng=jax.random.key(0, impl="unsafe_rbg"),
  )


def train_dataset(config, background: bool = True, reader_threads: int | None = None):
  """The demo's train loader (a grain IterDataset of this process's batches).

  background=False: no reader threads, no prefetch buffer; each next() reads
  and augments its batch on the spot.
  """
  options = None if background else grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  if background and reader_threads is not None:
    options = grain.ReadOptions(num_threads=reader_threads, prefetch_buffer_size=8)
  return data_lib.create_train_loader(
    config.dataset.name,
    None,
    global_batch_size=config.batch_size,
    seed=0,
    max_examples=config.dataset.max_train_examples,
    read_options=options,
  )


def measure_loop(config, run: run_lib.Run, num_steps: int, reader_threads: int | None):
  """The naive and the production loop, the host batch and the step alone (ms per step).

  Returns:
    (the 'loop' row, the live state after these steps, the pre-shipped batch
    the step alone was timed on).
  """
  mesh, step = run.mesh, run.train_step
  state = run.state
  warm = state_lib.global_batch_from_local(mesh, next(iter(train_dataset(config))))
  state, metrics = step(state, run.teacher_variables, warm, {})  # compile
  jax.block_until_ready(metrics)

  iterator = iter(train_dataset(config, background=False))
  start = time.perf_counter()
  for _ in range(num_steps):
    batch = state_lib.global_batch_from_local(mesh, next(iterator))
    state, metrics = step(state, run.teacher_variables, batch, {})
    float(metrics["loss"])  # a host sync every step
  naive_s = (time.perf_counter() - start) / num_steps

  dataset = train_dataset(config, reader_threads=reader_threads)
  start = time.perf_counter()
  # Exactly train/loop.py's input: global batches prefetched by grain.
  batches = iter(
    grain.experimental.ThreadPrefetchIterDataset(
      dataset.map(lambda local: state_lib.global_batch_from_local(mesh, local)),
      prefetch_buffer_size=loop_lib.DEVICE_PREFETCH,
    )
  )
  history = []
  for index in range(1, num_steps + 1):
    state, metrics = step(state, run.teacher_variables, next(batches), {})
    history.append(metrics)
    if index % config.log_every_steps == 0:
      jax.device_get(history)
      history = []
  jax.block_until_ready(state)
  production_s = (time.perf_counter() - start) / num_steps

  iterator = iter(train_dataset(config, background=False))
  host_batch_ms = timing.median_ms(lambda: next(iterator), num_steps)
  batch = state_lib.global_batch_from_local(mesh, next(iterator))
  holder = [state]

  def step_alone():
    # The step donates its state: continue from the returned one.
    holder[0], metrics = step(holder[0], run.teacher_variables, batch, {})
    return metrics

  step_alone_ms = timing.median_ms(step_alone, num_steps, wait=jax.block_until_ready)
  row = {
    "naive_step_ms": 1e3 * naive_s,
    "production_step_ms": 1e3 * production_s,
    "host_batch_ms": host_batch_ms,
    "step_alone_ms": step_alone_ms,
  }
  return row, holder[0], batch


def measure_donation(config, run: run_lib.Run, state, batch, num_steps: int) -> dict:
  """The step with donation (`run`, continuing from `state`) and without (its own run)."""
  without = build_demo_run(config, donate_state=False)
  holders = {"with": [state], "without": [without.state]}
  steps = {"with": run.train_step, "without": without.train_step}

  def timed(name):
    def call():
      holders[name][0], metrics = steps[name](holders[name][0], run.teacher_variables, batch, {})
      return metrics

    return timing.TimedCall(name, call, jax.block_until_ready)

  # Two untimed calls each (the first compiles the donation-free step).
  times = timing.time_interleaved([timed("with"), timed("without")], 2, num_steps)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(without.state))
  return {
    "with_ms": 1e3 * statistics.median(times["with"]),
    "without_ms": 1e3 * statistics.median(times["without"]),
    "state_mib": state_bytes / 2**20,
  }


def measure_traffic() -> dict:
  """Bytes, transfer and host-side resize: uint8 at the data's size vs float32 at the teacher's."""
  traffic = {}
  rng = np.random.default_rng(0)
  for name, size, teacher_size, count in (
    ("demo (28 -> 32 px)", 28, 32, 128),
    ("CIFAR + CLIP (32 -> 224 px)", 32, 224, 64),
  ):
    uint8_views = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)

    def host_preprocess():
      resized = np.stack(
        [
          np.asarray(Image.fromarray(view).resize((teacher_size, teacher_size), Image.BICUBIC))
          for view in uint8_views
        ]
      )
      return (resized.astype(np.float32) / 255.0 - 0.5) / 0.25

    float_views = host_preprocess()
    traffic[name] = {
      "uint8_bytes": int(uint8_views.nbytes),
      "float32_bytes": int(float_views.nbytes),
      "uint8_transfer_ms": timing.median_ms(
        lambda: jax.device_put(uint8_views), 10, wait=jax.block_until_ready
      ),
      "float32_transfer_ms": timing.median_ms(
        lambda: jax.device_put(float_views), 10, wait=jax.block_until_ready
      ),
      "host_resize_normalise_ms": timing.median_ms(host_preprocess, 5),
    }
  return traffic


def format_table(report: dict) -> str:
  loop, donation = report["loop"], report["donation"]
  rows = [
    ("setting", report["setting"]),
    (
      "load average before / after",
      f"{report['load_average_before'][0]:.2f} / {report['load_average_after'][0]:.2f}",
    ),
    ("loop: naive (read on the spot, sync every step)", f"{loop['naive_step_ms']:.1f} ms"),
    ("loop: production (prefetch, sync every 20)", f"{loop['production_step_ms']:.1f} ms"),
    ("  host batch (read + augment, one thread) alone", f"{loop['host_batch_ms']:.1f} ms"),
    ("  compiled step alone", f"{loop['step_alone_ms']:.1f} ms"),
    (
      "donation: with / without",
      f"{donation['with_ms']:.1f} / {donation['without_ms']:.1f} ms "
      f"(state {donation['state_mib']:.1f} MiB)",
    ),
  ]
  for name, row in report["traffic"].items():
    rows.append(
      (
        f"traffic {name}: uint8 / float32",
        f"{row['uint8_bytes'] / 2**20:.2f} / {row['float32_bytes'] / 2**20:.2f} MiB; "
        f"transfer {row['uint8_transfer_ms']:.2f} / {row['float32_transfer_ms']:.2f} ms; "
        f"host resize+normalise {row['host_resize_normalise_ms']:.1f} ms",
      )
    )
  width = max(len(name) for name, _ in rows)
  return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=30, help="steps per loop variant")
  parser.add_argument(
    "--reader_threads",
    type=int,
    default=None,
    help="grain reader threads of the production loop (default: the pipeline's default)",
  )
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)

  config = fashion_mnist.get_config()
  config.log_every_steps = 20
  run = build_demo_run(config)
  report = {
    "setting": "fashion_mnist 28px, resnet18 teacher @32px (random weights), resnet8, "
    f"ega, batch {config.batch_size}, float32",
    "cpu_count": os.cpu_count(),
    "load_average_before": list(os.getloadavg()),
  }
  report["loop"], state, batch = measure_loop(config, run, args.steps, args.reader_threads)
  report["donation"] = measure_donation(config, run, state, batch, args.steps)
  report["traffic"] = measure_traffic()
  report["load_average_after"] = list(os.getloadavg())
  print(format_table(report))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {args.json}")
  return report


if __name__ == "__main__":
  main()
