"""A flax.linen AutoencoderKL (the SD 1.x/2.x/SDXL VAE) that loads diffusers checkpoints.

What lives here:

* ``VAEConfig``: the parsed diffusers ``config.json`` of an ``AutoencoderKL`` (a frozen dataclass;
  the defaults are diffusers' constructor defaults, so a key missing from a file means the same
  thing here as there). Block types and options this port does not implement raise a
  ``ValueError`` naming them, and so do unknown keys (a silent mismatch would give wrong images).
* ``Encoder``, ``Decoder`` and ``AutoencoderKL``: NHWC modules, float32 parameters, ``dtype`` is
  the compute dtype; GroupNorm statistics and the attention softmax are always float32. Submodule
  names mirror diffusers' parameter names (``down_blocks_0/resnets_1/conv1`` is
  ``down_blocks.0.resnets.1.conv1``), so the name mapping is mechanical (``torch_name``).
* Loading and saving the diffusers layout (``config.json`` and
  ``diffusion_pytorch_model.safetensors``) without torch: ``from_pretrained``,
  ``save_pretrained``, ``params_from_state_dict``, ``state_dict_from_params``. Old checkpoints
  that name the mid-block attention ``query/key/value/proj_attn`` load as well as new ones
  (``to_q/to_k/to_v/to_out.0``).
* Jittable functions: ``encode`` (images in [-1, 1] -> posterior mean and std), ``sample_latents``,
  ``decode``, and ``to_model_latents`` / ``from_model_latents``, which move between the VAE's raw
  latents and the normalised latents a diffusion model is trained on (scaling and shift factors).

Usage::

  from ascan_jax.models import vae
  model, params = vae.from_pretrained("path/to/vae")   # model.config is the VAEConfig
  mean, std = jax.jit(functools.partial(vae.encode, model))(params, images)
  z = vae.to_model_latents(vae.sample_latents(mean, std, key), model.config)
  decode = jax.jit(functools.partial(vae.decode, model))
  images = decode(params, vae.from_model_latents(z, model.config))

Architecture (read off diffusers' ``AutoencoderKL``): the encoder is a 3x3 ``conv_in``, one
``DownEncoderBlock2D`` per entry of ``block_out_channels`` (``layers_per_block`` ResNet blocks,
then a stride-2 3x3 convolution on a right/bottom zero-padded input, except in the last block),
a mid block (ResNet, single-head self-attention, ResNet), GroupNorm, SiLU and a 3x3 ``conv_out``
to ``2 * latent_channels`` (mean and log-variance), then the optional 1x1 ``quant_conv``. The
decoder mirrors it: optional 1x1 ``post_quant_conv``, ``conv_in``, the mid block, one
``UpDecoderBlock2D`` per level in reverse order (``layers_per_block + 1`` ResNet blocks, then 2x
nearest upsampling and a 3x3 convolution, except in the last block), GroupNorm, SiLU, ``conv_out``.
All GroupNorms use epsilon 1e-6; the log-variance is clipped to [-30, 20].
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONV_KERNEL_AXES = (None, None, "conv_in", "conv_out")
DENSE_KERNEL_AXES = ("conv_in", "conv_out")  # attention projections act as 1x1 convolutions.
SUPPORTED_DOWN_BLOCKS = ("DownEncoderBlock2D",)
SUPPORTED_UP_BLOCKS = ("UpDecoderBlock2D",)
ACTIVATIONS = {  # diffusers' get_activation names; torch's GELU is the exact (erf) one.
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "relu": nn.relu,
    "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
}
NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)
# Old diffusers checkpoints name the attention projections differently (same shapes).
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_ATTENTION_RE = re.compile(
    r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


# ---------------------------------------------------------------------------------------------
# Config.


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The ``AutoencoderKL`` keys of a diffusers ``config.json``, with diffusers' defaults.

  ``sample_size`` and ``force_upcast`` do not change the network: ``sample_size`` is kept for
  reference (diffusers uses it only for tiling) and ``force_upcast`` is applied by
  ``from_pretrained`` (float16 compute becomes float32). ``latents_mean`` / ``latents_std``
  (per-channel, used by e.g. Playground v2.5) take the place of ``shift_factor`` in
  ``to_model_latents``; giving both is rejected.
  """
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int | tuple[int, ...] = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    # JSON gives lists; a frozen (hashable) config needs tuples.
    for name in ("down_block_types", "up_block_types", "block_out_channels", "latents_mean",
                 "latents_std", "sample_size"):
      value = getattr(self, name)
      if isinstance(value, list):
        object.__setattr__(self, name, tuple(value))
    self._validate()

  def _validate(self):
    problems = []
    bad = [t for t in self.down_block_types if t not in SUPPORTED_DOWN_BLOCKS]
    if bad:
      problems.append(f"down_block_types {sorted(set(bad))} are not supported "
                      f"(supported: {list(SUPPORTED_DOWN_BLOCKS)})")
    bad = [t for t in self.up_block_types if t not in SUPPORTED_UP_BLOCKS]
    if bad:
      problems.append(f"up_block_types {sorted(set(bad))} are not supported "
                      f"(supported: {list(SUPPORTED_UP_BLOCKS)})")
    n = len(self.block_out_channels)
    if n == 0:
      problems.append("block_out_channels is empty")
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      problems.append(f"down_block_types ({len(self.down_block_types)}), up_block_types "
                      f"({len(self.up_block_types)}) and block_out_channels ({n}) must have "
                      "the same length")
    if self.act_fn not in ACTIVATIONS:
      problems.append(f"act_fn {self.act_fn!r} is not supported (supported: {sorted(ACTIVATIONS)})")
    for name in ("in_channels", "out_channels", "latent_channels", "norm_num_groups",
                 "layers_per_block"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        problems.append(f"{name} must be a positive integer, got {value!r}")
    if isinstance(self.norm_num_groups, int) and self.norm_num_groups > 0:
      bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
      if bad:
        problems.append(f"block_out_channels {bad} are not divisible by norm_num_groups="
                        f"{self.norm_num_groups}")
    for name in ("latents_mean", "latents_std"):
      value = getattr(self, name)
      if value is not None and len(value) != self.latent_channels:
        problems.append(f"{name} has {len(value)} entries, latent_channels is "
                        f"{self.latent_channels}")
    if (self.latents_mean is None) != (self.latents_std is None):
      problems.append("latents_mean and latents_std must be given together")
    if self.latents_mean is not None and self.shift_factor is not None:
      problems.append("shift_factor and latents_mean/latents_std are both set; which one applies "
                      "is ambiguous")
    if problems:
      raise ValueError("unsupported AutoencoderKL config: " + "; ".join(problems))

  @property
  def downsample_factor(self) -> int:
    """Image size / latent size: 2 ** (number of levels - 1)."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
    """Parses a diffusers config dict. ``_``-prefixed keys are metadata and ignored, except that
    ``_class_name`` must be ``AutoencoderKL`` when present; any other unknown key is an error."""
    class_name = d.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
      raise ValueError(f"config is for {class_name!r}, not 'AutoencoderKL'; only AutoencoderKL "
                       "is supported")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d if k not in fields and not k.startswith("_"))
    if unknown:
      raise ValueError(f"unsupported AutoencoderKL config keys {unknown} (this port knows "
                       f"{sorted(fields)})")
    return cls(**{k: v for k, v in d.items() if k in fields})

  def to_dict(self) -> dict[str, Any]:
    """The diffusers ``config.json`` contents (lists for tuples, ``_class_name`` included)."""
    d = {"_class_name": "AutoencoderKL"}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      d[f.name] = list(value) if isinstance(value, tuple) else value
    return d


def load_config(path: str) -> VAEConfig:
  """Reads ``path/config.json`` (or ``path`` itself if it is a file) into a ``VAEConfig``."""
  file = path if os.path.isfile(path) else os.path.join(path, CONFIG_NAME)
  if not os.path.isfile(file):
    hint = ""
    if os.path.isfile(os.path.join(path, "vae", CONFIG_NAME)):
      hint = f" (a pipeline directory? the VAE is in {os.path.join(path, 'vae')})"
    elif not os.path.exists(path):
      hint = f" (the directory {path} does not exist)"
    raise FileNotFoundError(f"no VAE config: {file} not found{hint}")
  try:
    with open(file) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{file} is not valid JSON: {e}") from None
  try:
    return VAEConfig.from_dict(d)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{file}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Modules.


def _conv(features: int, kernel: int, *, dtype, name: str, stride: int = 1, padding=None):
  """A NHWC convolution with torch's explicit padding (``kernel // 2`` on each side by default)."""
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, param_dtype=jnp.float32, name=name,
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                          CONV_KERNEL_AXES),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))


