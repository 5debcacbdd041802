"""Run observability: ``metrics.jsonl``, TensorBoard events and a progress line with ETA.

Only process 0 writes files; every process logs with absl. ``metrics.jsonl`` has one JSON object
per logged step (``step``, ``train/loss``, ``train/lr``, ``train/grad_norm``, images/s, ... and
``eval/*`` after an evaluation). On resume, lines of steps after the restored checkpoint are
dropped (those steps are recomputed, identically), so the file never holds a step twice; a run
that starts from scratch (no complete checkpoint yet) starts a fresh file. TensorBoard events of
steps after the restored one are purged the same way (tensorboardX ``purge_step``).

Writes happen on a background thread, never on the training thread. Object stores (``gs://``)
have no append: there the lines are written in segments, a new small object
``metrics.d/<first step>-<n>.jsonl`` every ``segment_seconds`` (and at the end), instead of
rewriting a growing file on every log step; ``read_metrics(workdir)`` reads either layout.
"""
from __future__ import annotations

import json
import math
import queue
import threading
import time

from absl import logging

from ascan_jax import fileio


def _clean(value):
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def _value(v):
  """A JSON value: strings as they are, arrays (a confusion matrix, per-class numbers) as
  nested lists, numbers as floats (NaN and infinities as strings)."""
  if isinstance(v, str):
    return v
  if isinstance(v, (list, tuple)) or getattr(v, "ndim", 0) > 0:
    return [_value(x) for x in v]
  return _clean(float(v))


SEGMENTS = "metrics.d"


def _segment_files(workdir: str) -> list[str]:
  from etils import epath  # pylint: disable=g-import-not-at-top
  d = epath.Path(fileio.join(workdir, SEGMENTS))
  if not d.exists():
    return []
  return sorted(str(p) for p in d.iterdir() if p.name.endswith(".jsonl"))


def read_metrics(workdir: str) -> list[dict]:
  """Every logged record of a run, in step order (``metrics.jsonl`` and/or segments)."""
  rows = []
  for path in [fileio.join(workdir, "metrics.jsonl"), *_segment_files(workdir)]:
    if fileio.exists(path):
      rows += [json.loads(line) for line in fileio.read_text(path).splitlines() if line.strip()]
  return sorted(rows, key=lambda r: r.get("step", 0))


class MetricWriter:
  """Writes scalars to metrics.jsonl and TensorBoard (process 0 only), on a background thread."""

  def __init__(self, workdir: str, *, is_main: bool, tensorboard: bool = True,
               resume_step: int | None = None, segment_seconds: float = 30.0):
    self.is_main = is_main
    self.workdir = workdir
    self.path = fileio.join(workdir, "metrics.jsonl")
    self.remote = fileio.is_remote(workdir)
    self.segment_seconds = segment_seconds
    self._tb = None
    self._queue: queue.Queue = queue.Queue()
    self._thread = None
    self._error = None
    if not is_main:
      return
    fileio.makedirs(workdir)
    if resume_step is not None:
      self._truncate_after(resume_step)
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(fileio.join(workdir, "tensorboard"), flush_secs=30,
                               purge_step=None if not resume_step else resume_step + 1)
    self._thread = threading.Thread(target=self._run, name="metric-writer", daemon=True)
    self._thread.start()

  def _truncate_after(self, step: int) -> None:
    for path in [self.path, *_segment_files(self.workdir)]:
      if not fileio.exists(path):
        continue
      lines = [line for line in fileio.read_text(path).splitlines() if line.strip()]
      kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
      if len(kept) != len(lines):
        logging.info("%s: dropping %d lines after resumed step %d", path,
                     len(lines) - len(kept), step)
        fileio.write_text(path, "".join(line + "\n" for line in kept))

  def _run(self) -> None:
    pending, first, last_flush = [], None, time.monotonic()
    while True:
      item = self._queue.get()
      try:
        if item is not None:
          step, line, scalars = item
          if self.remote:
            pending.append(line)
            first = step if first is None else first
          else:
            fileio.append_line(self.path, line)
          if self._tb is not None:
            for k, v in scalars.items():
              self._tb.add_scalar(k, v, step)
        if pending and (item is None or time.monotonic() - last_flush >= self.segment_seconds):
          name = f"{first:09d}-{time.time_ns()}.jsonl"
          fileio.makedirs(fileio.join(self.workdir, SEGMENTS))
          fileio.write_text(fileio.join(self.workdir, SEGMENTS, name), "\n".join(pending) + "\n")
          pending, first, last_flush = [], None, time.monotonic()
      except Exception as e:  # pylint: disable=broad-except
        self._error = e  # reported on the training thread at the next write or at close.
      finally:
        self._queue.task_done()
      if item is None:
        return

  def write(self, step: int, scalars: dict) -> None:
    if not self.is_main:
      return
    if self._error is not None:
      raise RuntimeError(f"writing metrics to {self.workdir} failed: {self._error}")
    record = {"step": int(step), **{k: _value(v) for k, v in scalars.items()}}
    numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
    self._queue.put((int(step), json.dumps(record), numbers))

  def flush(self) -> None:
    if self._thread is not None:
      self._queue.join()

  def close(self) -> None:
    if self._thread is not None:
      self._queue.put(None)
      self._thread.join()
      self._thread = None
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
    if self._error is not None:
      logging.error("writing metrics to %s failed: %s", self.workdir, self._error)


class Progress:
  """Rate and ETA over the steps run in this process (so restarts don't skew it). The ETA counts
  from the end of the first step (``first_step_done``), which includes compilation: a first
  line's ETA would otherwise be far off."""

  def __init__(self, start_step: int, total_steps: int, flops_per_example: float | None = None,
               peak_flops_per_device: float | None = None):
    self.flops_per_example = flops_per_example
    self.peak = peak_flops_per_device
    self.start_step = start_step
    self.total = total_steps
    self.t0 = time.perf_counter()
    self.last_step, self.last_t = start_step, self.t0
    self.eta_step, self.eta_t = None, None

  def first_step_done(self, step: int) -> None:
    self.eta_step, self.eta_t = step, time.perf_counter()

  def eta(self, step: int, now: float) -> float:
    if self.eta_step is None or step <= self.eta_step:
      return float("inf")
    rate = (step - self.eta_step) / max(now - self.eta_t, 1e-9)
    return (self.total - step) / rate

  def line(self, step: int, scalars: dict, examples_per_step: int, num_devices: int) -> dict:
    now = time.perf_counter()
    dt = max(now - self.last_t, 1e-9)
    steps = step - self.last_step
    self.last_step, self.last_t = step, now
    rate = steps / dt
    eta = self.eta(step, now)
    out = {"perf/steps_per_second": rate,
           "perf/examples_per_second": rate * examples_per_step,
           "perf/examples_per_second_per_device": rate * examples_per_step / num_devices}
    if self.flops_per_example and self.peak:
      out["perf/mfu"] = (self.flops_per_example * out["perf/examples_per_second"]
                         / (self.peak * num_devices))
    msg = (f"step {step}/{self.total} ({100.0 * step / self.total:.1f}%)  "
           f"loss {scalars.get('train/loss', float('nan')):.4f}  "
           f"lr {scalars.get('train/lr', float('nan')):.2e}  "
           f"{out['perf/examples_per_second']:.1f} img/s  "
           f"({out['perf/examples_per_second_per_device']:.1f}/device)")
    if "perf/mfu" in out:
      msg += f"  MFU {100 * out['perf/mfu']:.1f}%"
    msg += f"  ETA {format_seconds(eta)}"
    logging.info(msg)
    print(msg, flush=True)
    return out


def format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
