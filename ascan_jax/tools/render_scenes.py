"""Writes a captioned grid PNG of digit scenes and prints the dataset's statistics.

``python -m ascan_jax.tools.render_scenes --out=results/scenes/scenes_64x64.png [--split=validation
--height=64 --width=64 --num=24 --columns=6 --scale=2 --mode=scenes --seed=0 --stats=600]``

Prints the generation time per scene and ``digit_scenes.scene_statistics`` over the first
``--stats`` scenes (tags, objects per scene, colours, classes) as JSON; ``--stats_out`` also
writes them to a file.
"""
from __future__ import annotations

import json
import time

from absl import app
from absl import flags
import numpy as np

from ascan_jax import fileio
from ascan_jax import viz
from ascan_jax.data import digit_scenes

FLAGS = flags.FLAGS


def _define_flags():
  """Flags exist only when this runs as a program, so importing it never clashes."""
  flags.DEFINE_string("out", None, "PNG file to write.")
  flags.DEFINE_string("split", "validation", "train or validation (held-out digits).")
  flags.DEFINE_integer("height", 64, "Canvas height.")
  flags.DEFINE_integer("width", 64, "Canvas width.")
  flags.DEFINE_integer("num", 24, "Scenes in the grid.")
  flags.DEFINE_integer("columns", 6, "Grid columns.")
  flags.DEFINE_integer("scale", 2, "Enlargement of each scene in the grid.")
  flags.DEFINE_enum("mode", "scenes", list(digit_scenes.MODES), "scenes or single_digit.")
  flags.DEFINE_integer("seed", 0, "Dataset seed.")
  flags.DEFINE_integer("stats", 600, "Scenes the statistics count (0: none).")
  flags.DEFINE_string("stats_out", None, "Optional JSON file for the statistics.")


def render(source: digit_scenes.DigitScenesSource, num: int, columns: int,
           scale: int) -> np.ndarray:
  examples = [source.load(i) for i in range(min(num, len(source)))]
  return viz.captioned_grid(np.stack([e["image"] for e in examples]),
                            [e["caption"] for e in examples], columns, scale=scale)


def timing(source: digit_scenes.DigitScenesSource, n: int = 200) -> float:
  """Milliseconds per scene (mean over ``n`` scenes, after one warm-up load)."""
  source.load(0)
  start = time.perf_counter()
  for i in range(n):
    source.load(i % len(source))
  return (time.perf_counter() - start) / n * 1e3


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS.out:
    raise app.UsageError("--out=FILE.png is required")
  size = max(FLAGS.num, FLAGS.stats, 200)
  source = digit_scenes.DigitScenesSource(FLAGS.split, height=FLAGS.height, width=FLAGS.width,
                                          num_examples=size, seed=FLAGS.seed, mode=FLAGS.mode)
  viz.save_png(FLAGS.out, render(source, FLAGS.num, FLAGS.columns, FLAGS.scale))
  print(f"wrote {FLAGS.out} ({source.description})")
  report = {"source": source.description, "ms_per_scene": round(timing(source), 3)}
  if FLAGS.stats:
    report["statistics"] = digit_scenes.scene_statistics(source, FLAGS.stats)
  text = json.dumps(report, indent=2)
  print(text)
  if FLAGS.stats_out:
    fileio.write_text(FLAGS.stats_out, text + "\n")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
