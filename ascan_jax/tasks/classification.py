"""Image classification with AsCAN: model, loss (label smoothing, mixup/cutmix), top-1/top-5.

Batches arrive as ``{'image': uint8[B,H,W,3], 'label': int32[B], 'mask': float32[B]}``; ``mask``
is 0 for padding (the last evaluation batch) and for records that could not be decoded, so those
examples count nowhere in the loss and the metrics. Mixup/cutmix and normalisation run on the
device.

Mixup and cutmix work in groups of ``augment.mix_group_size`` consecutive examples of the global
(micro-)batch: an example's partner is its mirror inside its group, and lambda, the choice of
mixup or cutmix and the cutmix box are drawn once per group (keyed by the group's index). A group
thus plays the part of one GPU's batch in timm's DDP training, where every process mixes its own
batch with its own draws. When the group size divides the per-device batch no image crosses
devices, and the mixed batch is the same on 1 device or 256. The partner is gathered in the
input dtype (uint8) and the mix is done on pixel values before normalising, which is the same
arithmetic as mixing normalised images (normalisation is affine per channel).

BatchNorm statistics: ``model.batch_norm`` (see ``ascan_jax.models.blocks``). The default is
``global``: under ``jit`` BatchNorm's statistics cover the whole global batch (SyncBN, as mmseg's
UperNet configs use), so a run gives the same numbers on any number of devices and processes
(and resumes on another count with the same losses); its cost is two small all-reduces per
BatchNorm layer forward and two in backward (``results/collectives``). The paper's timm recipe on
PyTorch DDP normalised per GPU unless ``--sync-bn`` was given: that is ``per_device``, whose
statistics then depend on the per-device batch (``batch_size / data-parallel devices /
microbatches``). Placeholder records (zero images with mask 0) still enter the training batch
statistics: they are rare (each one is logged and counted in ``data/skipped_records``), masking
them would thread the mask through every block of every model that uses these blocks, and with
``k`` placeholders in a batch of ``B`` the statistics move by about ``k / B`` of a channel's
mean; evaluation uses the running averages and is not affected by its padding.

GELU: ``model.gelu`` is ``exact`` (erf), PyTorch's and timm's ``nn.GELU`` default, which the
paper's timm-based models use; runs saved before the key existed computed the tanh approximation
and get ``tanh`` back when their config is read (``upgrade_config``), so their checkpoints
evaluate and resume as they were trained.
"""
from __future__ import annotations

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ascan_jax import compute
from ascan_jax import config_defaults
from ascan_jax import config_validation as cv
from ascan_jax.data import pipeline
from ascan_jax.data import sources
from ascan_jax.models import ascan
from ascan_jax.models import blocks
from ascan_jax.models import layout as layout_lib
from ascan_jax.tasks import base

MEAN_RGB = np.array([0.485, 0.456, 0.406], np.float32) * 255.0
STDDEV_RGB = np.array([0.229, 0.224, 0.225], np.float32) * 255.0


def normalize(images: jax.Array) -> jax.Array:
  return (images.astype(jnp.float32) - MEAN_RGB) / STDDEV_RGB


