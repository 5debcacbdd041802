"""The text-to-image stages of the paper (arXiv 2411.04967 §3.3.2, A.6, Fig. 8) and their CPU
``runlocal`` shrink, shared by ``t2i.py`` (the chains) and ``t2i_stage*.py`` (one stage each).

Paper, every stage: the same network (text adapter + the ``t2i`` AsCAN UNet, 4-channel SDXL-VAE
latents, frozen Flan-T5-XXL, 128 text tokens here), DDPM epsilon prediction with scaled-linear
betas, final beta 0.01 at 256² and 0.02 at 512² and above, AdamW betas (0.9, 0.99), T5
embeddings and VAE latents pre-computed (``text.cached``). Stage table (§6.4 of our notes):

  stage  data                          size        iterations  batch   lr
  1      ImageNet as text-to-image     256²        (ours 200K) (2048)  (6e-4)
  2a     curated image-text set        256²        300K        16,384  4e-4
  2b     same                          512²        200K        6,144   1e-4
  2c     same                          1024²       100K        1,536   5e-5
  2d     aspect-ratio buckets          1024² area  (ours 50K)  (1,536) (5e-5), offset noise 0.05

Not given, our choices (in parentheses above, and): stage 1 takes the class-conditional
recipe's batch and lr (A.7: 2048, 6e-4) and 200K iterations (about 320 ImageNet epochs; Fig. 8
only needs a warm start); 2d continues 2c's batch and lr for 50K iterations; every stage warms
up for 1000 steps to a constant lr, weight decay 0.01, gradient clipping 1.0, EMA 0.9999; each
stage warm-starts from the previous one's EMA parameters (``init_from``). Samples: Heun, 30
steps, the paper's "sampled cfg" ramp (1.1 -> 3.6 on steps 5..30; the paper gives no T2I
sampler, this is its class-conditional one). Every stage reads a caption latent cache with
its text embeddings (``tools.cache_latents --input=... --text_encoder=FLAN_T5_DIR``, in
``latents/t2i_*``): stages 1 to 2c one square bucket (``--buckets=''``), stage 2d the SDXL buckets
at the 1024² area (``--buckets=sdxl``); the task batches one bucket per global batch.

``runlocal``: the same chain at toy size on a 2-core CPU, pixel space, from the embedded digit
scenes (``data.digit_scenes``): stage 1 single white digits with synonym captions ("a photo of a
seven", the ImageNet-as-T2I analogue; object-centric like ImageNet's photos, the digit 0.7-0.85
of the canvas high and centred) at 32², stage 2 scenes at 64², stage 3 scenes on
aspect-ratio buckets 64x64, 64x96 and 96x64 (scenes rendered at those canvases; one bucket per
global batch, ``data.buckets``) with offset noise 0.05, its held-out loss and samples at 64x64.
Space-to-depth by 2 makes the UNet's input 16x16 / 32x32 / 32x48 tokens of 12 channels, so
one set of weights serves every stage and ``init_from`` loads all of it; the UNet is the
class-conditional runlocal's (channels 32/64/128). Stage 1: batch 64, 2000 steps (128,000
examples) at a peak lr of 3e-3. Stages 2 and 3 are short (300 and 100 steps) so the whole
chain fits 30 minutes of this CPU; they show the chain, not a trained scene model (the README
has a run with 1500 and 400). Measured in the README: with digits placed anywhere at 0.55-0.8
of the canvas, stage 1's samples were judged right 49 % of the time after 3000 steps (guidance
3; 62 % at 6); object-centric digits reach 75 % after 2000 steps (guidance 6). The loss is
Min-SNR weighted (``diffusion.min_snr_gamma=5``, Hang et al. 2023): the lowest-noise tenth of
the timesteps, whose eps error is the background's unpredictable grain and was half the
unweighted loss, counts about a third as much, the rest fully. Stage 1 then draws the named
digit for 100 of 100 held-out prompts after 3000 steps at lr 1e-3, 84 after 2000 at 1e-3,
92 % (of 300) after 2000 at 2e-3 and 96 % after 2000 at 3e-3, the config now.
Samples use DDIM 25 steps with constant guidance 6: on two step-3000 networks and
300 prompts, guidance 6 is judged right 62 % of the time against 53-55 % at 3 (Heun 30, more
steps, 9 or 10 give no more), so the runlocal guides harder than the class-conditional one (3).
A small T5 with random weights (2 layers, width 64) stands in for Flan-T5, frozen; its
sentencepiece tokenizer is a word model trained on the scenes' captions (each caption word one
token, at most 18 tokens, ``text.max_length=24``).
The network predicts v (``diffusion.prediction=v``) trained with the paper's epsilon loss on the
eps it implies (``loss_on=epsilon``): with the earlier 4x4 patches (48 values a token), an
epsilon network 96 wide did not learn to pass ``x_t`` through at high noise within the budget
(held-out loss in the last tenth 0.018 after 2000 steps of stage 1, against 0.0002 for
predicting the mean image; samples of colour noise), which the v form supplies; measured in the
README.
Beta_end is 0.02 throughout (pixel space: the class-conditional runlocal's choice). The digit
classifier that judges the samples is the classification ``:runlocal`` (shared with the
class-conditional runlocal under ``$ASCAN_CACHE``, trained first when missing).
"""
import os

