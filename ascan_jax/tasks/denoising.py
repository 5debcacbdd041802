"""What the two denoising tasks (class-conditional ``diffusion`` and ``text_to_image``) share.

* ``space_to_depth`` / ``depth_to_space`` (pixel space seen by the UNet in patches) and
  ``decoder`` (a sampler's ``x0`` to uint8 images, through the VAE for latents);
* ``add_model_keys``, ``diffusion_schema``, ``set_optim``: the config keys of the UNet, of
  ``config.diffusion`` and the paper's optimizer (AdamW betas 0.9/0.99, weight decay 0.01,
  clipping 1.0, 1000 warm-up steps to a constant lr, EMA 0.9999; A.7 and §6.4 of our notes);
* ``check_config``: the checks of ``config.diffusion`` (betas, schedule, offset noise) and of
  the UNet's keys in ``config.model`` (layouts, widths against ``head_dim`` and ``norm_groups``);
  ``check_sampler``: ``config.sample``'s sampler, guidance kind and steps;
  ``pixel_width_warning``: in pixel space, a first level narrower than twice the input;
* ``noise_schedule(config)``: the ``NoiseSchedule`` of ``config.diffusion``;
* ``unet(config, channels, dtype, **overrides)``: the ``AsCANUNet`` of ``config.model`` for a
  ``channels``-deep input and output;
* the DDPM objective (arXiv 2411.04967 §A.7/§3.3.2), given the task's network
  ``net_fn(x_t, t)``, which predicts ``config.diffusion.prediction`` (``epsilon``, the paper's,
  or ``v``; ``diffusion.schedule``'s module docstring): ``train_loss`` (uniform timesteps,
  optional offset noise, the mean squared error against the prediction's target over the
  ``mask``-ed examples, and per tenth of the timesteps, ``train/loss_t<k>``); ``denoiser``
  turns ``net_fn`` into ``eps_fn(x_t, t) -> eps`` for the samplers and for ``eval_sums`` (the
  held-out *epsilon* loss whatever the prediction, so runs compare, at timesteps spread evenly
  over the batch, with fixed noise, as sums that add up over batches, devices and processes)
  and ``summarize_eval``.
"""
from __future__ import annotations

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from ascan_jax import config_validation as cv
from ascan_jax.diffusion import generate
from ascan_jax.diffusion import samplers
from ascan_jax.diffusion import schedule as schedule_lib
from ascan_jax.models import layout as layout_lib
from ascan_jax.models import unet as unet_lib


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
  """[B, H, W, C] -> [B, H/p, W/p, p*p*C] (each p x p patch becomes channels)."""
  if p == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
  """The inverse of ``space_to_depth``."""
  if p == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, p, p, c // (p * p)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, c // (p * p))


def decoder(patch: int = 1, vae=None):
  """``(fn(vae_params, x0) -> uint8 images, vae_params or None)`` of a sampler's ``x0``: pixel
  space, ``depth_to_space`` by ``patch``; latents, the ``(model, params)`` of
  ``models.vae.from_pretrained``."""
  if vae is None:
    return (lambda _, x0: generate.to_uint8(depth_to_space(x0, patch))), None
  from ascan_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  model, params = vae

  def decode(vae_params, z):
    return generate.to_uint8(vae_lib.decode(model, vae_params,
                                            vae_lib.from_model_latents(z, model.config)))
  return decode, params


def add_model_keys(m: ml_collections.ConfigDict, *, channels, down_layout: str,
                   context_dim: int) -> None:
  """The UNet's keys of ``config.model`` (the tasks add their conditioning's)."""
  m.channels = tuple(channels)
  m.down_layout = down_layout
  m.mid_layout = "CTC"
  m.up_layout = ""  # empty: mirrors down_layout.
  m.head_dim = 64
  m.expand_ratio = 4  # C blocks' 3x3 expansion (the paper's FusedMBConv: 4).
  m.context_dim = context_dim  # the width the cross-attention attends to.
  m.norm_groups = 32
  m.drop_path_rate = 0.0
  m.attention_impl = "auto"
  m.remat_policy = "none"
  m.dtype = "auto"


def diffusion_schema() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.num_train_steps = 1000
  d.beta_start = 0.00085
  d.beta_end = 0.01  # 0.01 at 256², 0.02 at 512² and above (paper).
  d.schedule = "scaled_linear"  # scaled_linear | linear
  d.prediction = "epsilon"  # epsilon (paper) | v: what the network predicts (see schedule.py).
  d.loss_on = "prediction"  # prediction: its own target | epsilon: the eps it implies.
  d.offset_noise = 0.0  # 0.05 in the text-to-image aspect-ratio stage (paper).
  # > 0: Min-SNR-gamma loss weights (Hang et al., arXiv 2303.09556), min(SNR_t, gamma) / SNR_t on
  # an eps error, / (SNR_t + 1) on a v error; 0: the paper's unweighted loss.
  d.min_snr_gamma = 0.0
  d.loss_buckets = 10  # train/loss_t<k>: the loss per tenth of the timesteps.
  return d


