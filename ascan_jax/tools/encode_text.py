"""Encodes a file of prompts with a T5 encoder into an ``.npz`` of embeddings.

  python -m ascan_jax.tools.encode_text --text_encoder=DIR --prompts=FILE --output=OUT.npz \
      [--max_length=128] [--batch_size=N] [--dtype=auto]

``DIR`` is a transformers T5 directory (``config.json``, safetensors weights, ``spiece.model``:
Flan-T5-XXL, or ``tools.make_random_t5``'s stand-in). ``FILE`` is UTF-8 text, one prompt a line;
an empty line is the empty prompt (the unconditional input of classifier-free guidance); a
final newline does not add one, and a ``\\r`` before a newline is dropped. The encoder's
parameters are sharded over all devices by the default logical rules (FSDP on a
``(data=1, fsdp=all, tensor=1)`` mesh, so Flan-T5-XXL's 4.7B parameters need not fit on one
device) and each batch of ``--batch_size`` prompts (default 8 per device; a multiple of the
device count) is split over all devices (global arrays built with
``jax.make_array_from_callback``: every process reads every prompt and hands its own devices
their rows, whatever the mesh's device order). The last batch is padded and the padding dropped.

``OUT.npz`` (written by process 0, atomically) holds ``embeddings`` float32 ``[N, L, D]`` (the
encoder's last hidden state; positions past a prompt's EOS hold the encoder's output for the
padding, exactly as transformers gives them: read them through the mask), ``mask`` int32
``[N, L]`` (1 = token, EOS included), ``input_ids`` int32 ``[N, L]`` and ``prompts`` (a unicode
array). ``--dtype``: the matmul compute dtype (``auto``: bfloat16 on GPU/TPU, float32 on CPU);
norms, softmax and the residual stream are float32 either way. One ``.npz`` holds everything in
host memory: meant for evaluation prompt sets, not for caching a training set.
"""
from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags
import jax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import numpy as np
from tqdm import tqdm

from ascan_jax import compute
from ascan_jax import config_defaults
from ascan_jax.data import t5_tokenizer
from ascan_jax.models import t5
from ascan_jax.parallel import sharding as sharding_lib

PER_DEVICE_BATCH = 8


