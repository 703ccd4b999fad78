"""Distillation training: the train state, the per-device SPMD steps and the loop.

The steps are written as per-device code with named-axis collectives over a
1-D ('data',) mesh of all devices and compiled with
`jax.jit(jax.shard_map(...))`, which is what `jax.pmap` itself runs on since
JAX 0.8. Embeddings (and logits, labels, indices) are all-gathered, so every
graph loss sees the global batch; BatchNorm statistics are cross-replica; the
gradient equals the single-device gradient of the same global batch:

* a term computed from a per-device slice (cross-entropy) is written as its
  local sum divided by the *global* batch size, so its sum over devices is the
  global mean;
* a term computed from all-gathered values (the graph losses) has the same
  value on every device; it is divided by the number of devices;
* the gradient of replicated parameters is summed over devices by shard_map's
  transpose of the implicit broadcast, which turns both kinds into the exact
  global gradient. tests/test_train.py checks 1 device against 8.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Iterator, Mapping

from absl import logging
import flax
import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ega_jax import data as data_lib
from ega_jax import losses
from ega_jax import models as models_lib
from ega_jax.models import heads

AXIS = "data"

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TEACHER_VIEWS = ("independent", "same")
NONFINITE_POLICIES = ("skip", "stop")


class UserInputError(ValueError):
  """A user mistake (config, files, data); reported as one line, no traceback."""


class ConfigError(UserInputError):
  """A configuration value that cannot work; the message names the field."""


class NonFiniteError(FloatingPointError):
  """Training met a non-finite loss or gradient under nonfinite_policy='stop'."""


class PreemptionRequested:
  """Turns SIGTERM/SIGINT into a flag the loop polls after each step.

  The step in flight finishes, a checkpoint is written, and the run exits
  cleanly; a second signal while stopping falls back to the default action.
  """

  SIGNALS = ("SIGTERM", "SIGINT")

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
      for name in self.SIGNALS:
        number = getattr(signal, name)
        self._previous[number] = signal.signal(number, self._handle)
    return self

  def _handle(self, number, frame):
    import signal

    del frame
    self.signal_name = signal.Signals(number).name
    # A second signal gets the default behaviour (e.g. Ctrl-C twice kills).
    signal.signal(number, self._previous.get(number, signal.SIG_DFL))

  def __exit__(self, *exc):
    import signal

    for number, handler in self._previous.items():
      signal.signal(number, handler)
    return False

  def requested(self, step: int, log_every: int) -> bool:
    """Whether to stop after this step; all processes agree.

    With several processes the flag is combined over processes only at the
    logging cadence, so the loop gains no per-step host synchronisation.
    """
    if jax.process_count() == 1:
      return self.signal_name is not None
    if step % log_every:
      return False
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.array(self.signal_name is not None))
    return bool(np.any(flags))


# ---------------------------------------------------------------------------
# State and models.


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue, except the frozen teacher.

  The teacher backbone's variables are an argument of the steps, never part of
  the state: they are neither optimised nor checkpointed (the converted file is
  referenced by the config instead).
  """

  step: jnp.ndarray  # () int32
  student_params: Any  # {'backbone', 'head'[, 'crd_student', 'crd_teacher']}
  student_batch_stats: Any
  student_opt_state: Any
  teacher_head_params: Any  # the teacher's node-embedding head + classifier
  teacher_head_opt_state: Any
  crd_memory: Any  # losses.CRDMemory for method 'crd', else an empty dict
  rng: jnp.ndarray  # PRNG key, replicated
  skipped_steps: jnp.ndarray  # () int32: updates skipped for non-finite values
  first_nonfinite_step: jnp.ndarray  # () int32: first such step (1-based), -1 if none


