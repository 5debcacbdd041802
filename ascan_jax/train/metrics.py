"""Run observability: ``metrics.jsonl``, TensorBoard events and a progress line with ETA.

Only process 0 writes files; every process logs with absl. ``metrics.jsonl`` has one JSON object
per logged step (``step``, ``train/loss``, ``train/lr``, ``train/grad_norm``, images/s, ... and
``eval/*`` after an evaluation). On resume, lines of steps after the restored checkpoint are
dropped (those steps are recomputed, identically), so the file never holds a step twice; a run
that starts from scratch (no complete checkpoint yet) starts a fresh file.
"""
from __future__ import annotations

import json
import math
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


class MetricWriter:
  """Writes scalars to metrics.jsonl and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, *, is_main: bool, tensorboard: bool = True,
               resume_step: int | None = None):
    self.is_main = is_main
    self.path = fileio.join(workdir, "metrics.jsonl")
    self._tb = None
    if not is_main:
      return
    fileio.makedirs(workdir)
    if resume_step is not None and fileio.exists(self.path):
      self._truncate_after(resume_step)
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(fileio.join(workdir, "tensorboard"), flush_secs=30)

  def _truncate_after(self, step: int) -> None:
    lines = [line for line in fileio.read_text(self.path).splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
      logging.info("metrics.jsonl: dropping %d lines after resumed step %d",
                   len(lines) - len(kept), step)
      fileio.write_text(self.path, "".join(line + "\n" for line in kept))

  def write(self, step: int, scalars: dict) -> None:
    if not self.is_main:
      return
    record = {"step": int(step), **{k: _value(v) for k, v in scalars.items()}}
    fileio.append_line(self.path, json.dumps(record))
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()


class Progress:
  """Rate and ETA over the steps run in this process (so restarts don't skew it)."""

  def __init__(self, start_step: int, total_steps: int, flops_per_example: float | None = None,
               peak_flops_per_device: float | None = None):
    self.flops_per_example = flops_per_example
    self.peak = peak_flops_per_device
    self.start_step = start_step
    self.total = total_steps
    self.t0 = time.perf_counter()
    self.last_step, self.last_t = start_step, self.t0

  def line(self, step: int, scalars: dict, examples_per_step: int, num_devices: int) -> dict:
    now = time.perf_counter()
    dt = max(now - self.last_t, 1e-9)
    steps = step - self.last_step
    self.last_step, self.last_t = step, now
    rate = steps / dt
    done = step - self.start_step
    overall = done / max(now - self.t0, 1e-9)
    eta = (self.total - step) / overall if overall > 0 else float("inf")
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
