"""The few calls a Python user needs beyond the command line (re-exported by `ega_jax`)."""

from __future__ import annotations

import ml_collections

from ega_jax import cli
from ega_jax import config as config_lib


def get_config(name_or_path: str, **overrides) -> ml_collections.ConfigDict:
  """A config by shipped name ('fashion_mnist') or path ('configs/x.py[:arg]'), overridden.

  `overrides` use '__' for nesting: get_config('cifar100', distill__method='rkd',
  batch_size=128). An unknown field raises UserInputError naming it and the
  nearest valid ones.
  """
  try:
    config = cli.load_config_file(cli.resolve_config_path(name_or_path))
    for key, value in overrides.items():
      dotted = key.replace("__", ".")
      cli.check_override(config, dotted)
      *parents, leaf = dotted.split(".")
      node = config
      for parent in parents:
        node = node[parent]
      node[leaf] = value
  except cli.FlagError as error:
    raise config_lib.UserInputError(str(error)) from error
  return config


def distill(config: ml_collections.ConfigDict, workdir: str):
  """Trains (or resumes) a run in `workdir`.

  Returns:
    (summary, variables): the run's summary dict (best/last top-1, steps,
    wall time, ...) and the final student's `DistilledStudent` variables
    (NumPy), which `ega_jax.DistilledStudent(arch, num_classes,
    feature_dim).apply(variables, images)` runs.
  """
  from ega_jax import export
  from ega_jax.train.loop import train_and_evaluate

  summary = train_and_evaluate(config, workdir)
  if summary.get("preempted"):
    return summary, None
  variables, _ = export.student_from_workdir(workdir, "latest")
  return summary, variables


def export_student(workdir: str, output: str, which: str = "best", formats=None) -> dict:
  """`python -m ega_jax.export` as a call; returns the student.json written."""
  from ega_jax import export

  if isinstance(formats, str):
    formats = formats.split(",")
  variables, meta = export.student_from_workdir(workdir, which)
  return export.write_export(output, variables, meta, tuple(formats or export.FORMATS))
