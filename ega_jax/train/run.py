"""`build_run`: everything a run computes with, built once from a config, and
`compile_steps`: the steps as jit(shard_map(...)) programs over the data mesh.

The training loop, the benchmarks, the ablations and the multi-device test
worker all set a run up through this one function, so what they time or
check is what `python -m ega_jax.main` trains.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
from jax.sharding import Mesh, PartitionSpec as P
import numpy as np
import optax

from ega_jax import config as config_lib
from ega_jax import losses
from ega_jax.train import eval_steps
from ega_jax.train import state as state_lib
from ega_jax.train import steps as steps_lib


@dataclasses.dataclass
class Run:
  """A run's modules, placed state and compiled steps.

  `train_step(state, teacher_variables, batch, crd_tables) -> (state, metrics)`,
  `eval_step(state, teacher_variables, batch) -> sums` and
  `embed_step(state, teacher_variables, batch) -> (teacher_emb, student_emb, labels)`
  take global arrays (see `state.global_batch_from_local`).
  """

  mesh: Mesh
  models: state_lib.DistillModels
  student_tx: optax.GradientTransformation
  teacher_head_tx: optax.GradientTransformation
  learning_rate: optax.Schedule
  state: state_lib.TrainState  # replicated over the mesh
  teacher_variables: Any  # replicated; {} when the teacher never runs on device
  crd_tables: Any  # replicated losses.CRDClassTables for 'crd', else {}
  train_step: Callable
  eval_step: Callable
  embed_step: Callable


def build_run(
  config,
  mesh: Mesh,
  *,
  teacher_module,
  teacher_variables,
  teacher_meta,
  num_classes: int,
  num_train_examples: int,
  image_shape: tuple[int, int, int],
  crd_train_labels: np.ndarray | None = None,
  place_teacher: bool = True,
  donate_state: bool = True,
  init_rng: jax.Array | None = None,
) -> Run:
  """Models, optimisers, the initial state on the mesh, CRD tables and the steps.

  Args:
    teacher_module, teacher_variables, teacher_meta: the loaded teacher
      (`models.load_teacher`), variables on the host.
    image_shape: (H, W, 3) of the student's input.
    crd_train_labels: (N,) int labels of the train split; needed for 'crd'.
    place_teacher: False keeps the teacher's weights off the devices (every
      teacher embedding comes from the cache).
    donate_state: False keeps the input state alive (the donation ablation).
    init_rng: the key the parameters are drawn with (default
      PRNGKey(config.seed)); the benchmarks pass an 'unsafe_rbg' key, whose
      initialiser compiles ~4x faster on CPU. The state's own key is then
      PRNGKey(config.seed), so the step sees the production (threefry) types.
  """
  models = state_lib.build_models(config, teacher_module, teacher_meta, num_classes)
  student_tx, teacher_head_tx = state_lib.create_optimizers(config, num_train_examples)
  seed_key = jax.random.PRNGKey(config.seed)
  host_state = state_lib.create_train_state(
    config,
    models,
    teacher_variables,
    seed_key if init_rng is None else init_rng,
    image_shape,
    num_train_examples,
    student_tx,
    teacher_head_tx,
  )
  if init_rng is not None:
    host_state = host_state.replace(rng=seed_key)
  crd_tables = {}
  if config.distill.method == "crd":
    if crd_train_labels is None:
      raise ValueError("build_run: distill.method='crd' needs crd_train_labels.")
    crd_tables = state_lib.replicate(losses.build_crd_class_tables(crd_train_labels), mesh)
  train_step, eval_step, embed_step = compile_steps(
    mesh, models, config, student_tx, teacher_head_tx, donate_state=donate_state
  )
  return Run(
    mesh=mesh,
    models=models,
    student_tx=student_tx,
    teacher_head_tx=teacher_head_tx,
    learning_rate=state_lib.student_learning_rate_schedule(config, num_train_examples),
    state=state_lib.replicate(host_state, mesh),
    teacher_variables=state_lib.replicate(teacher_variables if place_teacher else {}, mesh),
    crd_tables=crd_tables,
    train_step=train_step,
    eval_step=eval_step,
    embed_step=embed_step,
  )


def compile_steps(
  mesh: Mesh,
  models: state_lib.DistillModels,
  config,
  student_tx,
  teacher_head_tx,
  donate_state: bool = True,
):
  """jit(shard_map(...)) versions of the steps over the 1-D data mesh.

  `donate_state=False` (the donation ablation only) keeps the input state's
  buffers alive instead of reusing them for the new state.
  """
  replicated = P()
  sharded = P(state_lib.AXIS)
  train = functools.partial(
    steps_lib.train_step,
    models=models,
    config=config,
    student_tx=student_tx,
    teacher_head_tx=teacher_head_tx,
    hparams=config_lib.distill_hparams(config),
  )
  train = jax.jit(
    jax.shard_map(
      train,
      mesh=mesh,
      in_specs=(replicated, replicated, sharded, replicated),
      out_specs=(replicated, replicated),
    ),
    donate_argnums=(0,) if donate_state else (),
  )
  with_teacher = config_lib.uses_teacher(config)
  evaluate = jax.jit(
    jax.shard_map(
      functools.partial(eval_steps.eval_step, models=models, with_teacher=with_teacher),
      mesh=mesh,
      in_specs=(replicated, replicated, sharded),
      out_specs=replicated,
    )
  )
  embed = jax.jit(
    jax.shard_map(
      functools.partial(eval_steps.embedding_step, models=models),
      mesh=mesh,
      in_specs=(replicated, replicated, sharded),
      out_specs=replicated,
    )
  )
  return train, evaluate, embed
