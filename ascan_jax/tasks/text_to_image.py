"""Text-to-image diffusion with the AsCAN UNet and a frozen T5 encoder (arXiv 2411.04967 §3.3,
A.6).

Model: ``models.t2i.TextToImageUNet`` = the trainable text adapter (two T blocks, one head, at the
encoder's width) and the text-conditional AsCAN UNet. The T5 encoder (Flan-T5-XXL in the paper,
``models.t5``) is frozen: it is never differentiated, optimised, EMA-averaged or checkpointed.

Objective (paper §3.3, §6.3 of our notes): DDPM epsilon prediction with the scaled-linear schedule
(``diffusion.beta_end`` 0.01 at 256², 0.02 at 512² and above), optional offset noise (0.05 in the
aspect-ratio stage), EMA; the loss is also logged per tenth of the timesteps (the objective and
the UNet's keys are shared with the class-conditional task: ``tasks.denoising``).

Text, two ways (``text.cached``):
* **online** (``False``): the host tokenizes captions (``data.t5_tokenizer``, ``spiece.model`` of
  ``text.encoder_dir``, ``text.max_length``); the batch carries ``input_ids`` and ``text_mask``
  (int32 ``[B, L]``), and ``preprocess`` runs the frozen, sharded encoder inside the jitted step.
  Captions stay on the host (``host_fields``).
* **cached** (``True``): the batch already carries ``text_embedding`` (float32 or bfloat16
  ``[B, L, D]``, the encoder's last hidden state, zeros past the prompt's tokens) and
  ``text_mask`` (int32 ``[B, L]``, 1 = token), read from the text-embedding cache
  (``data.text_cache``) that ``tools.cache_latents --text_encoder=...`` writes next to a caption
  latent cache; no encoder runs in the step. ``text.encoder_dir`` is still needed to encode the
  empty prompt once and new prompts for sampling (loaded when first needed).

Classifier-free guidance: with probability ``text.caption_dropout`` (0.1) an example's caption is
replaced by the empty prompt, at the embedding level: ``(text_embedding, text_mask)`` become the
encoder's output for the empty prompt (``""``, i.e. ``[EOS]``), held as frozen arrays
(``null_text``, ``null_mask``). Sampling's unconditional branch uses the encoding of
``sample.negative_prompt`` (default ``""``: the same empty prompt).

Data (``data.name``):
* ``embedded_digit_scenes``: ``data.digit_scenes``' captioned colour scenes of real MNIST digits
  at ``data.height`` x ``data.width`` (``data.scene_mode`` ``scenes`` or ``single_digit``, the
  ImageNet-as-text-to-image analogue), pixel space (images in [-1, 1], space-to-depth by
  ``data.patch``, as the class-conditional task). With ``data.buckets`` (``("HxW", ...)``) the
  training scenes are drawn at the canvas sizes ``data.scene_sizes`` (default: the buckets;
  ``caption_sources.ScenesSource`` interleaves them), each cropped and resized to its nearest
  bucket (``caption_pp.CaptionImageCodec``), and every global batch comes from one bucket
  (``buckets.BucketPlan`` through ``pipeline.train_dataset``): SDXL's aspect-ratio training. The
  held-out loss, grids and samples stay at ``data.height`` x ``data.width``.
* ``cache``: the caption latent cache at ``data.latent_dir`` (``data.latents`` format 2, written
  by ``tools.cache_latents --input=...``): VAE latents stored at their aspect-ratio bucket, read
  with ``latents.CaptionLatentSource`` / ``CaptionLatentCodec`` and batched one bucket per global
  batch (``BucketPlan`` over the cache's bucket side files). ``text.cached=True`` reads the
  prompts' embeddings from the cache's text table; ``False`` tokenizes the drawn prompt on the
  host. Samples are latents of the bucket nearest ``data.height`` x ``data.width``, decoded with
  ``sample.vae_dir`` (default: the VAE the cache names). The held-out loss reads the eval split's
  records of its most common bucket.

Stand-in encoder: with ``text.random_encoder.create``, a missing ``text.encoder_dir`` is filled
with a small T5 with random weights and a sentencepiece tokenizer trained on the scenes'
captions (``models.t5_random``, as ``tools.make_random_t5``; see ``make_standin_encoder``).

Stages: ``stages.previous`` lists earlier stage configs (``"name=path.py:arg"``). They are
prerequisite runs in ``DIR/stages/<name>``, each warm-starting from the one before
(``init_from``), and this run warm-starts from the last of them: the multi-stage chain of the
paper (§6.4) as one command. Evaluators, grids and ``--mode=sample``:
``tasks.text_to_image_sampling``; ``--mode=geneval`` (``config.eval``):
``tasks.text_to_image_geneval``.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ascan_jax import compute
from ascan_jax import config_defaults
from ascan_jax import config_validation as cv
from ascan_jax import fileio
from ascan_jax.data import buckets as buckets_lib
from ascan_jax.data import caption_pp
from ascan_jax.data import caption_sources
from ascan_jax.data import digit_scenes
from ascan_jax.data import latents as latents_lib
from ascan_jax.data import pipeline
from ascan_jax.data import sources
from ascan_jax.data import t5_tokenizer
from ascan_jax.diffusion import generate
from ascan_jax.diffusion import guidance as guidance_lib
from ascan_jax.diffusion import samplers
from ascan_jax.models import hf_checkpoint
from ascan_jax.models import t2i
from ascan_jax.models import t5
from ascan_jax.models import t5_random
from ascan_jax.models import text_adapter
from ascan_jax.parallel import mesh as mesh_lib
from ascan_jax.parallel import sharding as sharding_lib
from ascan_jax.tasks import base
from ascan_jax.tasks import denoising
from ascan_jax.tasks import diffusion as diffusion_task
from ascan_jax.tasks import evaluators as evaluators_lib
from ascan_jax.tasks import text_to_image_geneval as geneval_lib
from ascan_jax.tasks import text_to_image_sampling as sampling

DATA_NAMES = ("embedded_digit_scenes", "cache")  # module docstring.


def default_config() -> ml_collections.ConfigDict:
  """The paper's text-to-image model (§3.3, A.6) with stage-2a-like training values."""
  c = config_defaults.base()
  c.task = "text_to_image"
  c.batch_size = 2048
  c.eval_batch_size = 256
  c.total_epochs = 0.0
  c.total_steps = 300000

  c.model = ml_collections.ConfigDict()
  denoising.add_model_keys(c.model, channels=(320, 640, 1280),  # models.unet_variants' t2i.
                           down_layout="CCT-CCTT-C" + "T" * 20,
                           context_dim=4096)  # Flan-T5-XXL's width; checked when it loads.
  c.model.adapter_blocks = 2  # paper A.6: two T blocks with one head at the encoder's width.
  c.model.adapter_heads = 1
  c.model.adapter_mlp_ratio = 4

  c.text = ml_collections.ConfigDict()
  c.text.encoder_dir = ""  # a transformers T5 directory (config.json, safetensors, spiece.model).
  c.text.max_length = 128
  c.text.cached = False  # True: batches carry text_embedding / text_mask (the embedding cache).
  c.text.caption_dropout = 0.1  # to the empty prompt, for classifier-free guidance.
  c.text.param_dtype = "float32"  # of the frozen encoder's weights (bfloat16 halves them).
  c.text.random_encoder = ml_collections.ConfigDict()  # the CPU stand-in for Flan-T5.
  c.text.random_encoder.create = False  # create text.encoder_dir when it holds no model.
  c.text.random_encoder.d_model = 64
  c.text.random_encoder.d_kv = 16
  c.text.random_encoder.d_ff = 128
  c.text.random_encoder.num_layers = 2
  c.text.random_encoder.num_heads = 4
  c.text.random_encoder.vocab_size = 256  # sentencepiece pieces (an upper bound).
  c.text.random_encoder.tokenizer = "unigram"  # sentencepiece model type: unigram (T5's) | word.
  c.text.random_encoder.corpus_size = 2000  # training captions per scene mode it is trained on.
  c.text.random_encoder.seed = 0

  c.diffusion = denoising.diffusion_schema()

  c.data = ml_collections.ConfigDict()
  c.data.name = "embedded_digit_scenes"
  c.data.scene_mode = "scenes"  # scenes | single_digit ("a photo of a <synonym>").
  c.data.height = 256
  c.data.width = 256
  c.data.num_train_examples = 100000  # scenes (each a pure function of its index and seed).
  c.data.num_eval_examples = 1000
  c.data.scene_seed = 0
  c.data.tag_weights = ()  # ((tag, weight), ...) of the scene generator; empty: uniform.
  c.data.latent_dir = ""  # data.name=cache: the caption latent (+ text embedding) cache.
  c.data.buckets = ()  # pixel space: ("HxW", ...) aspect-ratio buckets; empty: height x width.
  c.data.scene_sizes = ()  # with buckets: the scenes' canvas sizes ("HxW", ...); empty: buckets.
  c.data.latent_channels = 4  # the latent shape when no cache is there (summary, bench).
  c.data.latent_downsample = 8
  c.data.channels = 3
  c.data.patch = 1  # pixel space: space-to-depth by p.
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.shuffle = "index_shuffle"
  c.data.worker_count = 0
  c.data.worker_buffer_size = 2
  c.data.holdout_fraction = 0.2

  c.sample = sampling.sample_schema()
  c.eval = geneval_lib.geneval_schema()  # --mode=geneval.

  c.evals.val = config_defaults.dataset_evaluator()  # eval/loss, eval/ema_loss, eval/loss_t<k>
  c.evals.val.every_steps = 10000
  c.evals.grid = sampling.grid_evaluator_schema()
  c.evals.geneval = sampling.compositional_evaluator_schema()  # off until num_per_tag > 0.
  c.evals.clip = sampling.clip_evaluator_schema()  # off until clip_dir is set.
  c.evals.caption_fid = sampling.caption_fid_evaluator_schema()  # off until caption_file is set.

  c.stages = ml_collections.ConfigDict()
  c.stages.previous = ()  # ("name=configs/x.py:arg", ...): earlier stages, run first (module doc).

  denoising.set_optim(c.optim, 4e-4)
  c.checkpoint.best_metric = ""
  return c


