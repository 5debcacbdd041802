"""A caption set for caption-set FID (e.g. COCO-30K), and optionally its reference images.

    python -m ascan_jax.tools.make_caption_set --source=coco_captions --data_dir=TFDS_DIR \
        --split=validation --num=30000 --seed=0 --output=coco30k.jsonl \
        [--reference_images=coco30k_ref/ --image_size=256]

Writes ``--output``: one ``{"caption": ..., "image_id": ...}`` line per drawn image
(``data.caption_sets``): ``--num`` distinct images drawn without replacement with ``--seed``,
in source order, and one of each image's captions (chosen with the seed and the image's
position). ``--source`` is ``coco_captions`` (tfds ``coco_captions``, prepared as ArrayRecord in
``--data_dir``; see ``data.caption_sources``) or any ``--input`` spec the caption tools accept
(a folder with ``metadata.jsonl``, webdataset shards, ``tfds:NAME@DIR``, curated output).
For ``coco_captions`` the split ``validation`` is COCO 2014 validation (40,504 images): tfds's
Karpathy splits ``val``, ``test`` and ``restval`` in that order; other split names are passed
to tfds as they are. ``image_id`` is COCO's image id (the record's key; an int when numeric).
``--reference_images=DIR`` also writes each drawn image, the short side resized to
``--image_size`` (bicubic) and centre-cropped to a square, as ``DIR/<k:05d>.png`` (k = line);
``tools.compute_reference_stats --images=DIR --store_images`` turns them into the reference
``.npz``. The sha256 of the output is printed.
"""
from __future__ import annotations

import os

from absl import app
from absl import flags
from tqdm import tqdm

from ascan_jax import viz
from ascan_jax.data import caption_sets
from ascan_jax.data import caption_sources
from ascan_jax.data import transforms
from ascan_jax.eval import generative_metrics

COCO_2014_VALIDATION = ("val", "test", "restval")  # tfds coco_captions' Karpathy splits.


class ConcatSource:
  """Several caption sources read as one, in order."""

  def __init__(self, parts):
    self.parts = list(parts)
    self.description = " + ".join(p.description for p in self.parts)

  def __len__(self) -> int:
    return sum(len(p) for p in self.parts)

  def load(self, i: int) -> dict:
    for part in self.parts:
      if i < len(part):
        return part.load(i)
      i -= len(part)
    raise IndexError(i)


def open_source(source: str, split: str, data_dir: str = ""):
  """The caption source of ``--source`` / ``--split`` (module docstring)."""
  if source == "coco_captions":
    splits = COCO_2014_VALIDATION if split == "validation" else (split,)
    return ConcatSource(caption_sources.TfdsCaptionSource("coco_captions", s, data_dir)
                        for s in splits)
  return caption_sources.get_caption_source(caption_sources.config_for_input(source), split)


def _image_id(key: str):
  return int(key) if key.isdigit() else key


def make(source, num: int, seed: int, output: str, reference_images: str = "",
         image_size: int = 256, progress: bool = True) -> list[dict]:
  """Draws and writes the caption set (and the reference images); returns its rows."""
  chosen = caption_sets.select(len(source), num, seed)
  rows = []
  if reference_images:
    os.makedirs(reference_images, exist_ok=True)
  for k, i in enumerate(tqdm(chosen, desc="captions", unit="image", disable=not progress)):
    record = source.load(int(i))
    captions = record["captions"]
    rows.append({"caption": captions[caption_sets.caption_choice(seed, i, len(captions))],
                 "image_id": _image_id(record["key"])})
    if reference_images:
      image = transforms.eval_crop(record["image"], image_size, 1.0)
      viz.save_png(os.path.join(reference_images, f"{k:05d}.png"), image)
  caption_sets.write(output, rows)
  return rows


FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("source", "coco_captions", "coco_captions, or an --input spec of the "
                      "caption tools (a metadata.jsonl folder, shards, tfds:NAME@DIR)")
  flags.DEFINE_string("data_dir", "", "coco_captions: the tfds data_dir")
  flags.DEFINE_string("split", "validation", "validation = COCO 2014 val for coco_captions")
  flags.DEFINE_integer("num", 30000, "images (one caption each)")
  flags.DEFINE_integer("seed", 0, "seed of the draw")
  flags.DEFINE_string("output", None, "the caption .jsonl to write")
  flags.DEFINE_string("reference_images", "", "also write the drawn images (centre crops) here")
  flags.DEFINE_integer("image_size", 256, "side of the reference images' centre crop")
  flags.mark_flags_as_required(["output"])


def main(argv):
  del argv
  source = open_source(FLAGS.source, FLAGS.split, FLAGS.data_dir)
  rows = make(source, FLAGS.num, FLAGS.seed, FLAGS.output, FLAGS.reference_images,
              FLAGS.image_size)
  print(f"{len(rows)} captions of {source.description} (seed {FLAGS.seed}) -> {FLAGS.output} "
        f"sha256 {generative_metrics.file_sha256(FLAGS.output)}")
  if FLAGS.reference_images:
    print(f"reference images ({FLAGS.image_size}x{FLAGS.image_size} centre crops) in "
          f"{FLAGS.reference_images}; next: python -m ascan_jax.tools.compute_reference_stats "
          f"--images={FLAGS.reference_images} --inception=fid_inception.safetensors "
          "--store_images --output=REF.npz")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
