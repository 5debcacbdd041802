"""Sampling from the text-to-image task: the sharded sampler, its evaluators and ``--mode=sample``.

* ``TextSampler``: one jitted sampling call over the whole mesh. Prompts are tokenized on the
  host and encoded by the frozen T5 inside the call; the batch (token ids, seeds, noise indices)
  is split over the data-parallel devices (global arrays from ``jax.make_array_from_callback``
  of values every process holds), parameters keep their training shardings. Sample ``j`` starts
  from noise drawn with ``fold_in(key(seed_j), index_j)`` (``index`` = the prompt's index), so
  with the deterministic samplers (ddim, euler, heun, dpmpp_2m) an image depends only on its
  prompt, seed and index, not on the batch size or the number of devices. A request of fewer
  samples than ``sample.batch_size`` is drawn at its own batch (rounded up to the data-parallel
  devices; one more compiled program per such size), so a grid of 16 prompts does not pay for
  128 samples of padding. Classifier-free guidance's unconditional branch is the encoding of
  ``sample.negative_prompt`` (``""``: the empty prompt the task's caption dropout trains),
  passed as a pytree condition ``(embedding, mask)`` to ``diffusion.guidance``.
* Evaluators (``config.evals.<name>.type``): ``sample_grid`` (a captioned grid of fixed prompts,
  ``viz.captioned_grid``), ``compositional`` (samples of held-out digit-scene prompts judged by
  ``eval.compositional`` with the digit classifier ``tasks.judge``: ``eval/geneval_<tag>``,
  ``eval/geneval_overall``) and ``clip_score`` (``eval.clip_score.CLIPScorer`` when
  ``clip_dir`` is set: ``eval/clip_score``) and ``caption_fid`` (one sample per caption of a
  caption file, seed ``seed + k`` for line ``k``: FID, sFID, IS, precision/recall against
  reference statistics with ``eval.inception_evaluator``; ``eval/caption_fid``, ...).
* ``sample_mode``: ``--mode=sample [--config.sample.prompts=FILE]`` writes
  ``DIR/samples/<name>/images/<prompt:05d>_seed<seed>.png`` (one PNG per prompt and seed),
  ``grid.png`` (captioned) and ``protocol.json``: the protocol keys (sampler, steps, spacing,
  guidance and its per-step scales, negative prompt, seeds, NFE, checkpoint step, EMA, schedule,
  text encoder, ...) and ``"samples": [{"file": "images/00000_seed0.png", "prompt": ...,
  "prompt_index": 0, "seed": 0}, ...]`` with files relative to the sample directory (what
  ``tools.clip_score`` reads).
"""
from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from ascan_jax import config_validation as cv
from ascan_jax import fileio
from ascan_jax import viz
from ascan_jax.data import caption_sets
from ascan_jax.data import digit_scenes
from ascan_jax.diffusion import generate
from ascan_jax.diffusion import guidance as guidance_lib
from ascan_jax.diffusion import samplers
from ascan_jax.diffusion import schedule as schedule_lib
from ascan_jax.eval import generative_metrics
from ascan_jax.parallel import sharding as sharding_lib
from ascan_jax.tasks import denoising

DEFAULT_GRID_PROMPTS = ("a photo of a seven", "a red three to the left of a blue eight",
                        "three green fives", "a yellow two above a white nine")


# ---- config ------------------------------------------------------------------------------------

def sample_schema() -> ml_collections.ConfigDict:
  """``config.sample``: how images are drawn (grids, evaluators and ``--mode=sample``)."""
  c = ml_collections.ConfigDict()
  c.sampler = "heun"  # ddpm | ddim | euler | heun | dpmpp_2m
  c.steps = 30
  c.spacing = ""  # empty: the sampler's default.
  c.guidance = "ramp"  # none | constant | interval | ramp (the paper's "sampled cfg").
  c.scale = 1.78  # constant / interval scale.
  c.ramp_start = 1.1
  c.ramp_end = 3.6
  c.start_step = 5  # interval / ramp: 1-indexed first guided step ...
  c.end_step = -1  # ... and last (-1: the last step).
  c.negative_prompt = ""  # the unconditional branch of guidance.
  c.prompts = ""  # --mode=sample: a UTF-8 file, one prompt a line (empty: grid_prompts).
  c.grid_prompts = DEFAULT_GRID_PROMPTS
  c.num_seeds = 4  # --mode=sample: seeds seed .. seed + num_seeds - 1 per prompt.
  c.seed = 0
  c.ema = True
  c.batch_size = 64
  c.vae_dir = ""  # latents: the diffusers VAE that decodes samples (empty: the cache's VAE).
  c.clip_denoised = 0.0  # > 0: clip x0 estimates to [-c, c] (pixel space: 1.0).
  c.name = ""  # --mode=sample: DIR/samples/<name>; empty: step<N>_<protocol tag>.
  return c