@dataclasses.dataclass(frozen=True)
class DistillModels:
  """The modules of a run and the fixed numbers the steps need (static)."""

  student: nn.Module
  student_head: heads.EmbeddingClassifierHead
  teacher: nn.Module
  teacher_head: heads.EmbeddingClassifierHead
  crd_projection: heads.ContrastiveProjection | None
  teacher_image_size: int
  teacher_mean: tuple[float, float, float]
  teacher_std: tuple[float, float, float]
  data_mean: tuple[float, float, float]
  data_std: tuple[float, float, float]
  dtype: Any


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ConfigError (one sentence naming the field) for values that cannot work."""
  valid_datasets = tuple(data_lib.DATASETS)
  if config.dataset.name not in valid_datasets:
    raise ConfigError(
        f"config.dataset.name={config.dataset.name!r} is not a known dataset; "
        f"valid: {', '.join(valid_datasets)}.")
  if config.student.arch not in models_lib.STUDENT_NAMES:
    raise ConfigError(
        f"config.student.arch={config.student.arch!r} is not a known student; "
        f"valid: {', '.join(models_lib.STUDENT_NAMES)}.")
  if config.teacher.arch not in models_lib.TEACHER_SPECS:
    raise ConfigError(
        f"config.teacher.arch={config.teacher.arch!r} is not a known teacher; "
        f"valid: {', '.join(models_lib.TEACHER_SPECS)}.")
  if config.distill.method not in losses.DISTILL_METHODS:
    raise ConfigError(
        f"config.distill.method={config.distill.method!r} is not a known method; "
        f"valid: {', '.join(losses.DISTILL_METHODS)}.")
  if config.teacher_view not in TEACHER_VIEWS:
    raise ConfigError(
        f"config.teacher_view={config.teacher_view!r} is not valid; valid: "
        f"{', '.join(TEACHER_VIEWS)}.")
  if config.dtype not in DTYPES:
    raise ConfigError(
        f"config.dtype={config.dtype!r} is not valid; valid: {', '.join(DTYPES)}.")
  if config.nonfinite_policy not in NONFINITE_POLICIES:
    raise ConfigError(
        f"config.nonfinite_policy={config.nonfinite_policy!r} is not valid; "
        f"valid: {', '.join(NONFINITE_POLICIES)}.")
  for field in ("batch_size", "eval_batch_size"):
    value = config[field]
    if value <= 0 or value % num_devices:
      raise ConfigError(
          f"config.{field}={value} must be a positive multiple of the device "
          f"count ({num_devices}), because it is the global batch split evenly "
          "over all devices.")
  if config.distill.method in ("rkd", "irg", "ega", "pkt", "nce", "ccl"):
    if config.batch_size < 2:
      raise ConfigError(
          f"config.batch_size={config.batch_size} is too small for a graph loss "
          f"({config.distill.method}); use at least 2.")
  if config.feature_dim <= 0:
    raise ConfigError(f"config.feature_dim={config.feature_dim} must be positive.")
  if not config.teacher.checkpoint:
    raise ConfigError(
        "config.teacher.checkpoint is empty; set it to a directory written by "
        "launch/convert_teacher.py (it holds teacher.json).")
  if not os.path.isdir(config.teacher.checkpoint):
    raise ConfigError(
        f"config.teacher.checkpoint={config.teacher.checkpoint!r} is not a "
        "directory; run launch/convert_teacher.py to create it.")
  cache_dir = config.teacher.get("cache", "")
  if cache_dir and not os.path.isdir(cache_dir):
    raise ConfigError(
        f"config.teacher.cache={cache_dir!r} is not a directory; build it with "
        "launch/cache_teacher.py or leave config.teacher.cache empty to run the teacher live.")


def uses_teacher(config) -> bool:
  """False for cross-entropy-only training, which needs no teacher forward pass."""
  return config.distill.method != "none" or bool(config.distill.alpha)


def distill_hparams(config: ml_collections.ConfigDict) -> dict[str, float]:
  """The flat hyperparameter mapping that losses.distill_loss reads."""
  d = config.distill
  return {
      "node_weight": d.node_weight,
      "edge_weight": d.edge_weight,
      "kd_temperature": d.kd_temperature,
      "rkd_distance_weight": d.rkd_distance_weight,
      "rkd_angle_weight": d.rkd_angle_weight,
      "nce_temperature": d.nce_temperature,
      "irg_vertex_weight": d.irg_vertex_weight,
      "irg_edge_weight": d.irg_edge_weight,
  }


def build_models(config, teacher_module, teacher_meta, num_classes: int) -> DistillModels:
  """Builds the student, heads and (already loaded) teacher of a run.

  The student's BatchNorm layers use the mesh axis name so their batch
  statistics are computed over the global batch.
  """
  dtype = DTYPES[config.dtype]
  info = data_lib.get_dataset_info(config.dataset.name)
  student = models_lib.create_student(
      config.student.arch, num_classes, bn_axis_name=AXIS, dtype=dtype)
  if dtype != jnp.float32 and hasattr(teacher_module, "dtype"):
    teacher_module = teacher_module.clone(dtype=dtype)
  crd_projection = None
  if config.distill.method == "crd":
    crd_projection = heads.ContrastiveProjection(config.distill.crd_feature_dim, dtype=dtype)
  return DistillModels(
      student=student,
      student_head=heads.EmbeddingClassifierHead(config.feature_dim, num_classes, dtype=dtype),
      teacher=teacher_module,
      teacher_head=heads.EmbeddingClassifierHead(config.feature_dim, num_classes, dtype=dtype),
      crd_projection=crd_projection,
      teacher_image_size=int(teacher_meta["image_size"]),
      teacher_mean=tuple(float(v) for v in teacher_meta["mean"]),
      teacher_std=tuple(float(v) for v in teacher_meta["std"]),
      data_mean=tuple(info.mean),
      data_std=tuple(info.std),
      dtype=dtype,
  )


# ---------------------------------------------------------------------------
# Pre-processing on device.


def normalize_images(images_uint8: jnp.ndarray, mean, std) -> jnp.ndarray:
  """(B, H, W, 3) uint8 -> (B, H, W, 3) float32, (x/255 - mean) / std."""
  images = images_uint8.astype(jnp.float32) / 255.0
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def teacher_inputs(images_uint8: jnp.ndarray, image_size: int, mean, std) -> jnp.ndarray:
  """(B, h, w, 3) uint8 -> (B, S, S, 3) float32 for the teacher.

  Bicubic resize to the teacher's resolution (as the released code's
  `transforms.Resize(S, BICUBIC)`), clipped to the valid pixel range like a PIL
  image, then the teacher's own normalisation.
  """
  images = images_uint8.astype(jnp.float32) / 255.0
  batch, height, width, channels = images.shape
  if (height, width) != (image_size, image_size):
    images = jax.image.resize(
        images, (batch, image_size, image_size, channels), method="bicubic")
    images = jnp.clip(images, 0.0, 1.0)
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def teacher_embedding(teacher: nn.Module, variables, images_uint8: jnp.ndarray,
                      image_size: int, mean, std, dtype=jnp.float32) -> jnp.ndarray:
  """The frozen backbone on raw views: (B, h, w, 3) uint8 -> (B, D) float32.

  `teacher_inputs` (resize, clip, normalise) on device, then the teacher in
  `dtype`. The one place the teacher runs: live steps, evaluation, the
  embedding cache's builder and the benchmark.
  """
  images = teacher_inputs(images_uint8, image_size, mean, std)
  return teacher.apply(variables, images.astype(dtype)).astype(jnp.float32)


def _live_teacher_embedding(models: DistillModels, variables, images_uint8) -> jnp.ndarray:
  return teacher_embedding(models.teacher, variables, images_uint8, models.teacher_image_size,
                           models.teacher_mean, models.teacher_std, models.dtype)


# ---------------------------------------------------------------------------
# Optimisers.


def steps_per_epoch(config, num_train_examples: int) -> int:
  return max(1, num_train_examples // config.batch_size)


def total_train_steps(config, num_train_examples: int) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return int(config.num_epochs * steps_per_epoch(config, num_train_examples))


def student_learning_rate_schedule(config, num_train_examples: int) -> optax.Schedule:
  """Step-wise decay by lr_decay_rate at each epoch in lr_decay_epochs.

  The released code decays at the start of epoch e+1 for each e in the list
  (`epoch > e`, epochs counted from 1), i.e. from step e * steps_per_epoch on.
  """
  spe = steps_per_epoch(config, num_train_examples)
  boundaries = {}
  for epoch in config.lr_decay_epochs:
    step = int(epoch * spe)
    boundaries[step] = boundaries.get(step, 1.0) * config.lr_decay_rate
  return optax.piecewise_constant_schedule(config.learning_rate, boundaries)


def sgd_with_weight_decay(learning_rate, momentum: float, weight_decay: float):
  """PyTorch's SGD: g += wd * p; buf = momentum * buf + g; p -= lr * buf."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.sgd(learning_rate, momentum=momentum),
  )