def read_prompts(path: str) -> list[str]:
  """One prompt per line of a UTF-8 file (see the module docstring)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompts file {path} not found")
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    raise ValueError(f"prompts file {path} is not UTF-8: line {line}: {e.reason}") from None
  if not text:
    raise ValueError(f"prompts file {path} is empty (an empty prompt is an empty line)")
  lines = text.split("\n")
  if lines[-1] == "":
    lines.pop()
  return [line[:-1] if line.endswith("\r") else line for line in lines]


class TextEncoder:
  """A T5 directory's tokenizer and encoder, jitted, parameters and batches over all devices."""

  def __init__(self, directory: str, max_length: int = 128, batch_size: int | None = None,
               dtype: str = "auto"):
    devices = jax.devices()
    self.batch_size = batch_size or PER_DEVICE_BATCH * len(devices)
    if self.batch_size % len(devices):
      raise ValueError(f"batch_size {self.batch_size} is not a multiple of the {len(devices)} "
                       "devices")
    self.max_length = max_length
    self.tokenizer = t5_tokenizer.T5Tokenizer.from_directory(directory)
    self.mesh = jax.make_mesh((1, len(devices), 1), ("data", "fsdp", "tensor"),
                              axis_types=(AxisType.Auto,) * 3, devices=devices)
    self.rules = config_defaults.DEFAULT_RULES
    self.model, self.params = t5.from_pretrained(directory, dtype=compute.compute_dtype(dtype),
                                                 mesh=self.mesh, rules=self.rules)
    config = self.model.config
    if self.tokenizer.vocab_size > config.vocab_size:
      raise ValueError(f"{directory}: the tokenizer has {self.tokenizer.vocab_size} ids, the "
                       f"model's embedding only {config.vocab_size} rows (vocab_size)")
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh, self.rules, 2, self.batch_size)
    out_sharding = NamedSharding(self.mesh, P(*self.batch_sharding.spec, None))
    param_shardings = jax.tree.map(lambda a: a.sharding, self.params)
    model, mesh, rules = self.model, self.mesh, self.rules

    def encode(params, ids, mask):
      with sharding_lib.in_mesh(mesh, rules):
        return model.apply({"params": params}, ids, mask)

    self._encode = jax.jit(encode, in_shardings=(param_shardings, self.batch_sharding,
                                                 self.batch_sharding),
                           out_shardings=out_sharding)

  def _global(self, rows: np.ndarray) -> jax.Array:
    """A global batch from this process's copy of it: every process holds every prompt, and
    each local device takes its rows, whatever the mesh's device order."""
    return jax.make_array_from_callback(rows.shape, self.batch_sharding, lambda index: rows[index])

  def __call__(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(embeddings float32 [N, L, D], mask int32 [N, L], ids int32 [N, L])`` on every process."""
    ids, mask = self.tokenizer.encode(prompts, self.max_length)
    outputs = []
    bar = tqdm(total=len(prompts), desc="encoding prompts", unit="prompt",
               disable=jax.process_index() != 0 or len(prompts) <= self.batch_size)
    for start in range(0, len(prompts), self.batch_size):
      rows = slice(start, start + self.batch_size)
      n = len(ids[rows])
      pad = ((0, self.batch_size - n), (0, 0))  # padded rows: all masked, dropped below.
      out = self._encode(self.params, self._global(np.pad(ids[rows], pad)),
                         self._global(np.pad(mask[rows], pad)))
      outputs.append(np.asarray(multihost_utils.process_allgather(out, tiled=True))[:n])
      bar.update(n)
    bar.close()
    d_model = self.model.config.d_model
    embeddings = (np.concatenate(outputs) if outputs
                  else np.zeros((0, self.max_length, d_model), np.float32))
    return embeddings.astype(np.float32), mask, ids


def encode_text(text_encoder: str, prompts_path: str, output: str, max_length: int = 128,
                batch_size: int | None = None, dtype: str = "auto") -> dict:
  """Reads, encodes and writes (see the module docstring); returns a summary dict."""
  if not os.path.isdir(text_encoder):
    raise FileNotFoundError(f"text encoder directory {text_encoder} does not exist")
  prompts = read_prompts(prompts_path)
  start = time.time()
  encoder = TextEncoder(text_encoder, max_length, batch_size, dtype)
  embeddings, mask, ids = encoder(prompts)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = f"{output}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name.
      np.savez(f, embeddings=embeddings, mask=mask, input_ids=ids, prompts=np.array(prompts))
    os.replace(tmp, output)
  return {"prompts": len(prompts), "embeddings": embeddings.shape, "devices": jax.device_count(),
          "batch_size": encoder.batch_size, "seconds": time.time() - start,
          "config": encoder.model.config}


def _define_flags():
  flags.DEFINE_string("text_encoder", None, "transformers T5 directory (config.json, "
                      "safetensors, spiece.model).")
  flags.DEFINE_string("prompts", None, "UTF-8 text file, one prompt a line.")
  flags.DEFINE_string("output", None, "Output .npz file.")
  flags.DEFINE_integer("max_length", 128, "Tokens per prompt, EOS included (pad / truncate).")
  flags.DEFINE_integer("batch_size", None, "Prompts per encoder call over all devices "
                       f"(default {PER_DEVICE_BATCH} per device).")
  flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"], "Matmul compute dtype.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  if not (f.text_encoder and f.prompts and f.output):
    raise app.UsageError("--text_encoder, --prompts and --output are required")
  cache = os.environ.get("ASCAN_COMPILATION_CACHE", "")  # the convention of main.py and tests.
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  try:
    summary = encode_text(f.text_encoder, f.prompts, f.output, f.max_length, f.batch_size,
                          f.dtype)
  except (OSError, ValueError) as e:  # missing or malformed inputs: one line, no traceback.
    print(f"encode_text: error: {e}", file=sys.stderr)
    sys.exit(1)
  c = summary["config"]
  if jax.process_index() == 0:
    print(f"encoded {summary['prompts']} prompts with {f.text_encoder} (d_model={c.d_model}, "
          f"{c.num_layers} layers) on {summary['devices']} devices in {summary['seconds']:.1f}s:"
          f" {f.output} holds embeddings {list(summary['embeddings'])} float32, mask and "
          "input_ids int32, prompts")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
