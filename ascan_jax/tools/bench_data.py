"""Measures the host input pipeline: images per second per worker count, and where the time goes.

  python -m ascan_jax.tools.bench_data --config=configs/ascan_t.py [--workers=0,1,2]
      [--batches=8] [--batch_size=64] [--source=synthetic|config] [--sizes=500x375,1024x768]
      [--threads=1] [--batching=worker,consumer] [--draft=true,false] [--recipe=config|before]
      [--eval] [--out=results/data_pipeline/NAME.json]

It runs the real training pipeline (``data.pipeline.train_dataset`` with the config's codec) for
every combination of ``--workers``, ``--threads``, ``--batching`` and ``--draft``: one warm-up
batch (which includes starting the workers: reported as ``first_batch_s``), then ``--batches``
timed batches of ``--batch_size`` images (``images_per_s``, and ``cpu_ms_per_image``: the CPU
time of this process and its workers per image, which other jobs on a shared machine disturb
far less than the wall clock). ``--eval`` also times the evaluation pipeline (``eval_dataset``),
whose workers start anew at every evaluation, and what starting a worker costs.

Sources. ``synthetic`` (default) is a picklable in-memory source of JPEGs of the ``--sizes``
given (quality 90, multi-scale noise: about 0.45-0.5 bytes per pixel, near ImageNet's training
JPEGs, which average about 110 KB, roughly 0.5-0.6 bytes per pixel), read through
``load_encoded`` like an ArrayRecord or tfds source; ``config`` reads the
dataset the config names (``sources.get_source``).

The stage table (``--stages``, on by default) times each step of the ImageNet transform on one
core in this process: decoding, the crop with and without reduced-size decoding, flip,
RandAugment, colour jitter, collation. ``--recipe=before`` runs the augmentation as it was
before timm's rules were applied (RandAugment magnitude unclamped, colour jitter on top). The
float32 2048x2048 matmul rate of the moment is recorded too, since the speed of a shared machine
varies from day to day. Results are printed and, with ``--out``, written as JSON.
"""
from __future__ import annotations

import io
import itertools
import json
import os
import time

from absl import app
from absl import flags
import ml_collections
import numpy as np
from PIL import Image

from ascan_jax.data import pipeline
from ascan_jax.data import sources
from ascan_jax.data import transforms