def set_optim(o: ml_collections.ConfigDict, lr: float) -> None:
  """The paper's optimizer (module docstring) at learning rate ``lr``."""
  o.schedule = "constant"  # the paper gives no decay.
  o.peak_lr = lr
  o.init_lr = 0.0
  o.end_lr = lr
  o.warmup_steps = 1000
  o.weight_decay = 0.01
  o.b1 = 0.9
  o.b2 = 0.99
  o.grad_clip_norm = 1.0
  o.ema_decay = 0.9999


def check_config(config) -> None:
  """``config.diffusion`` and the UNet keys of ``config.model`` (module docstring)."""
  m, d = config.model, config.diffusion
  cv.require(0.0 < d.beta_start < d.beta_end < 1.0, "diffusion.beta_end",
             f"need 0 < beta_start ({d.beta_start}) < beta_end ({d.beta_end}) < 1")
  cv.check_choice(config, "diffusion.schedule", schedule_lib.KINDS)
  cv.check_choice(config, "diffusion.prediction", schedule_lib.PREDICTIONS)
  cv.check_choice(config, "diffusion.loss_on", LOSS_ON)
  cv.require(d.offset_noise >= 0.0, "diffusion.offset_noise", "must be >= 0")
  cv.require(d.min_snr_gamma >= 0.0, "diffusion.min_snr_gamma", "must be >= 0 (0: unweighted)")
  try:
    down = layout_lib.parse_layout(m.down_layout, num_stages=len(m.channels))
    layout_lib.parse_layout(m.mid_layout)
    if m.up_layout:
      layout_lib.parse_layout(m.up_layout, num_stages=len(m.channels))
  except layout_lib.LayoutError as err:
    raise cv.ConfigError(f"config.model: {err}") from None
  for level, (stage, width) in enumerate(zip(down, m.channels)):
    if "T" in stage:
      cv.require(width % m.head_dim == 0, "model.channels",
                 f"level {level + 1} has T blocks and width {width}, not a multiple of "
                 f"head_dim {m.head_dim}")
    cv.require(width % m.norm_groups == 0, "model.norm_groups",
               f"{m.norm_groups} groups do not divide level {level + 1}'s width {width}")


def pixel_width_warning(config) -> str:
  """Pixel space (space-to-depth by ``data.patch``): a warning, logged and returned, when the
  UNet's first width is less than twice its input channels, else ``""``. The output passes
  GroupNorm and SiLU before its convolution, so a level about as wide as its input cannot
  carry the noise through (SiLU keeps about half of each channel). Measured on the
  text-to-image runlocal stage 1 (4x4x3 = 48 input channels, 2000 steps): 48 wide, the
  held-out loss stayed at 0.09 in every tenth of the timesteps (samples of pure noise); 96
  wide, 0.048 overall and 0.018 in the last tenth. A warning, not an error: such a network
  trains, only badly (the tests' toy networks do)."""
  m, data = config.model, config.data
  channels = data.patch * data.patch * data.channels
  if data.latent_dir or m.channels[0] >= 2 * channels:
    return ""
  warning = (f"config.model.channels: the first level is {m.channels[0]} wide, less than "
             f"twice the UNet's {channels} input channels (data.patch {data.patch}² x "
             f"data.channels {data.channels}); the output's GroupNorm + SiLU cannot pass the "
             "noise through and the model will learn slowly "
             "(tasks.denoising.pixel_width_warning)")
  logging.warning(warning)
  return warning


def check_sampler(s) -> None:
  """``config.sample``'s sampler, guidance kind and step count."""
  cv.require(s.sampler in samplers.SAMPLERS, "sample.sampler",
             f"{s.sampler!r} is not one of {sorted(samplers.SAMPLERS)}")
  cv.require(s.guidance in generate.GUIDANCE_KINDS, "sample.guidance",
             f"{s.guidance!r} is not one of {generate.GUIDANCE_KINDS}")
  cv.require(s.steps >= 1, "sample.steps", "must be >= 1")


def noise_schedule(config) -> schedule_lib.NoiseSchedule:
  d = config.diffusion
  return schedule_lib.NoiseSchedule(num_train_steps=d.num_train_steps, beta_start=d.beta_start,
                                    beta_end=d.beta_end, kind=d.schedule)


def unet(config, channels: int, dtype, **overrides) -> unet_lib.AsCANUNet:
  """The UNet of ``config.model`` with ``channels`` input and output channels."""
  m = config.model
  kwargs = dict(channels=tuple(m.channels), down_layout=m.down_layout,
                mid_layout=m.mid_layout, up_layout=m.up_layout or None,
                in_channels=channels, out_channels=channels, head_dim=m.head_dim,
                expand_ratio=m.expand_ratio, context_dim=m.context_dim,
                norm_groups=m.norm_groups, drop_path_rate=m.drop_path_rate,
                attention_impl=m.attention_impl, remat_policy=m.remat_policy, dtype=dtype)
  kwargs.update(overrides)
  return unet_lib.AsCANUNet(**kwargs)