def _cutmix_box(key, size: int, lam):
  """A box covering about (1 - lam) of a size x size image: (mask [size, size], exact lam)."""
  ky, kx = jax.random.split(key)
  cut = jnp.sqrt(1.0 - lam)
  h = jnp.round(size * cut).astype(jnp.int32)
  cy = jax.random.randint(ky, (), 0, size)
  cx = jax.random.randint(kx, (), 0, size)
  y0, y1 = jnp.clip(cy - h // 2, 0, size), jnp.clip(cy + h - h // 2, 0, size)
  x0, x1 = jnp.clip(cx - h // 2, 0, size), jnp.clip(cx + h - h // 2, 0, size)
  ys = jnp.arange(size)[:, None]
  xs = jnp.arange(size)[None, :]
  box = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
  area = (y1 - y0) * (x1 - x0)
  return box, 1.0 - area / (size * size)


def _group_draws(key, size: int, aug):
  """One group's draws: (lam for targets and mixup, cutmix?, cutmix box [size, size])."""
  use_mixup = aug.mixup_alpha > 0
  use_cutmix = aug.cutmix_alpha > 0
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(key, 5)
  lam_mix = jax.random.beta(k_mix, max(aug.mixup_alpha, 1e-3), max(aug.mixup_alpha, 1e-3))
  lam_cut = jax.random.beta(k_cut, max(aug.cutmix_alpha, 1e-3), max(aug.cutmix_alpha, 1e-3))
  if use_mixup and use_cutmix:
    do_cut = jax.random.uniform(k_switch) < aug.cutmix_switch_prob
  else:
    do_cut = jnp.asarray(use_cutmix)
  box, lam_box = _cutmix_box(k_box, size, lam_cut)
  apply = jax.random.uniform(k_apply) < aug.mix_prob
  lam = jnp.where(apply, jnp.where(do_cut, lam_box, lam_mix), 1.0)
  return lam, do_cut & apply, box


def mix_batch(key, images, targets, mask, aug):
  """Mixup or cutmix within groups of ``aug.mix_group_size`` examples (module docstring).

  ``images``: ``[B, H, W, C]`` pixel values (uint8 or float); returns float32 mixed pixels (not
  normalised) and the mixed ``targets``. An example whose partner is padding or a broken record
  (``mask`` 0) is left unmixed."""
  use_mixup = aug.mixup_alpha > 0
  use_cutmix = aug.cutmix_alpha > 0
  if not (use_mixup or use_cutmix) or aug.mix_prob <= 0:
    return images.astype(jnp.float32), targets
  size = aug.mix_group_size
  b = images.shape[0]
  if size < 1 or b % size:
    raise ValueError(f"config.augment.mix_group_size={size} does not divide the (micro-)batch "
                     f"of {b} examples")
  groups = b // size
  grouped = lambda x: x.reshape((groups, size) + x.shape[1:])
  partner = lambda x: jnp.flip(x, 1)  # the mirror inside each group.
  g_images, g_targets, g_mask = grouped(images), grouped(targets), grouped(mask)
  # The draws are a few numbers per group: every device computes all of them (replicated), so
  # the beta sampler's rejection loops never wait on other devices.
  replicated = lambda x: nn.with_logical_constraint(x, (None,) * x.ndim)
  keys = replicated(jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(groups)))
  lam, do_cut, box = jax.tree.map(
      replicated, jax.vmap(lambda k: _group_draws(k, images.shape[1], aug))(keys))
  partner_ok = partner(g_mask) > 0  # [groups, size]: never mix with padding or a broken record.
  p_images = partner(g_images)  # gathered in the input dtype.
  per_example = jnp.where(partner_ok, lam[:, None], 1.0)
  w = per_example[..., None, None, None]
  mixed = w * g_images.astype(jnp.float32) + (1.0 - w) * p_images.astype(jnp.float32)
  cut_mask = box[:, None, :, :, None] & partner_ok[..., None, None, None]
  cut = jnp.where(cut_mask, p_images, g_images).astype(jnp.float32)
  out = jnp.where(do_cut[:, None, None, None, None], cut, mixed)
  t = per_example[..., None]
  out_targets = t * g_targets + (1.0 - t) * partner(g_targets)
  return out.reshape(images.shape), out_targets.reshape(targets.shape)


def default_config() -> ml_collections.ConfigDict:
  """The classification task's keys; values follow AsCAN-T's paper recipe (appendix A.2)."""
  c = config_defaults.base()
  c.task = "classification"
  c.batch_size = 4096
  c.eval_batch_size = 1024
  c.total_epochs = 300.0
  c.label_smoothing = 0.1

  c.model = ml_collections.ConfigDict()
  c.model.name = "ascan"
  c.model.layout = "C-CCCT-CCTT-CTTT"
  c.model.widths = (64, 128, 256, 512)
  c.model.stem_width = 64
  c.model.embed_dim = 1280
  c.model.head_dim = 32
  c.model.mlp_ratio = 4
  c.model.expand_ratio = 4
  c.model.se_ratio = 0.25
  c.model.drop_path_rate = 0.3
  c.model.head_dropout = 0.0
  c.model.bn_momentum = 0.9
  c.model.table_image_size = 224  # relative position tables are sized for this input size.
  c.model.attention_impl = "auto"  # auto | xla | cudnn | pallas
  c.model.remat_policy = "none"  # none | full | dots | dots_no_batch
  c.model.dtype = "auto"  # auto (bfloat16 on GPU/TPU, float32 on CPU) | float32 | bfloat16
  c.model.gelu = "exact"  # exact (erf: PyTorch/timm nn.GELU) | tanh (runs before this key).
  # BatchNorm batch statistics: global (over the global batch, SyncBN: device-count independent)
  # | per_device (each data-parallel shard, PyTorch DDP's default). See the module docstring.
  c.model.batch_norm = "global"

  c.data = ml_collections.ConfigDict()
  c.data.name = "imagenet2012"  # imagenet2012 | array_record | embedded_mnist | embedded_digits
  c.data.data_dir = ""  # tfds data_dir, or the folder written by tools.folder_to_array_record.
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.image_size = 224
  c.data.num_classes = 1000
  c.data.eval_crop_fraction = 0.875  # resize to size / fraction, then centre-crop (224 <- 256).
  c.data.shuffle = "index_shuffle"  # index_shuffle | permutation (see ascan_jax.data.order).
  c.data.worker_count = 0  # grain worker processes per host; 0 decodes in the main process.
  c.data.worker_buffer_size = 2
  c.data.holdout_fraction = 0.2  # embedded datasets only: share kept for evaluation.

  c.augment = ml_collections.ConfigDict()
  c.augment.random_resized_crop = True
  c.augment.crop_min_scale = 0.08
  c.augment.flip = True
  c.augment.randaugment_layers = 2
  c.augment.randaugment_magnitude = 15
  c.augment.color_jitter = 0.4
  c.augment.mixup_alpha = 0.8
  c.augment.cutmix_alpha = 1.0
  c.augment.mix_prob = 1.0
  c.augment.cutmix_switch_prob = 0.5
  # Mixup/cutmix partners and draws are per group of this many consecutive examples of the
  # global (micro-)batch, like one GPU's batch in timm's DDP training; a divisor of the
  # per-device batch keeps every pair on one device.
  c.augment.mix_group_size = 16

  c.evals.val = config_defaults.dataset_evaluator()  # eval/top1, eval/top5, eval/loss, ...
  c.checkpoint.best_metric = "eval/top1"
  pipeline.add_config_keys(c)  # loading (workers, threads, batching) and augmentation keys.
  return c


def check_backbone(config) -> None:
  """The AsCAN backbone's keys: layout, widths and heads, dtype/attention/remat names."""
  m = config.model
  try:
    stages = layout_lib.parse_layout(m.layout, num_stages=len(m.widths))
  except layout_lib.LayoutError as e:
    raise cv.ConfigError(f"config.model.layout: {e}") from None
  cv.check_model_common(config)
  for i, (stage, width) in enumerate(zip(stages, m.widths)):
    if "T" in stage:
      cv.require(width % m.head_dim == 0, "model.widths",
                 f"stage {i + 1} has T blocks and width {width}, not a multiple of head_dim "
                 f"{m.head_dim}")
  cv.require(m.table_image_size >= 16, "model.table_image_size", "must be at least 16")
  if "gelu" in m:
    cv.check_choice(config, "model.gelu", blocks.GELUS)
  if "batch_norm" in m:
    cv.check_choice(config, "model.batch_norm", blocks.BATCH_NORMS)


def mixing_enabled(aug) -> bool:
  return (aug.mixup_alpha > 0 or aug.cutmix_alpha > 0) and aug.mix_prob > 0


def check_mix_groups(config, num_devices: int, mode: str) -> None:
  """``augment.mix_group_size`` must tile the batches the train step mixes (the micro-batch in
  training, ``bench.train_batch_size`` in bench); a group size that does not divide the
  per-device micro-batch works (same result) but moves images between devices: a warning."""
  a = config.augment
  g = a.mix_group_size
  cv.require(g >= 1, "augment.mix_group_size", f"must be >= 1, got {g}")
  if not mixing_enabled(a):
    return
  if mode == "bench":
    b = config.bench.train_batch_size
    cv.require(b <= 0 or b % g == 0, "augment.mix_group_size",
               f"{g} does not divide bench.train_batch_size {b}")
    return
  micro = config.batch_size // config.microbatches
  cv.require(micro % g == 0, "augment.mix_group_size",
             f"{g} does not divide the micro-batch of {micro} examples (batch_size "
             f"{config.batch_size} / microbatches {config.microbatches})")
  per_device = micro // cv.data_parallel_size(config, num_devices)
  if per_device % g:
    logging.warning("config.augment.mix_group_size=%d does not divide the per-device micro-batch "
                    "of %d examples: mixup/cutmix pairs cross devices every step (same result, "
                    "more traffic); a divisor of %d avoids it", g, per_device, per_device)


@base.register
class Task(base.Task):
  """The classification task; see the module docstring."""
  name = "classification"
  default_metric = "eval/top1"

  @classmethod
  def default_config(cls):
    return default_config()

  @classmethod
  def validate(cls, config, *, num_devices, num_processes, mode):
    check_backbone(config)
    check_mix_groups(config, num_devices, mode)
    d = config.data
    cv.require(d.image_size >= 16, "data.image_size", "must be at least 16")
    cv.require(d.num_classes >= 2, "data.num_classes", "must be at least 2")
    cv.require(d.worker_count >= 0, "data.worker_count", "must be >= 0")
    cv.require(0.0 < d.holdout_fraction < 1.0, "data.holdout_fraction", "must be in (0, 1)")
    cv.check_choice(config, "data.shuffle", ("index_shuffle", "permutation"))
    cv.check_choice(config, "data.batching", pipeline.BATCHING)
    cv.require(d.worker_threads >= 1, "data.worker_threads", "must be >= 1")

  @classmethod
  def upgrade_config(cls, saved):
    model = saved.get("model", {})
    if "gelu" not in model:  # runs saved before model.gelu existed used the tanh approximation.
      model = {**model, "gelu": "tanh"}
      saved = {**saved, "model": model}
    if "table_image_size" not in model and "image_size" in saved.get("data", {}):
      # Before model.table_image_size existed, the tables were sized for data.image_size.
      saved = {**saved, "model": {**model, "table_image_size": saved["data"]["image_size"]}}
    return saved

  def __init__(self, config):
    super().__init__(config)
    self.dtype = compute.compute_dtype(config.model.dtype)
    self.model = self.build_model()
    self._sources = {}

  def parameter_layer(self):
    return ascan.parameter_layer_fn(self.config.model.layout)

  # ---- data --------------------------------------------------------------------------------
  def source(self, split: str):
    if split not in self._sources:
      self._sources[split] = sources.get_source(self.config.data, split)
    return self._sources[split]

  def num_train_examples(self) -> int:
    return len(self.source(self.config.data.train_split))

  def train_batches(self, sharding, total_steps: int, start_step: int = 0):
    codec = pipeline.ImageCodec.from_config(self.config)
    return pipeline.train_dataset(self.source(self.config.data.train_split), codec, self.config,
                                  sharding, total_steps, start_step)

  def eval_batches(self, sharding, split: str):
    codec = pipeline.ImageCodec.from_config(self.config)
    return pipeline.eval_dataset(self.source(split), codec, self.config, sharding)

  # ---- model -------------------------------------------------------------------------------
  def build_model(self, **overrides) -> nn.Module:
    m = self.config.model
    kwargs = dict(layout=m.layout, widths=tuple(m.widths), stem_width=m.stem_width,
                  num_classes=self.config.data.num_classes, embed_dim=m.embed_dim,
                  head_dim=m.head_dim, mlp_ratio=m.mlp_ratio, expand_ratio=m.expand_ratio,
                  se_ratio=m.se_ratio, drop_path_rate=m.drop_path_rate,
                  head_dropout=m.head_dropout, bn_momentum=m.bn_momentum,
                  table_image_size=m.table_image_size,
                  attention_impl=m.attention_impl, remat_policy=m.remat_policy, dtype=self.dtype,
                  gelu=m.gelu, batch_norm=m.batch_norm)
    kwargs.update(overrides)
    return ascan.AsCAN(**kwargs)

  def input_spec(self, batch_size: int, train: bool = True) -> dict:
    s = self.config.data.image_size
    return {"image": jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.uint8),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
            "mask": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}

  def synthetic_batch(self, batch_size: int, key) -> dict:
    s = self.config.data.image_size
    k1, k2 = jax.random.split(key)
    return {"image": jax.random.randint(k1, (batch_size, s, s, 3), 0, 256).astype(jnp.uint8),
            "label": jax.random.randint(k2, (batch_size,), 0, self.config.data.num_classes),
            "mask": jnp.ones((batch_size,), jnp.float32)}

  def init_variables(self, key, model=None):
    s = self.config.data.image_size
    return (model or self.model).init({"params": key, "dropout": key},
                                      jnp.zeros((1, s, s, 3), jnp.float32), train=False)

  def forward(self, variables, batch, model=None):
    """Inference logits of a batch (used by eval, summary and bench)."""
    model = model or self.model
    return model.apply(variables, normalize(batch["image"]), train=False)

  # ---- training ----------------------------------------------------------------------------
  def loss_fn(self, params, model_state, batch, key):
    cfg = self.config
    k_mix, k_drop = jax.random.split(key)
    mask = batch["mask"]
    targets = jax.nn.one_hot(batch["label"], cfg.data.num_classes)
    images, targets = mix_batch(k_mix, batch["image"], targets, mask, cfg.augment)
    images = normalize(images)
    eps = cfg.label_smoothing
    targets = targets * (1.0 - eps) + eps / cfg.data.num_classes
    logits, new_state = self.model.apply({"params": params, **model_state}, images, train=True,
                                         rngs={"dropout": k_drop}, mutable=list(model_state))
    logits = logits.astype(jnp.float32)
    per_example = -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)
    denom = jnp.maximum(jnp.sum(mask), 1.0)
    loss = jnp.sum(per_example * mask) / denom
    accuracy = jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask) / denom
    return loss, (new_state, {"train/accuracy": accuracy})

  # ---- evaluation --------------------------------------------------------------------------
  def eval_fn(self, params, model_state, batch) -> dict:
    """Sums over the batch (masked), so batches and processes add up exactly."""
    logits = self.forward({"params": params, **model_state}, batch).astype(jnp.float32)
    mask = batch["mask"]
    label = batch["label"]
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), label[:, None], -1)[:, 0]
    return {"correct1": jnp.sum((top5[:, 0] == label) * mask),
            "correct5": jnp.sum(jnp.any(top5 == label[:, None], -1) * mask),
            "loss": jnp.sum(loss * mask),
            "count": jnp.sum(mask)}

  def summarize_eval(self, sums: dict) -> dict:
    n = max(float(sums["count"]), 1.0)
    return {"top1": float(sums["correct1"]) / n, "top5": float(sums["correct5"]) / n,
            "loss": float(sums["loss"]) / n, "examples": int(sums["count"])}
