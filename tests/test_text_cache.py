"""tools.cache_latents with captions: bucketed latents, one text embedding per unique prompt."""
import functools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ascan_jax.data import bucketed_pipeline, buckets, caption_sources, latents, pipeline
from ascan_jax.data import scene_captions
from ascan_jax.models import t5, vae as vae_lib
from ascan_jax.tools import cache_latents, make_random_t5, make_random_vae
from tests import helpers

TABLE = ((32, 32), (32, 48), (48, 32))
MAX_LENGTH = 24


def _data():
  data = caption_sources.data_config()
  data.scenes.sizes, data.scenes.mode = ("32x32", "32x48", "48x32"), "single_digit"
  data.scenes.train_examples = 24
  return data


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("models")
  vae_dir, t5_dir = str(root / "vae"), str(root / "t5")
  make_random_vae.make_random_vae(vae_dir, vae_lib.VAEConfig(
      block_out_channels=(8, 16), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4), seed=0)
  rng = np.random.default_rng(0)
  lines = [scene_captions.single_digit_caption(d % 10, rng) for d in range(200)]
  make_random_t5.make_random_t5(t5_dir, lines=lines, vocab_size=128, d_model=32, d_kv=8, d_ff=64,
                                num_layers=1, num_heads=4)
  return vae_dir, t5_dir


def _cache(models, out, **kw):
  vae_dir, t5_dir = models
  return cache_latents.cache_captions(
      _data(), vae_dir, out, ["train"], table=TABLE, text_encoder=t5_dir, max_length=MAX_LENGTH,
      batch_size=8, records_per_shard=8, text_records_per_shard=4, progress=False, **kw)


@pytest.fixture(scope="module")
def cache(models, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("cache") / "c")
  return out, _cache(models, out)


def test_records_hold_bucketed_latents_and_unique_prompt_embeddings(models, cache):
  vae_dir, t5_dir = models
  out, meta = cache
  assert meta["image_buckets"] == [list(b) for b in TABLE]
  assert meta["latent_buckets"] == [[16, 16, 4], [16, 24, 4], [24, 16, 4]]
  src = latents.CaptionLatentSource(out, "train")
  scenes = caption_sources.get_caption_source(_data(), "train")
  assert len(src) == 24
  ids = src.bucket_ids()
  records = [src.load(i) for i in range(len(src))]
  assert [r["bucket"] for r in records] == ids.tolist()
  assert sorted(r["index"] for r in records) == list(range(24))

  # Each latent is the VAE posterior of the image cropped and resized to its bucket.
  model, params = vae_lib.from_pretrained(vae_dir)
  encode = jax.jit(functools.partial(vae_lib.encode, model))
  for r in records[:3] + records[-3:]:
    image = scenes.load(r["index"])["image"]
    b = buckets.nearest_bucket(*image.shape[:2], TABLE)
    assert r["bucket"] == b and r["captions"] == (scenes.load(r["index"])["caption"],)
    x = buckets.crop_to_bucket(image, TABLE[b])[None].astype(np.float32) / 127.5 - 1
    mean, _ = encode(params, x)
    assert r["mean"].shape == tuple(meta["latent_buckets"][b])
    np.testing.assert_allclose(r["mean"], np.asarray(mean[0]), atol=2e-3)  # float16.

  # One text record per distinct prompt, equal to the encoder's output at the real tokens.
  prompts = sorted({r["captions"][0] for r in records})
  table = src.text_table()
  assert len(table) == len(prompts) < len(records)
  encoder = cache_latents.LocalTextEncoder(t5_dir, MAX_LENGTH, 8, "float32")
  ids_, mask_ = encoder.tokenizer.encode(prompts, MAX_LENGTH)
  m5, p5 = t5.from_pretrained(t5_dir)
  reference = np.asarray(m5.apply({"params": p5}, ids_, mask_))
  for k, prompt in enumerate(prompts):
    embedding, mask = table.lookup(prompt)
    n = int(mask_[k].sum())
    np.testing.assert_array_equal(mask, mask_[k])
    np.testing.assert_allclose(embedding[:n], reference[k, :n], rtol=2e-2, atol=2e-2)  # bf16.
    assert not embedding[n:].any()
  with pytest.raises(KeyError, match="not in the text cache"):
    table.lookup("a prompt nobody wrote")


