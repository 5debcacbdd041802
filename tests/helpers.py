"""Shared test helpers: running main.py in a subprocess, reading metrics.jsonl."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, env=None, timeout=900, check=True, devices=1):
  """Runs ``python main.py ARGS`` from the repo root; returns the CompletedProcess."""
  e = dict(os.environ)
  e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  e["JAX_PLATFORMS"] = "cpu"
  e.setdefault("ASCAN_COMPILATION_CACHE", os.path.join(REPO, ".jax_cache"))
  e.update(env or {})
  proc = subprocess.run([sys.executable, "main.py", *args], cwd=REPO, env=e,
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"main.py {' '.join(args)} failed ({proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
  return proc


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def random_inception_weights(path, seed=0):
  """A FID Inception-v3 safetensors file with random (He-initialised) weights, no torch."""
  import numpy as np
  import safetensors.numpy
  from ascan_jax.models import inception
  rng = np.random.default_rng(seed)
  flat = {}
  for key, shape in inception.expected_shapes().items():
    if key.endswith("/kernel"):
      fan_in = int(np.prod(shape[:-1]))
      flat[key] = (rng.normal(size=shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    elif key.endswith("/var") or key.endswith("/scale"):
      flat[key] = np.ones(shape, np.float32)
    else:
      flat[key] = np.zeros(shape, np.float32)
  safetensors.numpy.save_file(flat, str(path))
  return str(path)


# A diffusion run small enough for tests: the runlocal recipe with a tiny UNet.
TINY_DIFFUSION = [
    "--config=configs/imagenet256_diffusion.py:runlocal", "--config.model.channels=(16,32,32)",
    "--config.model.head_dim=16", "--config.model.context_dim=16", "--config.batch_size=16",
    "--config.eval_batch_size=200", "--config.sample.sampler=ddim", "--config.sample.steps=3",
    "--config.sample.per_class=2", "--config.sample.batch_size=20", "--config.log.every_steps=1",
    "--config.evals.samples.real_samples=50", "--config.optim.warmup_steps=2"]

# A classifier small enough for tests (used as a judge of generated digits).
TINY_CLASSIFIER = [
    "--config=configs/ascan_t.py:runlocal", "--config.model.layout=C-CT-CT-CT",
    "--config.model.widths=(16,32,64,64)", "--config.model.stem_width=16",
    "--config.model.head_dim=16", "--config.model.embed_dim=64", "--config.batch_size=32",
    "--config.eval_batch_size=200", "--config.log.every_steps=10"]
