"""The training package's own pieces: config validation table, hyperparameters from the
config, one checkpoint manager (latest k + best), the metrics writer, the stop signal."""

import json
import os
import signal

import numpy as np
import pytest

from ega_jax import config as config_lib
from ega_jax import losses


def _default_config():
  from ega_jax.configs import default

  return default.get_config()


def test_every_loss_hyperparameter_is_a_config_field_and_reaches_the_loss():
  config = _default_config()
  assert set(losses.DEFAULT_HPARAMS) <= set(config.distill.keys())
  for key, value in losses.DEFAULT_HPARAMS.items():
    assert config.distill[key] == value, key
  config.distill.pearson_eps = 0.5
  config.distill.irg_squared_distance = False
  config.distill.pkt_eps = 1e-3
  hparams = config_lib.distill_hparams(config)
  assert set(hparams) == set(losses.DEFAULT_HPARAMS)
  assert hparams["pearson_eps"] == 0.5 and hparams["pkt_eps"] == 1e-3
  assert hparams["irg_squared_distance"] is False
  # The value really changes the loss (a huge eps flattens the Pearson graph).
  rng = np.random.default_rng(0)
  teacher, student = rng.normal(size=(8, 16)), rng.normal(size=(8, 16))
  default_loss = losses.distill_loss("ega", student_emb=student, teacher_emb=teacher)
  config_loss = losses.distill_loss(
    "ega", student_emb=student, teacher_emb=teacher, hparams=hparams
  )
  assert abs(float(default_loss) - float(config_loss)) > 1e-3


def test_graph_methods_need_two_rows(tmp_path):
  config = _default_config()
  config.teacher.checkpoint = str(tmp_path)
  config.batch_size = 1
  for method in losses.GRAPH_METHODS:
    config.distill.method = method
    with pytest.raises(config_lib.ConfigError, match="config.batch_size=1 is too small"):
      config_lib.validate_config(config, num_devices=1)
  config.distill.method = "kd"
  config_lib.validate_config(config, num_devices=1)


def test_checkpoint_manager_keeps_the_latest_k_and_the_best(tmp_path):
  from ega_jax.train import checkpointing

  workdir = checkpointing.workdir_path(str(tmp_path))
  manager = checkpointing.create_checkpoint_manager(workdir, keep_checkpoints=2)
  top1 = {1: 10.0, 2: 70.0, 3: None, 4: 40.0, 5: 50.0, 6: None}
  for step, eval_top1 in top1.items():
    state = {"w": np.full((3,), float(step), np.float32)}
    checkpointing.save(manager, step, state, {"step": step}, eval_top1)
  manager.wait_until_finished()
  assert sorted(int(name) for name in os.listdir(tmp_path / "checkpoints")) == [2, 5, 6]
  assert manager.best_step() == 2 and manager.latest_step() == 6
  manager.close()


def test_jsonl_writer_appends_at_flush_and_keeps_earlier_lines(tmp_path):
  from ega_jax.train.metric_writers import JsonlWriter
  from etils import epath

  path = epath.Path(tmp_path) / "metrics.jsonl"
  path.write_text(json.dumps({"step": 1, "a": 1.0}) + "\n")
  writer = JsonlWriter(path)
  writer.write_scalars(2, {"a": np.float32(2.5)})
  writer.write_scalars(2, {"b": 3})
  # Nothing reaches the file before flush; then both lines, after the old one.
  assert len(path.read_text().splitlines()) == 1
  writer.flush()
  writer.write_scalars(3, {"a": 4.0})
  writer.close()
  records = [json.loads(line) for line in path.read_text().splitlines()]
  assert records == [
    {"step": 1, "a": 1.0},
    {"step": 2, "a": 2.5},
    {"step": 2, "b": 3.0},
    {"step": 3, "a": 4.0},
  ]


def test_preemption_block_turns_sigterm_into_a_flag_and_restores_the_handler():
  from ega_jax.train.preemption import PreemptionRequested

  def previous(number, frame):
    del number, frame

  old = signal.signal(signal.SIGTERM, previous)
  try:
    with PreemptionRequested() as preemption:
      assert not preemption.signalled
      os.kill(os.getpid(), signal.SIGTERM)
      assert preemption.signalled
      assert preemption.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is previous
  finally:
    signal.signal(signal.SIGTERM, old)
