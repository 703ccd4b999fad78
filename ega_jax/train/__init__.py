"""Distillation training, one concept per module.

state.py          TrainState, the models bundle, optimisers and schedule, initial state,
                  placement on the ('data',) mesh
steps.py          the per-device train step (forward, distillation term, non-finite guard)
eval_steps.py     the per-device evaluation and embedding steps
run.py            build_run(): models, state, CRD tables and the jit(shard_map) steps, built once
setup.py          build(): the teacher, the teacher cache, the loaders and build_run
loop.py           train_and_evaluate(): the loop, one screen, and its periodic work
checkpointing.py  one orbax CheckpointManager (latest k + best), workdir checks, restore
preemption.py     SIGTERM/SIGINT as a flag, used as a `with` block
metric_writers.py metrics.jsonl (a clu MetricWriter) and the writer factory
"""

__all__ = ["train_and_evaluate"]


def __getattr__(name):
  # Lazy, so that importing train.state (the cache builder, the benchmarks)
  # does not import the loop and its checkpoint/metric libraries.
  if name == "train_and_evaluate":
    from ega_jax.train.loop import train_and_evaluate

    return train_and_evaluate
  raise AttributeError(f"module 'ega_jax.train' has no attribute {name!r}")