def create_optimizers(config, num_train_examples: int):
  student_tx = sgd_with_weight_decay(
      student_learning_rate_schedule(config, num_train_examples),
      config.momentum, config.weight_decay)
  # The teacher head's learning rate is never decayed (as released).
  teacher_head_tx = sgd_with_weight_decay(
      config.teacher_head_learning_rate, config.teacher_head_momentum,
      config.teacher_head_weight_decay)
  return student_tx, teacher_head_tx


# ---------------------------------------------------------------------------
# Initialisation.


def init_train_state(config, models: DistillModels, teacher_variables, rng,
                     image_shape, num_train_examples: int, student_tx, teacher_head_tx
                     ) -> TrainState:
  """Initialises the student, the heads, both optimisers and the CRD memory.

  Args:
    teacher_variables: the teacher's variables, or their jax.ShapeDtypeStructs
      (only their shapes are used, to size the teacher head).
    image_shape: (H, W, 3) of the student's input.
  """
  init_rng, head_rng, teacher_head_rng, crd_rng, mem_rng, state_rng = jax.random.split(rng, 6)
  dummy = jnp.zeros((2, *image_shape), jnp.float32)
  # Initialise outside the mesh: BatchNorm's axis name is unbound here, so
  # use an identical module without it.
  student_no_axis = models.student.clone(bn_axis_name=None)
  student_variables = student_no_axis.init(init_rng, dummy, train=False)
  _, student_features = jax.eval_shape(
      lambda v, x: student_no_axis.apply(v, x, train=False), student_variables, dummy)
  head_params = models.student_head.init(
      head_rng, jnp.zeros(student_features["penultimate"].shape, jnp.float32))["params"]

  teacher_dummy = jnp.zeros((1, models.teacher_image_size, models.teacher_image_size, 3),
                            jnp.float32)
  teacher_feature = jax.eval_shape(
      lambda v, x: models.teacher.apply(v, x), teacher_variables, teacher_dummy)
  teacher_head_params = models.teacher_head.init(
      teacher_head_rng, jnp.zeros(teacher_feature.shape, jnp.float32))["params"]

  student_params = {"backbone": student_variables["params"], "head": head_params}
  crd_memory = {}
  if models.crd_projection is not None:
    s_rng, t_rng = jax.random.split(crd_rng)
    embedding = jnp.zeros((1, config.feature_dim), jnp.float32)
    student_params["crd_student"] = models.crd_projection.init(s_rng, embedding)["params"]
    student_params["crd_teacher"] = models.crd_projection.init(t_rng, embedding)["params"]
    crd_memory = losses.init_crd_memory(
        mem_rng, num_train_examples, config.distill.crd_feature_dim)

  return TrainState(
      step=jnp.zeros((), jnp.int32),
      student_params=student_params,
      student_batch_stats=student_variables.get("batch_stats", {}),
      student_opt_state=student_tx.init(student_params),
      teacher_head_params=teacher_head_params,
      teacher_head_opt_state=teacher_head_tx.init(teacher_head_params),
      crd_memory=crd_memory,
      rng=state_rng,
      skipped_steps=jnp.zeros((), jnp.int32),
      first_nonfinite_step=jnp.full((), -1, jnp.int32),
  )


def create_train_state(config, models: DistillModels, teacher_variables, rng, image_shape,
                       num_train_examples: int, student_tx, teacher_head_tx) -> TrainState:
  """`init_train_state` compiled as one program (op by op it took ~15 s on a
  2-core CPU); the teacher's variables only lend their shapes."""
  teacher_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                teacher_variables)
  return jax.jit(lambda key: init_train_state(
      config, models, teacher_shapes, key, image_shape, num_train_examples, student_tx,
      teacher_head_tx))(rng)


# ---------------------------------------------------------------------------
# Per-device steps (run under shard_map over AXIS).


def _cross_entropy_sum(logits, labels, mask=None):
  """Sum over the rows of the softmax cross-entropy. (B, C), (B,) -> ()."""
  per_example = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)
  if mask is not None:
    per_example = per_example * mask
  return jnp.sum(per_example)


def _correct_topk(logits, labels, k):
  """(B, C), (B,) -> (B,) float32: 1 where the label is among the top-k logits."""
  topk = jax.lax.top_k(logits.astype(jnp.float32), k)[1]
  return jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)


def _all_gather(x):
  return jax.lax.all_gather(x, AXIS, axis=0, tiled=True)


