"""The train state, the models of a run, their optimisers and the initial state.

The teacher backbone's variables are never part of the state: they are an
argument of the steps, neither optimised nor checkpointed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import optax

from ega_jax import config as config_lib
from ega_jax import data as data_lib
from ega_jax import losses
from ega_jax import models as models_lib
from ega_jax.models import heads

# The one mesh axis: every device holds a slice of the global batch.
AXIS = "data"


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue, except the frozen teacher."""

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


def build_models(config, teacher_module, teacher_meta, num_classes: int) -> DistillModels:
  """Builds the student, heads and (already loaded) teacher of a run.

  The student's BatchNorm layers use the mesh axis name so their batch
  statistics are computed over the global batch.
  """
  dtype = config_lib.DTYPES[config.dtype]
  info = data_lib.get_dataset_info(config.dataset)
  student = models_lib.create_student(
    config.student.arch, num_classes, bn_axis_name=AXIS, dtype=dtype
  )
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
# Schedule and optimisers.


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
  """(student optimiser, teacher-head optimiser)."""
  student_tx = sgd_with_weight_decay(
    student_learning_rate_schedule(config, num_train_examples), config.momentum, config.weight_decay
  )
  # The teacher head's learning rate is never decayed (as released).
  teacher_head_tx = sgd_with_weight_decay(
    config.teacher_head_learning_rate,
    config.teacher_head_momentum,
    config.teacher_head_weight_decay,
  )
  return student_tx, teacher_head_tx


# ---------------------------------------------------------------------------
# Initialisation.


def init_train_state(
  config,
  models: DistillModels,
  teacher_variables,
  rng,
  image_shape,
  num_train_examples: int,
  student_tx,
  teacher_head_tx,
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
    lambda v, x: student_no_axis.apply(v, x, train=False), student_variables, dummy
  )
  head_params = models.student_head.init(
    head_rng, jnp.zeros(student_features["penultimate"].shape, jnp.float32)
  )["params"]

  teacher_dummy = jnp.zeros(
    (1, models.teacher_image_size, models.teacher_image_size, 3), jnp.float32
  )
  teacher_feature = jax.eval_shape(
    lambda v, x: models.teacher.apply(v, x), teacher_variables, teacher_dummy
  )
  teacher_head_params = models.teacher_head.init(
    teacher_head_rng, jnp.zeros(teacher_feature.shape, jnp.float32)
  )["params"]

  student_params = {"backbone": student_variables["params"], "head": head_params}
  crd_memory = {}
  if models.crd_projection is not None:
    s_rng, t_rng = jax.random.split(crd_rng)
    embedding = jnp.zeros((1, config.feature_dim), jnp.float32)
    student_params["crd_student"] = models.crd_projection.init(s_rng, embedding)["params"]
    student_params["crd_teacher"] = models.crd_projection.init(t_rng, embedding)["params"]
    crd_memory = losses.init_crd_memory(mem_rng, num_train_examples, config.distill.crd_feature_dim)

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


def create_train_state(
  config,
  models: DistillModels,
  teacher_variables,
  rng,
  image_shape,
  num_train_examples: int,
  student_tx,
  teacher_head_tx,
) -> TrainState:
  """`init_train_state` compiled as one program (op by op it took ~15 s on a
  2-core CPU); the teacher's variables only lend their shapes."""
  teacher_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), teacher_variables)
  return jax.jit(
    lambda key: init_train_state(
      config,
      models,
      teacher_shapes,
      key,
      image_shape,
      num_train_examples,
      student_tx,
      teacher_head_tx,
    )
  )(rng)


# ---------------------------------------------------------------------------
# Placement on the mesh.


def data_mesh(devices=None) -> Mesh:
  """The 1-D ('data',) mesh over `devices` (default: every device of the job)."""
  return Mesh(np.array(jax.devices() if devices is None else devices), (AXIS,))


def replicate(tree, mesh: Mesh):
  """Places a host pytree (identical on every process) on all devices, replicated."""
  sharding = NamedSharding(mesh, P())

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def global_batch_from_local(mesh: Mesh, local_batch) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over the data axis."""
  sharding = NamedSharding(mesh, P(AXIS))
  return {
    key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
    for key, value in local_batch.items()
  }
