r"""Before/after measurements of the input-side speed work, on the real demo pipeline.

  python launch/ablations.py [--steps 30] [--json OUT]

Setting: configs/fashion_mnist.py (Fashion-MNIST from Debian's files, grain
loader with augmentation, batch 128), a random-weight ResNet-18 teacher at
32 px, resnet8 student, EGA. Each row turns one thing off ("before") and keeps
everything else as `python -m ega_jax.main` runs it ("after"):

  loop       before: every step reads and augments its batch on the spot (no
             reader threads), ships it, runs, and reads the loss back (a host
             sync per step); after: the production loop, grain's reader
             threads and `train.DevicePrefetcher` keeping 2 batches in flight,
             no host sync except every log_every_steps (20 here);
  donation   the same compiled step with and without `donate_argnums` on the
             state (timed alone on one pre-shipped batch);
  traffic    what the host would ship and compute per step if the teacher's
             resize and normalisation ran on the host (float32 at the teacher's
             resolution, 32 px here and 224 px for CLIP) instead of the device
             (uint8 at the data's 28 px): bytes, the host-side bicubic resize
             (PIL, per image), and the transfer.

Prints a table; --json writes every number.
"""

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


def _median_ms(function, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    function()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=30, help="steps per loop variant")
  parser.add_argument("--reader_threads", type=int, default=None,
                      help="grain reader threads of the production loop (default: the "
                      "pipeline's default)")
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh
  import numpy as np
  from PIL import Image

  from configs import fashion_mnist
  from ega_jax import data as data_lib
  from ega_jax import models as models_lib
  from ega_jax import train

  config = fashion_mnist.get_config()
  config.log_every_steps = 20
  info = data_lib.get_dataset_info(config.dataset.name)
  mesh = Mesh(np.array(jax.devices()), (train.AXIS,))
  teacher = models_lib.create_teacher("resnet18", image_size=32)
  teacher_variables_host = jax.jit(teacher.init)(jax.random.key(0, impl="unsafe_rbg"),
                                                 jnp.zeros((1, 32, 32, 3)))
  meta = {"image_size": 32, "mean": [0.286] * 3, "std": [0.353] * 3}
  models = train.build_models(config, teacher, meta, info.num_classes)
  num_train = config.dataset.max_train_examples
  student_tx, teacher_head_tx = train.create_optimizers(config, num_train)
  host_state = train.create_train_state(
      config, models, teacher_variables_host, jax.random.key(0, impl="unsafe_rbg"), (28, 28, 3),
      num_train, student_tx, teacher_head_tx)
  host_state = host_state.replace(rng=jax.random.PRNGKey(0))
  teacher_variables = train.replicate(teacher_variables_host, mesh)
  report = {"setting": "fashion_mnist 28px, resnet18 teacher @32px (random weights), resnet8, "
                       f"ega, batch {config.batch_size}, float32",
            "cpu_count": os.cpu_count(), "load_average_before": list(os.getloadavg())}

  import grain

  def loader(background: bool = True):
    # background=False: no reader threads, no prefetch buffer; each next()
    # reads and augments its batch on the spot.
    options = None if background else grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    if background and args.reader_threads is not None:
      options = grain.ReadOptions(num_threads=args.reader_threads, prefetch_buffer_size=8)
    return iter(data_lib.create_train_loader(
        config.dataset.name, None, global_batch_size=config.batch_size, seed=0,
        max_examples=num_train, read_options=options))

  # --- the loop: naive vs production --------------------------------------
  train_fn, _, _ = train.compile_steps(mesh, models, config, student_tx, teacher_head_tx)
  state = train.replicate(host_state, mesh)
  iterator = loader()
  warm = train.global_batch_from_local(mesh, next(iterator))
  state, metrics = train_fn(state, teacher_variables, warm, {})  # compile
  jax.block_until_ready(metrics)

  iterator = loader(background=False)
  start = time.perf_counter()
  for _ in range(args.steps):
    batch = train.global_batch_from_local(mesh, next(iterator))
    state, metrics = train_fn(state, teacher_variables, batch, {})
    float(metrics["loss"])  # a host sync every step
  naive_s = (time.perf_counter() - start) / args.steps

  iterator = loader()
  start = time.perf_counter()
  batches = train.DevicePrefetcher(iterator, mesh)
  history = []
  for step in range(1, args.steps + 1):
    state, metrics = train_fn(state, teacher_variables, next(batches), {})
    history.append(metrics)
    if step % config.log_every_steps == 0:
      jax.device_get(history)
      history = []
  jax.block_until_ready(state)
  production_s = (time.perf_counter() - start) / args.steps

  iterator = loader(background=False)
  host_batch_ms = _median_ms(lambda: next(iterator), args.steps)
  batch = train.global_batch_from_local(mesh, next(iterator))
  holder = [state]

  def step_alone():
    # The step donates its state: continue from the returned one.
    holder[0], metrics = train_fn(holder[0], teacher_variables, batch, {})
    jax.block_until_ready(metrics)

  step_alone_ms = _median_ms(step_alone, args.steps)
  report["loop"] = {"naive_step_ms": 1e3 * naive_s, "production_step_ms": 1e3 * production_s,
                    "host_batch_ms": host_batch_ms, "step_alone_ms": step_alone_ms}
  del state, holder

  # --- donation -----------------------------------------------------------
  donation = {}
  for donate in (True, False):
    function, _, _ = train.compile_steps(mesh, models, config, student_tx, teacher_head_tx,
                                         donate_state=donate)
    holder = [train.replicate(host_state, mesh)]

    def run_step():
      holder[0], metrics = function(holder[0], teacher_variables, batch, {})
      jax.block_until_ready(metrics)

    run_step()
    run_step()
    donation["with" if donate else "without"] = _median_ms(run_step, args.steps)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(host_state))
  report["donation"] = {"with_ms": donation["with"], "without_ms": donation["without"],
                        "state_mib": state_bytes / 2**20}

  # --- traffic: uint8 at the data's size vs float32 at the teacher's ------
  traffic = {}
  rng = np.random.default_rng(0)
  for name, size, teacher_size, count in (("demo (28 -> 32 px)", 28, 32, 128),
                                          ("CIFAR + CLIP (32 -> 224 px)", 32, 224, 64)):
    uint8_views = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)

    def host_preprocess():
      resized = np.stack([np.asarray(Image.fromarray(view).resize(
          (teacher_size, teacher_size), Image.BICUBIC)) for view in uint8_views])
      return ((resized.astype(np.float32) / 255.0 - 0.5) / 0.25)

    float_views = host_preprocess()
    ship = lambda array: jax.block_until_ready(jax.device_put(array))  # noqa: E731
    traffic[name] = {
        "uint8_bytes": int(uint8_views.nbytes), "float32_bytes": int(float_views.nbytes),
        "uint8_transfer_ms": _median_ms(lambda: ship(uint8_views), 10),
        "float32_transfer_ms": _median_ms(lambda: ship(float_views), 10),
        "host_resize_normalise_ms": _median_ms(host_preprocess, 5),
    }
  report["traffic"] = traffic
  report["load_average_after"] = list(os.getloadavg())

  loop, donation = report["loop"], report["donation"]
  rows = [
      ("setting", report["setting"]),
      ("load average before / after", f"{report['load_average_before'][0]:.2f} / "
                                      f"{report['load_average_after'][0]:.2f}"),
      ("loop: naive (read on the spot, sync every step)", f"{loop['naive_step_ms']:.1f} ms"),
      ("loop: production (prefetch, sync every 20)", f"{loop['production_step_ms']:.1f} ms"),
      ("  host batch (read + augment, one thread) alone", f"{loop['host_batch_ms']:.1f} ms"),
      ("  compiled step alone", f"{loop['step_alone_ms']:.1f} ms"),
      ("donation: with / without", f"{donation['with_ms']:.1f} / {donation['without_ms']:.1f} ms "
                                   f"(state {donation['state_mib']:.1f} MiB)"),
  ]
  for name, row in traffic.items():
    rows.append((f"traffic {name}: uint8 / float32",
                 f"{row['uint8_bytes'] / 2**20:.2f} / {row['float32_bytes'] / 2**20:.2f} MiB; "
                 f"transfer {row['uint8_transfer_ms']:.2f} / {row['float32_transfer_ms']:.2f} ms; "
                 f"host resize+normalise {row['host_resize_normalise_ms']:.1f} ms"))
  width = max(len(name) for name, _ in rows)
  print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
