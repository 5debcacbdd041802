"""Reference statistics for FID / sFID in ADM's reference-batch ``.npz`` format.

    python -m ascan_jax.tools.compute_reference_stats --images=NPZ_OR_DIR \
        --inception=fid_inception.safetensors --output=ref.npz

``--images`` is either an ``.npz`` whose ``arr_0`` holds uint8 NHWC images (ADM's sample and
reference-batch format; streamed in batches, never loaded whole) or a folder of image files
(png/jpg/..., read with PIL and converted to RGB, sorted by name; all must have one size, as
in pytorch-fid's batched loader). Images go through the FID Inception-v3 (resized to 299x299
inside the network) in batches under one ``jax.jit``; the pool (2048) and spatial (2023)
features give ``mu, sigma, mu_s, sigma_s`` (float64, ``np.cov``), written with
``generative_metrics.save_reference``. ``--store_images`` also writes the images as
``arr_0`` (ADM's evaluator needs them for precision/recall and IS of the reference). The
sha256 of the weights, the input .npz and the output are printed for the record.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
from absl import app
from absl import flags

from ascan_jax.eval import generative_metrics as gm

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def list_image_files(folder: str) -> list[str]:
  files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    raise ValueError(f"{folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
  return files


def _read_image(path: str) -> np.ndarray:
  from PIL import Image  # pylint: disable=import-outside-toplevel

  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def iter_image_batches(source: str, batch_size: int,
                       max_images: int | None = None) -> tuple[int, Iterator[np.ndarray]]:
  """(number of images, iterator of uint8 (B, H, W, 3) batches) for an .npz or a folder."""
  if os.path.isdir(source):
    files = list_image_files(source)[:max_images]

    def from_files():
      first_shape = None
      for lo in range(0, len(files), batch_size):
        batch = [_read_image(f) for f in files[lo:lo + batch_size]]
        for f, im in zip(files[lo:lo + batch_size], batch):
          first_shape = first_shape or im.shape
          if im.shape != first_shape:
            raise ValueError(f"{f} has size {im.shape}, the first image {first_shape}; "
                             "resize the folder to one size first")
        yield np.stack(batch)
    return len(files), from_files()
  shape, dtype = gm.npz_array_shape(source)
  if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
    raise ValueError(f"{source}: {gm.IMAGES_KEY} has shape {shape} and dtype {dtype}, "
                     "expected uint8 images (N, H, W, 3)")
  n = shape[0] if max_images is None else min(shape[0], max_images)

  def from_npz():
    seen = 0
    for batch in gm.iter_npz_images(source, batch_size):
      batch = batch[:n - seen]
      seen += len(batch)
      if len(batch):
        yield batch
      if seen >= n:
        return
  return n, from_npz()


def compute_features(feature_fn, batches: Iterator[np.ndarray], total: int, batch_size: int,
                     keep_images: bool = False, progress: bool = True):
  """Runs ``feature_fn`` (uint8 NHWC -> dict) over ``batches``; returns pool, spatial, images.

  The last, smaller batch is padded to ``batch_size`` so there is one compilation only.
  """
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  pools, spatials, images = [], [], []
  with tqdm(total=total, unit="img", disable=not progress, desc="inception") as bar:
    for batch in batches:
      n = len(batch)
      padded = batch
      if n < batch_size:
        padded = np.concatenate([batch, np.zeros((batch_size - n,) + batch.shape[1:], batch.dtype)])
      out = feature_fn(padded)
      pools.append(np.asarray(out["pool"])[:n])
      spatials.append(np.asarray(out["spatial"])[:n])
      if keep_images:
        images.append(np.asarray(batch))
      bar.update(n)
  if not pools:
    raise ValueError("no images")
  return (np.concatenate(pools), np.concatenate(spatials),
          np.concatenate(images) if keep_images else None)


def compute_reference(images: str, inception_path: str, output: str, batch_size: int = 100,
                      store_images: bool = False, max_images: int | None = None,
                      progress: bool = True) -> gm.ReferenceStats:
  """Computes and writes ADM-format reference statistics; returns them."""
  from ascan_jax.models import inception  # pylint: disable=import-outside-toplevel

  variables = inception.load_params(inception_path)
  feature_fn = inception.make_feature_fn(variables)
  total, batches = iter_image_batches(images, batch_size, max_images)
  pool, spatial, imgs = compute_features(feature_fn, batches, total, batch_size,
                                         keep_images=store_images, progress=progress)
  stats = gm.reference_from_features(pool, spatial, imgs)
  gm.save_reference(output, stats)
  return stats


FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("images", None, ".npz with uint8 NHWC arr_0, or a folder of images")
  flags.DEFINE_string("inception", None, "fid_inception.safetensors (convert_fid_inception)")
  flags.DEFINE_string("output", None, "where to write the reference .npz")
  flags.DEFINE_integer("batch_size", 100, "images per Inception forward pass")
  flags.DEFINE_integer("max_images", None, "use only the first N images")
  flags.DEFINE_bool("store_images", False, "also store the images as arr_0 (ADM format)")
  flags.mark_flags_as_required(["images", "inception", "output"])


def main(argv):
  del argv
  stats = compute_reference(FLAGS.images, FLAGS.inception, FLAGS.output, FLAGS.batch_size,
                            FLAGS.store_images, FLAGS.max_images)
  print(f"inception {FLAGS.inception} sha256 {gm.file_sha256(FLAGS.inception)}")
  if os.path.isfile(FLAGS.images):
    print(f"images    {FLAGS.images} sha256 {gm.file_sha256(FLAGS.images)}")
  print(f"output    {FLAGS.output} sha256 {gm.file_sha256(FLAGS.output)} "
        f"(mu {stats.mu.shape}, mu_s {stats.mu_s.shape})")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
