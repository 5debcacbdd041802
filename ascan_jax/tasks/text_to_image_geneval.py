"""``--mode=geneval`` of the text-to-image task: samples of GenEval's prompts in GenEval's layout.

``python main.py --config=... --workdir=DIR --mode=geneval --config.eval.geneval_metadata=FILE``
reads GenEval's ``evaluation_metadata.jsonl`` (``eval.geneval_files.read_metadata``: a bad line
fails before any sampling) and writes, for prompt ``i`` (line ``i + 1``)::

    OUT/<i:05d>/metadata.jsonl        that line, unchanged
    OUT/<i:05d>/samples/<j:04d>.png   j < eval.geneval_samples (default 4)
    OUT/<i:05d>/grid.png              the prompt's samples in one row, the prompt under the first
    OUT/protocol.json                 sampler, guidance, seeds, checkpoint, metadata file + sha256

which is the layout GenEval's ``evaluation/evaluate_images.py`` walks. ``OUT`` is
``eval.geneval_output`` or ``DIR/geneval/step<N>_<sampler tag>`` (the tag of
``TextSampler.tag``: sampler, steps, guidance, EMA). Sample ``j`` of prompt ``i`` has seed
``sample.seed + j`` and noise index ``i`` (``TextSampler``), so it does not depend on the batch
size, the number of devices, or which prompts a resumed run still had to draw. The sampler
is sharded over all devices; process 0 writes. Resumable: a prompt folder whose
``metadata.jsonl`` (written last) equals its line and whose samples and grid are all there is
skipped; ``OUT/protocol.json`` is written first, and a rerun whose protocol differs (another
sampler, seed, sample count or metadata file) stops instead of mixing the two.
At the end the commands for GenEval's evaluator are printed; its ``results.jsonl`` becomes
``geneval/<tag>`` lines of ``DIR/metrics.jsonl`` with ``tools.geneval_scores``.
"""
from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
from etils import epath
from tqdm import tqdm

from ascan_jax import config_validation as cv
from ascan_jax import fileio
from ascan_jax import viz
from ascan_jax.eval import generative_metrics
from ascan_jax.eval import geneval_files
from ascan_jax.tasks import base


def geneval_schema() -> ml_collections.ConfigDict:
  """``config.eval``: the GenEval export (``--mode=geneval``)."""
  c = ml_collections.ConfigDict()
  c.geneval_metadata = ""  # GenEval's prompts/evaluation_metadata.jsonl.
  c.geneval_samples = 4  # images per prompt (GenEval's default).
  c.geneval_output = ""  # empty: DIR/geneval/step<N>_<sampler tag>.
  return c


def check_geneval_config(config, mode: str) -> None:
  e = config.eval
  cv.require(e.geneval_samples >= 1, "eval.geneval_samples", "must be >= 1")
  if mode == "geneval":
    cv.require(bool(e.geneval_metadata), "eval.geneval_metadata",
               "--mode=geneval needs GenEval's evaluation_metadata.jsonl "
               "(--config.eval.geneval_metadata=FILE)")


def _folder(out: str, i: int) -> str:
  return fileio.join(out, f"{i:05d}")


def _is_complete(folder: str, line: str, n: int) -> bool:
  meta = fileio.join(folder, "metadata.jsonl")
  if not fileio.exists(meta) or fileio.read_text(meta).strip() != line:
    return False
  files = [fileio.join(folder, "samples", f"{j:04d}.png") for j in range(n)]
  return all(fileio.exists(f) for f in files + [fileio.join(folder, "grid.png")])