def _define_flags():
  """Flags exist only when this runs as a program, so importing it never clashes."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Experiment config file (file.py[:arg]).")
  flags.DEFINE_list("workers", ["0", "1", "2"], "Worker process counts to measure.")
  flags.DEFINE_list("threads", ["1"], "Threads per process to measure.")
  flags.DEFINE_list("batching", ["worker"], "Batching modes to measure (worker, consumer).")
  flags.DEFINE_list("draft", ["true"], "Reduced-size JPEG decoding off/on (false, true).")
  flags.DEFINE_integer("batches", 8, "Timed batches per measurement.")
  flags.DEFINE_integer("batch_size", 64, "Host batch size.")
  flags.DEFINE_enum("source", "synthetic", ["synthetic", "config"], "Where images come from.")
  flags.DEFINE_list("sizes", ["500x375"], "Synthetic JPEG sizes WIDTHxHEIGHT (cycled).")
  flags.DEFINE_enum("recipe", "config", ["config", "before"],
                    "Augmentation as configured, or as before timm's rules (unclamped, jitter).")
  flags.DEFINE_bool("stages", True, "Time each transform stage on one core.")
  flags.DEFINE_bool("eval", False, "Also time the evaluation pipeline.")
  flags.DEFINE_string("out", "", "Write the results as JSON here.")


# ---- a synthetic source of ImageNet-like JPEGs --------------------------------------------------
def synthetic_jpeg(width: int, height: int, rng: np.random.Generator, quality: int = 90) -> bytes:
  """A JPEG of multi-scale noise, from blobs a quarter of the image wide down to 2-pixel grain
  (about 0.45-0.5 bytes per pixel at quality 90, photo-like decode cost)."""
  image = np.zeros((height, width, 3), np.float32)
  for cells, weight in ((4, 90.0), (16, 60.0), (max(16, width // 8), 60.0),
                        (max(16, width // 2), 150.0)):
    coarse = rng.normal(0, 1, (max(2, height * cells // max(width, height)), cells, 3))
    up = Image.fromarray(((coarse - coarse.min()) / np.ptp(coarse) * 255).astype(np.uint8))
    image += weight * (np.asarray(up.resize((width, height), Image.BICUBIC), np.float32) / 255
                       - 0.5)
  image = np.clip(image + 128 + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def parse_size(text: str) -> tuple[int, int]:
  w, _, h = text.lower().partition("x")
  try:
    return int(w), int(h)
  except ValueError:
    raise ValueError(f"--sizes entry {text!r} is not WIDTHxHEIGHT") from None


class SyntheticJpegSource:
  """``num_records`` records cycling over ``distinct`` JPEGs per size (picklable, in memory)."""

  def __init__(self, num_records: int, sizes, num_classes: int, distinct: int = 8,
               seed: int = 0):
    rng = np.random.default_rng(seed)
    self.jpegs = [synthetic_jpeg(w, h, rng) for _ in range(distinct) for (w, h) in sizes]
    self.num_records, self.num_classes = int(num_records), int(num_classes)
    self.description = (f"synthetic JPEGs {','.join(f'{w}x{h}' for w, h in sizes)} "
                        f"({num_records} records)")

  def __len__(self) -> int:
    return self.num_records

  def load(self, i: int) -> dict:
    return {"image": sources.decode_image(self.jpegs[i % len(self.jpegs)]),
            "label": i % self.num_classes}

  def load_encoded(self, i: int) -> dict:
    return {"image": sources.EncodedImage(self.jpegs[i % len(self.jpegs)]),
            "label": i % self.num_classes}


# ---- measurements -------------------------------------------------------------------------------
def _ms_per_call(fn, items) -> float:
  """CPU milliseconds per call (process CPU time: robust to other jobs sharing the cores)."""
  t0 = time.process_time()
  for x in items:
    fn(x)
  return 1000.0 * (time.process_time() - t0) / max(1, len(items))


def process_tree_cpu_seconds() -> float | None:
  """User + system CPU seconds of this process and its live descendants (the grain workers),
  read from Linux's /proc; None elsewhere."""
  try:
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for name in os.listdir("/proc"):
      if name.isdigit():
        try:
          with open(f"/proc/{name}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
          continue
        stats[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
  except (OSError, ValueError, IndexError):
    return None
  total, todo = 0.0, [os.getpid()]
  while todo:
    pid = todo.pop()
    total += stats.get(pid, (0, 0.0))[1]
    todo += [child for child, (parent, _) in stats.items() if parent == pid]
  return total


def stage_costs(source, config, n: int = 48) -> dict:
  """Milliseconds per image of each stage of the training transform, on one core."""
  aug, size = config.augment, config.data.image_size
  records = [sources.load_record(source, i, encoded=True) for i in range(n)]
  encoded = [r["image"] for r in records if isinstance(r["image"], sources.EncodedImage)]
  rngs = lambda: [np.random.default_rng([0, i]) for i in range(len(encoded))]
  scale = (aug.crop_min_scale, 1.0)
  boxes = [transforms.random_resized_crop_box(e.height, e.width, r, scale)
           for e, r in zip(encoded, rngs())]
  out = {"images": len(encoded)}
  if not encoded:
    return out
  out["decode_full_ms"] = _ms_per_call(lambda e: e.decode(), encoded)
  out["crop_full_decode_ms"] = _ms_per_call(
      lambda eb: transforms.crop_and_resize_encoded(eb[0], eb[1], size, draft=False),
      list(zip(encoded, boxes)))
  out["crop_draft_decode_ms"] = _ms_per_call(
      lambda eb: transforms.crop_and_resize_encoded(eb[0], eb[1], size, draft=True),
      list(zip(encoded, boxes)))
  out["draft_share"] = float(np.mean([transforms.draft_factor(b, size) > 1 for b in boxes]))
  crops = [transforms.crop_and_resize_encoded(e, b, size) for e, b in zip(encoded, boxes)]
  out["flip_ms"] = _ms_per_call(lambda x: np.ascontiguousarray(x[:, ::-1]), crops)
  magnitude_max = transforms.randaugment_magnitude_max(aug)
  it = iter(rngs())
  out["randaugment_ms"] = _ms_per_call(
      lambda x: transforms.rand_augment(x, next(it), aug.randaugment_layers,
                                        aug.randaugment_magnitude, magnitude_max), crops)
  it = iter(rngs())
  out["color_jitter_ms"] = _ms_per_call(
      lambda x: transforms.color_jitter(x, next(it), max(aug.color_jitter, 0.4)), crops)
  examples = [{"image": c, "label": np.int32(0), "mask": 1.0, "index": 0} for c in crops]
  out["collate_ms"] = _ms_per_call(lambda _: pipeline.collate(examples), [0]) / len(examples)
  return out


def time_pipeline(make_iterable, batches: int, batch_size: int, drain: int = 0) -> dict:
  """Seconds to the first batch (worker start-up included); then, after ``drain`` more batches
  (as many as the buffers hold, filled while the first one was awaited, so the timing starts in
  the steady state), over ``batches`` batches: wall-clock images/s and the CPU milliseconds per
  image of this process and its workers."""
  t0 = time.perf_counter()
  iterator = iter(make_iterable())
  next(iterator)
  first = time.perf_counter() - t0
  for _ in range(drain):
    next(iterator)
  cpu0, t1 = process_tree_cpu_seconds(), time.perf_counter()
  for _ in range(batches):
    next(iterator)
  elapsed, cpu1 = time.perf_counter() - t1, process_tree_cpu_seconds()
  close = getattr(iterator, "close", None)
  if close:
    close()
  images = batches * batch_size
  out = {"first_batch_s": round(first, 3), "images_per_s": round(images / elapsed, 1)}
  if cpu0 is not None and cpu1 is not None and cpu1 > cpu0:
    out["cpu_ms_per_image"] = round(1000.0 * (cpu1 - cpu0) / images, 2)
  return out


def worker_startup(source, config, workers: int) -> dict:
  """Starting ``workers`` workers for one batch of one example: wall seconds to that batch and
  the CPU seconds the workers used (their interpreter, imports and unpickled pipeline), from
  the resource usage of finished child processes."""
  import resource  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())
  config.batch_size = config.eval_batch_size = 1
  config.data.worker_count = workers
  codec = pipeline.ImageCodec.from_config(config)
  usage = lambda: sum(getattr(resource.getrusage(resource.RUSAGE_CHILDREN), f)
                      for f in ("ru_utime", "ru_stime"))
  cpu0, t0 = usage(), time.perf_counter()
  iterator = iter(pipeline.eval_dataset(source, codec, config, pipeline.Sharding(0, 1)))
  next(iterator)
  wall = time.perf_counter() - t0
  iterator.close()
  time.sleep(1.0)  # let the workers exit and be reaped.
  return {"workers": workers, "first_batch_s": round(wall, 2),
          "worker_cpu_s": round(usage() - cpu0, 2)}


def buffered_batches(loading: pipeline.Loading) -> int:
  """How many batches the pipeline's buffers hold at most (they fill during start-up): per
  worker, its queue and grain's interleave buffer in the consumer (``buffer`` batches each, or
  examples adding up to that in consumer batching, which also has a batch prefetch thread)."""
  if loading.workers == 0:
    return 1
  if loading.batching == "consumer":
    return 3 * loading.buffer + 1
  return 2 * loading.workers * loading.buffer + 1


def machine(measure_matmul: bool = True) -> dict:
  """CPU count, load average and (``measure_matmul``) the float32 2048x2048 matmul rate."""
  out = {"cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2)}
  if measure_matmul:
    from ascan_jax.perf import peaks  # pylint: disable=g-import-not-at-top
    out["matmul_f32_2048_gflops"] = round(peaks.measure_matmul_flops() / 1e9, 1)
  return out


def _bool(text: str) -> bool:
  return text.strip().lower() in ("1", "true", "yes", "on")


def run(config, *, workers, threads, batching, drafts, batches: int, batch_size: int,
        source_kind: str = "synthetic", sizes=((500, 375),), recipe: str = "config",
        stages: bool = True, evaluate: bool = False, measure_machine: bool = True) -> dict:
  """Every measurement of the module docstring, as a dict."""
  config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy we may change.
  config.batch_size = config.eval_batch_size = int(batch_size)
  if recipe == "before":
    config.augment["randaugment_magnitude_max"] = 0.0
    config.augment["color_jitter_with_randaugment"] = True
  if source_kind == "synthetic":
    total = (batches + 1 + max(map(int, workers), default=0) * 4 + 4) * batch_size
    source = SyntheticJpegSource(max(total, 4096), sizes, config.data.num_classes)
  else:
    source = sources.get_source(config.data, config.data.train_split)
  result = {"config": {"image_size": config.data.image_size, "augment": config.augment.to_dict()},
            "source": source.description, "batch_size": batch_size, "recipe": recipe,
            "machine": machine(measure_machine), "pipeline": []}
  if stages and source_kind == "synthetic":
    result["stages"] = stage_costs(source, config)
  if evaluate:
    result["worker_startup"] = [worker_startup(source, config, w) for w in workers if w > 0]
  sharding = pipeline.Sharding(0, 1)
  for w, t, b, d in itertools.product(workers, threads, batching, drafts):
    config.data.worker_count, config.data["worker_threads"] = int(w), int(t)
    config.data["batching"], config.data["decode_draft"] = b, bool(d)
    codec = pipeline.ImageCodec.from_config(config)
    row = {"workers": int(w), "threads": int(t), "batching": b, "draft": bool(d)}
    drain = buffered_batches(pipeline.loading_of(config))
    row.update(time_pipeline(
        lambda: pipeline.train_dataset(source, codec, config, sharding, batches + drain + 1),
        batches, batch_size, drain))
    if evaluate:
      ev = time_pipeline(lambda: pipeline.eval_dataset(source, codec, config, sharding),
                         min(batches, len(source) // batch_size - drain - 1), batch_size, drain)
      row.update({f"eval_{k}": v for k, v in ev.items()})
    print(json.dumps(row), flush=True)
    result["pipeline"].append(row)
  return result


def main(argv):
  del argv
  f = flags.FLAGS
  if f.config is None:
    raise app.UsageError("--config is required (e.g. configs/ascan_t.py)")
  result = run(f.config, workers=[int(w) for w in f.workers],
               threads=[int(t) for t in f.threads], batching=list(f.batching),
               drafts=[_bool(d) for d in f.draft], batches=f.batches,
               batch_size=f.batch_size, source_kind=f.source,
               sizes=[parse_size(s) for s in f.sizes], recipe=f.recipe, stages=f.stages,
               evaluate=f.eval)
  print(json.dumps({k: v for k, v in result.items() if k != "pipeline"}, indent=1))
  if f.out:
    os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
    with open(f.out, "w") as fh:
      json.dump(result, fh, indent=1)
    print(f"wrote {f.out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
