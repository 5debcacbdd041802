"""Drawing samples from a trained diffusion model: sharded, seeded per sample, with a protocol.

``Generator`` jits one sampling call (sampler, steps, guidance from ``config.sample``) over the
whole mesh: labels and the starting noise are split over the data-parallel devices, parameters
keep their training shardings. Sample ``i`` starts from noise drawn with
``fold_in(split(key(seed))[0], i)``, so with the deterministic samplers (ddim, euler, heun,
dpmpp_2m) a sample is the same whatever batch or device count it is drawn with. Outputs are
decoded to uint8 images (pixel space: from [-1, 1]; latent space: through the configured VAE).

``protocol()`` is written beside every set of samples and every reported number: sampler,
steps, spacing, guidance (kind, scales), NFE per sample, seed, checkpoint step, EMA or raw,
schedule, number of samples, VAE.
"""
from __future__ import annotations

import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from ascan_jax import fileio
from ascan_jax.diffusion import guidance as guidance_lib
from ascan_jax.diffusion import samplers
from ascan_jax.parallel import sharding as sharding_lib

GUIDANCE_KINDS = ("none", "constant", "interval", "ramp")


def guidance_schedule(sample_config):
  """The ``GuidanceSchedule`` of ``config.sample`` (None for no guidance)."""
  s = sample_config
  end = None if s.end_step < 0 else s.end_step
  if s.guidance == "none":
    return None
  if s.guidance == "constant":
    return guidance_lib.constant(s.scale)
  if s.guidance == "interval":
    return guidance_lib.interval(s.scale, s.start_step, end)
  if s.guidance == "ramp":
    return guidance_lib.ramp(s.ramp_start, s.ramp_end, s.start_step, end)
  raise ValueError(f"config.sample.guidance={s.guidance!r} is not one of {GUIDANCE_KINDS}")