def _tree_all_finite(tree) -> jnp.ndarray:
  leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(leaf.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def train_step(state: TrainState, teacher_variables, batch, crd_tables, *,
               models: DistillModels, config, student_tx, teacher_head_tx,
               hparams: Mapping[str, float]):
  """One SGD step on this device's slice of the global batch.

  Args:
    state: replicated TrainState.
    teacher_variables: replicated frozen teacher variables.
    batch: this device's slice: 'image', 'teacher_image' (b, H, W, 3) uint8,
      'label' (b,) int32, 'index' (b,) int32; with a teacher-embedding cache
      'teacher_feature' (b, D) float16 replaces 'teacher_image' and the
      teacher does not run.
    crd_tables: replicated class tables for CRD negatives (empty dict otherwise).

  Returns:
    (new_state, metrics): both replicated; metrics are global-batch values.
  """
  method = config.distill.method
  num_devices = jax.lax.axis_size(AXIS)
  labels = batch["label"]
  global_labels = _all_gather(labels)
  global_batch = global_labels.shape[0]
  step_rng = jax.random.fold_in(state.rng, state.step)

  student_images = normalize_images(batch["image"], models.data_mean, models.data_std)
  # Cross-entropy alone needs no teacher: neither its forward pass nor its
  # head runs (the head stays as initialised and its accuracy is not reported).
  with_teacher = uses_teacher(config)
  if with_teacher and "teacher_feature" in batch:
    teacher_feature = batch["teacher_feature"].astype(jnp.float32)
  elif with_teacher:
    teacher_source = batch["image"] if config.teacher_view == "same" else batch["teacher_image"]
    teacher_feature = jax.lax.stop_gradient(
        _live_teacher_embedding(models, teacher_variables, teacher_source))

  def objective(student_params, teacher_head_params):
    (_, student_features), new_model_state = models.student.apply(
        {"params": student_params["backbone"], "batch_stats": state.student_batch_stats},
        student_images.astype(models.dtype), train=True, mutable=["batch_stats"])
    backbone_feature = student_features["penultimate"]
    student_emb, student_logits = models.student_head.apply(
        {"params": student_params["head"]}, backbone_feature)
    student_emb = student_emb.astype(jnp.float32)
    student_logits = student_logits.astype(jnp.float32)

    # Local terms: local sum / global batch (their sum over devices is the mean).
    ce_student = _cross_entropy_sum(student_logits, labels) / global_batch
    ce_teacher = jnp.zeros((), jnp.float32)
    teacher_correct = jnp.zeros((), jnp.float32)
    if with_teacher:
      teacher_emb, teacher_logits = models.teacher_head.apply(
          {"params": teacher_head_params}, teacher_feature)
      teacher_emb = teacher_emb.astype(jnp.float32)
      teacher_logits = teacher_logits.astype(jnp.float32)
      ce_teacher = _cross_entropy_sum(teacher_logits, labels) / global_batch
      teacher_correct = jnp.sum(_correct_topk(teacher_logits, labels, 1))
      # Global terms: every device computes the same value from gathered rows.
      if not config.distill.train_teacher_head_jointly:
        teacher_emb_for_distill = jax.lax.stop_gradient(teacher_emb)
      else:
        teacher_emb_for_distill = teacher_emb
      global_teacher_emb = _all_gather(teacher_emb_for_distill)
      global_teacher_logits = _all_gather(jax.lax.stop_gradient(teacher_logits))
    global_student_emb = _all_gather(student_emb)
    global_student_logits = _all_gather(student_logits)

    kd = jnp.zeros((), jnp.float32)
    if config.distill.alpha:
      kd = losses.kd_loss(global_student_logits, global_teacher_logits,
                          config.distill.kd_temperature)
    new_crd_memory = state.crd_memory
    if method == "crd":
      student_proj = models.crd_projection.apply(
          {"params": student_params["crd_student"]}, student_emb)
      teacher_proj = models.crd_projection.apply(
          {"params": student_params["crd_teacher"]}, teacher_emb_for_distill)
      contrast_indices = losses.sample_crd_negatives(
          jax.random.fold_in(step_rng, 1), global_labels, _all_gather(batch["index"]),
          crd_tables, config.distill.crd_num_negatives)
      distill, new_crd_memory = losses.crd_loss(
          _all_gather(student_proj.astype(jnp.float32)),
          _all_gather(teacher_proj.astype(jnp.float32)),
          _all_gather(batch["index"]), contrast_indices, state.crd_memory,
          temperature=config.distill.crd_temperature,
          momentum=config.distill.crd_momentum)
    elif method == "none":
      distill = jnp.zeros((), jnp.float32)
    else:
      distill = losses.distill_loss(
          method, student_emb=global_student_emb, teacher_emb=global_teacher_emb,
          labels=global_labels, student_logits=global_student_logits,
          teacher_logits=global_teacher_logits, hparams=hparams)

    if config.debug_nan_at_step > 0:
      # Fault injection for tests of the non-finite guard.
      distill = distill * jnp.where(state.step + 1 == config.debug_nan_at_step,
                                    jnp.nan, 1.0)
    d = config.distill
    global_terms = d.alpha * kd + d.beta * distill
    total = d.gamma * ce_student + global_terms / num_devices + ce_teacher
    aux = {
        "batch_stats": new_model_state["batch_stats"],
        "crd_memory": new_crd_memory,
        "ce": ce_student,
        "teacher_ce": ce_teacher,
        "kd": kd,
        "distill": distill,
        "correct": jnp.sum(_correct_topk(student_logits, labels, 1)),
        "teacher_correct": teacher_correct,
    }
    return total, aux

  if with_teacher:
    grad_fn = jax.grad(objective, argnums=(0, 1), has_aux=True)
    (student_grads, teacher_head_grads), aux = grad_fn(
        state.student_params, state.teacher_head_params)
  else:
    student_grads, aux = jax.grad(objective, has_aux=True)(
        state.student_params, state.teacher_head_params)

  # Gathered/global quantities are identical on every device; pmean makes
  # that visible to shard_map's replication check without changing values.
  ce = jax.lax.psum(aux["ce"], AXIS)
  teacher_ce = jax.lax.psum(aux["teacher_ce"], AXIS)
  distill = jax.lax.pmean(aux["distill"], AXIS)
  kd = jax.lax.pmean(aux["kd"], AXIS)
  d = config.distill
  loss = d.gamma * ce + d.alpha * kd + d.beta * distill

  student_updates, new_student_opt = student_tx.update(
      student_grads, state.student_opt_state, state.student_params)
  new_student_params = optax.apply_updates(state.student_params, student_updates)
  new_teacher_head, new_teacher_opt = state.teacher_head_params, state.teacher_head_opt_state
  if with_teacher:
    teacher_updates, new_teacher_opt = teacher_head_tx.update(
        teacher_head_grads, state.teacher_head_opt_state, state.teacher_head_params)
    new_teacher_head = optax.apply_updates(state.teacher_head_params, teacher_updates)

  finite = jnp.isfinite(loss) & jnp.isfinite(teacher_ce) & _tree_all_finite(
      (student_grads, teacher_head_grads if with_teacher else ()))

  def keep_if_finite(new, old):
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

  batch_stats = jax.tree.map(lambda x: jax.lax.pmean(x, AXIS), aux["batch_stats"])
  crd_memory = jax.tree.map(lambda x: jax.lax.pmean(x, AXIS), aux["crd_memory"])
  new_state = state.replace(
      step=state.step + 1,
      student_params=keep_if_finite(new_student_params, state.student_params),
      student_batch_stats=keep_if_finite(batch_stats, state.student_batch_stats),
      student_opt_state=keep_if_finite(new_student_opt, state.student_opt_state),
      teacher_head_params=keep_if_finite(new_teacher_head, state.teacher_head_params),
      teacher_head_opt_state=keep_if_finite(new_teacher_opt, state.teacher_head_opt_state),
      crd_memory=keep_if_finite(crd_memory, state.crd_memory),
      skipped_steps=state.skipped_steps + jnp.where(finite, 0, 1).astype(jnp.int32),
      first_nonfinite_step=jnp.where(
          (state.first_nonfinite_step < 0) & ~finite, state.step + 1,
          state.first_nonfinite_step).astype(jnp.int32),
  )
  metrics = {
      "loss": loss,
      "ce": ce,
      "distill": distill,
      "kd": kd,
      "teacher_ce": teacher_ce,
      "top1": jax.lax.psum(aux["correct"], AXIS) / global_batch,
      "teacher_top1": jax.lax.psum(aux["teacher_correct"], AXIS) / global_batch,
      "finite": finite.astype(jnp.float32),
  }
  return new_state, metrics


def _eval_student(state: TrainState, images_uint8, models: DistillModels):
  """Eval-mode student embedding and logits: (b, feature_dim), (b, classes) float32."""
  student_images = normalize_images(images_uint8, models.data_mean, models.data_std)
  _, student_features = models.student.apply(
      {"params": state.student_params["backbone"], "batch_stats": state.student_batch_stats},
      student_images.astype(models.dtype), train=False)
  embedding, logits = models.student_head.apply(
      {"params": state.student_params["head"]}, student_features["penultimate"])
  return embedding.astype(jnp.float32), logits.astype(jnp.float32)


def _eval_teacher(state: TrainState, teacher_variables, batch, models: DistillModels):
  """Teacher embedding and teacher-head logits: (b, feature_dim), (b, classes) float32.

  From the batch's cached 'teacher_feature' when it has one, else the teacher
  runs on 'image'.
  """
  if "teacher_feature" in batch:
    teacher_feature = batch["teacher_feature"]
  else:
    teacher_feature = _live_teacher_embedding(models, teacher_variables, batch["image"])
  embedding, logits = models.teacher_head.apply(
      {"params": state.teacher_head_params}, teacher_feature.astype(jnp.float32))
  return embedding.astype(jnp.float32), logits.astype(jnp.float32)


def eval_step(state: TrainState, teacher_variables, batch, *, models: DistillModels,
              with_teacher: bool = True):
  """Counts correct predictions on this device's slice of a padded eval batch.

  Args:
    batch: 'image' (b, H, W, 3) uint8, 'label' (b,), 'mask' (b,) bool; padded
      rows have mask False and count nowhere. Optionally 'teacher_feature'
      (b, D) cached teacher embeddings of the images.
    with_teacher: False skips the teacher (its 'teacher_top1' is then 0).

  Returns:
    Replicated sums over the global batch: 'count', 'top1', 'top5',
    'teacher_top1', 'ce'.
  """
  mask = batch["mask"].astype(jnp.float32)
  labels = batch["label"]
  _, student_logits = _eval_student(state, batch["image"], models)
  if with_teacher:
    _, teacher_logits = _eval_teacher(state, teacher_variables, batch, models)
  else:
    teacher_logits = jnp.zeros_like(student_logits)
  num_classes = student_logits.shape[-1]
  sums = {
      "count": jnp.sum(mask),
      "top1": jnp.sum(_correct_topk(student_logits, labels, 1) * mask),
      "top5": jnp.sum(_correct_topk(student_logits, labels, min(5, num_classes)) * mask),
      "teacher_top1": jnp.sum(_correct_topk(teacher_logits, labels, 1) * mask),
      "ce": _cross_entropy_sum(student_logits, labels, mask),
  }
  return jax.tree.map(lambda x: jax.lax.psum(x, AXIS), sums)


def embedding_step(state: TrainState, teacher_variables, batch, *, models: DistillModels):
  """Global eval-mode embeddings of a batch, for the graph pictures.

  Returns:
    (teacher_emb (B, feature_dim), student_emb (B, feature_dim), labels (B,)),
    replicated, B the global batch.
  """
  student_emb, _ = _eval_student(state, batch["image"], models)
  teacher_emb, _ = _eval_teacher(state, teacher_variables, batch, models)
  gathered = (_all_gather(teacher_emb), _all_gather(student_emb), _all_gather(batch["label"]))
  # Identical on every device; pmean records that for the replication check.
  return (jax.lax.pmean(gathered[0], AXIS), jax.lax.pmean(gathered[1], AXIS),
          jax.lax.pmax(gathered[2], AXIS))


def compile_steps(mesh: Mesh, models: DistillModels, config, student_tx, teacher_head_tx,
                  donate_state: bool = True):
  """jit(shard_map(...)) versions of the steps over the 1-D data mesh.

  `donate_state=False` (launch/ablations.py only) keeps the input state's
  buffers alive instead of reusing them for the new state.
  """
  replicated = P()
  sharded = P(AXIS)
  train = functools.partial(
      train_step, models=models, config=config, student_tx=student_tx,
      teacher_head_tx=teacher_head_tx, hparams=distill_hparams(config))
  train = jax.jit(
      jax.shard_map(train, mesh=mesh,
                    in_specs=(replicated, replicated, sharded, replicated),
                    out_specs=(replicated, replicated)),
      donate_argnums=(0,) if donate_state else ())
  evaluate = jax.jit(jax.shard_map(
      functools.partial(eval_step, models=models, with_teacher=uses_teacher(config)), mesh=mesh,
      in_specs=(replicated, replicated, sharded), out_specs=replicated))
  embed = jax.jit(jax.shard_map(
      functools.partial(embedding_step, models=models), mesh=mesh,
      in_specs=(replicated, replicated, sharded), out_specs=replicated))
  return train, evaluate, embed


# ---------------------------------------------------------------------------
# Host side: global arrays, metrics, checkpoints, the loop.


def replicate(tree, mesh: Mesh):
  """Places a host pytree (identical on every process) on all devices, replicated."""
  sharding = NamedSharding(mesh, P())

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def global_batch_from_local(mesh: Mesh, local_batch: Mapping[str, np.ndarray]):
  """This process's rows -> global arrays sharded over the data axis."""
  sharding = NamedSharding(mesh, P(AXIS))
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for key, value in local_batch.items()}


