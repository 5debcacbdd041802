"""Measures the text-to-image input pipeline on this machine's CPU: examples per second.

  PYTHONPATH=. .venv/bin/python results/data/measure_pipeline.py --out=results/data/throughput.json

Three inputs, each through ``bucketed_pipeline.bucketed_train_dataset`` (the bucket plan, the
codec, grain batching) with ``data.worker_count`` 0 (decode in the main process), 1 and 2:

* ``webdataset_jpeg``: a webdataset of JPEG images (embedded scenes rendered at 384x512 and
  512x384, quality 90) decoded, cropped to their SDXL bucket at a 256² area (sides multiples of
  32) and resized (``caption_pp.CaptionImageCodec``);
* ``embedded_scenes``: scenes rendered on the fly at 64x64 and 64x96, cropped to 64² buckets;
* ``caption_cache``: a caption latent cache of 256² images (latents 32x32x4 float16, mean and
  std) with text records shaped like Flan-T5-XXL's (4096-d, 24 tokens, bfloat16), read and
  expanded to ``text_embedding`` float32 [128, 4096] (``latents.CaptionLatentCodec``).

Each run reads ``--warmup`` batches, then times ``--batches`` batches of ``--batch`` examples;
with 0 workers the process's CPU time per example is recorded too (decode + augment cost,
insensitive to other jobs on the machine, unlike the wall-clock rates).
The embedding bytes per example are measured on the same text records. Results are written as
JSON with the machine's load average (other jobs share this CPU; rates are indicative).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time

import ml_collections
import numpy as np
from PIL import Image

from ascan_jax.data import bucketed_pipeline, buckets, caption_pp, caption_sources, latents
from ascan_jax.data import pipeline, shard_files, text_cache, webdataset


def _jpeg(image):
  b = io.BytesIO()
  Image.fromarray(image).save(b, format="JPEG", quality=90)
  return b.getvalue()


def make_webdataset(root: str, n: int) -> str:
  data = caption_sources.data_config()
  data.scenes.sizes, data.scenes.train_examples = ("384x512", "512x384"), n
  scenes = caption_sources.get_caption_source(data, "train")
  samples = [{"key": f"{i:06d}", "jpg": _jpeg(scenes.load(i)["image"]),
              "txt": scenes.load(i)["caption"]} for i in range(n)]
  os.makedirs(root, exist_ok=True)
  for k in range(0, n, 128):
    webdataset.write_shard(os.path.join(root, f"shard-{k // 128:05d}.tar"), samples[k:k + 128])
  return root


def make_cache(root: str, n: int, tokens: int = 24, dim: int = 4096) -> str:
  rng = np.random.default_rng(0)
  prompts = [f"prompt number {i}" for i in range(n)]
  digests = text_cache.sorted_unique_digests(prompts)
  order = {text_cache.digest(p): p for p in prompts}
  ordered = [order[(int(a), int(b))] for a, b in digests]
  os.makedirs(root, exist_ok=True)
  np.save(os.path.join(root, "train" + text_cache.DIGESTS_SUFFIX), digests)
  shard_files.write_records(os.path.join(root, "train-text-00000-of-00001.array_record"),
                            (text_cache.encode_record(p, rng.normal(size=(tokens, dim)))
                             for p in ordered), options=shard_files.UNCOMPRESSED)
  shard = "train-00000-of-00001.array_record"
  shard_files.write_records(os.path.join(root, shard), (
      latents.encode_caption_record(i, str(i), 0, [prompts[i]], {
          "mean": rng.normal(size=(32, 32, 4)), "std": np.abs(rng.normal(size=(32, 32, 4)))})
      for i in range(n)), options=shard_files.UNCOMPRESSED)
  np.save(os.path.join(root, shard + latents.BUCKETS_SUFFIX), np.zeros(n, np.int16))
  meta = {"format": latents.CAPTION_FORMAT, "vae_config": {"scaling_factor": 0.13025},
          "image_buckets": [[256, 256]], "latent_buckets": [[32, 32, 4]],
          "splits": {"train": {"shards": [shard], "complete": True, "records": n, "text": {
              "shards": ["train-text-00000-of-00001.array_record"],
              "digests": "train" + text_cache.DIGESTS_SUFFIX, "prompts": n, "max_length": 128,
              "dim": dim}}}}
  with open(os.path.join(root, "metadata.json"), "w") as f:
    json.dump(meta, f)
  return root


def rate(source, codec, plan, workers: int, batch: int, warmup: int,
         batches: int) -> tuple[float, float]:
  """(examples per second of wall time, CPU milliseconds of this process per example)."""
  config = ml_collections.ConfigDict({"seed": 0, "batch_size": batch, "data": {
      "worker_count": workers, "worker_buffer_size": 2}})
  it = iter(bucketed_pipeline.bucketed_train_dataset(
      source, codec, plan, config, pipeline.Sharding(0, 1), warmup + batches))
  for _ in range(warmup):
    next(it)
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(it)
  n = batch * batches
  return n / (time.perf_counter() - start), 1000 * (time.process_time() - cpu) / n


def main():
  from absl import flags
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags.
  p = argparse.ArgumentParser()
  p.add_argument("--out", default="results/data/throughput.json")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--batches", type=int, default=8)
  p.add_argument("--workers", default="0,1,2")
  args = p.parse_args()
  workers = [int(w) for w in args.workers.split(",")]
  tmp = tempfile.mkdtemp(prefix="t2i_pipeline_")
  n = args.batch * (args.warmup + args.batches) * 2
  results = {"batch": args.batch, "timed_batches": args.batches, "cpu_count": os.cpu_count(),
             "load_average_before": os.getloadavg(), "inputs": {}}

  wds = webdataset.WebDatasetSource(make_webdataset(os.path.join(tmp, "wds"), n))
  table = buckets.bucket_table(256, 32)
  scenes_data = caption_sources.data_config()
  scenes_data.scenes.sizes, scenes_data.scenes.train_examples = ("64x64", "64x96"), n
  scenes = caption_sources.get_caption_source(scenes_data, "train")
  small = buckets.bucket_table(64, 8)
  cache = latents.CaptionLatentSource(make_cache(os.path.join(tmp, "cache"), n), "train")
  inputs = {
      "webdataset_jpeg": (wds, caption_pp.CaptionImageCodec(table=table), table),
      "embedded_scenes": (scenes, caption_pp.CaptionImageCodec(table=small), small),
      "caption_cache": (cache, latents.CaptionLatentCodec(cache.meta, cache.text_table()), None),
  }
  for name, (source, codec, tab) in inputs.items():
    ids = cache.bucket_ids() if tab is None else buckets.compute_bucket_ids(source, tab)
    plan = buckets.BucketPlan(ids, args.batch, seed=0)
    runs = {w: rate(source, codec, plan, w, args.batch, args.warmup, args.batches)
            for w in workers}
    results["inputs"][name] = {
        "description": source.description,
        "examples_per_second": {str(w): round(r[0], 1) for w, r in runs.items()},
        # With 0 workers all decoding runs in this process: its CPU time per example is the
        # cost of decode + augment, whatever else the machine is running.
        "cpu_ms_per_example_in_process": round(runs[0][1], 2) if 0 in runs else None}
    print(name, results["inputs"][name], flush=True)
  table_ = cache.text_table()
  table_._open()
  payload = [len(table_._source[i]) for i in range(len(table_))]
  results["text_record_bytes"] = {
      "tokens": 24, "dim": 4096, "mean_record_bytes": float(np.mean(payload)),
      "bytes_per_token_row": 4096 * 2,
      "padded_128_token_bf16_bytes": 128 * 4096 * 2,
      "host_float32_bytes_per_example": 128 * 4096 * 4,
      "file_bytes": os.path.getsize(table_.shards[0])}
  results["load_average_after"] = os.getloadavg()
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)
  print(json.dumps(results["text_record_bytes"]))


if __name__ == "__main__":
  main()