def grid_evaluator_schema() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.type = "sample_grid"
  c.every_steps = 5000
  c.prompts = ()  # empty: sample.grid_prompts.
  c.num_seeds = 2  # images per prompt (seeds sample.seed ...).
  c.columns = 8
  return c


def compositional_evaluator_schema() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.type = "compositional"
  c.every_steps = 10000
  c.prefix = "eval/"
  c.num_per_tag = 0  # held-out scene prompts per GenEval tag (0: this evaluator does nothing).
  c.scene_mode = ""  # scenes | single_digit; empty: data.scene_mode.
  c.seed = 1  # of the held-out scenes and of the samples' noise.
  c.judge_dir = ""  # a classification workdir whose digit classifier reads the crops.
  c.train_judge = False  # train judge_config in judge_dir first when it is not there.
  c.judge_config = ""  # e.g. configs/ascan_t.py:runlocal
  c.grid_per_tag = 6  # samples per tag in the captioned grid written beside the scores.
  return c


def clip_evaluator_schema() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.type = "clip_score"
  c.every_steps = 10000
  c.prefix = "eval/"
  c.clip_dir = ""  # a Hugging Face CLIPModel directory (empty: this evaluator does nothing).
  c.num_prompts = 100  # held-out captions, one image each.
  c.seed = 2
  return c


def caption_fid_evaluator_schema() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.type = "caption_fid"
  c.every_steps = 50000
  c.prefix = "eval/caption_"  # eval/caption_fid, eval/caption_sfid, ...
  c.caption_file = ""  # jsonl {"caption", "image_id"} (tools.make_caption_set); empty: off.
  c.num_captions = 0  # the file's first N captions (0: all).
  c.seed = 3  # caption k (0-based line) is drawn with seed + k and noise index k.
  c.inception_path = ""  # FID Inception safetensors (tools.convert_fid_inception) ...
  c.reference_path = ""  # ... and the reference images' statistics (tools.compute_reference_stats).
  c.grid_size = 16  # the first samples, captioned, in DIR/samples/<name>_step<N>.png.
  return c


def check_sample_config(config) -> None:
  s = config.sample
  denoising.check_sampler(s)
  cv.require(s.num_seeds >= 1, "sample.num_seeds", "must be >= 1")
  cv.require(s.batch_size >= 1, "sample.batch_size", "must be >= 1")
  cv.require("/" not in s.name, "sample.name", "is a folder name, not a path")
  try:
    schedule = generate.guidance_schedule(s)
    if schedule is not None:
      schedule.scales(s.steps)
  except ValueError as e:
    raise cv.ConfigError(f"config.sample: {e}") from None
  for name in config.evals.keys():
    e = config.evals[name]
    key = f"evals.{name}"
    if e.type == "sample_grid":
      cv.require(e.num_seeds >= 1 and e.columns >= 1, f"{key}.num_seeds",
                 "num_seeds and columns must be >= 1")
    if e.type == "compositional":
      cv.require(e.scene_mode in ("",) + digit_scenes.MODES, f"{key}.scene_mode",
                 f"{e.scene_mode!r} is not one of {digit_scenes.MODES} (or empty)")
      if e.num_per_tag > 0:
        cv.require(bool(e.judge_dir), f"{key}.judge_dir",
                   "the compositional judge needs a digit classifier (a classification workdir)")
      if e.train_judge:
        cv.require(bool(e.judge_config), f"{key}.judge_config",
                   "train_judge needs the judge's config (e.g. configs/ascan_t.py:runlocal)")
    if e.type == "caption_fid":
      cv.require(e.num_captions >= 0, f"{key}.num_captions", "must be >= 0 (0: all)")
      if e.caption_file:
        for k in ("inception_path", "reference_path"):
          cv.require(bool(e[k]), f"{key}.{k}", "caption-set FID needs the FID Inception "
                     "(inception_path) and the reference statistics (reference_path)")


