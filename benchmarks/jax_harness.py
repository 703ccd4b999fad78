"""The production train step, built by `train.run.build_run` and compiled, ready to time.

What is timed is what `python -m ega_jax.main` runs: `build_run`'s train step
over a ('data',) mesh of all local devices, with its initial state, fed
synthetic uint8 batches made into global arrays by
`state.global_batch_from_local`. The teacher has random weights
(`create_teacher(arch).init`), so no converted checkpoint is needed; its
resolution, mean and std come from `TEACHER_SPECS`. Besides the step: the
teacher's forward pass alone, the same step fed cached teacher embeddings, and
the student's forward and forward + backward alone (`student_calls`).
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import BenchmarkError
from benchmarks import timing
from ega_jax import config as config_lib
from ega_jax import data as data_lib
from ega_jax import models as models_lib
from ega_jax.train import run as run_lib
from ega_jax.train import state as state_lib
from ega_jax.train import steps as steps_lib


def random_teacher(arch: str, image_size: int | None, seed: int):
  """(module, host variables, meta) of a random-weight teacher at `image_size` (None: its spec's).

  Raises:
    BenchmarkError: the teacher cannot run at that resolution.
  """
  spec = models_lib.TEACHER_SPECS[arch]
  image_size = image_size or spec.image_size
  try:
    module = models_lib.create_teacher(arch, image_size=image_size)
  except ValueError as error:
    raise BenchmarkError(f"--teacher_image_size={image_size}: {error}") from error
  # Random weights are all a timing needs; drawn with 'unsafe_rbg', whose
  # initialiser compiles ~3x faster on CPU than the default threefry's.
  variables = jax.jit(module.init)(
    jax.random.key(seed, impl="unsafe_rbg"), jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  )
  return module, variables, {"image_size": image_size, "mean": spec.mean, "std": spec.std}


def prepare_jax(
  config,
  local_batches: list[dict],
  *,
  teacher_image_size: int | None = None,
  with_cached_step: bool = False,
) -> tuple[list[timing.TimedCall], dict, Callable[[], float]]:
  """Builds the run, compiles its train step (and the teacher alone, the cached step).

  Args:
    local_batches: this process's rows of the synthetic batches
      ({'image', 'teacher_image': (b, H, W, 3) uint8, 'label', 'index': (b,)}).
    teacher_image_size: the teacher's resolution (None: its spec's).
    with_cached_step: also compile the step fed float16 teacher embeddings.

  Returns:
    (timed calls 'jax_step' [+ 'jax_teacher_forward' when the method uses the
    teacher] [+ 'jax_cached_step'], facts measured once: compile times, first
    step, FLOPs, ..., last_loss(): the loss of the latest step run).
  """
  devices = jax.local_devices()
  num_devices = len(devices)
  if config.batch_size % num_devices:
    raise BenchmarkError(
      f"--config.batch_size={config.batch_size} must be a multiple of the "
      f"device count ({num_devices})."
    )
  mesh = state_lib.data_mesh(devices)
  info = data_lib.get_dataset_info(config.dataset)
  teacher_module, teacher_host_variables, teacher_meta = random_teacher(
    config.teacher.arch, teacher_image_size, config.seed
  )
  crd_labels = None
  if config.distill.method == "crd":
    crd_labels = np.arange(info.num_train, dtype=np.int32) % info.num_classes
  # The parameters are drawn with 'unsafe_rbg' (threefry's initialiser
  # compiles ~4x slower); the state keeps the production (threefry) key.
  run = run_lib.build_run(
    config,
    mesh,
    teacher_module=teacher_module,
    teacher_variables=teacher_host_variables,
    teacher_meta=teacher_meta,
    num_classes=info.num_classes,
    num_train_examples=info.num_train,
    image_shape=(info.image_size, info.image_size, 3),
    crd_train_labels=crd_labels,
    init_rng=jax.random.key(config.seed, impl="unsafe_rbg"),
  )
  # The cached step gets its own copy: each step donates its state.
  cached_state = jax.tree.map(jnp.copy, run.state) if with_cached_step else None
  # Global batches are made before timing, as the production loop's grain
  # prefetch keeps them in flight ahead of the step; the host ships uint8 only.
  batches = [state_lib.global_batch_from_local(mesh, b) for b in local_batches]

  start = time.perf_counter()
  lowered = run.train_step.lower(run.state, run.teacher_variables, batches[0], run.crd_tables)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  flops_per_device = timing.xla_flops(compiled)

  state = run.state
  step_count = [0]
  latest_metrics = []

  def run_step():
    nonlocal state
    batch = batches[step_count[0] % len(batches)]
    step_count[0] += 1
    # The step donates its state: always continue from the returned one.
    state, metrics = compiled(state, run.teacher_variables, batch, run.crd_tables)
    latest_metrics[:] = [metrics]
    return state, metrics

  start = time.perf_counter()
  jax.block_until_ready(run_step())
  first_step_s = time.perf_counter() - start
  facts = {
    "backend": jax.default_backend(),
    "device_kind": devices[0].device_kind,
    "num_devices": num_devices,
    "teacher_image_size": teacher_meta["image_size"],
    "lower_s": lower_s,
    "compile_s": compile_s,
    "first_step_s": first_step_s,
    "first_loss": float(latest_metrics[0]["loss"]),
    "flops_per_step_per_device": flops_per_device,
    "flops_per_step": flops_per_device * num_devices,
  }
  calls = [timing.TimedCall("jax_step", run_step, jax.block_until_ready)]
  if config_lib.uses_teacher(config):
    calls.append(
      _teacher_alone(
        run,
        teacher_host_variables,
        local_batches[0]["teacher_image"],
        config.batch_size // num_devices,
        devices[0],
        facts,
      )
    )
  if with_cached_step:
    calls.append(
      _cached_step(run, cached_state, teacher_host_variables, local_batches, config.seed, facts)
    )
  return calls, facts, lambda: float(latest_metrics[0]["loss"])


def _teacher_alone(
  run: run_lib.Run,
  teacher_host_variables,
  teacher_images: np.ndarray,
  per_device_batch: int,
  device,
  facts: dict,
) -> timing.TimedCall:
  """The teacher's forward pass (resize, normalise, backbone) on one device's slice, compiled.

  Adds 'teacher_forward_flops_per_device' to `facts`.
  """
  models = run.models

  def teacher_forward(variables, images_uint8):
    return steps_lib.live_teacher_embedding(models, variables, images_uint8)

  variables = jax.device_put(teacher_host_variables, device)
  source = jax.device_put(teacher_images[:per_device_batch], device)
  compiled = jax.jit(teacher_forward).lower(variables, source).compile()
  facts["teacher_forward_flops_per_device"] = timing.xla_flops(compiled)
  return timing.TimedCall(
    "jax_teacher_forward", lambda: compiled(variables, source), jax.block_until_ready
  )


def _cached_step(
  run: run_lib.Run,
  cached_state,
  teacher_host_variables,
  local_batches: list[dict],
  seed: int,
  facts: dict,
) -> timing.TimedCall:
  """The same step reading cached float16 teacher embeddings, compiled and run once.

  This is what config.teacher.cache feeds it: the teacher neither runs nor
  sits on the devices. Adds 'cached_compile_s', 'cached_flops_per_step[_per_device]'
  and 'teacher_feature_dim' to `facts`.
  """
  models = run.models
  size = models.teacher_image_size
  feature_dim = jax.eval_shape(
    models.teacher.apply, teacher_host_variables, jnp.zeros((1, size, size, 3), jnp.float32)
  ).shape[-1]
  rng = np.random.default_rng(seed + 1)
  cached_batches = [
    state_lib.global_batch_from_local(
      run.mesh,
      {
        "image": b["image"],
        "label": b["label"],
        "index": b["index"],
        "teacher_feature": rng.standard_normal((len(b["label"]), feature_dim)).astype(np.float16),
      },
    )
    for b in local_batches
  ]
  no_teacher = state_lib.replicate({}, run.mesh)
  start = time.perf_counter()
  compiled = run.train_step.lower(
    cached_state, no_teacher, cached_batches[0], run.crd_tables
  ).compile()
  facts["cached_compile_s"] = time.perf_counter() - start
  facts["cached_flops_per_step_per_device"] = timing.xla_flops(compiled)
  facts["cached_flops_per_step"] = facts["cached_flops_per_step_per_device"] * run.mesh.size
  facts["teacher_feature_dim"] = int(feature_dim)
  state = cached_state
  count = [0]

  def run_cached_step():
    nonlocal state
    batch = cached_batches[count[0] % len(cached_batches)]
    count[0] += 1
    state, metrics = compiled(state, no_teacher, batch, run.crd_tables)
    return state, metrics

  jax.block_until_ready(run_cached_step())
  return timing.TimedCall("jax_cached_step", run_cached_step, jax.block_until_ready)


def _train_mode_logits(student, params, batch_stats, images: jax.Array) -> jax.Array:
  """(B, num_classes) logits of `student` with BatchNorm on the batch's statistics."""
  (logits, _), _ = student.apply(
    {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
  )
  return logits


def student_cross_entropy(student, batch_stats, images: jax.Array, labels: jax.Array):
  """params -> mean cross-entropy of the train-mode `student` on (images, labels).

  BatchNorm uses the batch's statistics, as in the train step; the running
  averages it would update are dropped. images: (B, H, W, 3) float; labels: (B,) int.
  """

  def loss_fn(params):
    logits = _train_mode_logits(student, params, batch_stats, images)
    # float32 at least (bfloat16 logits), float64 kept for float64 references.
    log_probs = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))

  return loss_fn