def _per_tenth(schedule, t, per_example, mask, num_buckets: int):
  return schedule_lib.bucket_sums(t, per_example, num_buckets, schedule.num_train_steps,
                                  weights=mask)


LOSS_ON = ("prediction", "epsilon")


def denoiser(net_fn, schedule, prediction: str):
  """``eps_fn(x_t, t) -> eps`` of a network ``net_fn(x_t, t)`` that predicts ``prediction``."""
  if prediction == "epsilon":
    return net_fn
  return lambda x_t, t: schedule_lib.to_epsilon(schedule, prediction, net_fn(x_t, t), x_t, t)


def train_loss(net_fn, schedule, x0, mask, k_t, k_noise, *, offset_noise: float,
               loss_buckets: int, prediction: str = "epsilon", loss_on: str = "prediction",
               min_snr_gamma: float = 0.0):
  """``(loss, {"train/loss_t<k>": ...})``: the squared error of ``net_fn(x_t, t)`` against its
  target, the noise of ``x_t`` (``prediction="epsilon"``) or its ``v`` (``"v"``); with
  ``loss_on="epsilon"``, of the eps the output implies against the noise (for ``v``, the v
  error weighted by ``abar_t``). ``min_snr_gamma > 0`` weights each example's error by
  ``min(SNR_t, gamma) / SNR_t`` (an eps error) or ``/ (SNR_t + 1)`` (a v error), which gives
  every target the same Min-SNR weighting of the x0 error; the ``loss_t<k>`` stay unweighted."""
  if prediction not in schedule_lib.PREDICTIONS or loss_on not in LOSS_ON:
    raise ValueError(f"prediction {prediction!r} / loss_on {loss_on!r}: valid are "
                     f"{schedule_lib.PREDICTIONS} / {LOSS_ON}")
  t = schedule_lib.sample_timesteps(k_t, x0.shape[0], schedule.num_train_steps)
  noise = schedule_lib.sample_noise(k_noise, x0.shape, offset_noise)
  x_t = schedule_lib.q_sample(schedule, x0, t, noise)
  out = net_fn(x_t, t.astype(jnp.float32))
  on_v = prediction == "v" and loss_on == "prediction"
  if on_v:
    target = schedule_lib.v_target(schedule, x0, t, noise)
  else:
    out, target = schedule_lib.to_epsilon(schedule, prediction, out, x_t, t), noise
  per_example = schedule_lib.epsilon_loss(out, target)
  weighted = per_example
  if min_snr_gamma > 0:
    weighted = per_example * min_snr_weight(schedule, t, min_snr_gamma, on_v=on_v)
  loss = jnp.sum(weighted * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  sums, counts = _per_tenth(schedule, t, per_example, mask, loss_buckets)
  return loss, {f"train/loss_t{k}": jnp.where(counts[k] > 0,
                                              sums[k] / jnp.maximum(counts[k], 1.0), 0.0)
                for k in range(loss_buckets)}


def min_snr_weight(schedule, t: jax.Array, gamma: float, *, on_v: bool) -> jax.Array:
  """Min-SNR-gamma weight per example (``train_loss``): ``min(SNR, gamma) / SNR`` for an eps
  error, ``min(SNR, gamma) / (SNR + 1)`` for a v error (``schedule.snr``)."""
  snr = schedule_lib.snr(schedule, t)
  return jnp.minimum(snr, gamma) / (snr + 1.0 if on_v else snr)


def eval_sums(eps_fn, schedule, x0, mask, *, loss_buckets: int) -> dict:
  """Held-out sums (module docstring): ``loss``, ``count``, ``loss_t<k>_sum``/``_count``."""
  b = x0.shape[0]
  steps = schedule.num_train_steps
  t = jnp.floor((jnp.arange(b) + 0.5) * steps / b).astype(jnp.int32)
  noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(jax.random.key(1234), i),
                                               x0.shape[1:]))(jnp.arange(b))
  x_t = schedule_lib.q_sample(schedule, x0, t, noise)
  per_example = schedule_lib.epsilon_loss(eps_fn(x_t, t.astype(jnp.float32)), noise)
  sums, counts = _per_tenth(schedule, t, per_example, mask, loss_buckets)
  out = {"loss": jnp.sum(per_example * mask), "count": jnp.sum(mask)}
  for k in range(loss_buckets):
    out[f"loss_t{k}_sum"], out[f"loss_t{k}_count"] = sums[k], counts[k]
  return out


def summarize_eval(sums: dict, loss_buckets: int) -> dict:
  """``eval_sums`` added over the held-out set -> ``loss``, ``examples``, ``loss_t<k>``."""
  out = {"loss": sums["loss"] / max(sums["count"], 1.0), "examples": int(sums["count"])}
  for k in range(loss_buckets):
    out[f"loss_t{k}"] = sums[f"loss_t{k}_sum"] / max(sums[f"loss_t{k}_count"], 1.0)
  return out
