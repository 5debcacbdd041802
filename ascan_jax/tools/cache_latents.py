"""Encodes an image dataset once with a VAE into ArrayRecord latent shards.

  python -m ascan_jax.tools.cache_latents --config=configs/imagenet256_diffusion.py \
      --vae=VAE_DIR --output=OUT [--split=train] [--batch_size=64] [--records_per_shard=4096]

The images come from the config's ``data`` section (any image source: tfds ImageNet, an
ArrayRecord folder, the embedded digits), centre-cropped to ``data.image_size``; the VAE is a
diffusers-format directory (``models.vae.from_pretrained``). Each record keeps the posterior mean
and std of the image and of its horizontal flip, and the label (``data.latents``). The work is
cut into fixed shards; process ``p`` of ``P`` writes shards ``p, p + P, ...`` and splits each
batch over its local devices. A shard is written to a temporary name and renamed when complete,
so an interrupted run resumes by skipping the finished shards. Process 0 writes
``metadata.json`` once every shard exists. Train on the cache with
``--config.data.latent_dir=OUT``.
"""
from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from ascan_jax.data import latents as latents_lib
from ascan_jax.data import pipeline
from ascan_jax.data import sources
from ascan_jax.models import vae as vae_lib


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def shard_name(split: str, k: int, n: int) -> str:
  return f"{split}-{k:05d}-of-{n:05d}.array_record"


class _Encoder:
  """Jitted VAE posterior of a batch and of its mirror, split over the local devices."""

  def __init__(self, vae_dir: str, batch_size: int):
    self.model, params = vae_lib.from_pretrained(vae_dir)
    devices = jax.local_devices()
    n = len(devices) if batch_size % len(devices) == 0 else 1
    self.mesh = Mesh(np.array(devices[:n]), ("batch",))
    self.batch_sharding = NamedSharding(self.mesh, P("batch"))
    self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
    model = self.model

    def encode(params, images_uint8):
      x = images_uint8.astype(jnp.float32) / 127.5 - 1.0
      mean, std = vae_lib.encode(model, params, x)
      mean_f, std_f = vae_lib.encode(model, params, jnp.flip(x, axis=2))
      return mean, std, mean_f, std_f

    self._encode = jax.jit(encode, out_shardings=self.batch_sharding)

  def __call__(self, images: np.ndarray):
    x = jax.device_put(images, self.batch_sharding)
    return [np.asarray(a) for a in jax.device_get(self._encode(self.params, x))]


def cache_split(config, vae_dir: str, output: str, split: str, batch_size: int = 64,
                records_per_shard: int = 4096, limit: int | None = None,
                process_index: int | None = None, process_count: int | None = None) -> dict:
  """Writes (or completes) ``split`` of the cache; returns the split's metadata entry."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  source = sources.get_source(config.data, split)
  codec = pipeline.ImageCodec(config.data.image_size, None, config.data.eval_crop_fraction)
  n = len(source) if limit is None else min(limit, len(source))
  num_shards = max(1, -(-n // records_per_shard))
  os.makedirs(output, exist_ok=True)
  encoder = _Encoder(vae_dir, batch_size)
  mine = [k for k in range(num_shards) if k % process_count == process_index]
  todo = [k for k in mine if not os.path.exists(os.path.join(output,
                                                              shard_name(split, k, num_shards)))]
  logging.info("%s: %d shards, %d for this process, %d left", split, num_shards, len(mine),
               len(todo))
  from array_record.python.array_record_module import ArrayRecordWriter
  total = sum(min(n, (k + 1) * records_per_shard) - k * records_per_shard for k in todo)
  with tqdm(total=total, desc=f"caching {split}", unit="img") as bar:
    for k in todo:
      final = os.path.join(output, shard_name(split, k, num_shards))
      tmp = final + f".tmp{os.getpid()}"
      writer = ArrayRecordWriter(tmp, "group_size:1")
      indices = list(range(k * records_per_shard, min(n, (k + 1) * records_per_shard)))
      for b in range(0, len(indices), batch_size):
        chunk = indices[b:b + batch_size]
        examples = [pipeline.load_example(source, i, codec, codec.eval) for i in chunk]
        images = np.stack([e["image"] for e in examples])
        pad = batch_size - len(chunk)
        if pad:
          images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
        mean, std, mean_f, std_f = encoder(images)
        for j, (i, e) in enumerate(zip(chunk, examples)):
          if e["mask"] == 0:
            continue  # undecodable image: left out of the cache (and logged).
          writer.write(latents_lib.encode_record(e["label"], i, {
              "mean": mean[j], "std": std[j], "mean_flip": mean_f[j], "std_flip": std_f[j]}))
        bar.update(len(chunk))
      writer.close()
      os.replace(tmp, final)
  shards = [shard_name(split, k, num_shards) for k in range(num_shards)]
  complete = all(os.path.exists(os.path.join(output, s)) for s in shards)
  latent_shape = list(encoder(np.zeros((batch_size,) + (config.data.image_size,) * 2 + (3,),
                                       np.uint8))[0].shape[1:])
  return {"shards": shards, "num_source_examples": n, "complete": complete,
          "latent_shape": latent_shape, "vae": encoder.model.config}


def write_metadata(output: str, vae_dir: str, split_info: dict, num_classes: int,
                   image_size: int, source_description: str) -> dict:
  path = os.path.join(output, "metadata.json")
  meta = json.load(open(path)) if os.path.exists(path) else {"splits": {}}
  vae_config = next(iter(split_info.values()))["vae"]
  meta.update({
      "vae_dir": os.path.abspath(vae_dir),
      "vae_weights_sha256": _sha256(os.path.join(vae_dir, vae_lib.WEIGHTS_NAME)),
      "vae_config": vae_config.to_dict(), "scaling_factor": vae_config.scaling_factor,
      "shift_factor": vae_config.shift_factor, "num_classes": num_classes,
      "image_size": image_size, "source": source_description,
      "format": "msgpack {label, index, shape, mean, std, mean_flip, std_flip (float16)}"})
  for split, info in split_info.items():
    meta["latent_shape"] = info["latent_shape"]
    meta["splits"][split] = {k: v for k, v in info.items() if k != "vae"}
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=2)
  os.replace(tmp, path)
  return meta


def _define_flags():
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Diffusion config whose data section names "
                                  "the images.")
  flags.DEFINE_string("vae", None, "diffusers-format AutoencoderKL directory.")
  flags.DEFINE_string("output", None, "Output folder of the latent cache.")
  flags.DEFINE_list("split", ["train"], "Splits to cache (comma separated).")
  flags.DEFINE_integer("batch_size", 64, "Images per encoder call (per process).")
  flags.DEFINE_integer("records_per_shard", 4096, "Records per shard (the unit of resumption).")
  flags.DEFINE_integer("limit", None, "Cache only the first N images of each split.")


def main(argv):
  del argv
  f = flags.FLAGS
  if not (f.config and f.vae and f.output):
    raise app.UsageError("--config, --vae and --output are required")
  config = f.config
  info = {s: cache_split(config, f.vae, f.output, s, f.batch_size, f.records_per_shard, f.limit)
          for s in f.split}
  if jax.process_index() == 0 and all(v["complete"] for v in info.values()):
    src = sources.get_source(config.data, f.split[0])
    meta = write_metadata(f.output, f.vae, info, src.num_classes, config.data.image_size,
                          src.description)
    print(f"latent cache complete in {f.output}: latent shape {meta['latent_shape']}, "
          + ", ".join(f"{s}: {v['num_source_examples']} images" for s, v in info.items()))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
