"""Preemption and Ctrl-C: the loop writes one checkpoint and exits, instead of losing the steps.

SIGTERM (a preemption notice, a scheduler's time limit, ``kill``) and SIGINT (Ctrl-C) are both
caught: the step in flight finishes, a checkpoint of it is written, one line is printed, and the
run exits (status 0 after SIGTERM, so schedulers requeue it; 130 after Ctrl-C, the shell's
convention for an interrupted command). A second Ctrl-C while the checkpoint is being written
interrupts at once. The loop keeps at most one step in flight (``modes.train``), so the signal is
acted on within a step whatever ``log.every_steps`` is.

The handler itself does no I/O: Python runs it between two bytecodes of the main thread, which
may be inside a write to the same stream (an absl log line), and a second write there fails
("reentrant call inside <_io.BufferedWriter name='<stderr>'>": a "--- Logging error ---"
traceback on a clean exit). The main thread logs the signal at its next ``should_stop``.

Several processes must agree on the step at which they save (a save is a collective): JAX's
preemption sync point (``multihost_utils.reached_preemption_sync_point``) does that for SIGTERM,
and Ctrl-C in one process is turned into a SIGTERM to itself so the same mechanism spreads it.
"""
from __future__ import annotations

import os
import signal

import jax
from absl import logging

EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 130}


class PreemptionWatcher:

  def __init__(self):
    self.multi = jax.process_count() > 1
    self.signal = None  # the signal that stopped the run.
    self.step_at_signal = None  # the last step dispatched when it came.
    self.current_step = 0
    self._announced = False
    self._previous = {}
    if not self.multi:
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)
    self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_signal)

  def _on_signal(self, signum, frame):
    del frame
    if self.multi and signum == signal.SIGINT:
      self.signal = signal.SIGINT
      self.step_at_signal = self.current_step
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption service spreads it.
      return
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now.
    self.signal = signum  # no I/O here (module docstring); should_stop logs it.
    self.step_at_signal = self.current_step

  def should_stop(self, step: int) -> bool:
    self.current_step = step
    if self.multi:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal = self.signal or signal.SIGTERM
        self._announce(step)
        return True
      return False
    if self.signal is not None:
      self._announce(step)
    return self.signal is not None

  def _announce(self, step: int) -> None:
    if not self._announced:
      self._announced = True
      logging.warning("received %s: checkpointing step %d and exiting", self.signal_name, step)

  @property
  def exit_code(self) -> int:
    return EXIT_CODES.get(self.signal, 0)

  @property
  def signal_name(self) -> str:
    names = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT (Ctrl-C)"}
    return names.get(self.signal, "a signal")

  def close(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}
