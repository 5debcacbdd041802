"""Draws the first batches of a bucketed plan over multi-aspect embedded scenes, one row a step.

  PYTHONPATH=. .venv/bin/python results/data/render_buckets.py --out=results/data/bucket_batches.png

Scenes are rendered at 64x64, 48x80, 80x48, 56x72 and 60x100; every image goes to the nearest
of ``buckets.bucket_table(64, 8)`` (the first four are bucket sizes; 60x100 is centre-cropped to
48x80) and each global batch (4 images here) comes from one bucket, drawn
by ``buckets.BucketPlan`` from ``(seed, step)``. Each image is centred on a grey cell of the
largest bucket's size and captioned with its step, bucket and caption.
"""
from __future__ import annotations

import argparse

import numpy as np

from ascan_jax import viz
from ascan_jax.data import buckets, caption_pp, caption_sources


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default="results/data/bucket_batches.png")
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--batch", type=int, default=4)
  args = p.parse_args()
  data = caption_sources.data_config()
  data.scenes.sizes = ("64x64", "48x80", "80x48", "56x72", "60x100")
  data.scenes.train_examples = 400
  source = caption_sources.get_caption_source(data, "train")
  table = buckets.bucket_table(64, 8)
  plan = buckets.BucketPlan(buckets.compute_bucket_ids(source, table), args.batch, seed=0)
  codec = caption_pp.CaptionImageCodec(table=table)
  cell = max(max(h, w) for h, w in table)
  images, captions = [], []
  for step in range(args.steps):
    b = plan.bucket_at(step)
    for r in plan.step_records(step):
      ex = codec.train(dict(source.load(int(r)), bucket=b), np.random.default_rng([0, int(r)]))
      h, w = ex["image"].shape[:2]
      canvas = np.full((cell, cell, 3), 160, np.uint8)
      canvas[(cell - h) // 2:(cell - h) // 2 + h, (cell - w) // 2:(cell - w) // 2 + w] = \
          ex["image"]
      images.append(canvas)
      captions.append(f"step {step}, {h}x{w}: {ex['caption']}")
  grid = viz.captioned_grid(np.stack(images), captions, columns=args.batch, scale=2,
                            max_lines=3)
  viz.save_png(args.out, grid)
  print(f"wrote {args.out}: {plan.summary()}")


if __name__ == "__main__":
  main()