def check_config(config) -> None:
  """Values of the text-to-image task that cannot work."""
  m, t, data = config.model, config.text, config.data
  cv.check_model_common(config)
  sampling.check_sample_config(config)
  denoising.check_config(config)
  cv.require(0.0 <= t.caption_dropout < 1.0, "text.caption_dropout", "must be in [0, 1)")
  cv.require(t.max_length >= 2, "text.max_length", "must be >= 2 (a token and EOS)")
  cv.check_choice(config, "text.param_dtype", ("float32", "bfloat16"))
  cv.check_choice(config, "text.random_encoder.tokenizer", t5_random.TOKENIZER_TYPES)
  cv.require(bool(t.encoder_dir) or t.cached, "text.encoder_dir",
             "online text encoding (text.cached=False) needs the T5 encoder directory")
  cv.require(m.adapter_blocks >= 1 and m.adapter_heads >= 1, "model.adapter_blocks",
             "the text adapter needs at least one block and one head")
  cv.require(m.context_dim % m.adapter_heads == 0, "model.adapter_heads",
             f"{m.adapter_heads} heads do not split the text width {m.context_dim}")
  cv.check_choice(config, "data.name", DATA_NAMES)
  cv.check_choice(config, "data.scene_mode", digit_scenes.MODES)
  cv.check_choice(config, "data.shuffle", ("index_shuffle", "permutation"))
  cached = data.name == "cache"
  cv.require(cached == bool(data.latent_dir), "data.latent_dir",
             "data.name=cache reads the caption latent cache at data.latent_dir (and only it "
             f"does): data.name={data.name!r}, data.latent_dir={data.latent_dir!r}")
  cv.require(cached or not t.cached, "text.cached",
             "cached text embeddings come from the caption latent cache: set data.name=cache and "
             "data.latent_dir")
  if not cached:
    factor = 2 ** (len(m.channels) - 1) * data.patch
    for key in ("height", "width"):
      cv.require(data[key] % factor == 0, f"data.{key}",
                 f"{data[key]} is not divisible by {factor} (the UNet's {len(m.channels)} "
                 f"levels x data.patch {data.patch})")
    cv.require(data.channels in (1, 3), "data.channels", "must be 1 or 3")
    for key in ("buckets", "scene_sizes"):
      for size in data[key]:
        try:
          h, w = caption_sources.parse_size(size)
        except ValueError as e:
          raise cv.ConfigError(f"config.data.{key}: {e}") from None
        cv.require(key == "scene_sizes" or (h % factor == 0 and w % factor == 0),
                   f"data.{key}", f"bucket {size!r} is not divisible by {factor} (the UNet's "
                   f"{len(m.channels)} levels x data.patch {data.patch})")
    cv.require(not data.scene_sizes or bool(data.buckets), "data.scene_sizes",
               "scene canvas sizes are for aspect-ratio buckets (data.buckets)")
    cv.require(not data.buckets or data.channels == 3, "data.channels",
               "aspect-ratio buckets give RGB images (data.channels=3)")
  for i, pair in enumerate(data.tag_weights):
    cv.require(isinstance(pair, (tuple, list)) and len(pair) == 2
               and pair[0] in digit_scenes.TAGS, "data.tag_weights",
               f"entry {i} {pair!r} is not (tag, weight) with a tag of {digit_scenes.TAGS}")
  for i, entry in enumerate(config.stages.previous):
    name, eq, spec = str(entry).partition("=")
    cv.require(bool(eq and name and spec) and "/" not in name, "stages.previous",
               f"entry {i} {entry!r} is not 'name=path/to/config.py[:arg]'")