def _write_folder(folder: str, line: str, prompt: str, images: np.ndarray) -> None:
  samples = epath.Path(fileio.join(folder, "samples"))
  if fileio.exists(fileio.join(folder, "metadata.jsonl")):
    epath.Path(fileio.join(folder, "metadata.jsonl")).unlink()  # incomplete until rewritten.
  if samples.exists():  # samples of an earlier, larger geneval_samples would be read too.
    for stale in samples.glob("*.png"):
      stale.unlink()
  for j, image in enumerate(images):
    viz.save_png(fileio.join(folder, "samples", f"{j:04d}.png"),
                 image if image.shape[-1] != 1 else image[..., 0])
  captions = [prompt] + [""] * (len(images) - 1)
  viz.save_png(fileio.join(folder, "grid.png"), viz.captioned_grid(
      images, captions, columns=len(images), scale=max(1, 96 // images.shape[1]), max_lines=4))
  fileio.write_text(fileio.join(folder, "metadata.jsonl"), line + "\n")


def _check_protocol(out: str, protocol: dict) -> None:
  path = fileio.join(out, "protocol.json")
  if fileio.exists(path):
    saved = json.loads(fileio.read_text(path))
    changed = sorted(k for k in protocol if k not in ("checkpoint_step", "geneval_metadata")
                     and saved.get(k) != protocol[k])
    if changed:
      raise base.TaskError(f"{out} holds GenEval samples of another protocol ({', '.join(changed)} "
                       "differ); set config.eval.geneval_output to a new folder or delete it")


def export(task, context, workdir: str) -> dict:
  """``--mode=geneval`` (module docstring); returns ``{"folder", "num_prompts", "drawn"}``."""
  config = task.config
  e, s = config.eval, config.sample
  try:  # before any sampling.
    metadata = geneval_files.read_metadata(e.geneval_metadata)
  except geneval_files.MetadataError as err:
    raise base.TaskError(f"config.eval.geneval_metadata: {err}") from None
  n = int(e.geneval_samples)
  sampler = task.text_sampler(context.setup)
  out = e.geneval_output or fileio.join(workdir, "geneval",
                                        f"step{context.step:07d}_{sampler.tag(s.ema)}")
  seeds = s.seed + np.arange(n)
  protocol = sampler.protocol(step=context.step, ema=s.ema, seeds=seeds)
  protocol.update(geneval_metadata=e.geneval_metadata,
                  geneval_metadata_sha256=generative_metrics.file_sha256(e.geneval_metadata),
                  num_prompts=len(metadata), samples_per_prompt=n,
                  layout="<prompt index:05d>/{metadata.jsonl, samples/<j:04d>.png, grid.png}",
                  sample_seed="sample j of prompt i: seed sample.seed + j, noise index i")
  _check_protocol(out, protocol)
  todo = [i for i, (line, _) in enumerate(metadata) if not _is_complete(_folder(out, i), line, n)]
  main_process = jax.process_index() == 0
  if main_process:
    fileio.makedirs(out)
    fileio.write_text(fileio.join(out, "protocol.json"), json.dumps(protocol, indent=2))
  params = context.state.ema_params if s.ema else context.state.params
  per_call = max(1, sampler.batch_size // n)  # whole prompts per sampler call.
  print(f"geneval: {len(metadata)} prompts x {n} samples -> {out} ({len(metadata) - len(todo)} "
        "already there)", flush=True)
  with tqdm(total=len(todo), unit="prompt", desc="geneval", disable=not main_process) as bar:
    for lo in range(0, len(todo), per_call):
      chunk = todo[lo:lo + per_call]
      prompts = [metadata[i][1]["prompt"] for i in chunk for _ in range(n)]
      images = sampler(params, prompts, np.tile(seeds, len(chunk)), np.repeat(chunk, n))
      if main_process:
        for k, i in enumerate(chunk):
          line, meta = metadata[i]
          _write_folder(_folder(out, i), line, meta["prompt"], images[k * n:(k + 1) * n])
      bar.update(len(chunk))
  if main_process:
    print(f"wrote GenEval's layout to {out}. Score it with GenEval's evaluator (a checkout of "
          "djghosh13/geneval, in its own environment, with its Mask2Former weights):\n"
          f"  python evaluation/evaluate_images.py {out} --outfile {out}/results.jsonl "
          "--model-path <MASK2FORMER_DIR>\n"
          f"  python evaluation/summary_scores.py {out}/results.jsonl\n"
          "then record the scores in this run's metrics.jsonl:\n"
          f"  python -m ascan_jax.tools.geneval_scores --results={out}/results.jsonl "
          f"--workdir={workdir}", flush=True)
  return {"folder": out, "num_prompts": len(metadata), "drawn": len(todo)}
