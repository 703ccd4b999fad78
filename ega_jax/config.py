"""What a run's configuration may hold: errors, validation, derived settings.

The default values live in `configs/default.py`; the distillation
hyperparameters' defaults live in `ega_jax.losses.DEFAULT_HPARAMS` (the config
copies them from there). This module checks a config before anything is built
and derives the few settings several parts of a run share.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax.numpy as jnp
import ml_collections

from ega_jax import data as data_lib
from ega_jax import losses
from ega_jax import models as models_lib

# Computation dtypes a config may name (parameters and losses stay float32).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TEACHER_VIEWS = ("independent", "same")
NONFINITE_POLICIES = ("skip", "stop")


class UserInputError(ValueError):
  """A user mistake (config, files, data); reported as one line, no traceback."""


class ConfigError(UserInputError):
  """A configuration value that cannot work; the message names the field."""


class NonFiniteError(FloatingPointError):
  """Training met a non-finite loss or gradient under nonfinite_policy='stop'."""


def one_line(error: BaseException) -> str:
  """An exception's message on one line (for one-sentence user errors)."""
  return " ".join(str(error).split())


def uses_teacher(config) -> bool:
  """False for cross-entropy-only training, which needs no teacher forward pass."""
  return config.distill.method != "none" or bool(config.distill.alpha)


def distill_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The flat hyperparameter mapping that losses.distill_loss reads.

  Every key of losses.DEFAULT_HPARAMS is read from config.distill, so each
  loss hyperparameter can be set from the command line.
  """
  return {key: config.distill[key] for key in losses.DEFAULT_HPARAMS}


def eval_batch_size_for(config, num_devices: int) -> int:
  """config.eval_batch_size rounded up to a multiple of the device count.

  Evaluation batches are padded and masked anyway, so a larger batch changes
  no score; it lets one config run unchanged on 1, 2, 4, 8 or 16 devices.
  """
  return -(-int(config.eval_batch_size) // num_devices) * num_devices


def run_signature(config) -> dict[str, Any]:
  """What a workdir's checkpoints were trained for; a resume must match it."""
  return {
    "dataset": config.dataset.name,
    "student": config.student.arch,
    "teacher": config.teacher.arch,
    "method": config.distill.method,
    "feature_dim": int(config.feature_dim),
  }


def _one_of(valid) -> Callable[[Any], str | None]:
  def check(value):
    if value not in valid:
      return f"is not valid; valid: {', '.join(valid)}."
    return None

  return check


def _positive(value) -> str | None:
  return None if value > 0 else "must be positive."


def _existing_directory(what_creates_it: str) -> Callable[[Any], str | None]:
  def check(value):
    if not value:
      return f"is empty; set it to a directory written by {what_creates_it}."
    if not os.path.isdir(value):
      return f"is not a directory; run {what_creates_it} to create it."
    return None

  return check


GRAPH_ROWS = ("auto", "replicated", "sharded")


def _optional_directory(value) -> str | None:
  if value and not os.path.isdir(value):
    return (
      "is not a directory; build it with ega-cache or leave "
      "config.teacher.cache empty to run the teacher live."
    )
  return None


# (field, check): a check returns None when the value is fine, else the rest of
# the sentence "config.<field>=<value> <message>".
_FIELD_CHECKS = (
  ("dataset.name", _one_of(data_lib.DATASET_NAMES)),
  ("student.arch", _one_of(tuple(models_lib.STUDENT_NAMES))),
  ("teacher.arch", _one_of(tuple(models_lib.TEACHER_SPECS))),
  ("distill.method", _one_of(losses.DISTILL_METHODS)),
  ("teacher_view", _one_of(TEACHER_VIEWS)),
  ("distill.graph_rows", _one_of(GRAPH_ROWS)),
  ("dtype", _one_of(tuple(DTYPES))),
  ("nonfinite_policy", _one_of(NONFINITE_POLICIES)),
  ("feature_dim", _positive),
  (
    "teacher.checkpoint",
    _existing_directory("ega-convert (it holds teacher.json)"),
  ),
  ("teacher.cache", _optional_directory),
)


def _field(config, dotted: str):
  value = config
  for part in dotted.split("."):
    value = value.get(part, "")  # An absent optional field (teacher.cache) reads as ''.
  return value


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ConfigError (one sentence naming the field) for values that cannot work."""
  for field, check in _FIELD_CHECKS:
    value = _field(config, field)
    problem = check(value)
    if problem:
      raise ConfigError(f"config.{field}={value!r} {problem}")
  if config.batch_size <= 0 or config.batch_size % num_devices:
    raise ConfigError(
      f"config.batch_size={config.batch_size} must be a positive multiple of the device "
      f"count ({num_devices}), because it is the global batch split evenly "
      "over all devices."
    )
  if config.eval_batch_size <= 0:
    raise ConfigError(f"config.eval_batch_size={config.eval_batch_size} must be positive.")
  num_labelled = config.dataset.get("num_labelled", -1)
  if num_labelled != -1 and num_labelled <= 0:
    raise ConfigError(
      f"config.dataset.num_labelled={num_labelled} must be -1 (every label) or a positive "
      "number of labelled train images."
    )
  share = config.dataset.get("labelled_share", 0.5)
  if not 0 < share <= 1:
    raise ConfigError(
      f"config.dataset.labelled_share={share} must be in (0, 1]: the share of each batch "
      "drawn from the labelled images."
    )
  if config.distill.method in losses.GRAPH_METHODS and config.batch_size < 2:
    raise ConfigError(
      f"config.batch_size={config.batch_size} is too small for a graph loss "
      f"({config.distill.method}); use at least 2."
    )