class TokenizeCaption:
  """pp op: ``caption`` -> ``input_ids`` and ``text_mask`` (int32 ``[max_length]``) with the T5
  tokenizer of ``directory``; the tokenizer loads on first use (picklable for grain workers).
  ``encode(texts, max_length)`` makes it a tokenizer for ``caption_pp`` codecs too."""

  def __init__(self, directory: str, max_length: int):
    self.directory, self.max_length = directory, int(max_length)
    self._tokenizer = None

  def __getstate__(self):
    return {"directory": self.directory, "max_length": self.max_length, "_tokenizer": None}

  def encode(self, texts, max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    if self._tokenizer is None:
      self._tokenizer = t5_tokenizer.T5Tokenizer.from_directory(self.directory)
    return self._tokenizer.encode(list(texts), max_length or self.max_length)

  def __call__(self, example: dict, rng=None) -> dict:
    ids, mask = self.encode([example["caption"]])
    return {**example, "input_ids": ids[0], "text_mask": mask[0]}


class CaptionCodec:
  """Scene records -> the pixel-space batch fields of the task at one size: ``image`` uint8 at
  the rendered size (no flip: captions say "left of"), ``caption`` (host-only), ``input_ids``
  and ``text_mask`` (see the module docstring)."""

  def __init__(self, task):
    c = task.config
    self.tokenize = TokenizeCaption(c.text.encoder_dir, c.text.max_length)
    self._placeholder = {k: np.zeros(v.shape[1:], v.dtype)
                         for k, v in task.input_spec(1).items() if k != "mask"}
    self._placeholder["caption"] = ""

  def _encode(self, example: dict) -> dict:
    out = {"caption": str(example.get("caption", "")),
           "image": np.ascontiguousarray(np.asarray(example["image"], np.uint8))}
    out = self.tokenize(out)
    return {k: out[k] for k in self._placeholder}

  def train(self, example: dict, rng) -> dict:
    return self._encode(example)

  def eval(self, example: dict) -> dict:
    return self._encode(example)

  def placeholder(self, bucket: int | None = None) -> dict:
    return {k: (np.copy(v) if isinstance(v, np.ndarray) else v)
            for k, v in self._placeholder.items()}


class TokenizedCaptionLatentCodec(latents_lib.CaptionLatentCodec):
  """``latents.CaptionLatentCodec`` for online text encoding (``text.cached=False`` on a caption
  latent cache): the drawn prompt is tokenized (``input_ids``, ``text_mask``) instead of looked
  up in the text-embedding table, so a cache without text embeddings serves too."""

  def __init__(self, meta: dict, tokenize: TokenizeCaption):
    super().__init__(meta, None)
    self.tokenize = tokenize

  def _fields(self, latent: np.ndarray, caption: str) -> dict:
    ids, mask = self.tokenize.encode([caption])
    return {"latent": latent, "input_ids": ids[0], "text_mask": mask[0], "caption": caption}

  def placeholder(self, bucket: int | None = None) -> dict:
    shape = self.latent_buckets[0 if bucket is None else int(bucket)]
    length = self.tokenize.max_length
    return {"latent": np.zeros(shape, np.float32), "input_ids": np.zeros(length, np.int32),
            "text_mask": np.zeros(length, np.int32), "caption": ""}


class RecordSubset:
  """The records ``indices`` of ``source`` (the held-out loss of a bucketed cache reads one
  bucket, so that every evaluation batch has one shape)."""

  def __init__(self, source, indices, what: str):
    self.source, self.indices = source, np.asarray(indices, np.int64)
    self.description = f"{source.description}, {what} ({len(self.indices)} records)"

  def __len__(self) -> int:
    return len(self.indices)

  def load(self, i: int) -> dict:
    return self.source.load(int(self.indices[i]))


def scene_source(config, split: str, *, mode: str | None = None, num_examples: int | None = None,
                 seed: int | None = None, tag_weights: dict | None = None,
                 height: int | None = None, width: int | None = None):
  """The digit scenes of ``config.data`` (optionally another mode, size, count or seed)."""
  d = config.data
  train = split == d.train_split
  weights = dict(d.tag_weights) if tag_weights is None else tag_weights
  return digit_scenes.DigitScenesSource(
      "train" if train else split, height=height or d.height, width=width or d.width,
      num_examples=num_examples or (d.num_train_examples if train else d.num_eval_examples),
      seed=d.scene_seed if seed is None else seed, mode=mode or d.scene_mode,
      tag_weights=weights or None, holdout_fraction=d.holdout_fraction)


def make_standin_encoder(directory: str, config) -> None:
  """Writes a random-weight T5 encoder and a sentencepiece tokenizer trained on scene captions.

  ``models.t5_random`` (what ``tools.make_random_t5`` writes): ``spiece.model``
  (``random_encoder.tokenizer``: unigram as T5's, or word, which gives every word of the small
  caption vocabulary one token), ``config.json`` and ``model.safetensors``, plus the corpus in
  ``corpus.txt``. The corpus is ``corpus_size`` training captions of each scene mode at 64x64 with
  seed 0, so every stage of a chain that names the same directory gets the same encoder. Written
  to a temporary folder and renamed (atomic).
  """
  r = config.text.random_encoder
  lines = []
  for mode in digit_scenes.MODES:
    src = digit_scenes.DigitScenesSource("train", height=64, width=64,
                                         num_examples=r.corpus_size, seed=0, mode=mode)
    lines += [src.load(i)["caption"] for i in range(r.corpus_size)]
  tmp = f"{directory.rstrip('/')}.tmp{os.getpid()}"
  t5_random.make_random_t5(tmp, lines=lines, vocab_size=r.vocab_size, seed=r.seed,
                           tokenizer_type=r.tokenizer, d_model=r.d_model, d_kv=r.d_kv,
                           d_ff=r.d_ff, num_layers=r.num_layers, num_heads=r.num_heads)
  with open(os.path.join(tmp, "corpus.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")
  os.makedirs(os.path.dirname(os.path.abspath(directory)), exist_ok=True)
  os.replace(tmp, directory)


@base.register
class Task(base.Task):
  """The text-to-image task; see the module docstring."""
  name = "text_to_image"
  default_metric = ""
  host_fields = ("caption",)

  @classmethod
  def default_config(cls):
    return default_config()

  @classmethod
  def validate(cls, config, *, num_devices, num_processes, mode):
    check_config(config)
    denoising.pixel_width_warning(config)
    geneval_lib.check_geneval_config(config, mode)

  @classmethod
  def evaluator_schemas(cls):
    return {"dataset": config_defaults.dataset_evaluator,
            "sample_grid": sampling.grid_evaluator_schema,
            "compositional": sampling.compositional_evaluator_schema,
            "clip_score": sampling.clip_evaluator_schema,
            "caption_fid": sampling.caption_fid_evaluator_schema}

  def __init__(self, config):
    super().__init__(config)
    self.dtype = compute.compute_dtype(config.model.dtype)
    self.schedule = denoising.noise_schedule(config)
    self.latent_meta = None
    if config.data.latent_dir:
      d = config.data
      try:
        meta = latents_lib.read_caption_metadata(d.latent_dir)
      except sources.DatasetNotFoundError as e:  # summary/bench need no data.
        f = d.latent_downsample
        shape = [d.height // f, d.width // f, d.latent_channels]
        meta = {"image_buckets": [[d.height, d.width]], "latent_buckets": [shape],
                "missing": str(e)}
      # Samples (and summary, bench) use the bucket nearest data.height x data.width.
      b = buckets_lib.nearest_bucket(d.height, d.width,
                                     [tuple(x) for x in meta["image_buckets"]])
      self.latent_meta = {**meta, "latent_shape": list(meta["latent_buckets"][b])}
    self.model = self.build_model()
    self._sources = {}
    self._encoder = None  # (T5Encoder, params) once loaded outside the frozen weights.
    self._tokenizer = None
    self._samplers = {}

  # ---- model -------------------------------------------------------------------------------
  def sample_shape(self) -> tuple[int, int, int]:
    if self.latent_meta is not None:
      return tuple(self.latent_meta["latent_shape"])
    d = self.config.data
    p = d.patch
    return (d.height // p, d.width // p, p * p * d.channels)

  def build_model(self, **overrides) -> nn.Module:
    m = self.config.model
    unet = denoising.unet(self.config, self.sample_shape()[-1], self.dtype, **overrides)
    adapter = text_adapter.TextAdapter(m.adapter_blocks, m.adapter_heads, m.adapter_mlp_ratio,
                                       attention_impl=unet.attention_impl, dtype=self.dtype)
    return t2i.TextToImageUNet(unet=unet, adapter=adapter)

  def init_variables(self, key, model=None):
    model = model or self.model
    length, width = self.config.text.max_length, self.config.model.context_dim
    return model.init({"params": key, "dropout": key}, jnp.zeros((1,) + self.sample_shape()),
                      jnp.zeros((1,)), jnp.zeros((1, length, width)),
                      jnp.ones((1, length), jnp.int32))

  def input_key(self) -> str:
    return "latent" if self.latent_meta is not None else "image"

  def input_spec(self, batch_size: int, train: bool = True) -> dict:
    d, length = self.config.data, self.config.text.max_length
    if self.latent_meta is not None:
      x = jax.ShapeDtypeStruct((batch_size,) + self.sample_shape(), jnp.float32)
    else:
      x = jax.ShapeDtypeStruct((batch_size, d.height, d.width, d.channels), jnp.uint8)
    spec = {self.input_key(): x}
    if self.config.text.cached:
      spec["text_embedding"] = jax.ShapeDtypeStruct(
          (batch_size, length, self.config.model.context_dim), jnp.float32)
    else:
      spec["input_ids"] = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
    spec["text_mask"] = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
    spec["mask"] = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
    return spec

  def synthetic_batch(self, batch_size: int, key) -> dict:
    out = {}
    keys = jax.random.split(key, 4)
    length = self.config.text.max_length
    for (name, s), k in zip(self.input_spec(batch_size).items(), keys):
      if name == "text_mask":
        lengths = jax.random.randint(k, (batch_size, 1), 1, length + 1)
        out[name] = (jnp.arange(length)[None] < lengths).astype(jnp.int32)
      elif name == "input_ids":
        out[name] = jax.random.randint(k, s.shape, 0, 64)
      elif name == "mask":
        out[name] = jnp.ones(s.shape, jnp.float32)
      elif s.dtype == jnp.uint8:
        out[name] = jax.random.randint(k, s.shape, 0, 256).astype(jnp.uint8)
      else:
        out[name] = jax.random.normal(k, s.shape)
    return out

  def x0(self, batch) -> jax.Array:
    if self.latent_meta is not None:
      return batch["latent"].astype(jnp.float32)
    x = batch["image"].astype(jnp.float32) / 127.5 - 1.0
    return denoising.space_to_depth(x, self.config.data.patch)

  def text(self, batch) -> jax.Array:
    """The batch's text embeddings. A batch of token ids that was not preprocessed (summary and
    bench have no frozen weights) gets zeros of the encoder's output shape, so the frozen
    encoder is not counted there."""
    if "text_embedding" in batch:
      return batch["text_embedding"]
    return jnp.zeros(batch["text_mask"].shape + (self.config.model.context_dim,), jnp.float32)

  def forward(self, variables, batch, model=None):
    """One denoiser evaluation at t = T/2 of the trainable network (adapter + UNet)."""
    model = model or self.model
    x = self.x0(batch)
    t = jnp.full((x.shape[0],), self.schedule.num_train_steps / 2, jnp.float32)
    return model.apply(variables, x, t, self.text(batch), batch["text_mask"], train=False)

  # ---- frozen text encoder -------------------------------------------------------------------
  def ensure_encoder(self) -> str:
    """``text.encoder_dir``, created first when it is missing and ``random_encoder.create``."""
    directory = self.config.text.encoder_dir
    if not directory:
      raise base.TaskError("config.text.encoder_dir is empty: the text encoder is needed to "
                           "encode prompts")
    present = fileio.exists(fileio.join(directory, "config.json"))
    if not present and self.config.text.random_encoder.create:
      if jax.process_index() == 0:
        print(f"creating the random T5 stand-in encoder in {directory}", flush=True)
        make_standin_encoder(directory, self.config)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        multihost_utils.sync_global_devices("text_to_image_standin_encoder")
    elif not present:
      raise base.TaskError(f"config.text.encoder_dir={directory!r} holds no T5 model "
                           "(config.json); give a Flan-T5 directory or set "
                           "config.text.random_encoder.create=True for a random stand-in")
    return directory

  def encoder_module(self) -> t5.T5Encoder:
    t5_config = t5.load_config(self.ensure_encoder())
    if t5_config.d_model != self.config.model.context_dim:
      raise base.TaskError(f"config.model.context_dim={self.config.model.context_dim} but the "
                           f"text encoder in {self.config.text.encoder_dir} is "
                           f"{t5_config.d_model} wide")
    return t5.T5Encoder(t5_config, dtype=self.dtype,
                        param_dtype=jnp.dtype(self.config.text.param_dtype))

  def tokenizer(self) -> t5_tokenizer.T5Tokenizer:
    if self._tokenizer is None:
      self._tokenizer = t5_tokenizer.T5Tokenizer.from_directory(self.ensure_encoder())
    return self._tokenizer

  def tokenize(self, texts) -> tuple[np.ndarray, np.ndarray]:
    return self.tokenizer().encode(list(texts), self.config.text.max_length)

  def encode(self, encoder_params, input_ids, text_mask) -> jax.Array:
    """The frozen encoder's output ``[B, L, D]`` float32 (inside a jitted function)."""
    return self.encoder_module().apply({"params": encoder_params}, input_ids, text_mask)

  def frozen_spec(self):
    length, width = self.config.text.max_length, self.config.model.context_dim
    spec = {"null_text": jax.ShapeDtypeStruct((1, length, width), jnp.float32),
            "null_mask": jax.ShapeDtypeStruct((1, length), jnp.int32)}
    if not self.config.text.cached:
      spec["encoder"] = t5.abstract_params(self.encoder_module())
    return spec

  def load_frozen(self, shardings):
    """The encoder's parameters (online mode) read straight into their shardings, and the empty
    prompt's encoding (``null_text``, ``null_mask``) computed with it."""
    mesh = jax.tree.leaves(shardings)[0].mesh
    rules = mesh_lib.rules(self.config)
    if self.config.text.cached:
      encoder = self.encoder_params(mesh, rules)
    else:
      checkpoint = hf_checkpoint.SafetensorsCheckpoint(self.ensure_encoder())
      encoder = t5.load_params(self.encoder_module(), checkpoint, mesh=mesh, rules=rules)
    null_text, null_mask = self.encode_prompts(encoder, [""], mesh, rules)
    out = {"null_text": jax.device_put(null_text, shardings["null_text"]),
           "null_mask": jax.device_put(null_mask, shardings["null_mask"])}
    if not self.config.text.cached:
      out["encoder"] = encoder
    return out

  def encoder_params(self, mesh, rules):
    """The encoder's parameters in their shardings on ``mesh``, loaded once (cached mode and
    sampling without frozen weights)."""
    if self._encoder is None or self._encoder[0] is not mesh:
      checkpoint = hf_checkpoint.SafetensorsCheckpoint(self.ensure_encoder())
      self._encoder = (mesh, t5.load_params(self.encoder_module(), checkpoint, mesh=mesh,
                                            rules=rules))
    return self._encoder[1]

  def encode_prompts(self, encoder_params, prompts, mesh, rules) -> tuple[np.ndarray, np.ndarray]:
    """Host arrays ``(embeddings [N, L, D] float32, mask [N, L] int32)`` of ``prompts``."""
    ids, mask = self.tokenize(prompts)

    def run(params, i, m):
      with sharding_lib.in_mesh(mesh, rules):
        return self.encode(params, i, m)
    out = jax.jit(run)(encoder_params, ids, mask)
    return np.asarray(jax.device_get(out), np.float32), mask

  def preprocess(self, frozen, batch, key, train):
    """Encodes the captions (online) and, in training, drops them to the empty prompt with
    probability ``text.caption_dropout``."""
    batch = dict(batch)
    mask = batch["text_mask"]
    if self.config.text.cached:
      text = batch["text_embedding"].astype(jnp.float32)
    else:
      text = self.encode(frozen["encoder"], batch.pop("input_ids"), mask)
    if train and self.config.text.caption_dropout > 0:
      text, mask = self.drop_captions(key, text, mask, frozen)
    batch["text_embedding"], batch["text_mask"] = text, mask
    return batch

  def drop_captions(self, key, text, mask, frozen):
    """``(text, mask)`` with each example replaced by the empty prompt's encoding with
    probability ``text.caption_dropout``."""
    return guidance_lib.drop_condition(key, (text, mask),
                                       (frozen["null_text"], frozen["null_mask"]),
                                       self.config.text.caption_dropout)

  # ---- data --------------------------------------------------------------------------------
  def source(self, split: str):
    """The split's records: scenes at one size, scenes at the bucket canvases (training with
    ``data.buckets``) or the caption latent cache (``data.name=cache``)."""
    if split not in self._sources:
      d = self.config.data
      if d.name == "cache":
        self._sources[split] = self._cache_source(split)
      elif d.buckets and split == d.train_split:
        self._sources[split] = caption_sources.ScenesSource(
            split, d.scene_sizes or d.buckets, d.num_train_examples, mode=d.scene_mode,
            seed=d.scene_seed, holdout_fraction=d.holdout_fraction)
      else:
        self._sources[split] = scene_source(self.config, split)
    return self._sources[split]

  def _cache_source(self, split: str):
    """The cache's split, checked against the model (latent channels, UNet divisibility) and,
    with ``text.cached``, the text table (width, tokens)."""
    d, m = self.config.data, self.config.model
    if "missing" in self.latent_meta:
      raise sources.DatasetNotFoundError(self.latent_meta["missing"])
    src = latents_lib.CaptionLatentSource(d.latent_dir, split)
    factor = 2 ** (len(m.channels) - 1)
    channels = self.sample_shape()[-1]
    for h, w, c in src.meta["latent_buckets"]:
      if h % factor or w % factor or c != channels:
        raise base.TaskError(
            f"the caption latent cache {d.latent_dir} has a {h}x{w}x{c} latent bucket; the UNet "
            f"needs sides divisible by {factor} ({len(m.channels)} levels) and {channels} "
            "channels")
    if self.config.text.cached:
      table = src.text_table()
      if table.dim != m.context_dim or table.max_length != self.config.text.max_length:
        raise base.TaskError(
            f"the text embeddings of {d.latent_dir}/{split} are {table.max_length} tokens x "
            f"{table.dim} wide; config.text.max_length={self.config.text.max_length} and "
            f"config.model.context_dim={m.context_dim} must match them")
    return src

  def codec(self, split: str | None = None):
    """The codec of ``split``'s source (default: the training split)."""
    c, d = self.config, self.config.data
    split = split or d.train_split
    if d.name == "cache":
      src = self.source(split)
      if c.text.cached:
        return latents_lib.CaptionLatentCodec(src.meta, src.text_table())
      return TokenizedCaptionLatentCodec(src.meta,
                                         TokenizeCaption(c.text.encoder_dir, c.text.max_length))
    if d.buckets and split == d.train_split:
      table = [caption_sources.parse_size(b) for b in d.buckets]
      return caption_pp.CaptionImageCodec(
          table=table, tokenizer=TokenizeCaption(c.text.encoder_dir, c.text.max_length),
          max_length=c.text.max_length)
    return CaptionCodec(self)

  def bucket_plan(self):
    """The ``buckets.BucketPlan`` of the training split, or None (one size)."""
    d = self.config.data
    src = self.source(d.train_split)
    if d.name == "cache":
      ids, n = src.bucket_ids(), len(src.meta["latent_buckets"])
    elif d.buckets:
      table = [caption_sources.parse_size(b) for b in d.buckets]
      ids, n = buckets_lib.compute_bucket_ids(src, table), len(table)
    else:
      return None
    plan = buckets_lib.BucketPlan(ids, self.config.batch_size, self.config.seed, num_buckets=n)
    if jax.process_index() == 0:
      print(f"aspect-ratio buckets of {src.description}: {plan.summary()}", flush=True)
    return plan

  def num_train_examples(self) -> int:
    return len(self.source(self.config.data.train_split))

  def train_batches(self, sharding, total_steps: int, start_step: int = 0):
    split = self.config.data.train_split
    return pipeline.train_dataset(self.source(split), self.codec(split), self.config, sharding,
                                  total_steps, start_step, plan=self.bucket_plan())

  def eval_batches(self, sharding, split: str):
    src = self.source(split)
    if self.config.data.name == "cache":  # one bucket: every batch has one shape.
      ids = src.bucket_ids()
      b = int(np.bincount(ids[ids >= 0]).argmax())
      src = RecordSubset(src, np.flatnonzero(ids == b), f"bucket {b}")
    return pipeline.eval_dataset(src, self.codec(split), self.config, sharding)

  # ---- training ----------------------------------------------------------------------------
  def _net_fn(self, params, model_state, batch, **kwargs):
    return lambda x_t, t: self.model.apply({"params": params, **model_state}, x_t, t,
                                           self.text(batch), batch["text_mask"], **kwargs)

  def loss_fn(self, params, model_state, batch, key):
    d = self.config.diffusion
    k_t, k_noise, k_path = jax.random.split(key, 3)
    net_fn = self._net_fn(params, model_state, batch, train=True, rngs={"dropout": k_path})
    loss, buckets = denoising.train_loss(net_fn, self.schedule, self.x0(batch), batch["mask"],
                                         k_t, k_noise, offset_noise=d.offset_noise,
                                         loss_buckets=d.loss_buckets, prediction=d.prediction,
                                         loss_on=d.loss_on, min_snr_gamma=d.min_snr_gamma)
    return loss, (model_state, buckets)

  def eval_fn(self, params, model_state, batch) -> dict:
    """Held-out epsilon loss at timesteps spread evenly over each batch (fixed noise)."""
    eps_fn = denoising.denoiser(self._net_fn(params, model_state, batch, train=False),
                                self.schedule, self.config.diffusion.prediction)
    return denoising.eval_sums(eps_fn, self.schedule, self.x0(batch), batch["mask"],
                               loss_buckets=self.config.diffusion.loss_buckets)

  def summarize_eval(self, sums: dict) -> dict:
    return denoising.summarize_eval(sums, self.config.diffusion.loss_buckets)

  # ---- sampling, evaluators, stages --------------------------------------------------------
  def decoder(self):
    """``(fn(vae_params, x0) -> uint8 images, vae_params or None)``."""
    if self.latent_meta is None:
      return denoising.decoder(self.config.data.patch)
    vae_dir = self.config.sample.vae_dir or self.latent_meta.get("vae_dir", "")
    if not vae_dir:
      raise ValueError("config.sample.vae_dir: latent samples need the VAE that decodes them")
    from ascan_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
    return denoising.decoder(vae=vae_lib.from_pretrained(vae_dir))

  def text_sampler(self, setup) -> "sampling.TextSampler":
    key = id(setup.mesh)
    if key not in self._samplers:
      self._samplers[key] = sampling.TextSampler(self, setup, self.config.sample.batch_size)
    return self._samplers[key]

  def stage_runs(self, workdir: str) -> list[tuple[ml_collections.ConfigDict, str]]:
    """``(config, workdir)`` of every stage of ``stages.previous``, in order, each set to
    warm-start from the one before (unless its config names another ``init_from``)."""
    out, previous = [], None
    for entry in self.config.stages.previous:
      name, _, spec = str(entry).partition("=")
      stage = diffusion_task.load_config_file(spec)
      if previous is not None and not stage.init_from.workdir:
        stage.init_from.workdir = previous
      previous = fileio.join(workdir, "stages", name)
      out.append((stage, previous))
    return out

  def prerequisites(self, workdir: str | None = None):
    """The judge classifier of each ``compositional`` evaluator with ``train_judge``, then the
    unfinished earlier stages (``stages.previous``, in ``workdir/stages/<name>``). This run
    warm-starts from the last stage: ``init_from.workdir`` is set to it when empty."""
    from ascan_jax.tasks import judge as judge_lib  # pylint: disable=g-import-not-at-top
    out = []
    for name in self.config.evals.keys():
      e = self.config.evals[name]
      if e.type == "compositional" and e.num_per_tag > 0 and e.train_judge:
        judge_config = diffusion_task.load_config_file(e.judge_config)
        if not judge_lib.is_trained(judge_config, e.judge_dir):
          out.append((judge_config, e.judge_dir))
    if not self.config.stages.previous:
      return out
    if workdir is None:
      raise base.TaskError("config.stages.previous needs the run's workdir to place the "
                           "earlier stages (Task.prerequisites(workdir))")
    stages = self.stage_runs(workdir)
    for stage_config, stage_dir in stages:
      if not judge_lib.is_trained(stage_config, stage_dir):
        out.append((stage_config, stage_dir))
    if not self.config.init_from.workdir:
      self.config.init_from.workdir = stages[-1][1]
    return out

  def make_evaluators(self, setup) -> dict:
    out = evaluators_lib.build_standard(self, setup)
    out.update(sampling.build_evaluators(self, setup))
    return out

  def sample(self, context, workdir: str) -> dict:
    return sampling.sample_mode(self, context, workdir)

  def geneval(self, context, workdir: str) -> dict:
    return geneval_lib.export(self, context, workdir)

  def bench_extra(self, result: dict, make_context) -> dict:
    s = self.config.sample
    nfe = samplers.nfe(s.sampler, s.steps, generate.guidance_schedule(s))
    batch = max(int(b) for b in result["inference"])
    fwd = result["inference"][str(batch)]["examples_per_second"]
    return {"sampling": {"sampler": s.sampler, "steps": s.steps, "guidance": s.guidance,
                         "nfe_per_sample": nfe, "batch": batch,
                         "samples_per_second_from_forward": fwd / nfe}}

