"""Stopping cleanly on SIGTERM/SIGINT: a `with` block the loop polls after each step, and,
with several processes, a vote carried by the train step so that all stop at the same step."""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np


class PreemptionRequested:
  """Turns SIGTERM/SIGINT into a flag the loop polls after each step.

  Used as `with PreemptionRequested() as preemption:`; the previous handlers
  are restored when the block ends, also when it raises. The step in flight
  finishes, a checkpoint is written, and the run exits cleanly; a second
  signal while stopping falls back to the default action.
  """

  SIGNALS = ("SIGTERM", "SIGINT")

  def __init__(self, signals: tuple[str, ...] = SIGNALS):
    self.signal_name = None
    self._signals = signals
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for name in self._signals:
        number = getattr(signal, name)
        self._previous[number] = signal.signal(number, self._handle)
    return self

  def _handle(self, number, frame):
    del frame
    self.signal_name = signal.Signals(number).name
    # A second signal gets the default behaviour (e.g. Ctrl-C twice kills).
    signal.signal(number, self._previous.get(number, signal.SIG_DFL))

  def __exit__(self, *exc):
    for number, handler in self._previous.items():
      signal.signal(number, handler)
    self._previous = {}
    return False

  @property
  def signalled(self) -> bool:
    """Whether this process received a stop signal."""
    return self.signal_name is not None


def jax_preemption_sync_available() -> bool:
  """Whether jax.distributed's preemption sync manager runs in this process.

  jax.distributed.initialize starts it in multi-process jobs: a C++ SIGTERM
  handler tells the coordination service, which tells every process; each
  process asks `multihost_utils.reached_preemption_sync_point(step)` after
  every step and all of them get True at the same step. Taking SIGTERM in
  Python as well would replace that handler, so the loop then leaves SIGTERM
  to it (SIGINT stays with PreemptionRequested and the StopVote).
  """
  from jax._src import distributed

  return jax.process_count() > 1 and distributed.global_state.preemption_sync_manager is not None


def reached_jax_preemption_sync_point(step: int) -> bool:
  """True at the step at which every process stops for a SIGTERM to any of them."""
  from jax.experimental import multihost_utils

  return multihost_utils.reached_preemption_sync_point(step)


class StopVote:
  """All processes stop after the same step, at most one step after any of them is signalled.

  Each step's batch carries, in this process's rows, whether this process was
  signalled ('stop', int32); the train step takes the maximum over the global
  batch (`metrics['stop']`, replicated). The loop reads step t's vote after it
  has dispatched step t+1, so one step stays in flight and no extra host
  synchronisation is added; every process then sees the same vote and stops
  after step t+1. TPU maintenance events signal every host, but not at the
  same moment; a SIGTERM sent to one process of a SLURM job stops them all.
  """

  def __init__(self, mesh, local_rows: int):
    self._mesh = mesh
    self._local_rows = local_rows
    self._pending = None

  def attach(self, batch: dict, signalled: bool) -> dict:
    """`batch` with this process's vote added under 'stop'."""
    from ega_jax.train import state as state_lib

    vote = np.full((self._local_rows,), int(signalled), np.int32)
    return {**batch, **state_lib.global_batch_from_local(self._mesh, {"stop": vote})}

  def agreed(self, vote) -> bool:
    """True when the vote of the previous step said stop; `vote` is this step's."""
    previous, self._pending = self._pending, vote
    return previous is not None and bool(jax.device_get(previous))
