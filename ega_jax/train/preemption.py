"""Stopping cleanly on SIGTERM/SIGINT: a `with` block the loop polls after each step."""

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

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for name in self.SIGNALS:
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