def _dense(features: int, *, dtype, name: str):
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                           DENSE_KERNEL_AXES),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))


def _group_norm(groups: int, *, dtype, name: str):
  # Exact two-pass variance (as torch) and float32 statistics whatever the compute dtype.
  return nn.GroupNorm(num_groups=groups, epsilon=NORM_EPS, dtype=dtype, param_dtype=jnp.float32,
                      use_fast_variance=False, force_float32_reductions=True, name=name)


class ResnetBlock(nn.Module):
  """diffusers' ``ResnetBlock2D`` without a time embedding: GN-act-conv3x3 twice plus a shortcut
  (a 1x1 ``conv_shortcut`` when the width changes)."""
  features: int
  groups: int
  act_fn: str = "silu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = ACTIVATIONS[self.act_fn]
    h = act(_group_norm(self.groups, dtype=self.dtype, name="norm1")(x))
    h = _conv(self.features, 3, dtype=self.dtype, name="conv1")(h)
    h = act(_group_norm(self.groups, dtype=self.dtype, name="norm2")(h))
    h = _conv(self.features, 3, dtype=self.dtype, name="conv2")(h)
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, dtype=self.dtype, name="conv_shortcut")(x)
    return x + h


class Attention(nn.Module):
  """The VAE mid-block self-attention: GroupNorm, one head over all channels, output projection,
  residual. Logits and softmax in float32."""
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    y = _group_norm(self.groups, dtype=self.dtype, name="group_norm")(x).reshape(b, h * w, c)
    q = _dense(c, dtype=self.dtype, name="to_q")(y)
    k = _dense(c, dtype=self.dtype, name="to_k")(y)
    v = _dense(c, dtype=self.dtype, name="to_v")(y)
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * (c ** -0.5), axis=-1).astype(v.dtype)
    y = jnp.einsum("bqk,bkc->bqc", probs, v)
    y = _dense(c, dtype=self.dtype, name="to_out_0")(y)
    return x + y.reshape(b, h, w, c).astype(x.dtype)