from ascan_jax import config_defaults
from ascan_jax.tasks import text_to_image

CONFIGS = os.path.dirname(os.path.abspath(__file__))
PAPER_STAGES = {
    # stage: (resolution, iterations, batch, lr, offset noise)
    "1": (256, 200_000, 2048, 6e-4, 0.0),
    "2a": (256, 300_000, 16_384, 4e-4, 0.0),
    "2b": (512, 200_000, 6144, 1e-4, 0.0),
    "2c": (1024, 100_000, 1536, 5e-5, 0.0),
    "2d": (1024, 50_000, 1536, 5e-5, 0.05),
}
RUNLOCAL_STAGES = {
    # stage: (name, scene mode, height, width, steps, batch, lr, offset noise)
    "1": ("stage1_single_digits", "single_digit", 32, 32, 2000, 64, 3e-3, 0.0),
    "2": ("stage2_scenes64", "scenes", 64, 64, 300, 32, 5e-4, 0.0),
    "3": ("stage3_buckets64", "scenes", 64, 64, 100, 32, 2.5e-4, 0.05),
}


def cache_dir(*parts: str) -> str:
  base = os.environ.get("ASCAN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                       "ascan_jax")
  return os.path.join(base, *parts)


def paper_stage(stage: str):
  """One stage of the paper's chain (see the module docstring)."""
  if stage not in PAPER_STAGES:
    raise ValueError(f"unknown text-to-image stage {stage!r}; stages: {sorted(PAPER_STAGES)}")
  resolution, iterations, batch, lr, offset = PAPER_STAGES[stage]
  c = text_to_image.default_config()
  c.batch_size = batch
  c.total_steps = iterations
  c.optim.peak_lr = c.optim.end_lr = lr
  c.diffusion.beta_end = 0.01 if resolution < 512 else 0.02
  c.diffusion.offset_noise = offset
  c.data.name = "cache"  # SDXL-VAE latents + Flan-T5-XXL embeddings (module docstring).
  c.data.latent_dir = ("latents/t2i_imagenet_256" if stage == "1" else
                       f"latents/t2i_{resolution}{'_buckets' if stage == '2d' else ''}")
  c.data.height = c.data.width = resolution
  c.text.cached = True
  c.text.encoder_dir = "flan-t5-xxl"  # for sampling prompts (a transformers directory).
  c.text.max_length = 128
  c.evals.val.every_steps = 10_000
  c.evals.grid.every_steps = 5000
  c.checkpoint.every_steps = 2000
  return c


def paper_chain():
  """Stage 2d, after 1, 2a, 2b and 2c in ``DIR/stages/<name>``, each from the one before."""
  c = paper_stage("2d")
  c.stages.previous = tuple(f"stage{s}={CONFIGS}/t2i_stage{s}.py" for s in ("1", "2a", "2b", "2c"))
  return c


def runlocal_stage(stage: str):
  """One stage of the CPU chain (see the module docstring)."""
  if stage not in RUNLOCAL_STAGES:
    raise ValueError(f"unknown runlocal stage {stage!r}; stages: {sorted(RUNLOCAL_STAGES)}")
  _, mode, height, width, steps, batch, lr, offset = RUNLOCAL_STAGES[stage]
  c = text_to_image.default_config()
  m = c.model
  m.channels = (32, 64, 128)  # over twice the 12 values of a 2x2x3 patch (module docstring).
  m.down_layout = "C-CT-CT"
  m.mid_layout = "CT"
  m.head_dim = 32
  m.context_dim = 64  # the stand-in encoder's width.
  m.norm_groups = 8
  m.dtype = "float32"
  t = c.text
  t.encoder_dir = cache_dir("t5", "random_t5_digit_captions_word_d64")
  t.max_length = 24
  t.random_encoder.create = True
  t.random_encoder.tokenizer = "word"
  t.random_encoder.corpus_size = 1000
  d = c.data
  d.name = "embedded_digit_scenes"
  d.scene_mode = mode
  d.height, d.width = height, width
  d.patch = 2
  if stage == "3":
    d.buckets = ("64x64", "64x96", "96x64")
  d.num_train_examples = 50_000
  d.num_eval_examples = 500
  c.diffusion.beta_end = 0.02
  c.diffusion.offset_noise = offset
  c.diffusion.prediction = "v"  # with the paper's epsilon loss (module docstring).
  c.diffusion.loss_on = "epsilon"
  c.diffusion.min_snr_gamma = 5.0  # (module docstring)
  c.batch_size = batch
  c.eval_batch_size = 250
  c.total_steps = steps
  o = c.optim
  o.schedule = "cosine"
  o.peak_lr = lr
  o.end_lr = lr / 100
  o.warmup_steps = min(100, steps // 4)
  o.ema_decay = 0.999
  o.ema_warmup = True
  c.log.every_steps = 50
  c.checkpoint.every_steps = 250
  s = c.sample
  s.sampler = "ddim"
  s.steps = 25
  s.guidance = "constant"
  s.scale = 6.0  # stage 1 judged 0.62 against 0.53-0.55 at 3.0 (README: the guidance sweep).
  s.clip_denoised = 1.0
  s.batch_size = 128
  s.num_seeds = 2
  if mode == "single_digit":
    s.grid_prompts = tuple(f"a photo of {p}" for p in (
        "a zero", "the digit one", "a 2", "a handwritten three", "the number four", "a five",
        "the digit 6", "a seven", "an eight", "a handwritten nine"))
  c.evals.val.every_steps = steps
  c.evals.grid.every_steps = steps
  c.evals.grid.num_seeds = 2
  c.evals.grid.columns = 10 if mode == "single_digit" else 8
  g = c.evals.geneval
  g.every_steps = steps
  g.num_per_tag = 100 if mode == "single_digit" else 20
  g.judge_dir = cache_dir("judges", "embedded_mnist32_ascan_t_runlocal")
  g.train_judge = True
  g.judge_config = os.path.join(CONFIGS, "ascan_t.py:runlocal")
  return c


def runlocal_chain():
  """The last runlocal stage, after the others in ``DIR/stages/<name>``."""
  last = max(RUNLOCAL_STAGES)
  c = runlocal_stage(last)
  c.stages.previous = tuple(f"{RUNLOCAL_STAGES[s][0]}={CONFIGS}/t2i.py:runlocal,stage={s}"
                            for s in sorted(RUNLOCAL_STAGES) if s != last)
  return c


def get_config(arg=None, stage: str = ""):
  """``arg``: ``runlocal`` and/or ``stage=S``; without a stage, the whole chain."""
  args = config_defaults.parse_arg(arg, runlocal=False, stage=stage)
  if args.runlocal:
    return runlocal_stage(args.stage) if args.stage else runlocal_chain()
  return paper_stage(args.stage) if args.stage else paper_chain()