def read_prompts(path: str) -> list[str]:
  """One prompt per line of a UTF-8 file; an empty line is the empty prompt, a final newline
  adds none, ``\\r`` before a newline is dropped."""
  if not fileio.exists(path):
    raise FileNotFoundError(f"config.sample.prompts: prompts file {path} not found")
  try:
    lines = fileio.read_text(path).split("\n")
  except UnicodeDecodeError as e:
    raise ValueError(f"config.sample.prompts: {path} is not UTF-8 text ({e.reason} at byte "
                     f"{e.start})") from None
  if lines and lines[-1] == "":
    lines = lines[:-1]
  prompts = [line[:-1] if line.endswith("\r") else line for line in lines]
  if not prompts:
    raise ValueError(f"config.sample.prompts: {path} holds no prompt")
  return prompts


# ---- the sampler ------------------------------------------------------------------------------

class TextSampler:
  """Sharded, jitted sampling from prompts; see the module docstring."""

  def __init__(self, task, setup, batch_size: int):
    config = task.config
    s = config.sample
    mesh, rules = setup.mesh, setup.rules
    self.task, self.config, self.mesh, self.rules = task, config, mesh, rules
    self._programs = generate.BatchedPrograms(mesh, rules, batch_size, self._build_program)
    self.batch_size = self._programs.batch_size
    self.schedule = generate.guidance_schedule(s)
    self.spacing = s.spacing or samplers.get_sampler(s.sampler).default_spacing
    if config.text.cached:
      self.encoder = task.encoder_params(mesh, rules)
    else:
      self.encoder = setup.frozen["encoder"]
    self._encoder_shardings = jax.tree.map(lambda a: a.sharding, self.encoder)
    self._param_shardings = setup.state_shardings.params
    replicated = NamedSharding(mesh, P())
    self._replicated = replicated
    self._decode, vae_params = task.decoder()
    self._vae_params = None if vae_params is None else jax.device_put(vae_params, replicated)

  @property
  def compiled_batch_sizes(self) -> tuple[int, ...]:
    return self._programs.batch_sizes

  def _build_program(self, b: int):
    """``(draw, rows)``: the jitted sampling call at batch ``b`` and its batch shardings."""
    task, config, mesh, rules = self.task, self.config, self.mesh, self.rules
    s = config.sample
    shape = (b,) + task.sample_shape()
    rows = {n: sharding_lib.batch_sharding(mesh, rules, n, b) for n in (1, 2, 4)}
    model, decode = task.model, self._decode
    prediction = config.diffusion.prediction

    def draw(params, encoder, vae_params, ids, mask, null_ids, null_mask, seeds, index,
             loop_seed):
      with sharding_lib.in_mesh(mesh, rules):
        text = task.encode(encoder, ids, mask)
        noise = jax.vmap(lambda seed, i: jax.random.normal(
            jax.random.fold_in(jax.random.key(seed), i), shape[1:]))(seeds, index)
        noise = jax.lax.with_sharding_constraint(noise, rows[4])

        def model_eps(x, t, cond):
          return schedule_lib.to_epsilon(
              task.schedule, prediction, model.apply({"params": params}, x, t, cond[0], cond[1],
                                                     train=False), x, t)

        if self.schedule is None:
          eps_fn, g = (lambda x, t: model_eps(x, t, (text, mask))), None
        else:
          null = (task.encode(encoder, null_ids, null_mask), null_mask)
          eps_fn, g = model_eps, guidance_lib.cfg(self.schedule, (text, mask), null)
        x0, _ = samplers.sample(eps_fn, shape, jax.random.key(loop_seed), sampler=s.sampler,
                                steps=s.steps, schedule=task.schedule, guidance=g,
                                dtype=task.dtype, spacing=self.spacing, initial=noise,
                                clip_denoised=s.clip_denoised or None)
        return decode(vae_params, x0)

    replicated = self._replicated
    jitted = jax.jit(draw, in_shardings=(
        self._param_shardings, self._encoder_shardings, replicated, rows[2], rows[2],
        replicated, replicated, rows[1], rows[1], None), out_shardings=rows[4])
    return jitted, rows

  @staticmethod
  def _global(values: np.ndarray, rows: dict) -> jax.Array:
    return jax.make_array_from_callback(values.shape, rows[values.ndim],
                                        lambda index: values[index])

  def tag(self, ema: bool) -> str:
    """A file-name tag of the protocol, e.g. ``heun30_ramp1.1to3.6_steps5toend_ema``."""
    s = self.config.sample
    return f"{s.sampler}{s.steps}_{generate.guidance_tag(s)}_{'ema' if ema else 'raw'}"

  def nfe(self) -> int:
    s = self.config.sample
    return samplers.nfe(s.sampler, s.steps, self.schedule)

  def protocol(self, *, step: int, ema: bool, seeds) -> dict:
    c = self.config
    s, d = c.sample, c.diffusion
    return {
        "sampler": s.sampler, "steps": s.steps, "spacing": self.spacing,
        "guidance": s.guidance,
        "guidance_scales": (None if self.schedule is None
                            else [float(x) for x in self.schedule.scales(s.steps)]),
        "negative_prompt": s.negative_prompt, "nfe_per_sample": self.nfe(),
        "seeds": sorted({int(x) for x in seeds}), "checkpoint_step": int(step), "ema": bool(ema),
        "clip_denoised": s.clip_denoised or None,
        "noise": "sample j: normal(fold_in(key(seed_j), prompt_index_j))",
        "schedule": {"num_train_steps": d.num_train_steps, "beta_start": d.beta_start,
                     "beta_end": d.beta_end, "kind": d.schedule},
        "prediction": d.prediction,
        "text_encoder": c.text.encoder_dir, "max_length": c.text.max_length,
        "vae_dir": s.vae_dir or None, "sample_shape": list(self.task.sample_shape()),
        "image_size": [c.data.height, c.data.width],
    }

  def chunks(self, params, prompts, seeds, index=None, progress: bool = False):
    """``(images, count)`` per jitted batch, left on the devices that drew them: uint8
    ``[b, H, W, C]`` (``b``: ``generate.BatchedPrograms.call_batch_size``) split over the
    data-parallel devices, whose first ``count`` rows are the next samples (``prompts[j]`` with
    ``seeds[j]`` and noise index ``index[j]``, default ``j``); the rest repeat the last. Every
    process passes the same arguments."""
    prompts = list(prompts)
    n = len(prompts)
    seeds = np.broadcast_to(np.asarray(seeds, np.int32), (n,))
    index = np.arange(n, dtype=np.int32) if index is None else np.asarray(index, np.int32)
    ids, mask = self.task.tokenize(prompts)
    null_ids, null_mask = self.task.tokenize([self.config.sample.negative_prompt])
    if not n:
      return
    b, (draw, shardings) = self._programs.for_samples(n)
    put = lambda values: self._global(values, shardings)
    for start in tqdm(range(0, n, b), desc="sampling", unit="batch", disable=not progress):
      rows = np.arange(start, start + b).clip(max=n - 1)  # the last batch repeats its last row.
      images = draw(params, self.encoder, self._vae_params, put(ids[rows]), put(mask[rows]),
                    null_ids, null_mask, put(seeds[rows]), put(index[rows]), int(seeds[start]))
      yield images, min(b, n - start)

  def __call__(self, params, prompts, seeds, index=None, progress: bool = False) -> np.ndarray:
    """uint8 images ``[N, H, W, C]`` on every process (see ``chunks``)."""
    out = []
    for images, count in self.chunks(params, prompts, seeds, index, progress):
      if jax.process_count() > 1:  # every process gets every sample.
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        images = multihost_utils.process_allgather(images, tiled=True)
      out.append(np.asarray(jax.device_get(images))[:count])
    return np.concatenate(out) if out else np.zeros((0,), np.uint8)


