"""Semantic segmentation with UperNet on an AsCAN backbone (arXiv 2411.04967, appendix A.3).

Model: ``models.upernet.SegmentationModel``: ``AsCAN(features_only=True)`` (stochastic depth as in
ImageNet training) feeding UperNet with the stages of ``model.feature_stages`` (the paper: S2,
S3, S4) and an auxiliary FCN head on ``model.aux_stage`` (0: none). Parameters live under
``backbone/``, ``decode_head/`` and ``auxiliary_head/``, so a classifier's checkpoint starts the
backbone through ``config.init_from`` (rename ``^`` -> ``backbone/``, exclude the classifier's
``head_conv|head_bn|classifier``; relative-position tables resized, BatchNorm statistics
loaded). ``backbone_pretrain`` names the classification run that writes that checkpoint; with
``train_if_missing`` it is a prerequisite, trained first when it is not there (``:runlocal``).

Loss: pixel cross-entropy with the ignore label 255 plus 0.4 x the auxiliary head's
(``models.segmentation_loss``). ``loss.normalize="all"`` divides by every pixel of the batch,
ignored ones included, which is what mmseg's ``CrossEntropyLoss`` does by default
(``avg_non_ignore=False``) and so what the published UperNet numbers and their learning rates
were tuned with; ``"valid"`` averages over labelled pixels only.

Data (``data.name``): ``ade20k``, the ArrayRecord shards of ``tools.ade20k_to_array_record`` in
``data.data_dir`` (labels already reduced: 0..149, 255 ignored); ``scene_parse150``, tfds's
dataset of that name in ``data.data_dir`` through ``tfds.data_source`` (its annotations are the
instance maps, so only the 100 object classes are labelled: ``data.accept_instance_annotations``
must say that is wanted, see ``data.ade20k``); or ``embedded_digit_scenes``,
the captioned MNIST scenes of ``data.digit_scenes`` (11 classes: background and the ten digits;
nothing to download). Training applies mmseg's ADE20K pipeline to image and labels jointly
(``data.segmentation_transforms``: random rescale of ``data.scale`` by ``data.ratio_range``,
``data.crop_size`` crop with ``cat_max_ratio``, flip, photometric distortion, padding with
``data.pad_value``); normalisation runs on the device.

Evaluation (``config.evals``):
* ``dataset``: the fast in-training evaluator. Every validation image and its labels are fitted
  into one fixed ``data.eval_size`` canvas (aspect kept, padding ignored), so one compiled shape
  serves all; ``eval_fn`` returns the int32 confusion matrix, which the ``DatasetEvaluator`` sums
  exactly over batches, devices and processes (padding examples masked). Reported: ``mIoU``,
  ``mAcc``, ``aAcc`` and ``pixels``; the per-class IoU/Acc table goes to
  ``DIR/eval/<name>/per_class_step<N>.md`` (``tasks.segmentation_evaluators``). Because labels
  are resampled onto the canvas, this approximates the benchmark protocol.
* ``segmentation_inference``: the benchmark protocol at each image's original resolution (test
  resize ``data.test_scale``; whole-image, sliding-window, multi-scale + flip), see
  ``tasks.segmentation_evaluators``.
``--mode=sample`` draws image | ground truth | prediction rows of held-out images into a PNG.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ascan_jax import compute
from ascan_jax import config_defaults
from ascan_jax import config_validation as cv
from ascan_jax.data import ade20k
from ascan_jax.data import digit_scenes
from ascan_jax.data import pipeline
from ascan_jax.data import pp
from ascan_jax.data import segmentation_transforms as seg_ops
from ascan_jax.eval import segmentation_metrics
from ascan_jax.models import ascan
from ascan_jax.models import segmentation_loss
from ascan_jax.models import upernet
from ascan_jax.tasks import base
from ascan_jax.tasks import classification
from ascan_jax.tasks import segmentation_evaluators as seg_evaluators

DATASETS = ("ade20k", "scene_parse150", "embedded_digit_scenes")
IGNORE_INDEX = 255
# mmseg pads the normalised image with 0, i.e. with the mean colour (rounded ImageNet mean).
MEAN_PAD = (124, 116, 104)


def default_config() -> ml_collections.ConfigDict:
  """UperNet-AsCAN-T on ADE20K with the paper's recipe (appendix A.3); see the configs."""
  c = config_defaults.base()
  c.task = "segmentation"
  c.batch_size = 16
  c.eval_batch_size = 16
  c.total_epochs = 0.0
  c.total_steps = 160000

  c.model = ml_collections.ConfigDict()
  c.model.name = "ascan_upernet"
  # The backbone: the classification task's model keys (features_only, so no embed_dim).
  c.model.layout = "C-CCCT-CCTT-CTTT"
  c.model.widths = (64, 128, 256, 512)
  c.model.stem_width = 64
  c.model.head_dim = 32
  c.model.mlp_ratio = 4
  c.model.expand_ratio = 4
  c.model.se_ratio = 0.25
  c.model.drop_path_rate = 0.3  # stochastic depth as in ImageNet training (T / B / L).
  c.model.bn_momentum = 0.9
  c.model.table_image_size = 512  # relative position tables sized for 512x512 inputs.
  c.model.attention_impl = "auto"
  c.model.remat_policy = "none"
  c.model.dtype = "auto"
  c.model.gelu = "exact"  # as the classifier whose checkpoint starts the backbone.
  c.model.batch_norm = "global"  # backbone and heads: global (SyncBN) | per_device.
  # The decode heads (mmseg's UperNet configs).
  c.model.feature_stages = (2, 3, 4)  # 1-based backbone stages fed to UperNet (paper: S2-S4).
  c.model.aux_stage = 3  # the auxiliary FCN head's stage; 0: no auxiliary head.
  c.model.channels = 512
  c.model.aux_channels = 256
  c.model.dropout = 0.1
  c.model.pool_scales = (1, 2, 3, 6)

  c.loss = ml_collections.ConfigDict()
  c.loss.aux_weight = 0.4
  c.loss.normalize = "all"  # all (mmseg's default) | valid; see the module docstring.

  c.data = ml_collections.ConfigDict()
  c.data.name = "ade20k"  # ade20k | scene_parse150 | embedded_digit_scenes
  c.data.data_dir = ""  # ade20k: the folder written by tools.ade20k_to_array_record; or tfds's.
  # scene_parse150 (tfds) holds instance annotations only (see data.ade20k): opt in to train on
  # its object labels; it is not the ADE20K benchmark.
  c.data.accept_instance_annotations = False
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.num_classes = 150
  c.data.crop_size = (512, 512)  # training crop (H, W).
  c.data.scale = (2048, 512)  # random rescale target (long, short) ...
  c.data.ratio_range = (0.5, 2.0)  # ... times a ratio drawn from this range.
  c.data.cat_max_ratio = 0.75  # redraw crops where one class covers this much (1: never).
  c.data.flip = True
  c.data.photometric = True
  c.data.pad_value = MEAN_PAD  # image padding colour; padded labels are ignored.
  c.data.eval_size = (512, 512)  # the in-training evaluator's canvas (H, W); also summary's.
  c.data.test_scale = (2048, 512)  # (long, short) test resize of the exact evaluators.
  c.data.scene_size = 64  # embedded_digit_scenes: square scenes of this side ...
  c.data.train_scenes = 20000  # ... this many training scenes (rendered on the fly) ...
  c.data.eval_scenes = 500  # ... and held-out scenes (held-out MNIST digits).
  c.data.scene_seed = 0
  c.data.holdout_fraction = 0.2
  c.data.shuffle = "index_shuffle"
  c.data.worker_count = 0
  c.data.worker_buffer_size = 2

  # The classification run whose checkpoint init_from loads (prerequisite when missing).
  c.backbone_pretrain = ml_collections.ConfigDict()
  c.backbone_pretrain.config = ""  # e.g. configs/ascan_t.py:runlocal
  c.backbone_pretrain.train_if_missing = False  # train it in init_from.workdir first.

  c.sample = ml_collections.ConfigDict()
  c.sample.num_images = 8  # --mode=sample: held-out images drawn (image | truth | prediction).
  c.sample.split = ""  # empty: data.eval_split.
  c.sample.zoom = 1  # nearest-neighbour enlargement of each picture.
  c.sample.ema = False

  c.evals.val = config_defaults.dataset_evaluator()  # eval/mIoU, eval/mAcc, eval/aAcc
  c.evals.val.every_steps = 16000  # mmseg: every 16K of the 160K iterations.
  c.evals.val.params = "raw"  # the recipe has no EMA.

  c.optim.schedule = "poly"
  c.optim.peak_lr = 1e-4
  c.optim.init_lr = 1e-10  # mmseg: LinearLR from 1e-6 x the peak ...
  c.optim.warmup_steps = 1500  # ... over 1500 iterations ...
  c.optim.end_lr = 0.0  # ... then PolyLR(power 1.0, eta_min 0).
  c.optim.poly_power = 1.0
  c.optim.weight_decay = 0.05
  c.optim.grad_clip_norm = 0.0  # mmseg's UperNet recipes do not clip.
  c.optim.ema_decay = 0.0
  c.checkpoint.every_steps = 16000
  c.checkpoint.best_metric = "eval/mIoU"
  c.bench.batch_sizes = (1, 16)
  c.bench.train_batch_size = 16
  c.summary.memory_batch_size = 2  # per device of the paper's batch 16 on 8 GPUs.
  return c


