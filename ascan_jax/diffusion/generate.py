"""Drawing samples from a trained diffusion model: sharded, seeded per sample, with a protocol.

``Generator`` jits one sampling call (sampler, steps, guidance from ``config.sample``) over the
whole mesh: labels and the starting noise are split over the data-parallel devices, parameters
keep their training shardings. Sample ``i`` starts from noise drawn with
``fold_in(split(key(seed))[0], i)``, so with the deterministic samplers (ddim, euler, heun,
dpmpp_2m) a sample is the same whatever batch or device count it is drawn with; fewer samples
than a batch are drawn at their own batch (``BatchedPrograms``), not padded to a full one.
Outputs are decoded to uint8 images (pixel space: from [-1, 1]; latent space: through the
configured VAE).

Samples stay where they were drawn: ``Generator.chunks`` yields one ``SampleChunk`` per jitted
batch (images and labels as global arrays split over the data-parallel devices of every
process), which evaluators consume on the devices (``eval.inception_evaluator``,
``tasks.judge``), so nothing scales with the number of samples on a host. Labels and noise
indices enter the jit as global arrays built from each process's share
(``jax.make_array_from_callback``; a numpy array with a sharded ``in_shardings`` is refused
with more than one process). ``leading_rows`` copies the first rows of a chunk to every process
(files of the first samples); ``Generator.__call__`` does that for every sample, for grids.

``protocol()`` is written beside every set of samples and every reported number: sampler,
steps, spacing, guidance (kind, scales), NFE per sample, seed, checkpoint step, EMA or raw,
schedule, number of samples, VAE.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from ascan_jax import fileio
from ascan_jax.diffusion import guidance as guidance_lib
from ascan_jax.diffusion import samplers
from ascan_jax.diffusion import schedule as schedule_lib
from ascan_jax.parallel import sharding as sharding_lib

GUIDANCE_KINDS = ("none", "constant", "interval", "ramp")


def guidance_tag(s) -> str:
  """The guidance of ``config.sample`` in a file name, e.g. ``ramp1.1to3.6_steps5toend``."""
  end = "end" if s.end_step < 0 else s.end_step
  return {"none": "noguidance", "constant": f"constant{s.scale:g}",
          "interval": f"interval{s.scale:g}_steps{s.start_step}to{end}",
          "ramp": f"ramp{s.ramp_start:g}to{s.ramp_end:g}_steps{s.start_step}to{end}"}[s.guidance]


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


class BatchedPrograms:
  """A sampler's jitted calls, one per call batch, each built on first use by ``build(b)``. The
  sampler's batch is ``batch_size`` rounded up to the data-parallel devices; ``n`` samples are
  drawn at ``call_batch_size(n)``: that batch, or for fewer samples ``n`` rounded up to the
  data-parallel devices, so a small grid does not pay for a full batch of padding (at the cost
  of one more compiled program per such size). Used by ``Generator`` and the text-to-image
  ``TextSampler``."""

  def __init__(self, mesh, rules, batch_size: int, build):
    self.data_parallel = sharding_lib.data_parallel_size(mesh, rules)
    self.batch_size = int(math.ceil(batch_size / self.data_parallel) * self.data_parallel)
    self._build = build
    self._built = {}

  def call_batch_size(self, n: int) -> int:
    if n >= self.batch_size:
      return self.batch_size
    return int(math.ceil(max(n, 1) / self.data_parallel) * self.data_parallel)

  def for_samples(self, n: int):
    """``(b, program)``: the call batch of ``n`` samples and its program."""
    b = self.call_batch_size(n)
    if b not in self._built:
      self._built[b] = self._build(b)
    return b, self._built[b]

  @property
  def batch_sizes(self) -> tuple[int, ...]:
    """The call batches whose programs were built."""
    return tuple(sorted(self._built))


@dataclasses.dataclass(frozen=True)
class SampleChunk:
  """One jitted batch of samples, where it was drawn. ``images`` [b, H, W, C] uint8 and
  ``labels`` [b] int32 (``b``: ``BatchedPrograms.call_batch_size``) are global arrays split over the
  data-parallel devices; rows ``[0, count)`` are samples ``start .. start + count - 1`` of the
  requested set, the rest pad the last batch."""
  images: jax.Array
  labels: jax.Array
  start: int
  count: int


class Generator:
  """Sharded, jitted sampling of ``task``'s model; see the module docstring."""

  def __init__(self, task, mesh, rules, param_shardings, batch_size: int):
    cfg = task.config
    self.task = task
    self.config = cfg
    self.mesh = mesh
    self.rules = rules
    self._programs = BatchedPrograms(mesh, rules, batch_size, self._build_program)
    self.batch_size = self._programs.batch_size
    self.schedule = guidance_schedule(cfg.sample)
    s = cfg.sample
    self.spacing = s.spacing or samplers.get_sampler(s.sampler).default_spacing
    self._param_shardings = param_shardings
    self._decode, self._vae_params = task.decoder()
    if self._vae_params is not None:
      self._vae_params = replicate(self._vae_params, mesh)

  @property
  def compiled_batch_sizes(self) -> tuple[int, ...]:
    return self._programs.batch_sizes

  def _build_program(self, b: int):
    """``(draw, labels_sharding)``: the jitted sampling call at batch ``b``."""
    task, cfg, mesh, rules = self.task, self.config, self.mesh, self.rules
    s = cfg.sample
    shape = (b,) + task.sample_shape()
    batch = sharding_lib.batch_sharding(mesh, rules, 4, b)
    labels_sharding = sharding_lib.batch_sharding(mesh, rules, 1, b)
    replicated = NamedSharding(mesh, P())
    null = task.null_label
    model, decode = task.model, self._decode
    prediction = cfg.diffusion.prediction

    def draw(params, vae_params, labels, indices, seed):
      noise_key, loop_key = jax.random.split(jax.random.key(seed))
      noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(noise_key, i),
                                                   shape[1:]))(indices)
      noise = jax.lax.with_sharding_constraint(noise, batch)

      def model_eps(x, t, cond):
        return schedule_lib.to_epsilon(task.schedule, prediction,
                                       model.apply({"params": params}, x, t, cond, train=False),
                                       x, t)

      if self.schedule is None:
        eps_fn, g = (lambda x, t: model_eps(x, t, labels)), None
      else:
        eps_fn, g = model_eps, guidance_lib.cfg(self.schedule, labels, null)
      x0, _ = samplers.sample(eps_fn, shape, loop_key, sampler=s.sampler,
                              steps=s.steps, schedule=task.schedule, guidance=g,
                              dtype=task.dtype, spacing=self.spacing, initial=noise,
                              clip_denoised=s.clip_denoised or None)
      return decode(vae_params, x0)

    jitted = jax.jit(draw, in_shardings=(self._param_shardings, replicated, labels_sharding,
                                         labels_sharding, None), out_shardings=batch)
    return jitted, labels_sharding

  def tag(self, seed: int, ema: bool) -> str:
    """A file-name tag of the sampling protocol, e.g. ``heun30_constant3.0_seed1_ema``."""
    s = self.config.sample
    return f"{s.sampler}{s.steps}_{guidance_tag(s)}_seed{seed}_{'ema' if ema else 'raw'}"

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
        "prediction": d.prediction,
        "vae_dir": self.config.sample.vae_dir or None,
        "sample_shape": list(self.task.sample_shape()),
    }

  def chunks(self, params, labels: np.ndarray, seed: int,
             progress: bool = False) -> Iterator[SampleChunk]:
    """Samples for ``labels`` [N] (sample ``i`` uses noise index ``i``), one jitted batch at a
    time, left on the devices that drew them (see ``SampleChunk``). Every process passes the
    same ``labels`` and gets the same sequence of chunks."""
    labels = np.asarray(labels, np.int32)
    if labels.ndim != 1:
      raise ValueError(f"labels must be one class index per sample ([N]), got {labels.shape}")
    n = len(labels)
    if not n:
      return
    b, (draw, labels_sharding) = self._programs.for_samples(n)
    for start in tqdm(range(0, n, b), desc="sampling", unit="batch", disable=not progress):
      idx = np.arange(start, start + b, dtype=np.int32)
      lab = labels[start:start + b]
      count = len(lab)
      lab = np.concatenate([lab, np.zeros(b - count, np.int32)])
      lab = _global_batch_array(lab, labels_sharding)
      images = draw(params, self._vae_params, lab, _global_batch_array(idx, labels_sharding),
                    seed)
      yield SampleChunk(images, lab, start, count)

  def __call__(self, params, labels: np.ndarray, seed: int, progress: bool = False) -> np.ndarray:
    """uint8 images [N, H, W, C] for ``labels`` [N] on every process (sample ``i`` uses noise
    index ``i``). Every sample is copied to every host: for grids and other small sets;
    evaluations consume ``chunks`` where the samples were drawn."""
    out = [leading_rows(chunk.images, chunk.count)
           for chunk in self.chunks(params, labels, seed, progress)]
    return np.concatenate(out) if out else np.zeros((0,) + self.task.sample_shape(), np.uint8)


