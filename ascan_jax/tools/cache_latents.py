"""Encodes an image dataset once with a VAE (and its captions with a text encoder) into ArrayRecord.

Class-conditional (format 1, ``data.latents``)::

  python -m ascan_jax.tools.cache_latents --config=configs/imagenet256_diffusion.py \\
      --vae=VAE_DIR --output=OUT [--split=train] [--batch_size=64] [--records_per_shard=4096]

The images come from the config's ``data`` section (tfds ImageNet, an ArrayRecord folder, the
embedded digits), centre-cropped to ``data.image_size``; each record keeps the posterior mean and
std of the image and of its flip, and the label.

Text-to-image (format 2, ``data.latents`` and ``data.text_cache``)::

  python -m ascan_jax.tools.cache_latents --input=SOURCE --vae=VAE_DIR --output=OUT \\
      --text_encoder=T5_DIR [--max_length=128] [--buckets=sdxl --bucket_side=1024] [--flip]

``SOURCE`` is any caption source (``data.caption_sources.config_for_input``: webdataset shards, a
``metadata.jsonl`` folder, a curated output, ``tfds:coco_captions@DIR``, ``tfds:imagenet2012@DIR``,
``embedded_digit_scenes``; ``--data.*`` sets the other data keys), or ``--config=T2I_CONFIG`` whose
``data`` section is a caption data config. Every image goes to its aspect-ratio bucket
(``--buckets``: ``sdxl`` for ``buckets.bucket_table(--bucket_side, --bucket_multiple)``, a list
such as ``64x64,48x80``, or empty for one square bucket of ``--bucket_side``; default
``data.image_size``), is centre-cropped and resized to it and encoded at that size, so latent
shapes vary per record (one compilation per bucket). Records keep all the image's candidate
captions; ``--text_encoder`` (a transformers T5 directory: Flan-T5-XXL or
``tools.make_random_t5``'s stand-in) then encodes every *distinct* prompt of the split once into
the text cache (``data.text_cache``: bfloat16, real tokens only). Without ``--text_encoder`` only
latents are cached (training then encodes captions online).

Processes and resuming. With several hosts, start the distributed runtime as ``main.py`` does
(``--coordinator_address --num_processes --process_id``, or automatically on Cloud TPU and SLURM):
process ``p`` of ``P`` encodes latent shards ``p, p + P, ...`` and text shards likewise, each on
its own local devices (a host never encodes another host's shards). Every file is written whole
under a temporary name and renamed, or uploaded when OUT is ``gs://...`` (``data.shard_files``),
so a killed run resumes by skipping finished shards. The text pass starts when every latent shard
exists (processes wait on the shared OUT); process 0 writes ``metadata.json`` once everything
exists. Memory: latents stream shard by shard into the writer and text shards are encoded from
their own prompts, so neither cache is ever whole in host memory; the text pass holds the split's
sorted prompt digests (16 bytes per distinct prompt).
"""
from __future__ import annotations

import hashlib
import io
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from ascan_jax import config_defaults
from ascan_jax.data import buckets as buckets_lib
from ascan_jax.data import caption_sources
from ascan_jax.data import latents as latents_lib
from ascan_jax.data import pipeline
from ascan_jax.data import shard_files
from ascan_jax.data import sources
from ascan_jax.data import text_cache
from ascan_jax.models import vae as vae_lib


PROMPTS_PER_SCAN = 1 << 20  # prompt strings one pass of the text stage holds at most.


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def shard_name(split: str, k: int, n: int) -> str:
  return shard_files.shard_name(split, k, n)


def _local_mesh(batch_size: int) -> Mesh:
  devices = jax.local_devices()
  n = len(devices) if batch_size % len(devices) == 0 else 1
  return Mesh(np.array(devices[:n]), ("batch",))