def check_config(config) -> None:
  """Values of the segmentation task that cannot work."""
  classification.check_backbone(config)
  m, d = config.model, config.data
  num_stages = len(m.widths)
  stages = tuple(m.feature_stages)
  cv.require(bool(stages) and list(stages) == sorted(set(stages)) and stages[0] >= 1
             and stages[-1] <= num_stages, "model.feature_stages",
             f"{stages} must be increasing 1-based stage numbers of the backbone's "
             f"{num_stages} stages")
  cv.require(0 <= m.aux_stage <= num_stages, "model.aux_stage",
             f"{m.aux_stage} is not 0 (none) or a stage 1..{num_stages}")
  cv.require(m.channels >= 1 and m.aux_channels >= 1, "model.channels", "must be positive")
  cv.require(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
  cv.require(len(m.pool_scales) >= 1 and all(p >= 1 for p in m.pool_scales),
             "model.pool_scales", f"{tuple(m.pool_scales)} must be positive bin counts")
  cv.check_choice(config, "loss.normalize", segmentation_loss.NORMALIZATIONS)
  cv.require(config.loss.aux_weight >= 0, "loss.aux_weight", "must be >= 0")
  cv.check_choice(config, "data.name", DATASETS)
  cv.require(2 <= d.num_classes < IGNORE_INDEX, "data.num_classes",
             f"must be in [2, {IGNORE_INDEX}) (label {IGNORE_INDEX} is the ignore label)")
  for key in ("crop_size", "eval_size", "scale", "test_scale"):
    value = tuple(d[key])
    cv.require(len(value) == 2 and min(value) >= 16, f"data.{key}",
               f"{value} must be two sizes of at least 16 pixels")
  lo, hi = tuple(d.ratio_range)
  cv.require(0.0 < lo <= hi, "data.ratio_range", f"({lo}, {hi}) needs 0 < low <= high")
  cv.require(0.0 < d.cat_max_ratio <= 1.0, "data.cat_max_ratio", "must be in (0, 1]")
  cv.require(len(tuple(d.pad_value)) == 3, "data.pad_value", "must be an RGB triple")
  if d.name in ("ade20k", "scene_parse150"):
    cv.require(d.num_classes == ade20k.NUM_CLASSES, "data.num_classes",
               f"ADE20K has {ade20k.NUM_CLASSES} classes, not {d.num_classes}")
  else:
    cv.require(d.num_classes == len(digit_scenes.CLASS_NAMES), "data.num_classes",
               f"digit scenes have {len(digit_scenes.CLASS_NAMES)} classes (background and "
               f"ten digits), not {d.num_classes}")
    cv.require(d.scene_size >= digit_scenes.MIN_SIDE, "data.scene_size",
               f"must be at least {digit_scenes.MIN_SIDE}")
    cv.require(d.train_scenes >= 1 and d.eval_scenes >= 1, "data.train_scenes",
               "train_scenes and eval_scenes must be positive")
    cv.require(0.0 < d.holdout_fraction < 1.0, "data.holdout_fraction", "must be in (0, 1)")
  cv.require(d.worker_count >= 0, "data.worker_count", "must be >= 0")
  cv.check_choice(config, "data.shuffle", ("index_shuffle", "permutation"))
  cv.require(config.sample.num_images >= 1 and config.sample.zoom >= 1, "sample.num_images",
             "sample.num_images and sample.zoom must be >= 1")
  p = config.backbone_pretrain
  if p.train_if_missing:
    cv.require(bool(p.config), "backbone_pretrain.config",
               "train_if_missing needs the classification run's config file "
               "(e.g. configs/ascan_t.py:runlocal)")
    cv.require(bool(config.init_from.workdir), "init_from.workdir",
               "backbone_pretrain.train_if_missing trains the classifier there: set it")
  for name in config.evals.keys():
    if config.evals[name].type == seg_evaluators.INFERENCE_TYPE:
      seg_evaluators.check_inference_config(config.evals[name], f"evals.{name}")


def to_label_map(segmentation) -> jax.Array:
  return jnp.asarray(segmentation).astype(jnp.int32)


@base.register
class Task(base.Task):
  """The segmentation task; see the module docstring."""
  name = "segmentation"
  default_metric = "eval/mIoU"

  @classmethod
  def default_config(cls):
    return default_config()

  @classmethod
  def validate(cls, config, *, num_devices, num_processes, mode):
    check_config(config)

  @classmethod
  def evaluator_schemas(cls):
    return {"dataset": config_defaults.dataset_evaluator,
            seg_evaluators.INFERENCE_TYPE: seg_evaluators.inference_evaluator_schema}

  def __init__(self, config):
    super().__init__(config)
    self.dtype = compute.compute_dtype(config.model.dtype)
    self.num_classes = int(config.data.num_classes)
    self.model = self.build_model()
    self._sources = {}

  def parameter_layer(self):
    return ascan.parameter_layer_fn(self.config.model.layout)

  # ---- model -------------------------------------------------------------------------------
  def build_model(self, **overrides) -> nn.Module:
    m = self.config.model
    backbone = dict(layout=m.layout, widths=tuple(m.widths), stem_width=m.stem_width,
                    num_classes=self.num_classes, head_dim=m.head_dim, mlp_ratio=m.mlp_ratio,
                    expand_ratio=m.expand_ratio, se_ratio=m.se_ratio,
                    drop_path_rate=m.drop_path_rate, bn_momentum=m.bn_momentum,
                    table_image_size=m.table_image_size, features_only=True,
                    attention_impl=m.attention_impl, remat_policy=m.remat_policy,
                    gelu=m.gelu, batch_norm=m.batch_norm, dtype=self.dtype)
    backbone.update(overrides)
    return upernet.SegmentationModel(
        backbone=ascan.AsCAN(**backbone), num_classes=self.num_classes,
        feature_stages=tuple(m.feature_stages), aux_stage=m.aux_stage or None,
        channels=m.channels, aux_channels=m.aux_channels, dropout=m.dropout,
        pool_scales=tuple(m.pool_scales), bn_momentum=m.bn_momentum,
        batch_norm=m.batch_norm, dtype=backbone["dtype"])

  def init_variables(self, key, model=None):
    h, w = self.config.data.crop_size
    return (model or self.model).init({"params": key, "dropout": key},
                                      jnp.zeros((1, h, w, 3), jnp.float32), train=False)

  def forward(self, variables, batch, model=None):
    """Inference logits ``[B, H, W, K]`` float32 at the input resolution (eval, summary, bench);
    ``batch['image']`` holds pixel values 0..255 (uint8 or float)."""
    model = model or self.model
    logits, _ = model.apply(variables, classification.normalize(batch["image"]), train=False,
                            with_aux=False)
    return logits

  # ---- data --------------------------------------------------------------------------------
  def source(self, split: str):
    if split not in self._sources:
      d = self.config.data
      if d.name == "ade20k":
        src = ade20k.ADE20KArrayRecordSource(d.data_dir, split)
      elif d.name == "scene_parse150":
        src = ade20k.ADE20KTfdsSource(split, d.data_dir, d.accept_instance_annotations)
      else:
        train = split == d.train_split
        src = digit_scenes.DigitScenesSource(
            "train" if train else split, height=d.scene_size, width=d.scene_size,
            num_examples=d.train_scenes if train else d.eval_scenes, seed=d.scene_seed,
            holdout_fraction=d.holdout_fraction)
      if src.num_classes != self.num_classes:
        raise ValueError(f"config.data.num_classes={self.num_classes}, but {src.description} "
                         f"has {src.num_classes} classes")
      self._sources[split] = src
    return self._sources[split]

  def class_names(self) -> tuple[str, ...]:
    if self.config.data.name in ("ade20k", "scene_parse150"):
      return ade20k.CLASS_NAMES
    return digit_scenes.CLASS_NAMES

  def num_train_examples(self) -> int:
    return len(self.source(self.config.data.train_split))

  def train_codec(self) -> pp.Preprocess:
    d = self.config.data
    crop = tuple(d.crop_size)
    ops = [pp.Select(("image", "segmentation"))]
    if tuple(d.ratio_range) != (1.0, 1.0):
      ops.append(seg_ops.random_rescale(tuple(d.scale), tuple(d.ratio_range)))
    ops.append(seg_ops.random_crop(crop, d.cat_max_ratio, IGNORE_INDEX))
    if d.flip:
      ops.append(seg_ops.random_flip(0.5))
    if d.photometric:
      ops.append(seg_ops.photometric_distortion())
    ops += [seg_ops.pad(crop, tuple(d.pad_value), IGNORE_INDEX),
            pp.Cast({"image": np.uint8, "segmentation": np.uint8})]
    return pp.Preprocess(ops, [], _placeholder(crop))

  def eval_codec(self) -> pp.Preprocess:
    d = self.config.data
    size = tuple(d.eval_size)
    ops = [pp.Select(("image", "segmentation")),
           seg_ops.fit_and_pad(size, tuple(d.pad_value), IGNORE_INDEX),
           pp.Cast({"image": np.uint8, "segmentation": np.uint8})]
    return pp.Preprocess([], ops, _placeholder(size))

  def train_batches(self, sharding, total_steps: int, start_step: int = 0):
    return pipeline.train_dataset(self.source(self.config.data.train_split), self.train_codec(),
                                  self.config, sharding, total_steps, start_step)

  def eval_batches(self, sharding, split: str):
    return pipeline.eval_dataset(self.source(split), self.eval_codec(), self.config, sharding)

  def input_spec(self, batch_size: int, train: bool = True) -> dict:
    d = self.config.data
    h, w = d.crop_size if train else d.eval_size
    return {"image": jax.ShapeDtypeStruct((batch_size, h, w, 3), jnp.uint8),
            "segmentation": jax.ShapeDtypeStruct((batch_size, h, w), jnp.uint8),
            "mask": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}

  def synthetic_batch(self, batch_size: int, key) -> dict:
    h, w = self.config.data.crop_size
    k1, k2 = jax.random.split(key)
    return {"image": jax.random.randint(k1, (batch_size, h, w, 3), 0, 256).astype(jnp.uint8),
            "segmentation": jax.random.randint(k2, (batch_size, h, w), 0,
                                               self.num_classes).astype(jnp.uint8),
            "mask": jnp.ones((batch_size,), jnp.float32)}

  # ---- training ----------------------------------------------------------------------------
  def loss_fn(self, params, model_state, batch, key):
    cfg = self.config
    (logits, aux), new_state = self.model.apply(
        {"params": params, **model_state}, classification.normalize(batch["image"]),
        train=True, rngs={"dropout": key}, mutable=list(model_state))
    loss, accuracy = segmentation_loss.segmentation_loss(
        logits, to_label_map(batch["segmentation"]), aux, aux_weight=cfg.loss.aux_weight,
        ignore_index=IGNORE_INDEX, mask=batch["mask"], normalize=cfg.loss.normalize)
    return loss, (new_state, {"train/pixel_accuracy": accuracy})

  # ---- evaluation --------------------------------------------------------------------------
  def eval_fn(self, params, model_state, batch) -> dict:
    """The int32 confusion matrix of the batch (padding examples and ignored pixels left out)."""
    logits = self.forward({"params": params, **model_state}, batch)
    pred = jnp.argmax(logits, axis=-1)
    return {"confusion": segmentation_metrics.confusion_matrix(
        pred, to_label_map(batch["segmentation"]), self.num_classes, IGNORE_INDEX,
        mask=batch["mask"])}

  def summarize_eval(self, sums: dict) -> dict:
    """mIoU, mAcc, aAcc, the pixel count, and the confusion matrix itself (an array that the
    evaluator wrapper turns into the per-class table and takes out of the logged metrics)."""
    return seg_evaluators.summarize_confusion(sums["confusion"])

  def make_evaluators(self, setup) -> dict:
    return seg_evaluators.build(self, setup)

  # ---- prerequisites and pictures ----------------------------------------------------------
  def prerequisites(self, workdir: str | None = None):
    """The classification run that initialises the backbone, when it has not finished yet."""
    del workdir  # its runs have their own workdirs in the config.
    p = self.config.backbone_pretrain
    if not p.train_if_missing:
      return []
    from ascan_jax.tasks import diffusion  # pylint: disable=g-import-not-at-top
    from ascan_jax.tasks import judge  # pylint: disable=g-import-not-at-top
    pretrain_config = diffusion.load_config_file(p.config)
    if judge.is_trained(pretrain_config, self.config.init_from.workdir):
      return []
    return [(pretrain_config, self.config.init_from.workdir)]

  def sample(self, context, workdir: str) -> dict:
    return seg_evaluators.example_picture(self, context, workdir)


def _placeholder(size) -> dict:
  h, w = size
  return {"image": np.zeros((h, w, 3), np.uint8),
          "segmentation": np.full((h, w), IGNORE_INDEX, np.uint8)}