@functools.lru_cache(maxsize=64)
def _leading_rows_fn(n: int, replicated: NamedSharding):
  return jax.jit(lambda x: x[:n], out_shardings=replicated)


def leading_rows(x: jax.Array, n: int) -> np.ndarray:
  """The first ``n`` rows of a global array split over a mesh, as numpy on every process. Only
  those rows move: a jitted slice whose output is replicated over ``x``'s mesh, which each
  process then reads from one of its own devices."""
  n = int(n)
  if not 0 <= n <= x.shape[0]:
    raise ValueError(f"cannot take {n} leading rows of an array of shape {x.shape}")
  if not isinstance(x.sharding, NamedSharding):
    return np.asarray(x[:n])
  return np.asarray(_leading_rows_fn(n, NamedSharding(x.sharding.mesh, P()))(x))


def _global_batch_array(values: np.ndarray, sharding) -> jax.Array:
  """A global array of ``values`` (the same on every process) in a batch ``sharding``: each
  process supplies the shards its devices hold, so this works on any number of hosts (a numpy
  array passed to a jit with a non-trivial sharding does not, with more than one process)."""
  return jax.make_array_from_callback(values.shape, sharding, lambda index: values[index])


def replicate(tree, mesh):
  """Every array of ``tree`` (host values, the same on every process) replicated over ``mesh``.
  Each process supplies its own devices' copies, so this works on any number of hosts without
  the cross-host equality check (an all-gather of the values) ``jax.device_put`` would make."""
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: _global_batch_array(np.asarray(x), sharding), tree)


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