class _Encoder:
  """Jitted VAE posterior of a batch (and of its mirror), split over this host's devices."""

  def __init__(self, vae_dir: str, batch_size: int, flip: bool = True):
    self.model, params = vae_lib.from_pretrained(vae_dir)
    self.mesh = _local_mesh(batch_size)
    self.batch_sharding = NamedSharding(self.mesh, P("batch"))
    self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
    model = self.model

    def encode(params, images_uint8):
      x = images_uint8.astype(jnp.float32) / 127.5 - 1.0
      mean, std = vae_lib.encode(model, params, x)
      if not flip:
        return mean, std
      mean_f, std_f = vae_lib.encode(model, params, jnp.flip(x, axis=2))
      return mean, std, mean_f, std_f

    self._encode = jax.jit(encode, out_shardings=self.batch_sharding)

  def __call__(self, images: np.ndarray):
    x = jax.device_put(images, self.batch_sharding)
    return [np.asarray(a) for a in jax.device_get(self._encode(self.params, x))]


def _pad(images: np.ndarray, batch_size: int) -> np.ndarray:
  pad = batch_size - len(images)
  return np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)]) if pad \
      else images


def _wait_for(paths: list[str], what: str, timeout: float) -> None:
  start, told = time.time(), False
  while True:
    missing = [p for p in paths if not shard_files.exists(p)]
    if not missing:
      return
    if time.time() - start > timeout:
      raise TimeoutError(f"waited {timeout:.0f}s for {len(missing)} {what} of other processes, "
                         f"e.g. {missing[0]}")
    if not told:
      logging.info("waiting for %d %s of other processes", len(missing), what)
      told = True
    time.sleep(1.0)


# ---- class-conditional caches (format 1) ---------------------------------------------------------