class DevicePrefetcher:
  """Keeps `size` global batches in flight to the devices ahead of the step.

  A checkpoint must record the data position of the batches actually
  consumed, not of the ones prefetched, so the iterator's state is captured
  right after each batch is read and handed out with it.
  """

  def __init__(self, iterator, mesh: Mesh, size: int = 2):
    self._iterator = iterator
    self._mesh = mesh
    self._size = size
    self._queue = []
    self.consumed_state = iterator.get_state()

  def _fill(self):
    while len(self._queue) < self._size:
      local_batch = next(self._iterator)
      state = self._iterator.get_state()
      self._queue.append((global_batch_from_local(self._mesh, local_batch), state))

  def __next__(self):
    self._fill()
    batch, self.consumed_state = self._queue.pop(0)
    self._fill()
    return batch

  @contextlib.contextmanager
  def iterator_at_consumed_position(self):
    """Context: the wrapped iterator temporarily set to the consumed position."""
    ahead = self._iterator.get_state()
    self._iterator.set_state(self.consumed_state)
    try:
      yield self._iterator
    finally:
      self._iterator.set_state(ahead)


def workdir_path(workdir: str):
  """The workdir as an etils Path: local (made absolute) or a bucket (gs://...)."""
  from etils import epath

  if "://" not in str(workdir):
    workdir = os.path.abspath(workdir)
  return epath.Path(workdir)


