"""``--mode=bench``: inference and training throughput, with warm-up, medians and MFU.

Inference: the jitted eval-mode forward on one device at each of ``bench.batch_sizes`` (1, 16,
64: the paper's Table 7 setting), random inputs already on the device. Training: the very train
step the loop runs (optimizer, EMA, donation, shardings) on all devices of the mesh, at
``bench.train_batch_size``. Each timing repeats the call until ``bench.min_seconds`` have passed
and divides; ``bench.repeats`` such timings are taken after ``bench.warmup`` untimed calls, and
the median is reported (with min and max). MFU = achieved model FLOP/s over the device peak
(``peaks``), with model FLOPs = 2 x MACs per example for inference and 6 x for training (forward
plus backward, not counting rematerialisation). Writes ``DIR/bench.json`` and prints a table.
"""
from __future__ import annotations

import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ascan_jax import fileio
from ascan_jax.modes import summary as summary_lib
from ascan_jax.perf import peaks
from ascan_jax.train import builder


def time_call(fn, *, warmup: int, repeats: int, min_seconds: float) -> list[float]:
  """Seconds per call of ``fn()`` (which must block), ``repeats`` times after ``warmup``."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    n, t0 = 0, time.perf_counter()
    while True:
      fn()
      n += 1
      elapsed = time.perf_counter() - t0
      if elapsed >= min_seconds:
        break
    times.append(elapsed / n)
  return times


def _stats(times: list[float], examples: int) -> dict:
  med = statistics.median(times)
  return {"seconds_median": med, "seconds_min": min(times), "seconds_max": max(times),
          "examples_per_second": examples / med, "repeats": len(times)}


def bench_inference(task, config, batch_size: int, device) -> dict:
  variables = jax.jit(task.init_variables, out_shardings=jax.sharding.SingleDeviceSharding(
      device))(jax.random.key(0))
  batch = jax.device_put(task.synthetic_batch(batch_size, jax.random.key(1)), device)
  fwd = jax.jit(lambda v, b: task.forward(v, b))
  c = config.bench
  times = time_call(lambda: fwd(variables, batch).block_until_ready(), warmup=c.warmup,
                    repeats=c.repeats, min_seconds=c.min_seconds)
  return _stats(times, batch_size)


def bench_train(task, config) -> dict:
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.batch_size = config.bench.train_batch_size
    cfg.total_steps = 1000
  setup = builder.build(task, cfg)
  holder = {"state": builder.create_state(setup)}
  batch = jax.device_put(task.synthetic_batch(cfg.batch_size, jax.random.key(1)),
                         setup.batch_shardings)

  def one():
    holder["state"], metrics = setup.train_step(holder["state"], setup.frozen, batch)
    jax.block_until_ready(metrics)

  c = config.bench
  times = time_call(one, warmup=c.warmup, repeats=c.repeats, min_seconds=c.min_seconds)
  out = _stats(times, cfg.batch_size)
  out["devices"] = setup.mesh.size
  out["mesh"] = dict(setup.mesh.shape)
  return out


def run_benchmark(task, config) -> dict:
  device = jax.devices()[0]
  dtype = task.dtype
  model = task.build_model(attention_impl="xla")
  variables = summary_lib.abstract_variables(task, model)
  macs = summary_lib.count_forward_macs(task, model, variables)["macs"]
  params = sum(int(x.size) for x in jax.tree.leaves(variables["params"]))
  peak, peak_source = peaks.peak_flops(device, dtype)
  result = {
      "task": config.task, "device_kind": device.device_kind, "platform": device.platform,
      "num_devices": jax.device_count(), "compute_dtype": jnp.dtype(dtype).name,
      "image_size": config.data.get("image_size") if "data" in config else None,
      "input_shapes": {k: list(v.shape[1:]) for k, v in task.input_spec(1, train=False).items()
                       if len(v.shape) > 1},
      "attention_impl": config.model.attention_impl if "model" in config else None,
      "params": params, "macs_per_example": macs, "gflops_per_example": 2.0 * macs / 1e9,
      "peak_flops_per_device": peak, "peak_source": peak_source,
      "host": platform.node(), "jax_version": jax.__version__,
      "warmup": config.bench.warmup, "repeats": config.bench.repeats,
      "min_seconds": config.bench.min_seconds, "inference": {}, "train": None,
  }
  for b in config.bench.batch_sizes:
    r = bench_inference(task, config, int(b), device)
    r["mfu"] = 2.0 * macs * r["examples_per_second"] / peak
    result["inference"][str(b)] = r
  if config.bench.train_batch_size > 0:
    r = bench_train(task, config)
    r["mfu"] = 6.0 * macs * r["examples_per_second"] / (peak * r["devices"])
    r["examples_per_second_per_device"] = r["examples_per_second"] / r["devices"]
    result["train"] = r
  def fresh_context():
    setup = builder.build(task, config)
    return builder.RunContext(setup, builder.create_state(setup), 0)

  result.update(task.bench_extra(result, fresh_context))  # e.g. whole samples per second.
  return result


def format_table(r: dict) -> str:
  lines = [f"device: {r['device_kind']} x{r['num_devices']} ({r['platform']}), "
           f"dtype {r['compute_dtype']}, {r['params'] / 1e6:.2f} M params, "
           f"{r['macs_per_example'] / 1e9:.3f} GMACs/example, "
           f"peak {r['peak_flops_per_device'] / 1e12:.3f} TFLOP/s ({r['peak_source']})",
           f"{'mode':<10} {'batch':>6} {'ex/s (median)':>14} {'min..max ex/s':>20} {'MFU':>7}"]
  for b, x in r["inference"].items():
    lo, hi = int(b) / x["seconds_max"], int(b) / x["seconds_min"]
    lines.append(f"{'inference':<10} {b:>6} {x['examples_per_second']:>14.1f} "
                 f"{lo:>9.1f}..{hi:<10.1f} {100 * x['mfu']:>6.2f}%")
  s = r.get("sampling")
  if s:
    for k, v in s.items():
      lines.append(f"sampling: {k} = {v}")
  t = r.get("train")
  if t:
    b = int(round(t["examples_per_second"] * t["seconds_median"]))
    lo, hi = b / t["seconds_max"], b / t["seconds_min"]
    lines.append(f"{'train':<10} {b:>6} {t['examples_per_second']:>14.1f} "
                 f"{lo:>9.1f}..{hi:<10.1f} {100 * t['mfu']:>6.2f}%")
  return "\n".join(lines)


def run(task, config, workdir: str) -> dict:
  r = run_benchmark(task, config)
  fileio.makedirs(workdir)
  fileio.write_text(fileio.join(workdir, "bench.json"),
                    json.dumps(r, indent=2, default=lambda o: np.asarray(o).tolist()))
  print(format_table(r), flush=True)
  return r