def cache_split(config, vae_dir: str, output: str, split: str, batch_size: int = 64,
                records_per_shard: int = 4096, limit: int | None = None,
                process_index: int | None = None, process_count: int | None = None) -> dict:
  """Writes (or completes) ``split`` of a class-conditional cache; returns its metadata entry."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  source = sources.get_source(config.data, split)
  codec = pipeline.ImageCodec(config.data.image_size, None, config.data.eval_crop_fraction,
                              resize_small_squares=pipeline.eval_resize_small_squares(config.data))
  n = len(source) if limit is None else min(limit, len(source))
  num_shards = max(1, -(-n // records_per_shard))
  shard_files.makedirs(output)
  encoder = _Encoder(vae_dir, batch_size)
  mine = [k for k in range(num_shards) if k % process_count == process_index]
  path = lambda k: shard_files.join(output, shard_name(split, k, num_shards))
  todo = [k for k in mine if not shard_files.exists(path(k))]
  logging.info("%s: %d shards, %d for this process, %d left", split, num_shards, len(mine),
               len(todo))
  total = sum(min(n, (k + 1) * records_per_shard) - k * records_per_shard for k in todo)
  with tqdm(total=total, desc=f"caching {split}", unit="img") as bar:
    for k in todo:
      indices = list(range(k * records_per_shard, min(n, (k + 1) * records_per_shard)))

      def records(indices=indices):
        for b in range(0, len(indices), batch_size):
          chunk = indices[b:b + batch_size]
          examples = [pipeline.load_example(source, i, codec, codec.eval) for i in chunk]
          images = _pad(np.stack([e["image"] for e in examples]), batch_size)
          mean, std, mean_f, std_f = encoder(images)
          for j, (i, e) in enumerate(zip(chunk, examples)):
            if e["mask"] == 0:
              continue  # undecodable image: left out of the cache (and logged).
            yield latents_lib.encode_record(e["label"], i, {
                "mean": mean[j], "std": std[j], "mean_flip": mean_f[j], "std_flip": std_f[j]})
          bar.update(len(chunk))

      shard_files.write_records(path(k), records(), f"p{process_index}")
  shards = [shard_name(split, k, num_shards) for k in range(num_shards)]
  complete = all(shard_files.exists(shard_files.join(output, s)) for s in shards)
  latent_shape = list(encoder(np.zeros((batch_size,) + (config.data.image_size,) * 2 + (3,),
                                       np.uint8))[0].shape[1:])
  return {"shards": shards, "num_source_examples": n, "complete": complete,
          "latent_shape": latent_shape, "vae": encoder.model.config}


def write_metadata(output: str, vae_dir: str, split_info: dict, num_classes: int,
                   image_size: int, source_description: str) -> dict:
  path = shard_files.join(output, "metadata.json")
  meta = shard_files.read_json(path) if shard_files.exists(path) else {"splits": {}}
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
  shard_files.write_json(path, meta)
  return meta


# ---- caption caches (format 2) -------------------------------------------------------------------


class LocalTextEncoder:
  """A T5 directory's tokenizer and encoder on this host's devices only (parameters FSDP-sharded
  over them by the default rules), so each host encodes its own prompts."""

  def __init__(self, directory: str, max_length: int, batch_size: int, dtype: str = "auto"):
    from ascan_jax import compute
    from ascan_jax.data import t5_tokenizer
    from ascan_jax.models import t5
    from ascan_jax.parallel import sharding as sharding_lib
    devices = jax.local_devices()
    self.batch_size = -(-batch_size // len(devices)) * len(devices)
    self.max_length = max_length
    self.tokenizer = t5_tokenizer.T5Tokenizer.from_directory(directory)
    mesh = Mesh(np.array(devices).reshape(1, len(devices), 1), ("data", "fsdp", "tensor"))
    rules = config_defaults.DEFAULT_RULES
    self.model, self.params = t5.from_pretrained(directory, dtype=compute.compute_dtype(dtype),
                                                 mesh=mesh, rules=rules)
    self.config = self.model.config
    self.sharding = sharding_lib.batch_sharding(mesh, rules, 2, self.batch_size)
    model = self.model

    def encode(params, ids, mask):
      with sharding_lib.in_mesh(mesh, rules):
        return model.apply({"params": params}, ids, mask)

    self._encode = jax.jit(encode)

  def __call__(self, prompts: list[str]) -> list[np.ndarray]:
    """Per prompt, float32 ``[length, d_model]``: the encoder output at its real tokens."""
    ids, mask = self.tokenizer.encode(prompts, self.max_length)
    out = []
    for lo in range(0, len(prompts), self.batch_size):
      n = len(ids[lo:lo + self.batch_size])
      pad = ((0, self.batch_size - n), (0, 0))
      batch = [jax.device_put(np.pad(a[lo:lo + self.batch_size], pad), self.sharding)
               for a in (ids, mask)]
      emb = np.asarray(jax.device_get(self._encode(self.params, *batch)), np.float32)
      out += [emb[j, :int(mask[lo + j].sum())] for j in range(n)]
    return out


def resolve_table(spec: str, side: int, multiple: int) -> tuple[tuple[int, int], ...]:
  if spec == "sdxl":
    return buckets_lib.bucket_table(side, multiple)
  if not spec:
    return ((side, side),)
  return buckets_lib.parse_table(spec)


def cache_caption_split(data_config, vae_dir: str, output: str, split: str, *,
                        table, batch_size: int = 64, records_per_shard: int = 4096,
                        limit: int | None = None, flip: bool = False,
                        process_index: int = 0, process_count: int = 1,
                        progress: bool = True) -> dict:
  """Latent pass of a caption cache (module docstring); returns the split's metadata entry."""
  source = caption_sources.get_caption_source(data_config, split)
  n = len(source) if limit is None else min(limit, len(source))
  num_shards = max(1, -(-n // records_per_shard))
  shard_files.makedirs(output)
  path = lambda k: shard_files.join(output, shard_name(split, k, num_shards))
  mine = list(range(process_index, num_shards, process_count))
  todo = [k for k in mine if not shard_files.exists(path(k))]
  tag = f"p{process_index}"
  encoder = _Encoder(vae_dir, batch_size, flip) if todo else None
  total = sum(min(n, (k + 1) * records_per_shard) - k * records_per_shard for k in todo)
  with tqdm(total=total, desc=f"latents {split}", unit="img", disable=not progress) as bar:
    for k in todo:
      bucket_column, prompts = [], {}

      def records(k=k, bucket_column=bucket_column, prompts=prompts):
        pending: dict[int, list] = {}

        def flush(b):
          items = pending.pop(b)
          arrays = encoder(_pad(np.stack([im for _, im in items]), batch_size))
          names = latents_lib.FIELDS if flip else latents_lib.FIELDS[:2]
          for j, (record, _) in enumerate(items):
            bucket_column.append(b)
            yield latents_lib.encode_caption_record(
                record["index"], record["key"], b, record["captions"],
                {name: a[j] for name, a in zip(names, arrays)})

        for i in range(k * records_per_shard, min(n, (k + 1) * records_per_shard)):
          bar.update(1)
          try:  # still encoded where the source allows: large JPEGs decode reduced.
            record = sources.load_record(source, i, encoded=True)
            image = buckets_lib.crop_to_bucket(
                record["image"], table[buckets_lib.nearest_bucket(*record["image"].shape[:2],
                                                                  table)])
          except sources.RecordError as e:
            logging.warning("skipping record %d of %s: %s", i, source.description, e)
            continue  # left out of the cache (and logged).
          b = buckets_lib.nearest_bucket(*record["image"].shape[:2], table)
          captions = tuple(record.get("captions") or (record["caption"],))
          for c in captions:
            prompts.setdefault(c, None)
          meta = {"index": i, "key": record.get("key", str(i)), "captions": captions}
          pending.setdefault(b, []).append((meta, image))
          if len(pending[b]) == batch_size:
            yield from flush(b)
        for b in sorted(pending):
          yield from flush(b)

      def side_files(k=k, bucket_column=bucket_column, prompts=prompts):
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(bucket_column, np.int16))
        shard_files.write_bytes(path(k) + latents_lib.BUCKETS_SUFFIX, buffer.getvalue(), tag)
        shard_files.write_json(path(k) + latents_lib.PROMPTS_SUFFIX, list(prompts), tag)

      shard_files.write_records(path(k), records(), tag, before_publish=side_files,
                                options=shard_files.UNCOMPRESSED)
  shards = [shard_name(split, k, num_shards) for k in range(num_shards)]
  complete = all(shard_files.exists(shard_files.join(output, s)) for s in shards)
  return {"shards": shards, "num_source_examples": n, "complete": complete}


def cache_text(output: str, split: str, latent_shards: list[str], text_encoder: str, *,
               max_length: int = 128, batch_size: int = 64, records_per_shard: int = 4096,
               dtype: str = "auto", process_index: int = 0, process_count: int = 1,
               progress: bool = True) -> dict:
  """Text pass (module docstring): the split's distinct prompts, encoded once each."""
  prompt_files = [shard_files.join(output, s) + latents_lib.PROMPTS_SUFFIX for s in latent_shards]

  def all_prompts():
    for f in prompt_files:
      yield from shard_files.read_json(f)

  digests = text_cache.sorted_unique_digests(all_prompts())
  digests_name = f"{split}{text_cache.DIGESTS_SUFFIX}"
  if process_index == 0:
    buffer = io.BytesIO()
    np.save(buffer, digests)
    shard_files.write_bytes(shard_files.join(output, digests_name), buffer.getvalue(), "p0")
  num_shards = max(1, -(-len(digests) // records_per_shard))
  prefix = text_cache.text_prefix(split)
  path = lambda k: shard_files.join(output, shard_files.shard_name(prefix, k, num_shards))
  todo = [k for k in range(process_index, num_shards, process_count)
          if not shard_files.exists(path(k))]
  encoder = LocalTextEncoder(text_encoder, max_length, batch_size, dtype) if todo else None
  per_scan = max(1, PROMPTS_PER_SCAN // records_per_shard)
  with tqdm(total=sum(min(len(digests), (k + 1) * records_per_shard) - k * records_per_shard
                      for k in todo), desc=f"text {split}", unit="prompt",
            disable=not progress) as bar:
    for g in range(0, len(todo), per_scan):
      group = todo[g:g + per_scan]
      # One pass over the side files finds the prompts of a group of shards (bounded memory).
      wanted = {(int(a), int(b)): None for k in group
                for a, b in digests[k * records_per_shard:(k + 1) * records_per_shard]}
      for prompt in all_prompts():
        d = text_cache.digest(prompt)
        if d in wanted:
          wanted[d] = prompt
      for k in group:
        ordered = [wanted[(int(a), int(b))]
                   for a, b in digests[k * records_per_shard:(k + 1) * records_per_shard]]

        def records(ordered=ordered):
          for start in range(0, len(ordered), encoder.batch_size):
            part = ordered[start:start + encoder.batch_size]
            for prompt, embedding in zip(part, encoder(part)):
              yield text_cache.encode_record(prompt, embedding)
            bar.update(len(part))

        shard_files.write_records(path(k), records(), f"p{process_index}",
                                  options=shard_files.UNCOMPRESSED)
  shards = [shard_files.shard_name(prefix, k, num_shards) for k in range(num_shards)]
  info = {"shards": shards, "digests": digests_name, "prompts": int(len(digests)),
          "max_length": int(max_length)}
  if encoder is not None:
    info["dim"] = int(encoder.config.d_model)
  else:
    from ascan_jax.models import t5
    info["dim"] = int(t5.load_config(text_encoder).d_model)
  return info


def write_caption_metadata(output: str, vae_dir: str, table, split_info: dict,
                           source_description: str, text_encoder: str | None,
                           flip: bool) -> dict:
  path = shard_files.join(output, "metadata.json")
  meta = shard_files.read_json(path) if shard_files.exists(path) else {"splits": {}}
  vae_config = vae_lib.load_config(vae_dir)
  f = vae_config.downsample_factor
  meta.update({
      "format": latents_lib.CAPTION_FORMAT, "vae_dir": os.path.abspath(vae_dir),
      "vae_weights_sha256": _sha256(os.path.join(vae_dir, vae_lib.WEIGHTS_NAME)),
      "vae_config": vae_config.to_dict(), "source": source_description,
      "image_buckets": [list(b) for b in table],
      "latent_buckets": [[h // f, w // f, vae_config.latent_channels] for h, w in table],
      "flip": flip, "record_format": "msgpack {index, key, bucket, shape, mean, std"
      + (", mean_flip, std_flip" if flip else "") + " (float16), captions}"})
  if text_encoder:
    from ascan_jax.models import t5
    meta["text_encoder"] = {"dir": os.path.abspath(text_encoder),
                            "config": t5.load_config(text_encoder).to_dict()}
  meta["splits"].update(split_info)
  shard_files.write_json(path, meta)
  return meta


def cache_captions(data_config, vae_dir: str, output: str, splits: list[str], *,
                   table, text_encoder: str | None = None, max_length: int = 128,
                   batch_size: int = 64, records_per_shard: int = 4096,
                   text_records_per_shard: int = 4096, limit: int | None = None,
                   flip: bool = False, dtype: str = "auto", process_index: int = 0,
                   process_count: int = 1, wait_seconds: float = 86400.0,
                   progress: bool = True) -> dict | None:
  """Latent and text passes of every split; process 0 returns the metadata it wrote."""
  info, description = {}, ""
  for split in splits:
    entry = cache_caption_split(data_config, vae_dir, output, split, table=table,
                                batch_size=batch_size, records_per_shard=records_per_shard,
                                limit=limit, flip=flip, process_index=process_index,
                                process_count=process_count, progress=progress)
    _wait_for([shard_files.join(output, s) for s in entry["shards"]], "latent shards",
              wait_seconds)
    entry["records"] = sum(
        len(np.load(io.BytesIO(epath.Path(shard_files.join(output, s)
                                          + latents_lib.BUCKETS_SUFFIX).read_bytes())))
        for s in entry["shards"])
    if text_encoder:
      entry["text"] = cache_text(output, split, entry["shards"], text_encoder,
                                 max_length=max_length, batch_size=batch_size,
                                 records_per_shard=text_records_per_shard, dtype=dtype,
                                 process_index=process_index, process_count=process_count,
                                 progress=progress)
      _wait_for([shard_files.join(output, s) for s in entry["text"]["shards"]], "text shards",
                wait_seconds)
    entry["complete"] = True
    info[split] = entry
    description = caption_sources.get_caption_source(data_config, split).description
  if process_index != 0:
    return None
  return write_caption_metadata(output, vae_dir, table, info, description, text_encoder, flip)


# ---- the command ---------------------------------------------------------------------------------


def _define_flags():
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config whose data section names the images "
                                  "(a diffusion config, or a text-to-image one).")
  config_flags.DEFINE_config_dict("data", caption_sources.data_config(),
                                  "Caption data keys with --input (scenes, index_dir, ...).")
  flags.DEFINE_string("input", None, "A caption source (module docstring): caches captions.")
  flags.DEFINE_string("vae", None, "diffusers-format AutoencoderKL directory.")
  flags.DEFINE_string("output", None, "Output folder of the cache (local or gs://).")
  flags.DEFINE_list("split", ["train"], "Splits to cache (comma separated).")
  flags.DEFINE_integer("batch_size", 64, "Images (and prompts) per encoder call (per process).")
  flags.DEFINE_integer("records_per_shard", 4096, "Records per shard (the unit of resumption).")
  flags.DEFINE_integer("text_records_per_shard", 4096, "Prompts per text shard.")
  flags.DEFINE_integer("limit", None, "Cache only the first N images of each split.")
  flags.DEFINE_string("text_encoder", None, "T5 directory: also cache the prompts' embeddings.")
  flags.DEFINE_integer("max_length", 128, "Text tokens per prompt, EOS included.")
  flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"], "Text encoder compute.")
  flags.DEFINE_string("buckets", "sdxl", "sdxl | '' (one square bucket) | HxW,HxW,...")
  flags.DEFINE_integer("bucket_side", None, "Side of the bucket area (default data.image_size).")
  flags.DEFINE_integer("bucket_multiple", 64, "Bucket sides are multiples of this.")
  flags.DEFINE_boolean("flip", None, "Also cache mirrored latents (default: yes for class-"
                       "conditional caches, no for captions, which can say 'left of').")
  flags.DEFINE_float("wait_seconds", 86400.0, "How long to wait for other processes.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")


def main(argv):
  del argv
  f = flags.FLAGS
  from ascan_jax.parallel import distributed
  distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
  cache = os.environ.get("ASCAN_COMPILATION_CACHE", "")  # the convention of main.py and tests.
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  captions = bool(f.input or f.text_encoder)
  if not (f.vae and f.output and (f.config or f.input)):
    raise app.UsageError("--vae, --output and --config or --input are required")
  if not captions:
    config = f.config
    info = {s: cache_split(config, f.vae, f.output, s, f.batch_size, f.records_per_shard,
                           f.limit) for s in f.split}
    if jax.process_index() == 0 and all(v["complete"] for v in info.values()):
      src = sources.get_source(config.data, f.split[0])
      meta = write_metadata(f.output, f.vae, info, src.num_classes, config.data.image_size,
                            src.description)
      print(f"latent cache complete in {f.output}: latent shape {meta['latent_shape']}, "
            + ", ".join(f"{s}: {v['num_source_examples']} images" for s, v in info.items()))
    return
  try:
    data = caption_sources.config_for_input(f.input, f.data) if f.input else f.config.data
    side = f.bucket_side or int(data.get("image_size", 256))
    table = resolve_table(f.buckets, side, f.bucket_multiple)
    meta = cache_captions(data, f.vae, f.output, f.split, table=table,
                          text_encoder=f.text_encoder, max_length=f.max_length,
                          batch_size=f.batch_size, records_per_shard=f.records_per_shard,
                          text_records_per_shard=f.text_records_per_shard, limit=f.limit,
                          flip=bool(f.flip), dtype=f.dtype, process_index=jax.process_index(),
                          process_count=jax.process_count(), wait_seconds=f.wait_seconds)
  except (OSError, ValueError, TimeoutError) as e:  # bad input: one message, no traceback.
    print(f"cache_latents: error: {e}", file=sys.stderr)
    sys.exit(1)
  if meta is not None:
    print(f"caption latent cache complete in {f.output}: buckets {meta['image_buckets']}, "
          + ", ".join(f"{s}: {v['records']} records" + (f", {v['text']['prompts']} prompts"
                                                        if "text" in v else "")
                      for s, v in meta["splits"].items()))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