class JsonlWriter:
  """clu MetricWriter that adds one JSON object per write to a file.

  Only scalars are written; images and other summaries are ignored here (they
  go to TensorBoard). Local files are appended to; object stores (gs://) cannot
  append, so there the whole file is rewritten from the records of this run
  plus what the file held when the writer was created.
  """

  def __init__(self, path):
    self._path = path
    self._append = "://" not in str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    self._lines = []
    if not self._append and path.exists():
      self._lines = path.read_text().splitlines(keepends=True)

  def write_scalars(self, step, scalars):
    record = {"step": int(step)}
    record.update({key: float(value) for key, value in scalars.items()})
    line = json.dumps(record) + "\n"
    if self._append:
      with self._path.open("a") as f:
        f.write(line)
    else:
      self._lines.append(line)
      self._path.write_text("".join(self._lines))

  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None):
    del step, point_clouds, point_colors, configs

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
    pass

  def close(self):
    pass


def create_metric_writer(workdir):
  """TensorBoard (clu) + metrics.jsonl on process 0; logging only elsewhere."""
  from clu import metric_writers  # Imports tensorflow; keep it off module import.

  if jax.process_index() > 0:
    return metric_writers.create_default_writer(str(workdir), just_logging=True)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(str(workdir), asynchronous=False),
      JsonlWriter(workdir / "metrics.jsonl"),
  ])


def run_signature(config) -> dict[str, Any]:
  """What a workdir's checkpoints were trained for; a resume must match it."""
  return {
      "dataset": config.dataset.name,
      "student": config.student.arch,
      "teacher": config.teacher.arch,
      "method": config.distill.method,
      "feature_dim": int(config.feature_dim),
  }


def _checkpoint_managers(workdir: str, config):
  import orbax.checkpoint as ocp

  latest = ocp.CheckpointManager(
      workdir / "checkpoints",
      options=ocp.CheckpointManagerOptions(
          max_to_keep=config.keep_checkpoints, create=True,
          enable_async_checkpointing=False),
  )
  best = ocp.CheckpointManager(
      workdir / "best",
      options=ocp.CheckpointManagerOptions(
          max_to_keep=1, create=True, enable_async_checkpointing=False),
  )
  return latest, best


def _save_args(state, data_iterator, meta, with_data: bool = True):
  import grain
  import orbax.checkpoint as ocp

  items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
  if with_data and data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  return ocp.args.Composite(**items)


def _restore_latest(manager, state, data_iterator):
  import grain
  import orbax.checkpoint as ocp

  abstract_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored = manager.restore(
      manager.latest_step(),
      args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          meta=ocp.args.JsonRestore(),
          data=grain.checkpoint.CheckpointRestore(data_iterator),
      ))
  return restored["state"], restored["meta"]


def _mean_metrics(history: list[dict[str, jnp.ndarray]]) -> dict[str, float]:
  host = jax.device_get(history)
  return {key: float(np.mean([h[key] for h in host])) for key in host[0]}


def evaluate(evaluate_fn, state, teacher_variables, eval_loader, mesh) -> dict[str, float]:
  """Runs the padded, masked evaluation over the whole test split."""
  totals = None
  for local_batch in eval_loader:
    sums = evaluate_fn(state, teacher_variables, global_batch_from_local(mesh, local_batch))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = max(float(totals["count"]), 1.0)
  return {
      "eval/top1": 100.0 * float(totals["top1"]) / count,
      "eval/top5": 100.0 * float(totals["top5"]) / count,
      "eval/teacher_top1": 100.0 * float(totals["teacher_top1"]) / count,
      "eval/ce": float(totals["ce"]) / count,
      "eval/count": count,
  }


def _graph_picture(embed_fn, state, teacher_variables, picture_batch, num_rows: int,
                   path: str | None):
  """Renders E_t, E_s and N of the fixed picture batch; returns a uint8 image."""
  from ega_jax import viz

  teacher_emb, student_emb, labels = jax.device_get(
      embed_fn(state, teacher_variables, picture_batch))
  teacher_emb, student_emb, labels = (
      teacher_emb[:num_rows], student_emb[:num_rows], labels[:num_rows])
  teacher_graph, student_graph, node_matrix = jax.device_get(
      losses.ega_graph_blocks(jnp.asarray(teacher_emb), jnp.asarray(student_emb)))
  return viz.plot_ega_graphs(teacher_graph, student_graph, node_matrix, labels,
                             path=path, title=f"step {int(jax.device_get(state.step))}")


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split())


@contextlib.contextmanager
def _as_user_error(what: str):
  """Context: FileNotFoundError/ValueError from data or models -> UserInputError."""
  try:
    yield
  except UserInputError:
    raise
  except (FileNotFoundError, ValueError) as error:
    raise UserInputError(f"{what}: {_one_line(error)}") from error


def _create_loaders(config, process_index: int, process_count: int,
                    train_cache: str | None = None, eval_cache: str | None = None):
  """The train and eval loaders; `*_cache` (a cache directory) makes their
  batches carry cached teacher embeddings."""
  train_loader = data_lib.create_train_loader(
      config.dataset.name, config.dataset.data_dir, global_batch_size=config.batch_size,
      seed=config.seed, process_index=process_index, process_count=process_count,
      teacher_view=config.teacher_view, worker_count=config.dataset.worker_count,
      max_examples=config.dataset.max_train_examples, teacher_cache_dir=train_cache)
  eval_loader = data_lib.create_eval_loader(
      config.dataset.name, config.dataset.data_dir,
      global_batch_size=config.eval_batch_size, process_index=process_index,
      process_count=process_count, max_examples=config.dataset.max_eval_examples,
      teacher_cache_dir=eval_cache)
  return train_loader, eval_loader