def student_calls(
  arch: str, num_classes: int, images: np.ndarray, labels: np.ndarray, dtype: str, seed: int
) -> list[timing.TimedCall]:
  """The student's share of the step, alone, on one device: what the PyTorch student is timed on.

  'jax_student_forward' is the train-mode forward (logits); 'jax_student_forward_backward'
  is that plus the gradient of the cross-entropy with respect to every parameter
  (`jax.value_and_grad`). Both are compiled and run once here.

  Args:
    images: (B, H, W, 3) float32, normalised as the step normalises them.
    labels: (B,) int32.
    dtype: the config's compute dtype name ('float32' or 'bfloat16').
  """
  student = models_lib.create_student(arch, num_classes, dtype=jnp.dtype(dtype))
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  variables = jax.jit(lambda key: student.init(key, images[:2], train=False))(
    jax.random.key(seed, impl="unsafe_rbg")
  )
  params, batch_stats = variables["params"], variables["batch_stats"]

  def forward(params):
    return _train_mode_logits(student, params, batch_stats, images)

  loss_fn = student_cross_entropy(student, batch_stats, images, labels)
  compiled_forward = jax.jit(forward).lower(params).compile()
  compiled_grad = jax.jit(jax.value_and_grad(loss_fn)).lower(params).compile()
  calls = [
    timing.TimedCall(
      "jax_student_forward", lambda: compiled_forward(params), jax.block_until_ready
    ),
    timing.TimedCall(
      "jax_student_forward_backward", lambda: compiled_grad(params), jax.block_until_ready
    ),
  ]
  for timed in calls:
    timed.wait(timed.call())
  return calls
