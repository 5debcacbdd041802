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
    "--config=configs/imagenet256_diffusion.py:runlocal", "--config.model.channels=(16,32)",
    "--config.model.down_layout=C-CT",
    "--config.model.head_dim=16", "--config.model.context_dim=16", "--config.batch_size=16",
    "--config.eval_batch_size=200", "--config.sample.sampler=ddim", "--config.sample.steps=3",
    "--config.sample.per_class=2", "--config.sample.batch_size=20", "--config.log.every_steps=1",
    "--config.evals.samples.real_samples=50", "--config.optim.warmup_steps=2"]

# A classifier small enough for tests (used as a judge of generated digits).
TINY_CLASSIFIER = [
    "--config=configs/ascan_t.py:runlocal", "--config.model.layout=C-CT",
    "--config.model.widths=(16,64)", "--config.model.stem_width=16",
    "--config.model.head_dim=16", "--config.model.embed_dim=64", "--config.batch_size=32",
    "--config.eval_batch_size=200", "--config.log.every_steps=10"]

def zero_network_samples(task, noise_key, loop_key, n):
  """The uint8 images ``task``'s sampler must draw for ``n`` samples from a network whose output
  is zero (a UNet at initialisation: zero output layer), run by hand: eps = 0 when it predicts
  eps, eps = sqrt(1 - abar) x_t when it predicts v; sample i starts from
  ``normal(fold_in(noise_key, i))``, the sampler's loop key is ``loop_key``."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from ascan_jax.diffusion import generate
  from ascan_jax.diffusion import samplers
  from ascan_jax.tasks import denoising
  config, schedule = task.config, task.schedule

  def eps_fn(x, t):
    if config.diffusion.prediction == "epsilon":
      return jnp.zeros_like(x)
    abar = schedule.alpha_bar_at(jnp.broadcast_to(t, x.shape[:1]))
    return jnp.sqrt(1.0 - abar)[:, None, None, None] * x
  shape = (n,) + task.sample_shape()
  noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(noise_key, i),
                                               shape[1:]))(jnp.arange(n))
  s = config.sample
  x0, _ = samplers.sample(eps_fn, shape, loop_key, sampler=s.sampler, steps=s.steps,
                          schedule=schedule, initial=noise, clip_denoised=s.clip_denoised or None)
  return np.asarray(generate.to_uint8(denoising.depth_to_space(x0, config.data.patch)))


def assert_same_images_across_device_shapes(actual, expected):
  """uint8 images drawn by a v network with different per-device shapes: turning v into eps
  rounds differently with those shapes, so a few pixels may differ by one grey level (2 of
  18,432 when measured); anything more is a real difference."""
  import numpy as np
  diff = np.abs(np.asarray(actual).astype(int) - np.asarray(expected).astype(int))
  assert diff.max() <= 1 and np.count_nonzero(diff) <= 1e-3 * diff.size, np.count_nonzero(diff)


# A text-to-image stage small enough for tests: the runlocal stage 1 (single digits at 32x32)
# with 4x4 patches (8x8 tokens: a quarter of the runlocal's 2x2-patch compute), a tiny UNet and a
# tiny stand-in encoder. Written to a file, so main.py runs the same config.
TINY_T2I_CONFIG = '''
import ml_collections
from configs import t2i_common


def get_config(arg=None):
  c = t2i_common.runlocal_stage("1")
  c.model.update(dict(channels=(16, 32, 32), down_layout="C-T-T", mid_layout="T", head_dim=16,
                      context_dim=32, norm_groups=8))
  c.text.update(dict(encoder_dir={encoder!r}, max_length=16))
  c.text.random_encoder.update(dict(create=False, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                    num_heads=4, corpus_size=100))
  c.data.update(dict(num_train_examples=256, num_eval_examples=16, patch=4))
  c.batch_size, c.eval_batch_size, c.total_steps = 8, 16, {steps}
  c.optim.warmup_steps = 2
  c.log.every_steps = 1
  c.log.tensorboard = False
  c.checkpoint.every_steps = 3
  c.sample.update(dict(sampler="ddim", steps=2, batch_size=8, num_seeds=2))
  c.evals = ml_collections.ConfigDict()  # evaluators run at the last step: none, to save time.
  return c
'''


def write_tiny_t2i_config(directory, encoder, steps):
  """Writes ``TINY_T2I_CONFIG`` (stand-in encoder at ``encoder``) to a file; returns its path."""
  path = os.path.join(str(directory), f"t2i_tiny_{steps}.py")
  with open(path, "w") as f:
    f.write(TINY_T2I_CONFIG.format(encoder=str(encoder), steps=steps))
  return path


def train_tiny_t2i(root, steps=8):
  """The stand-in encoder, the tiny config file and a finished ``steps``-step run (by main.py)
  under ``root``: ``(encoder dir, config path, workdir)``."""
  from ascan_jax.tasks import diffusion as diffusion_task
  from ascan_jax.tasks import text_to_image
  encoder = os.path.join(str(root), "t5")
  config_path = write_tiny_t2i_config(root, encoder, steps)
  text_to_image.make_standin_encoder(encoder, diffusion_task.load_config_file(config_path))
  workdir = os.path.join(str(root), "stage_a")
  run_main(f"--config={config_path}", f"--workdir={workdir}")
  return encoder, config_path, workdir
