"""Preemption: SIGTERM makes the loop write a checkpoint at the next step and exit cleanly.

Single process: a SIGTERM handler sets a flag. Several processes: JAX's own preemption sync
point (``multihost_utils.reached_preemption_sync_point``), so all processes agree on the step at
which to save (a checkpoint save is a collective; they must all take part in the same one).
"""
from __future__ import annotations

import signal

import jax
from absl import logging


class PreemptionWatcher:

  def __init__(self):
    self.multi = jax.process_count() > 1
    self._flag = False
    self._previous = None
    if not self.multi:
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del frame
    logging.warning("received signal %d: will checkpoint and exit after this step", signum)
    self._flag = True

  def should_stop(self, step: int) -> bool:
    if self.multi:
      from jax.experimental import multihost_utils
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self._flag

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
