"""The ADE20K UperNet recipe shared by ``ade20k_upernet_ascan_{t,b,l}.py``, and ``runlocal``.

Paper (arXiv 2411.04967, appendix A.3): UperNet on backbone stages S2-S4, initialised from the
ImageNet-1K 224 classifiers, AdamW lr 1e-4, weight decay 0.05, stochastic depth as in ImageNet
training (0.3 / 0.4 / 0.5), 160K iterations at batch 16 on 8 GPUs, 512x512 crops, schedule "as
FasterViT". Not given, taken from mmsegmentation's UperNet recipes (Swin, FasterViT's fork):
betas (0.9, 0.999); 1500 linear warm-up iterations from 1e-6 x the peak, then poly decay with
power 1.0 to 0; no gradient clipping and no EMA; SyncBN (BatchNorm over the global batch); the
ADE20K pipeline (rescale 0.5-2.0 of 2048x512, 512 crop with cat_max_ratio 0.75, flip,
photometric distortion, mean-colour padding); auxiliary FCN head on S3 with weight 0.4;
cross-entropy divided by all pixels (mmseg's avg_non_ignore=False); evaluation every 16K
iterations. Swin's recipe sets weight-decay multipliers of 0 for norms and position tables and
no learning-rate multipliers; our AdamW already leaves norms, biases and position tables
undecayed, so ``optim.groups`` stays empty and ``optim.layer_decay`` 1.

Evaluators: ``val`` (every 16K, the fixed 512x512 canvas, an approximation), ``ss`` (at the end:
whole-image single-scale at the original resolution, the benchmark number) and ``ms`` (at the
end: multi-scale 0.5-1.75 plus flip).

``:runlocal`` segments 96x96 digit scenes (``data.digit_scenes``: background and ten digits) on
a 2-core CPU, the backbone initialised from the classification ``configs/ascan_t.py:runlocal``
checkpoint, which is trained first when it is not cached in
``$ASCAN_CACHE/classifiers/embedded_mnist32_ascan_t_runlocal`` (default ``~/.cache/ascan_jax``).
"""
import os

from ascan_jax import config_defaults
from ascan_jax.models import variants
from ascan_jax.tasks import segmentation
from ascan_jax.tasks import segmentation_evaluators

# The classification runs whose EMA weights start the backbone (ImageNet-1K at 224).
CLASSIFIER_EXCLUDE = r"^(head_conv|head_bn|classifier)/"


def cache_dir(*parts: str) -> str:
  base = os.environ.get("ASCAN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                       "ascan_jax")
  return os.path.join(base, *parts)


def get_config(variant: str, arg: str | None = None):
  args = config_defaults.parse_arg(arg, runlocal=False, classifier="")
  c = segmentation.default_config()
  backbone = {k: v for k, v in variants.VARIANTS[variant].items() if k != "embed_dim"}
  c.model.update(backbone)
  c.model.table_image_size = 512
  c.data.name = "ade20k"
  c.data.data_dir = "ade20k"  # python -m ascan_jax.tools.ade20k_to_array_record --output=...
  c.data.worker_count = 8
  c.batch_size = 16
  c.total_steps = 160000
  # Backbone from the ImageNet classifier (pass its workdir: ':classifier=DIR').
  c.init_from.workdir = args.classifier
  c.init_from.rename = (("^", "backbone/"),)
  c.init_from.exclude = CLASSIFIER_EXCLUDE
  c.evals.val.every_steps = 16000
  c.evals.ss = segmentation_evaluators.inference_evaluator_schema()
  c.evals.ss.every_steps = 160000
  c.evals.ms = segmentation_evaluators.inference_evaluator_schema()
  c.evals.ms.every_steps = 160000
  c.evals.ms.prefix = "eval_ms/"
  c.evals.ms.scales = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
  c.evals.ms.flip = True
  if args.runlocal:
    _runlocal(c)
  return c


def _runlocal(c):
  """Digit scenes on a 2-core CPU (see the README for the measured run)."""
  # The classification runlocal's backbone (configs/classification_common.py), tables for 96.
  c.model.layout = "C-CCCT-CCTT-CTTT"
  c.model.widths = (32, 64, 128, 256)
  c.model.stem_width = 32
  c.model.head_dim = 32
  c.model.drop_path_rate = 0.0  # 700 steps: no regularisation (the recipe's 0.3 is for 160K).
  c.model.dropout = 0.0
  c.model.dtype = "float32"
  c.model.table_image_size = 96
  # Thin digit strokes need the finest stage too: the ground-truth masks of these scenes, averaged
  # to stride 8 (4) and upsampled bilinearly, score only mIoU 0.51 (0.86). A 32-channel head: at
  # stride 4 the head's 3x3 convolutions cost as much as the backbone.
  c.model.feature_stages = (1, 2, 3, 4)
  c.model.aux_stage = 3
  c.model.channels = 32
  c.model.aux_channels = 32
  c.data.name = "embedded_digit_scenes"
  c.data.num_classes = 11
  c.data.scene_size = 96
  c.data.train_scenes = 20000
  c.data.eval_scenes = 500
  c.data.crop_size = (96, 96)
  c.data.eval_size = (96, 96)
  c.data.scale = (384, 96)
  c.data.ratio_range = (1.0, 1.0)
  c.data.cat_max_ratio = 1.0  # scenes are mostly background: never redraw.
  c.data.flip = False  # mirrored digits are other digits.
  c.data.photometric = False
  c.data.test_scale = (384, 96)
  c.data.worker_count = 0
  c.batch_size = 16
  c.eval_batch_size = 100
  c.total_steps = 700
  c.optim.peak_lr = 2e-3  # the classification runlocal's peak.
  # The heads start from scratch behind BatchNorm: Adam moves a weight by about lr a step, so
  # their logits leave the class prior slowly. Measured (500 steps, peak 1e-3): mIoU 0.08 with
  # one learning rate (background everywhere), 0.45 with the heads at 10x (mmseg's lr_mult).
  c.optim.groups = (("^(decode_head|auxiliary_head)/", 10.0, 1.0),)
  c.optim.init_lr = 1e-6
  c.optim.warmup_steps = 50
  c.optim.grad_clip_norm = 1.0
  c.log.every_steps = 25
  c.evals.val.every_steps = 350
  del c.evals["ss"]
  del c.evals["ms"]
  c.checkpoint.every_steps = 350
  c.bench.batch_sizes = (1, 16)
  c.summary.memory_batch_size = 16
  c.sample.num_images = 6
  c.sample.zoom = 2
  c.init_from.workdir = cache_dir("classifiers", "embedded_mnist32_ascan_t_runlocal")
  c.backbone_pretrain.config = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                            "ascan_t.py:runlocal")
  c.backbone_pretrain.train_if_missing = True