def _teacher_cache_splits(config, teacher_meta) -> tuple[str | None, str | None]:
  """(train cache, eval cache): config.teacher.cache for the splits it holds.

  The cache must come from the loaded teacher and the configured dataset; a
  train run needs its train split, and evaluation uses its eval split when
  complete (else the live teacher).
  """
  from ega_jax.data import augment, teacher_cache

  directory = config.teacher.get("cache", "")
  if not directory or not uses_teacher(config):
    return None, None
  try:
    manifest = teacher_cache.read_manifest(directory)
    teacher_cache.check_matches(
        manifest, directory=directory, teacher_meta=teacher_meta,
        dataset=config.dataset.name,
        padding=augment.crop_padding(data_lib.get_dataset_info(config.dataset.name).image_size))
  except (FileNotFoundError, ValueError) as error:
    raise ConfigError(f"config.teacher.cache={directory!r}: {_one_line(error)}") from error
  splits = manifest.get("splits", {})
  if not splits.get("train", {}).get("complete"):
    raise ConfigError(
        f"config.teacher.cache={directory!r} has no complete train split; run "
        "launch/cache_teacher.py again to finish it.")
  eval_cache = directory if splits.get("eval", {}).get("complete") else None
  logging.info("Teacher embeddings for training from the cache %s (%d views per image%s); "
               "evaluation uses %s.", directory, splits["train"]["num_views"],
               ", all of them" if splits["train"]["all_views"] else "",
               "its centre views" if eval_cache else "the live teacher")
  return directory, eval_cache