def test_bucketed_training_batches_from_the_cache(cache):
  out, _ = cache
  import ml_collections
  src = latents.CaptionLatentSource(out, "train")
  codec = latents.CaptionLatentCodec(src.meta, src.text_table())
  plan = buckets.BucketPlan(src.bucket_ids(), 4, seed=3, num_buckets=len(TABLE))
  config = ml_collections.ConfigDict({"seed": 3, "batch_size": 4, "data": {
      "worker_count": 0, "worker_buffer_size": 1}})
  shapes = set()
  for step, batch in enumerate(bucketed_pipeline.bucketed_train_dataset(
      src, codec, plan, config, pipeline.Sharding(0, 1), plan.steps_per_epoch)):
    b = plan.bucket_at(step)
    assert batch["latent"].shape == (4,) + tuple(src.meta["latent_buckets"][b])
    assert batch["latent"].dtype == np.float32
    assert batch["text_embedding"].shape == (4, MAX_LENGTH, 32)
    assert batch["text_embedding"].dtype == np.float32
    assert batch["text_mask"].dtype == np.int32 and batch["text_mask"].sum(1).min() >= 2
    assert batch["caption"].dtype == object and all(batch["caption"])
    assert batch["mask"].tolist() == [1.0] * 4
    shapes.add(batch["latent"].shape)
  assert len(shapes) == len(TABLE)


def test_resume_and_process_split_give_the_same_bytes(models, cache, tmp_path):
  out, _ = cache
  vae_dir, t5_dir = models
  names = sorted(n for n in os.listdir(out) if n != "metadata.json")

  def read(directory):
    return {n: open(os.path.join(directory, n), "rb").read() for n in names}

  # Two processes, one after the other: each writes only its own shards.
  split = str(tmp_path / "split")
  for p in (1, 0):
    entry = cache_latents.cache_caption_split(
        _data(), vae_dir, split, "train", table=TABLE, batch_size=8, records_per_shard=8,
        process_index=p, process_count=2, progress=False)
    written = sorted(n for n in os.listdir(split) if n.endswith(".array_record"))
    assert written == (entry["shards"][1::2] if p == 1 else entry["shards"])
  for p in (0, 1):
    cache_latents.cache_text(split, "train", entry["shards"], t5_dir, max_length=MAX_LENGTH,
                             batch_size=8, records_per_shard=4, process_index=p,
                             process_count=2, progress=False)
  assert read(split) == read(out)

  # Killed: a latent shard, a text shard and the metadata are gone; the rest is not redone.
  latent_shards = sorted(n for n in names if n.endswith(".array_record") and "text" not in n)
  text_shards = sorted(n for n in names if n.endswith(".array_record") and "text" in n)
  assert len(latent_shards) == 3 and len(text_shards) >= 2
  kept = os.path.join(split, latent_shards[0])
  before = os.stat(kept).st_mtime_ns
  for name in (latent_shards[1], text_shards[-1]):
    os.remove(os.path.join(split, name))
  meta = _cache(models, split)
  assert os.stat(kept).st_mtime_ns == before
  assert read(split) == read(out) and meta["splits"]["train"]["complete"]


def test_embedding_cache_bytes_per_example(cache):
  out, meta = cache
  info = meta["splits"]["train"]["text"]
  src = latents.CaptionLatentSource(out, "train")
  table = src.text_table()
  table._open()
  payload = sum(len(table._source[i]) for i in range(len(table)))
  tokens = sum(int(table.lookup(p)[1].sum()) for p in
               {src.load(i)["captions"][0] for i in range(len(src))})
  # bfloat16 rows of the real tokens, plus the prompt and a few bytes of msgpack framing.
  assert tokens * info["dim"] * 2 < payload < tokens * info["dim"] * 2 + 80 * len(table)
  padded = len(src) * MAX_LENGTH * info["dim"] * 2  # one padded embedding per example.
  assert payload < padded / 3


def test_cli_bad_input_is_one_message(models, tmp_path):
  vae_dir, t5_dir = models
  env = dict(os.environ, PYTHONPATH=helpers.REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  bad = subprocess.run([sys.executable, "-m", "ascan_jax.tools.cache_latents",
                        f"--input={tmp_path / 'no_such_shards'}", f"--vae={vae_dir}",
                        f"--output={tmp_path / 'o'}"], cwd=helpers.REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
  assert "no_such_shards" in bad.stderr and "does not exist" in bad.stderr