def _params(variants: dict, ema: bool):
  return variants["ema" if ema else "raw"][0]


def _write_grid(path: str, images, captions, columns: int) -> None:
  viz.save_png(path, viz.captioned_grid(images, captions, columns=columns,
                                        scale=max(1, 96 // images.shape[1]), max_lines=4))


# ---- evaluators -------------------------------------------------------------------------------

class GridEvaluator:
  """A captioned grid of fixed prompts x ``num_seeds`` seeds in ``DIR/samples``."""

  def __init__(self, name: str, cfg, task, setup):
    self.name, self.every_steps, self.cfg = name, int(cfg.every_steps), cfg
    self.task, self.setup = task, setup

  def run(self, inputs) -> dict:
    s = self.task.config.sample
    prompts = list(self.cfg.prompts or s.grid_prompts)
    seeds = s.seed + np.arange(self.cfg.num_seeds)
    all_prompts = [p for p in prompts for _ in seeds]
    sampler = self.task.text_sampler(self.setup)
    images = sampler(_params(inputs.variants, s.ema), all_prompts, np.tile(seeds, len(prompts)),
                     np.repeat(np.arange(len(prompts)), len(seeds)))
    if jax.process_index() == 0:
      name = f"grid_step{inputs.step:07d}_{sampler.tag(s.ema)}"
      folder = fileio.join(inputs.workdir, "samples")
      _write_grid(fileio.join(folder, f"{name}.png"), images, all_prompts, self.cfg.columns)
      protocol = sampler.protocol(step=inputs.step, ema=s.ema, seeds=seeds)
      protocol["prompts"] = prompts
      fileio.write_text(fileio.join(folder, f"{name}.json"), json.dumps(protocol, indent=2))
    return {}


def held_out_prompts(config, cfg) -> list[dict]:
  """GenEval metadata of held-out digit scenes: ``num_per_tag`` per tag (single_digit mode:
  ``num_per_tag`` single-object prompts), at the run's canvas size."""
  from ascan_jax.tasks import text_to_image  # pylint: disable=g-import-not-at-top
  mode = cfg.scene_mode or config.data.scene_mode
  split = config.data.eval_split
  if mode == "single_digit":
    tags = [None]
  else:
    tags = digit_scenes.TAGS
  out = []
  for tag in tags:
    src = text_to_image.scene_source(config, split, mode=mode, num_examples=cfg.num_per_tag,
                                     seed=cfg.seed, tag_weights={tag: 1.0} if tag else {})
    out += [json.loads(src.load(i)["metadata"]) for i in range(cfg.num_per_tag)]
  return out


class CompositionalEvaluator:
  """GenEval-style scores of samples of held-out scene prompts (``eval.compositional``)."""

  def __init__(self, name: str, cfg, task, setup, judge_loader):
    self.name, self.every_steps, self.cfg = name, int(cfg.every_steps), cfg
    self.task, self.setup = task, setup
    self._judge_loader = judge_loader
    self._judge = None
    self._metadata = None

  def run(self, inputs) -> dict:
    from ascan_jax.eval import compositional  # pylint: disable=g-import-not-at-top
    e, s = self.cfg, self.task.config.sample
    if e.num_per_tag <= 0:
      return {}
    if self._judge is None:
      self._judge = self._judge_loader(e.judge_dir)
      self._metadata = held_out_prompts(self.task.config, e)
    judge = self._judge
    prompts = [m["prompt"] for m in self._metadata]
    sampler = self.task.text_sampler(self.setup)
    images = sampler(_params(inputs.variants, s.ema), prompts, e.seed)
    smoothing = float(judge.task.config.get("label_smoothing", 0.0))
    result = compositional.score(images, self._metadata, lambda crops: judge.predict(crops)[0],
                                 judge.image_size, label_smoothing=smoothing)
    metrics = {f"{e.prefix}{k}": float(v) for k, v in result.items()
               if k.startswith("geneval_") and k != "geneval_correct_images"}
    if jax.process_index() == 0:
      folder = fileio.join(inputs.workdir, "samples", f"{self.name}_step{inputs.step:07d}")
      picks = [i for tag in dict.fromkeys(result["tags"])
               for i in [j for j, t in enumerate(result["tags"]) if t == tag][:e.grid_per_tag]]
      marks = ["ok" if result["correct"][i] else "wrong" for i in picks]
      _write_grid(fileio.join(folder, "grid.png"), images[picks],
                  [f"{prompts[i]} [{m}]" for i, m in zip(picks, marks)],
                  columns=max(1, min(e.grid_per_tag, 8)))
      protocol = sampler.protocol(step=inputs.step, ema=s.ema, seeds=[e.seed])
      protocol.update(judge_dir=judge.workdir, judge_step=judge.step, metrics=metrics,
                      samples=[{"prompt": p, "tag": t, "correct": c, "reason": r}
                               for p, t, c, r in zip(prompts, result["tags"],
                                                     result["correct"], result["reasons"])])
      fileio.write_text(fileio.join(folder, "protocol.json"), json.dumps(protocol, indent=1))
    return metrics


class ClipScoreEvaluator:
  """CLIP score of samples of held-out captions (``eval.clip_score``)."""

  def __init__(self, name: str, cfg, task, setup):
    self.name, self.every_steps, self.cfg = name, int(cfg.every_steps), cfg
    self.task, self.setup = task, setup
    self._scorer = None

  def run(self, inputs) -> dict:
    e, s = self.cfg, self.task.config.sample
    if not e.clip_dir:
      return {}
    from ascan_jax.eval import clip_score  # pylint: disable=g-import-not-at-top
    from ascan_jax.tasks import text_to_image  # pylint: disable=g-import-not-at-top
    if self._scorer is None:
      self._scorer = clip_score.CLIPScorer(e.clip_dir)
    config = self.task.config
    src = text_to_image.scene_source(config, config.data.eval_split,
                                     num_examples=e.num_prompts, seed=e.seed)
    prompts = [src.load(i)["caption"] for i in range(e.num_prompts)]
    images = self.task.text_sampler(self.setup)(_params(inputs.variants, s.ema), prompts, e.seed)
    if images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)
    return {f"{e.prefix}clip_score": self._scorer.score(images, prompts)["clip_score"]}


class CaptionFidEvaluator:
  """FID, sFID, IS, precision and recall of one sample per caption of a caption file
  (``data.caption_sets``; e.g. COCO-30K from ``tools.make_caption_set``) against reference
  statistics. The FID plumbing is the diffusion task's: ``eval.inception_evaluator`` folds each
  batch into the statistics on the devices that drew it (``TextSampler.chunks``); only the first
  ``grid_size`` samples leave them (``generate.leading_rows``), for the captioned grid. The
  protocol (sampler, guidance, checkpoint, the caption file and its sha256, the reference and
  Inception files and their sha256) is written beside the grid as ``.json``."""

  def __init__(self, name: str, cfg, task, setup):
    self.name, self.every_steps, self.cfg = name, int(cfg.every_steps), cfg
    self.task, self.setup = task, setup
    self._inception = None
    self._captions = None

  def captions(self) -> list[dict]:
    if self._captions is None:
      rows = caption_sets.read(self.cfg.caption_file)
      self._captions = rows[:self.cfg.num_captions] if self.cfg.num_captions else rows
    return self._captions

  def run(self, inputs) -> dict:
    e, s = self.cfg, self.task.config.sample
    if not e.caption_file:
      return {}
    from ascan_jax.eval import inception_evaluator  # pylint: disable=g-import-not-at-top
    rows = self.captions()
    if self._inception is None:
      self._inception = inception_evaluator.InceptionEvaluator(e.inception_path,
                                                               e.reference_path)
    inception = self._inception
    prompts = [r["caption"] for r in rows]
    n = len(prompts)
    sampler = self.task.text_sampler(self.setup)
    stats = inception.start(n)
    first = []
    kept = 0
    for images, count in sampler.chunks(_params(inputs.variants, s.ema), prompts,
                                        e.seed + np.arange(n), np.arange(n),
                                        progress=jax.process_index() == 0):
      inception.add(stats, images, count)
      if kept < e.grid_size:
        first.append(generate.leading_rows(images, min(count, e.grid_size - kept)))
        kept += len(first[-1])
    metrics = {f"{e.prefix}{k}": v for k, v in inception.finish(stats).items()}
    protocol = sampler.protocol(step=inputs.step, ema=s.ema, seeds=[e.seed])
    protocol.update(inception.protocol(n))
    protocol.update(caption_file=e.caption_file,
                    caption_file_sha256=generative_metrics.file_sha256(e.caption_file),
                    num_captions=n, caption_seed=f"caption k (0-based line): seed {e.seed} + k, "
                    "noise index k", metrics=metrics)
    name = f"{self.name}_step{inputs.step:07d}_{sampler.tag(s.ema)}"
    folder = fileio.join(inputs.workdir, "samples")
    if jax.process_index() == 0:
      if first:
        images = np.concatenate(first)
        _write_grid(fileio.join(folder, f"{name}.png"), images, prompts[:len(images)],
                    columns=min(8, len(images)))
      fileio.write_text(fileio.join(folder, f"{name}.json"), json.dumps(protocol, indent=2))
    metrics[f"{e.prefix}sample_protocol"] = f"samples/{name}.json"
    return metrics


def build_evaluators(task, setup) -> dict:
  """The evaluators of ``config.evals`` of the types of this module."""
  from ascan_jax.tasks import judge as judge_lib  # pylint: disable=g-import-not-at-top
  out = {}
  for name in task.config.evals.keys():
    cfg = task.config.evals[name]
    if cfg.type == "sample_grid":
      out[name] = GridEvaluator(name, cfg, task, setup)
    elif cfg.type == "compositional":
      out[name] = CompositionalEvaluator(name, cfg, task, setup, judge_lib.Judge.from_workdir)
    elif cfg.type == "clip_score":
      out[name] = ClipScoreEvaluator(name, cfg, task, setup)
    elif cfg.type == "caption_fid":
      out[name] = CaptionFidEvaluator(name, cfg, task, setup)
  return out


# ---- --mode=sample ----------------------------------------------------------------------------

def sample_mode(task, context, workdir: str) -> dict:
  """One PNG per prompt and seed, a captioned grid and ``protocol.json`` (module docstring)."""
  s = task.config.sample
  prompts = read_prompts(s.prompts) if s.prompts else list(s.grid_prompts)
  seeds = s.seed + np.arange(s.num_seeds)
  order = [(p, int(seed)) for p in range(len(prompts)) for seed in seeds]
  sampler = task.text_sampler(context.setup)
  params = context.state.ema_params if s.ema else context.state.params
  images = sampler(params, [prompts[p] for p, _ in order], [seed for _, seed in order],
                   [p for p, _ in order], progress=jax.process_index() == 0)
  name = s.name or f"step{context.step:07d}_{sampler.tag(s.ema)}"
  folder = fileio.join(workdir, "samples", name)
  if jax.process_index() != 0:
    return {"folder": folder}
  entries = []
  for (p, seed), image in zip(order, images):
    file = f"images/{p:05d}_seed{seed}.png"
    viz.save_png(fileio.join(folder, file), image if image.shape[-1] != 1 else image[..., 0])
    entries.append({"file": file, "prompt": prompts[p], "prompt_index": p, "seed": seed})
  shown = min(len(order), 64 * len(seeds))
  _write_grid(fileio.join(folder, "grid.png"), images[:shown],
              [prompts[p] for p, _ in order[:shown]], columns=max(len(seeds), 4))
  protocol = sampler.protocol(step=context.step, ema=s.ema, seeds=seeds)
  protocol.update(prompts_file=s.prompts or None, num_prompts=len(prompts),
                  num_samples=len(order), samples=entries)
  fileio.write_text(fileio.join(folder, "protocol.json"), json.dumps(protocol, indent=2))
  print(f"wrote {len(order)} samples ({len(prompts)} prompts x {len(seeds)} seeds) to {folder}",
        flush=True)
  logging.info("samples: %s", folder)
  return {"folder": folder, "num_samples": len(order)}