def _check_workdir(workdir: str, signature: dict, overwrite: bool) -> None:
  """Refuses to resume checkpoints of another run, unless told to overwrite them.

  Reads only the small JSON item of the newest complete checkpoint, before any
  restore is attempted (a different student would not even fit the state).
  """
  import orbax.checkpoint as ocp

  directory = workdir / "checkpoints"
  if not directory.is_dir():
    return
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      create=False, read_only=True)) as manager:
    step = manager.latest_step()
    if step is None:
      return
    saved = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
  saved_signature = saved["meta"].get("signature")
  if saved_signature == signature:
    return
  if not overwrite:
    raise ConfigError(
        f"workdir {str(workdir)!r} holds checkpoints of another run ({saved_signature}) than "
        f"this one ({signature}); use a new --workdir or set "
        "--config.overwrite_workdir=True to delete them.")
  if jax.process_index() == 0:
    logging.warning("Deleting the checkpoints of another run in %s (overwrite_workdir).",
                    workdir)
    for name in ("checkpoints", "best", "metrics.jsonl", "summary.json", "graphs"):
      path = workdir / name
      if path.is_dir():
        path.rmtree()
      elif path.exists():
        path.unlink()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs a distillation job in `workdir`, resuming from its latest checkpoint.

  Returns:
    The final summary: best and last student top-1, teacher-head top-1,
    steps, wall time.
  """
  start_time = time.time()
  devices = np.array(jax.devices())
  mesh = Mesh(devices, (AXIS,))
  validate_config(config, len(devices))
  workdir = workdir_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  logging.info("Devices: %d (%s), processes: %d, mesh: %s", len(devices),
               devices[0].platform, jax.process_count(), dict(mesh.shape))

  try:
    teacher_module, teacher_host_variables, teacher_meta = models_lib.load_teacher(
        config.teacher.checkpoint)
  except (FileNotFoundError, ValueError, OSError) as error:
    raise UserInputError(
        f"config.teacher.checkpoint={config.teacher.checkpoint!r} cannot be loaded: "
        f"{_one_line(error)}") from error
  if teacher_meta.get("arch") != config.teacher.arch:
    raise ConfigError(
        f"config.teacher.arch={config.teacher.arch!r} does not match "
        f"{os.path.join(config.teacher.checkpoint, 'teacher.json')}, which holds "
        f"arch {teacher_meta.get('arch')!r}; set config.teacher.arch to it or "
        "convert the right checkpoint.")
  info = data_lib.get_dataset_info(config.dataset.name)
  models = build_models(config, teacher_module, teacher_meta, info.num_classes)

  process_index, process_count = jax.process_index(), jax.process_count()
  train_cache, eval_cache = _teacher_cache_splits(config, teacher_meta)
  with _as_user_error(f"config.dataset.name={config.dataset.name!r}"):
    train_loader, eval_loader = _create_loaders(
        config, process_index, process_count, train_cache, eval_cache)
  num_train = info.num_train
  if config.dataset.max_train_examples > 0:
    num_train = min(num_train, config.dataset.max_train_examples)
  spe = steps_per_epoch(config, num_train)
  num_steps = total_train_steps(config, num_train)
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else spe
  checkpoint_every = (config.checkpoint_every_steps
                      if config.checkpoint_every_steps > 0 else spe)

  student_tx, teacher_head_tx = create_optimizers(config, num_train)
  learning_rate = student_learning_rate_schedule(config, num_train)
  # With every teacher embedding cached the teacher never runs: its weights
  # stay off the devices.
  live_teacher = not (train_cache and eval_cache)
  teacher_variables = replicate(teacher_host_variables if live_teacher else {}, mesh)
  image_shape = (info.image_size, info.image_size, 3)
  with _as_user_error(f"config.student.arch={config.student.arch!r} on "
                      f"{info.image_size}x{info.image_size} {config.dataset.name} images"):
    host_state = create_train_state(
        config, models, teacher_host_variables, jax.random.PRNGKey(config.seed), image_shape,
        num_train, student_tx, teacher_head_tx)
  state = replicate(host_state, mesh)
  del host_state

  crd_tables = {}
  if config.distill.method == "crd":
    crd_tables = replicate(losses.build_crd_class_tables(
        data_lib.train_labels(config.dataset.name, config.dataset.data_dir,
                              config.dataset.max_train_examples)), mesh)

  train_fn, evaluate_fn, embed_fn = compile_steps(
      mesh, models, config, student_tx, teacher_head_tx)

  data_iterator = iter(train_loader)
  signature = run_signature(config)
  _check_workdir(workdir, signature, config.overwrite_workdir)
  if jax.process_count() > 1:
    # Nobody creates checkpoint directories before every process has looked:
    # orbax's managers synchronise in their constructors, and the processes
    # must take the same branch above.
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("ega_jax workdir checked")
  latest_manager, best_manager = _checkpoint_managers(workdir, config)
  meta = {"signature": signature, "best_top1": -1.0, "best_step": 0, "last_top1": -1.0}
  if latest_manager.latest_step() is not None:
    state, saved_meta = _restore_latest(latest_manager, state, data_iterator)
    meta.update(saved_meta)
    logging.info("Resumed from %s at step %d.", workdir, int(jax.device_get(state.step)))

  writer = create_metric_writer(workdir)
  from clu import periodic_actions

  report_progress = periodic_actions.ReportProgress(
      num_train_steps=num_steps, writer=writer, every_steps=config.log_every_steps)

  picture_batch = None
  if config.graph_pictures:
    first_eval = next(iter(eval_loader))
    picture_batch = global_batch_from_local(mesh, first_eval)

  step = int(jax.device_get(state.step))
  if step == 0:
    writer.write_hparams({k: v for k, v in config.to_dict().items()
                          if isinstance(v, (int, float, str, bool))})
  logging.info("Training %s -> %s with %s on %s: %d steps (%d per epoch), global batch %d.",
               config.teacher.arch, config.student.arch, config.distill.method,
               config.dataset.name, num_steps, spe, config.batch_size)

  batches = DevicePrefetcher(data_iterator, mesh)
  preemption = PreemptionRequested()
  # Restored in the finally below, also when the loop raises.
  preemption.__enter__()
  preempted = False
  history = []
  last_eval = {}
  last_log_time = time.time()
  last_log_step = step
  try:
    while step < num_steps:
      batch = next(batches)
      state, metrics = train_fn(state, teacher_variables, batch, crd_tables)
      step += 1
      history.append(metrics)
      report_progress(step)
      if step % config.log_every_steps == 0 or step == num_steps:
        history_window = history
        summary = _mean_metrics(history)
        history = []
        now = time.time()
        steps_per_sec = (step - last_log_step) / max(now - last_log_time, 1e-9)
        last_log_time, last_log_step = now, step
        scalars = {f"train/{k}": v for k, v in summary.items() if k != "finite"}
        scalars["train/top1"] *= 100.0
        scalars["train/teacher_top1"] *= 100.0
        if not uses_teacher(config):
          del scalars["train/teacher_top1"], scalars["train/teacher_ce"]
        scalars["train/skipped_steps"] = float(jax.device_get(state.skipped_steps))
        scalars["train/learning_rate"] = float(learning_rate(step - 1))
        scalars["steps_per_sec"] = steps_per_sec
        writer.write_scalars(step, scalars)
        logging.info("step %d/%d: loss %.4f ce %.4f distill %.4f top1 %.2f%% (%.2f steps/s)",
                     step, num_steps, summary["loss"], summary["ce"], summary["distill"],
                     scalars["train/top1"], steps_per_sec)
        if summary["finite"] < 1.0 and config.nonfinite_policy == "stop":
          bad_step = int(jax.device_get(state.first_nonfinite_step))
          position = bad_step - 1 - (step - len(history_window))
          bad = (jax.device_get(history_window[position])
                 if 0 <= position < len(history_window) else summary)
          raise NonFiniteError(
              f"Non-finite loss or gradient at step {bad_step} (loss {float(bad['loss'])}, "
              f"ce {float(bad['ce'])}, distill {float(bad['distill'])}, kd "
              f"{float(bad['kd'])}); its update was not applied and training stopped. Last "
              f"good checkpoint: step {latest_manager.latest_step()} in "
              f"{workdir / 'checkpoints'}.")
      if step % eval_every == 0 or step == num_steps:
        with report_progress.timed("eval"):
          last_eval = evaluate(evaluate_fn, state, teacher_variables, eval_loader, mesh)
        is_best = last_eval["eval/top1"] > meta["best_top1"]
        if is_best:
          meta["best_top1"], meta["best_step"] = last_eval["eval/top1"], step
        meta["last_top1"] = last_eval["eval/top1"]
        scalars = dict(last_eval)
        scalars["eval/best_top1"] = meta["best_top1"]
        if not uses_teacher(config):
          del scalars["eval/teacher_top1"]
        writer.write_scalars(step, scalars)
        logging.info("eval at step %d: top1 %.2f%% top5 %.2f%% teacher %.2f%% (best %.2f%%)",
                     step, last_eval["eval/top1"], last_eval["eval/top5"],
                     last_eval["eval/teacher_top1"], meta["best_top1"])
        if picture_batch is not None:
          image = _graph_picture(embed_fn, state, teacher_variables, picture_batch,
                                 config.graph_picture_batch, None)
          if jax.process_index() == 0:
            import matplotlib.image

            (workdir / "graphs").mkdir(parents=True, exist_ok=True)
            with (workdir / "graphs" / f"graphs_{step:08d}.png").open("wb") as f:
              matplotlib.image.imsave(f, image, format="png")
          writer.write_images(step, {"graphs": image[None, ..., :3]})
        if is_best:
          best_manager.save(step, args=_save_args(state, None, dict(meta), with_data=False))
      preempted = preemption.requested(step, config.log_every_steps)
      if step % checkpoint_every == 0 or step == num_steps or preempted:
        with batches.iterator_at_consumed_position() as consumed_iterator:
          latest_manager.save(
              step, args=_save_args(state, consumed_iterator, dict(meta)), force=True)
      writer.flush()
      if preempted:
        break
  finally:
    preemption.__exit__()

  if preempted:
    latest_manager.wait_until_finished()
    message = (f"Stopped by {preemption.signal_name or 'a peer process'} after step {step} of "
               f"{num_steps}; checkpoint saved in {workdir / 'checkpoints'}. "
               "Run the same command again to resume.")
    logging.warning(message)
    writer.close()
    return {"preempted": True, "steps": step, "message": message,
            "wall_time_s": time.time() - start_time}

  if not last_eval:
    # Nothing left to train (a finished workdir): still report its accuracy.
    last_eval = evaluate(evaluate_fn, state, teacher_variables, eval_loader, mesh)
    meta["last_top1"] = last_eval["eval/top1"]
  latest_manager.wait_until_finished()
  best_manager.wait_until_finished()
  summary = {
      "best_top1": meta["best_top1"],
      "best_step": meta["best_step"],
      "last_top1": meta["last_top1"],
      "teacher_top1": (last_eval.get("eval/teacher_top1", float("nan"))
                       if uses_teacher(config) else float("nan")),
      "steps": step,
      "skipped_steps": int(jax.device_get(state.skipped_steps)),
      "wall_time_s": time.time() - start_time,
  }
  if jax.process_index() == 0:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  writer.close()
  return summary
