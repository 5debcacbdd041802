"""tools.cache_latents on the embedded digits with a small random VAE; training from the cache."""
import json
import os
import subprocess
import sys

import jax
import numpy as np

from ascan_jax.data import latents as latents_lib
from ascan_jax.data import pipeline, sources
from ascan_jax.models import vae as vae_lib
from ascan_jax.tools import make_random_vae
from configs import imagenet256_diffusion
from tests import helpers


def _cache(vae_dir, out, *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, "-m", "ascan_jax.tools.cache_latents",
                         "--config=configs/imagenet256_diffusion.py:runlocal", f"--vae={vae_dir}",
                         f"--output={out}", "--limit=48", "--records_per_shard=16",
                         "--batch_size=8", *extra], cwd=helpers.REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_cache_resume_and_train_from_latents(tmp_path):
  vae_dir = str(tmp_path / "vae")
  config = vae_lib.VAEConfig(block_out_channels=(16, 32), layers_per_block=1,
                             down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2,
                             norm_num_groups=8, latent_channels=4)
  make_random_vae.make_random_vae(vae_dir, config, seed=0)
  out = tmp_path / "latents"
  _cache(vae_dir, out, "--split=train,validation")
  meta = json.loads((out / "metadata.json").read_text())
  assert meta["latent_shape"] == [16, 16, 4]
  assert meta["splits"]["train"]["complete"] and len(meta["splits"]["train"]["shards"]) == 3
  assert len(meta["vae_weights_sha256"]) == 64

  # A record holds the VAE posterior of the image and of its mirror.
  cfg = imagenet256_diffusion.get_config("runlocal")
  images = sources.get_source(cfg.data, "train")
  codec = pipeline.ImageCodec(32, None, cfg.data.eval_crop_fraction)
  src = latents_lib.LatentSource(str(out), "train")
  assert len(src) == 48
  rec = src.load(5)
  image = codec.eval(images.load(rec["index"]))["image"]
  model, params = vae_lib.from_pretrained(vae_dir)
  x = image[None].astype(np.float32) / 127.5 - 1.0
  mean, std = jax.jit(lambda p, x: vae_lib.encode(model, p, x))(params, x)
  np.testing.assert_allclose(rec["mean"], np.asarray(mean[0]), atol=2e-3)  # stored as float16
  mean_f, _ = jax.jit(lambda p, x: vae_lib.encode(model, p, x))(params, x[:, :, ::-1])
  np.testing.assert_allclose(rec["mean_flip"], np.asarray(mean_f[0]), atol=2e-3)

  # Interrupted: a shard is missing (and the metadata not yet written): the re-run writes only it.
  kept = out / "train-00000-of-00003.array_record"
  before = kept.stat().st_mtime_ns
  os.remove(out / "train-00001-of-00003.array_record")
  os.remove(out / "metadata.json")
  proc = _cache(vae_dir, out, "--split=train,validation")
  assert kept.stat().st_mtime_ns == before
  assert (out / "train-00001-of-00003.array_record").exists()
  assert "latent cache complete" in proc.stdout
  indices = sorted(latents_lib.LatentSource(str(out), "train").load(i)["index"]
                   for i in range(48))
  assert indices == list(range(48))

  # The diffusion runlocal trains on the cache and decodes its samples with the VAE.
  run = tmp_path / "run"
  helpers.run_main(*helpers.TINY_DIFFUSION, f"--workdir={run}", f"--config.data.latent_dir={out}",
                   f"--config.sample.vae_dir={vae_dir}", "--config.total_steps=4",
                   "--config.evals.val.every_steps=4", "--config.evals.samples.num_samples=0",
                   "--config.evals.grid.every_steps=4", "--config.eval_batch_size=16")
  rows = helpers.read_jsonl(run / "metrics.jsonl")
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
  assert np.isfinite(rows[-1]["eval/loss"])
  grid = np.load(run / "samples" / "grid_step0000004_ddim3_constant3_seed0_ema.npz")
  assert grid["images"].shape == (20, 32, 32, 3)  # decoded by the VAE to RGB pixels.