class MidBlock(nn.Module):
  """``UNetMidBlock2D`` as the VAE uses it: ResNet, (attention), ResNet, constant width."""
  groups: int
  act_fn: str = "silu"
  add_attention: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, self.act_fn, self.dtype, name="resnets_0")(x)
    if self.add_attention:
      x = Attention(self.groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock(c, self.groups, self.act_fn, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
  """Stride-2 3x3 convolution after zero padding one row/column at the bottom/right only
  (diffusers' ``Downsample2D`` with ``padding=0``)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _conv(self.features, 3, stride=2, padding=((0, 1), (0, 1)), dtype=self.dtype,
                 name="conv")(x)


class Upsample(nn.Module):
  """2x nearest-neighbour upsampling followed by a 3x3 convolution."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    return _conv(self.features, 3, dtype=self.dtype, name="conv")(x)


class DownEncoderBlock(nn.Module):
  features: int
  num_layers: int
  groups: int
  add_downsample: bool
  act_fn: str = "silu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      x = ResnetBlock(self.features, self.groups, self.act_fn, self.dtype, name=f"resnets_{i}")(x)
    if self.add_downsample:
      x = Downsample(self.features, self.dtype, name="downsamplers_0")(x)
    return x


class UpDecoderBlock(nn.Module):
  features: int
  num_layers: int
  groups: int
  add_upsample: bool
  act_fn: str = "silu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      x = ResnetBlock(self.features, self.groups, self.act_fn, self.dtype, name=f"resnets_{i}")(x)
    if self.add_upsample:
      x = Upsample(self.features, self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Images NHWC -> ``2 * latent_channels`` moments (before ``quant_conv``)."""
  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    widths = cfg.block_out_channels
    x = _conv(widths[0], 3, dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
    for i, width in enumerate(widths):
      x = DownEncoderBlock(width, cfg.layers_per_block, cfg.norm_num_groups,
                           add_downsample=i < len(widths) - 1, act_fn=cfg.act_fn,
                           dtype=self.dtype, name=f"down_blocks_{i}")(x)
    x = MidBlock(cfg.norm_num_groups, cfg.act_fn, cfg.mid_block_add_attention, self.dtype,
                 name="mid_block")(x)
    x = ACTIVATIONS[cfg.act_fn](
        _group_norm(cfg.norm_num_groups, dtype=self.dtype, name="conv_norm_out")(x))
    return _conv(2 * cfg.latent_channels, 3, dtype=self.dtype, name="conv_out")(x)


class Decoder(nn.Module):
  """Latents NHWC (after ``post_quant_conv``) -> images NHWC."""
  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    cfg = self.config
    widths = tuple(reversed(cfg.block_out_channels))
    x = _conv(widths[0], 3, dtype=self.dtype, name="conv_in")(z.astype(self.dtype))
    x = MidBlock(cfg.norm_num_groups, cfg.act_fn, cfg.mid_block_add_attention, self.dtype,
                 name="mid_block")(x)
    for i, width in enumerate(widths):
      x = UpDecoderBlock(width, cfg.layers_per_block + 1, cfg.norm_num_groups,
                         add_upsample=i < len(widths) - 1, act_fn=cfg.act_fn,
                         dtype=self.dtype, name=f"up_blocks_{i}")(x)
    x = ACTIVATIONS[cfg.act_fn](
        _group_norm(cfg.norm_num_groups, dtype=self.dtype, name="conv_norm_out")(x))
    return _conv(cfg.out_channels, 3, dtype=self.dtype, name="conv_out")(x)


class AutoencoderKL(nn.Module):
  """Encoder + decoder + the optional 1x1 ``quant_conv`` / ``post_quant_conv``.

  ``model.config`` is the ``VAEConfig``. Methods (for ``model.apply(..., method=...)``):
  ``encode(images) -> (mean, std)`` and ``decode(latents) -> images``, float32 outputs;
  ``__call__(images, key=None)`` reconstructs (from the posterior mean when ``key`` is None).
  """
  config: VAEConfig
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype)
    self.decoder = Decoder(cfg, self.dtype)
    self.quant_conv = (_conv(2 * cfg.latent_channels, 1, dtype=self.dtype, name="quant_conv")
                       if cfg.use_quant_conv else None)
    self.post_quant_conv = (_conv(cfg.latent_channels, 1, dtype=self.dtype,
                                  name="post_quant_conv") if cfg.use_post_quant_conv else None)

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    moments = self.encoder(images)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    moments = moments.astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    std = jnp.exp(0.5 * jnp.clip(logvar, *LOGVAR_RANGE))
    return mean, std

  def decode(self, latents: jax.Array) -> jax.Array:
    z = latents.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
    mean, std = self.encode(images)
    return self.decode(mean if key is None else sample_latents(mean, std, key))


# ---------------------------------------------------------------------------------------------
# Jittable functions. ``params`` is the parameter tree ``from_pretrained`` returns (a
# ``{"params": tree}`` variables dict is accepted too). Bind the model with functools.partial
# or pass it as a static argument: ``jax.jit(vae.encode, static_argnums=0)``.


def _variables(params):
  if isinstance(params, Mapping) and set(params.keys()) == {"params"}:
    return params
  return {"params": params}


def encode(model: AutoencoderKL, params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Images NHWC in [-1, 1] -> the posterior's ``(mean, std)``, each NHWC with
  ``latent_channels`` channels and spatial size ``/ config.downsample_factor``, float32."""
  return model.apply(_variables(params), images, method=AutoencoderKL.encode)


def sample_latents(mean: jax.Array, std: jax.Array, key: jax.Array) -> jax.Array:
  """One draw from the diagonal Gaussian posterior: ``mean + std * N(0, 1)``."""
  return mean + std * jax.random.normal(key, mean.shape, mean.dtype)


def decode(model: AutoencoderKL, params, latents: jax.Array) -> jax.Array:
  """Raw (unscaled) latents NHWC -> images NHWC, float32, nominally in [-1, 1] (not clipped)."""
  return model.apply(_variables(params), latents, method=AutoencoderKL.decode)


def _latent_affine(config) -> tuple[Any, Any, float]:
  config = getattr(config, "config", config)  # an AutoencoderKL is accepted too.
  if config.latents_mean is not None:
    mean = jnp.asarray(config.latents_mean, jnp.float32)  # per channel; NHWC broadcasts.
    std = jnp.asarray(config.latents_std, jnp.float32)
  else:
    mean = 0.0 if config.shift_factor is None else config.shift_factor
    std = 1.0
  return mean, std, config.scaling_factor


def to_model_latents(z: jax.Array, config) -> jax.Array:
  """Raw VAE latents -> the normalised latents a diffusion model sees:
  ``(z - shift_factor) * scaling_factor`` (``(z - latents_mean) * scaling_factor / latents_std``
  when the config has per-channel statistics). ``config``: a VAEConfig or the model."""
  mean, std, scale = _latent_affine(config)
  return (z - mean) * (scale / std)


def from_model_latents(x: jax.Array, config) -> jax.Array:
  """The inverse of ``to_model_latents``: diffusion-model latents -> raw latents for ``decode``."""
  mean, std, scale = _latent_affine(config)
  return x * (std / scale) + mean


# ---------------------------------------------------------------------------------------------
# Parameters <-> diffusers state dicts.


def _example_images(config: VAEConfig) -> jax.ShapeDtypeStruct:
  f = config.downsample_factor  # the smallest image: a 1x1 latent.
  return jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)


def param_shapes(model: AutoencoderKL):
  """The (unboxed) parameter tree of ``model`` as ShapeDtypeStructs; nothing is computed."""
  variables = jax.eval_shape(model.init, jax.random.key(0), _example_images(model.config))
  return nn.unbox(variables)["params"]


def init_params(model: AutoencoderKL, key: jax.Array):
  """Random parameters (flax initialisers, run on the smallest image), unboxed.

  On CPU compiled at XLA backend optimisation level 1: there the default level takes two to three
  times as long to compile this one-shot computation and runs it no faster."""
  x = jnp.zeros(_example_images(model.config).shape, jnp.float32)
  options = {"xla_backend_optimization_level": 1} if jax.default_backend() == "cpu" else None
  init = jax.jit(model.init).lower(key, x).compile(compiler_options=options)
  return nn.unbox(init(key, x))["params"]


def torch_name(path: tuple[str, ...]) -> str:
  """A flax parameter path -> its diffusers state-dict name.

  ``('encoder', 'down_blocks_0', 'resnets_1', 'conv1', 'kernel')`` ->
  ``encoder.down_blocks.0.resnets.1.conv1.weight``; ``kernel`` and GroupNorm ``scale`` are
  ``weight``; a trailing ``_<digits>`` in a module name is a ModuleList index.
  """
  modules = [re.sub(r"_(\d+)$", r".\1", p) for p in path[:-1]]
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]]
  return ".".join(modules + [leaf])