def to_uint8(x: jax.Array) -> jax.Array:
  return jnp.clip(jnp.round((x.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


class Generator:
  """Sharded, jitted sampling of ``task``'s model; see the module docstring."""

  def __init__(self, task, mesh, rules, param_shardings, batch_size: int):
    cfg = task.config
    self.task = task
    self.config = cfg
    self.mesh = mesh
    dp = max(1, math.prod(mesh.shape[a] for a in _batch_axes(mesh, rules)))
    self.batch_size = int(math.ceil(batch_size / dp) * dp)
    self.schedule = guidance_schedule(cfg.sample)
    s = cfg.sample
    self.spacing = s.spacing or samplers.get_sampler(s.sampler).default_spacing
    shape = (self.batch_size,) + task.sample_shape()
    batch = sharding_lib.batch_sharding(mesh, rules, 4, self.batch_size)
    labels_sharding = sharding_lib.batch_sharding(mesh, rules, 1, self.batch_size)
    replicated = NamedSharding(mesh, P())
    null = task.null_label
    model = task.model
    decode, self._vae_params = task.decoder()
    if self._vae_params is not None:
      self._vae_params = jax.device_put(self._vae_params, replicated)

    def draw(params, vae_params, labels, indices, seed):
      noise_key, loop_key = jax.random.split(jax.random.key(seed))
      noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(noise_key, i),
                                                   shape[1:]))(indices)
      noise = jax.lax.with_sharding_constraint(noise, batch)

      def model_eps(x, t, cond):
        return model.apply({"params": params}, x, t, cond, train=False)

      if self.schedule is None:
        eps_fn, g = (lambda x, t: model_eps(x, t, labels)), None
      else:
        eps_fn, g = model_eps, guidance_lib.cfg(self.schedule, labels, null)
      x0, _ = samplers.sample(eps_fn, shape, loop_key, sampler=s.sampler,
                              steps=s.steps, schedule=task.schedule, guidance=g,
                              dtype=task.dtype, spacing=self.spacing, initial=noise,
                              clip_denoised=s.clip_denoised or None)
      return decode(vae_params, x0)

    self._labels_sharding = labels_sharding
    self._draw = jax.jit(draw, in_shardings=(param_shardings, replicated, labels_sharding,
                                             labels_sharding, None), out_shardings=batch)

  def _global(self, values: np.ndarray) -> jax.Array:
    return _global_batch_array(values, self._labels_sharding)

  def tag(self, seed: int, ema: bool) -> str:
    """A file-name tag of the sampling protocol, e.g. ``heun30_constant3.0_seed1_ema``."""
    s = self.config.sample
    end = "end" if s.end_step < 0 else s.end_step
    g = {"none": "noguidance", "constant": f"constant{s.scale:g}",
         "interval": f"interval{s.scale:g}_steps{s.start_step}to{end}",
         "ramp": f"ramp{s.ramp_start:g}to{s.ramp_end:g}_steps{s.start_step}to{end}"}[s.guidance]
    return f"{s.sampler}{s.steps}_{g}_seed{seed}_{'ema' if ema else 'raw'}"

  def nfe(self) -> int:
    s = self.config.sample
    return samplers.nfe(s.sampler, s.steps, self.schedule)

  def protocol(self, *, step: int, ema: bool, num_samples: int, seed: int) -> dict:
    s = self.config.sample
    d = self.config.diffusion
    return {
        "sampler": s.sampler, "steps": s.steps, "spacing": self.spacing,
        "guidance": s.guidance,
        "guidance_scales": (None if self.schedule is None
                            else [float(x) for x in self.schedule.scales(s.steps)]),
        "nfe_per_sample": self.nfe(), "seed": seed, "checkpoint_step": step, "ema": ema,
        "clip_denoised": s.clip_denoised or None,
        "num_samples": num_samples,
        "schedule": {"num_train_steps": d.num_train_steps, "beta_start": d.beta_start,
                     "beta_end": d.beta_end, "kind": d.schedule},
        "vae_dir": self.config.sample.vae_dir or None,
        "sample_shape": list(self.task.sample_shape()),
    }

  def __call__(self, params, labels: np.ndarray, seed: int, progress: bool = False) -> np.ndarray:
    """uint8 images [N, H, W, C] for ``labels`` [N]; sample ``i`` uses noise index ``i``."""
    labels = np.asarray(labels, np.int32)
    n = len(labels)
    out = []
    chunks = range(0, n, self.batch_size)
    for start in tqdm(chunks, desc="sampling", unit="batch", disable=not progress):
      idx = np.arange(start, start + self.batch_size)
      lab = labels[start:start + self.batch_size]
      lab = np.concatenate([lab, np.zeros(self.batch_size - len(lab), np.int32)])
      images = self._draw(params, self._vae_params, self._global(lab),
                          self._global(idx.astype(np.int32)), seed)
      if jax.process_count() > 1:  # every process gets every sample.
        from jax.experimental import multihost_utils
        images = multihost_utils.process_allgather(images, tiled=True)
      out.append(np.asarray(jax.device_get(images))[:min(self.batch_size, n - start)])
    return np.concatenate(out) if out else np.zeros((0,) + self.task.sample_shape(), np.uint8)


def _global_batch_array(values: np.ndarray, sharding) -> jax.Array:
  """A global array of ``values`` (the same on every process) in a batch ``sharding``: each
  process supplies the shards its devices hold, so this works on any number of hosts (a numpy
  array passed to a jit with a non-trivial sharding does not, with more than one process)."""
  return jax.make_array_from_callback(values.shape, sharding, lambda index: values[index])


def _batch_axes(mesh, rules):
  for logical, axes in rules:
    if logical == "batch":
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      return [a for a in axes if a in mesh.shape]
  return []


def grid(images: np.ndarray, columns: int) -> np.ndarray:
  """[N, H, W, C] uint8 -> one [rows*H, columns*W, C] image (row-major), 2-pixel gaps."""
  n, h, w, c = images.shape
  rows = max(1, math.ceil(n / columns))
  gap = 2
  canvas = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, c), 255, np.uint8)
  for i, im in enumerate(images):
    r, k = divmod(i, columns)
    canvas[r * (h + gap):r * (h + gap) + h, k * (w + gap):k * (w + gap) + w] = im
  return canvas


def write_outputs(directory: str, name: str, images: np.ndarray, labels: np.ndarray,
                  protocol: dict, columns: int) -> dict:
  """``name.png`` (grid), ``name.npz`` (images, labels) and ``name.json`` (protocol)."""
  from PIL import Image
  fileio.makedirs(directory)
  picture = grid(images, columns)
  if picture.shape[-1] == 1:
    picture = picture[..., 0]
  buf = io.BytesIO()
  Image.fromarray(picture).save(buf, format="PNG")
  paths = {k: fileio.join(directory, f"{name}.{k}") for k in ("png", "npz", "json")}
  from etils import epath
  epath.Path(paths["png"]).write_bytes(buf.getvalue())
  npz = io.BytesIO()
  np.savez_compressed(npz, images=images, labels=np.asarray(labels))
  epath.Path(paths["npz"]).write_bytes(npz.getvalue())
  fileio.write_text(paths["json"], json.dumps(protocol, indent=2))
  return paths