def _torch_layout(x: np.ndarray) -> np.ndarray:
  """Flax kernel layout -> torch (conv HWIO -> OIHW, dense (in, out) -> (out, in))."""
  if x.ndim == 4:
    return np.transpose(x, (3, 2, 0, 1))
  if x.ndim == 2:
    return x.T
  return x


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def _flax_layout(x: np.ndarray) -> np.ndarray:
  if x.ndim == 4:
    return np.transpose(x, (2, 3, 1, 0))
  if x.ndim == 2:
    return x.T
  return x


def _flat(tree) -> dict[tuple[str, ...], Any]:
  return {tuple(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def state_dict_from_params(params) -> dict[str, np.ndarray]:
  """Flax parameters -> a diffusers ``AutoencoderKL`` state dict (float32 numpy, torch layouts)."""
  params = _variables(params)["params"]
  return {torch_name(path): np.ascontiguousarray(_torch_layout(np.asarray(leaf, np.float32)))
          for path, leaf in _flat(params).items()}


def _rename_old_attention(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
  out, clashes = {}, []
  for name, value in state_dict.items():
    m = _OLD_ATTENTION_RE.match(name)
    new = f"{m.group(1)}.{_OLD_ATTENTION_NAMES[m.group(2)]}.{m.group(3)}" if m else name
    if new in out or (m and new in state_dict):
      clashes.append(f"{name} and {new} are both present")
      continue
    out[new] = value
  return out, clashes


def _shape(x) -> tuple[int, ...]:
  return tuple(int(d) for d in x.shape)


def params_from_state_dict(model: AutoencoderKL, state_dict: Mapping[str, Any], source: str = ""):
  """A diffusers ``AutoencoderKL`` state dict (numpy arrays, torch names and layouts; old-style
  attention names accepted) -> flax parameters (float32 jax arrays, plain, not boxed).

  Every missing, unexpected and wrongly shaped tensor is listed in one ``ValueError``.
  ``source`` (e.g. the file) is named in the message.
  """
  state_dict, clashes = _rename_old_attention(state_dict)
  expected = {torch_name(path): (path, leaf.shape)
              for path, leaf in _flat(param_shapes(model)).items()}
  missing, wrong, flat = [], [], {}
  for name, (path, shape) in expected.items():
    if name not in state_dict:
      missing.append(f"{name} {_torch_shape(shape)}")
      continue
    value = state_dict[name]
    want = _torch_shape(shape)
    if len(want) == 2 and _shape(value) == want + (1, 1):  # attention stored as 1x1 convs.
      value = np.asarray(value).reshape(want)
    if _shape(value) != want:
      wrong.append(f"{name}: expected {want}, found {_shape(value)}")
      continue
    flat[path] = value
  unexpected = [f"{name} {_shape(v)}" for name, v in state_dict.items() if name not in expected]
  if missing or unexpected or wrong or clashes:
    cfg = model.config
    lines = [f"weights{' in ' + source if source else ''} do not match the AutoencoderKL config "
             f"(block_out_channels={list(cfg.block_out_channels)}, layers_per_block="
             f"{cfg.layers_per_block}, latent_channels={cfg.latent_channels}, in/out_channels="
             f"{cfg.in_channels}/{cfg.out_channels}, use_quant_conv={cfg.use_quant_conv}, "
             f"use_post_quant_conv={cfg.use_post_quant_conv}, mid_block_add_attention="
             f"{cfg.mid_block_add_attention}); shapes are in the file's (torch) layout:"]
    for title, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                         ("tensors with the wrong shape", wrong),
                         ("old and new attention names both present", clashes)):
      if items:
        lines.append(f"{len(items)} {title}:")
        lines.extend(f"  {item}" for item in items)
    raise ValueError("\n".join(lines))
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = jnp.asarray(_flax_layout(np.asarray(value, np.float32)))
  return tree


def _read_safetensors(file: str) -> dict[str, np.ndarray]:
  """All tensors of a .safetensors file as numpy arrays; bfloat16 ones (which
  ``safetensors.numpy`` cannot represent) are decoded with ml_dtypes."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  try:
    return safetensors.numpy.load_file(file)
  except TypeError:  # "data type 'bfloat16' not understood"
    pass
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  with open(file, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
    data = f.read()
  dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
            "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
            "BOOL": np.bool_}
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in dtypes:
      raise ValueError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    out[name] = np.frombuffer(data[begin:end], dtypes[info["dtype"]]).reshape(info["shape"])
  return out


def _resolve_dtype(config: VAEConfig, dtype) -> Any:
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float16 and config.force_upcast:
    return jnp.dtype(jnp.float32)  # as diffusers pipelines do: this VAE overflows in float16.
  return dtype


def from_pretrained(path: str, *, dtype: Any = jnp.float32,
                    weights_name: str = WEIGHTS_NAME) -> tuple[AutoencoderKL, Any]:
  """Loads a diffusers-layout VAE directory -> ``(model, params)``.

  ``path`` holds ``config.json`` and ``weights_name`` (default
  ``diffusion_pytorch_model.safetensors``; pass e.g. ``diffusion_pytorch_model.fp16.safetensors``
  for a variant). ``dtype`` is the compute dtype; float16 becomes float32 when the config says
  ``force_upcast`` (bfloat16 is kept). ``params`` are float32 jax arrays, plain (not boxed), in
  the tree ``model.apply({"params": params}, ...)`` expects; ``model.config`` is the VAEConfig.
  No torch is needed.
  """
  if os.path.isfile(path):
    raise ValueError(f"{path} is a file; from_pretrained takes the directory that holds "
                     f"{CONFIG_NAME} and {weights_name}")
  config = load_config(path)
  file = os.path.join(path, weights_name)
  if not os.path.isfile(file):
    present = sorted(f for f in os.listdir(path)
                     if f.endswith((".safetensors", ".bin", ".index.json", ".ckpt", ".pt")))
    raise FileNotFoundError(f"no VAE weights: {file} not found"
                            + (f" (weight files present: {present}; pass weights_name=...)"
                               if present else ""))
  model = AutoencoderKL(config, dtype=_resolve_dtype(config, dtype))
  params = params_from_state_dict(model, _read_safetensors(file), source=file)
  return model, params


def save_pretrained(path: str, model_or_config, params) -> None:
  """Writes ``config.json`` and ``diffusion_pytorch_model.safetensors`` in diffusers' layout
  (float32, torch names and layouts); diffusers' ``AutoencoderKL.from_pretrained`` loads it."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  config = getattr(model_or_config, "config", model_or_config)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, CONFIG_NAME), "w") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True)
    f.write("\n")
  safetensors.numpy.save_file(state_dict_from_params(params), os.path.join(path, WEIGHTS_NAME),
                              metadata={"format": "pt"})
