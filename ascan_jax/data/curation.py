"""Filters that curate an image-caption set, and the learned score heads.

``tools.curate`` runs them; they live here, below ``eval/``, so they take CLIP embeddings as
arrays (the tool computes them with ``eval.clip_score.CLIPScorer.image_features``).

Per-record filters, checked in ``FILTERS`` order; a record is dropped for the first that fails
(``report.json`` also counts every filter a record fails):

* ``unreadable``: the source raised ``RecordError`` (corrupt image, caption not UTF-8, no
  caption), with the error as the reason;
* ``caption_length``: fewer than ``min_caption_words`` or more than ``max_caption_words``
  whitespace-separated words (an empty caption has none);
* ``resolution``: shorter side below ``min_side`` pixels;
* ``aspect_ratio``: longer / shorter side above ``max_aspect``;
* ``near_constant``: standard deviation of the grey image below ``min_pixel_std`` (0..255);
* ``blur``: variance of the Laplacian (OpenCV, 3x3 aperture) of the grey image, downscaled so its
  shorter side is at most ``blur_side`` (so the threshold does not depend on resolution), below
  ``min_laplacian_var`` (Pech-Pacheco et al. 2000; about 100 at 512 px is a common cut for photos);
* ``aesthetic`` / ``watermark`` / ``nsfw``: a ``ScoreHead`` on the CLIP image embedding; kept when
  aesthetic >= ``min_aesthetic``, watermark <= ``max_watermark``, nsfw <= ``max_nsfw``;
* ``duplicate``: near-duplicates over the whole set, by perceptual hash (``imagehash.phash``, 64
  bits) within Hamming distance ``dedup_max_distance``. Deterministic keep-first rule: among the
  records that pass every other filter, taken in index order, a record is dropped when an earlier
  *kept* record lies within the distance (``find_duplicates``; multi-index hashing: the hash is
  cut into ``distance + 1`` bands and, by the pigeonhole principle, any two hashes that close
  agree exactly on one band, so only records sharing a band are compared). Mirrored copies are
  not duplicates to a perceptual hash.

``ScoreHead`` files (``.npz`` or ``.safetensors``): arrays ``w0, b0, w1, b1, ...`` (``w_k``
``[in, out]``, last ``out`` 1) applied as ``x @ w_k + b_k`` with ``activation`` (``relu`` or
``none``) between layers; string settings ``activation``, ``normalize`` (``l2``: unit-normalise the
embedding first, as LAION's aesthetic predictor does, or ``none``) and ``output`` (``raw`` or
``sigmoid``, a probability for watermark/NSFW), stored as 0-d string arrays in ``.npz`` or in the
safetensors metadata. LAION's improved aesthetic predictor (an MLP 768-1024-128-64-16-1 without
activations on L2-normalised CLIP ViT-L/14 embeddings) converts by transposing its ``Linear``
weights into ``w_k``.
"""
from __future__ import annotations

import os
from typing import Iterable, Mapping, Sequence

import cv2
import ml_collections
import numpy as np
from PIL import Image

FILTERS = ("unreadable", "caption_length", "resolution", "aspect_ratio", "near_constant", "blur",
           "aesthetic", "watermark", "nsfw", "duplicate")
HEADS = ("aesthetic", "watermark", "nsfw")


def curation_config() -> ml_collections.ConfigDict:
  """Thresholds of every filter (``tools.curate --config.KEY=VALUE``)."""
  c = ml_collections.ConfigDict()
  c.min_caption_words = 1
  c.max_caption_words = 512
  c.min_side = 256
  c.max_aspect = 3.0
  c.min_pixel_std = 4.0
  c.min_laplacian_var = 100.0
  c.blur_side = 512
  c.dedup_max_distance = 4  # phash Hamming distance; -1 turns de-duplication off.
  c.clip_dir = ""  # a CLIPModel directory: needed by the heads.
  c.aesthetic_head = ""  # ScoreHead files; empty: the filter is off.
  c.min_aesthetic = 5.0
  c.watermark_head = ""
  c.max_watermark = 0.5
  c.nsfw_head = ""
  c.max_nsfw = 0.5
  c.captions = ""  # recaptioning: a .jsonl of {"key" | "index", "caption" | "text"}.
  c.recaption_mode = "replace"  # replace | add (keep the old captions as alternatives).
  return c


def check_config(c) -> None:
  problems = []
  if c.min_caption_words < 0 or c.max_caption_words < c.min_caption_words:
    problems.append("caption word limits must satisfy 0 <= min_caption_words <= "
                    "max_caption_words")
  if c.max_aspect < 1:
    problems.append(f"max_aspect must be >= 1 (longer / shorter side), got {c.max_aspect}")
  if c.dedup_max_distance > 31:
    problems.append(f"dedup_max_distance {c.dedup_max_distance} is more than half of the 64 "
                    "hash bits")
  if c.recaption_mode not in ("replace", "add"):
    problems.append(f"recaption_mode must be replace or add, got {c.recaption_mode!r}")
  if any(c[f"{h}_head"] for h in HEADS) and not c.clip_dir:
    problems.append("a score head needs config.clip_dir (the CLIP model of its embeddings)")
  if problems:
    raise ValueError("curation config: " + "; ".join(problems))


# ---- measurements and per-record filters ---------------------------------------------------------


def grey(image: np.ndarray) -> np.ndarray:
  return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)


def laplacian_variance(image: np.ndarray, max_side: int = 512) -> float:
  g = grey(image)
  short = min(g.shape)
  if short > max_side:
    scale = max_side / short
    g = cv2.resize(g, (round(g.shape[1] * scale), round(g.shape[0] * scale)),
                   interpolation=cv2.INTER_AREA)
  return float(cv2.Laplacian(g, cv2.CV_64F, ksize=3).var())


def perceptual_hash(image: np.ndarray) -> int:
  """64-bit DCT perceptual hash (``imagehash.phash``) as an int."""
  import imagehash
  return int(str(imagehash.phash(Image.fromarray(image))), 16)


def measure(image: np.ndarray, caption: str, config) -> dict:
  """Everything the per-record filters look at (JSON-serialisable)."""
  h, w = image.shape[:2]
  return {"height": int(h), "width": int(w), "words": len(caption.split()),
          "pixel_std": round(float(grey(image).std()), 4),
          "laplacian_var": round(laplacian_variance(image, config.blur_side), 4),
          "phash": f"{perceptual_hash(image):016x}"}


def failures(m: Mapping, config) -> list[tuple[str, str]]:
  """``(filter, reason)`` for every per-record filter ``m`` (from ``measure``) fails; a reason is
  ``'<rule> (<measured value>)'``, so the text before `` (`` groups records in the report."""
  out = []
  if m["words"] < config.min_caption_words:
    out.append(("caption_length", f"caption words < {config.min_caption_words} ({m['words']})"))
  elif m["words"] > config.max_caption_words:
    out.append(("caption_length", f"caption words > {config.max_caption_words} ({m['words']})"))
  short, long = min(m["height"], m["width"]), max(m["height"], m["width"])
  if short < config.min_side:
    out.append(("resolution", f"shorter side < {config.min_side} ({short})"))
  if long / max(1, short) > config.max_aspect:
    out.append(("aspect_ratio", f"aspect > {config.max_aspect} ({long / max(1, short):.2f})"))
  if m["pixel_std"] < config.min_pixel_std:
    out.append(("near_constant", f"pixel std < {config.min_pixel_std} ({m['pixel_std']:.2f})"))
  if m["laplacian_var"] < config.min_laplacian_var:
    out.append(("blur", f"Laplacian variance < {config.min_laplacian_var} "
                f"({m['laplacian_var']:.1f})"))
  return out


def score_failures(scores: Mapping[str, float], config) -> list[tuple[str, str]]:
  out = []
  if "aesthetic" in scores and scores["aesthetic"] < config.min_aesthetic:
    out.append(("aesthetic", f"aesthetic < {config.min_aesthetic} ({scores['aesthetic']:.3f})"))
  for name in ("watermark", "nsfw"):
    limit = config[f"max_{name}"]
    if name in scores and scores[name] > limit:
      out.append((name, f"{name} > {limit} ({scores[name]:.3f})"))
  return out


def reason_kind(reason: str) -> str:
  """The rule of a reason, without the measured value: 'shorter side < 32 (16)' -> 'shorter
  side < 32'."""
  return reason.split(" (")[0].strip()


def unreadable_reason(error: str) -> str:
  """The kind of a ``RecordError`` message: its text after the location, before details."""
  text = error.split(": ", 1)[1] if ": " in error else error
  return reason_kind(text)


# ---- near-duplicates -----------------------------------------------------------------------------


def _bands(max_distance: int, bits: int = 64) -> list[tuple[int, int]]:
  n = max_distance + 1
  edges = [round(k * bits / n) for k in range(n + 1)]
  return [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges[:-1], edges[1:])]


def find_duplicates(hashes: Sequence[int | None], max_distance: int) -> dict[int, int]:
  """``{i: j}``: record ``i`` is a near-duplicate of the earlier kept record ``j`` (the module
  docstring's keep-first rule); ``None`` hashes take no part."""
  if max_distance < 0:
    return {}
  bands = _bands(max_distance)
  tables: list[dict[int, list[int]]] = [{} for _ in bands]
  duplicate_of: dict[int, int] = {}
  for i, h in enumerate(hashes):
    if h is None:
      continue
    keys = [(h >> lo) & mask for lo, mask in bands]
    candidates = set()
    for table, key in zip(tables, keys):
      candidates.update(table.get(key, ()))
    close = [j for j in candidates if (h ^ hashes[j]).bit_count() <= max_distance]
    if close:
      duplicate_of[i] = min(close)
      continue
    for table, key in zip(tables, keys):
      table.setdefault(key, []).append(i)
  return duplicate_of


# ---- learned score heads -------------------------------------------------------------------------


class ScoreHead:
  """A small MLP (or linear) head on CLIP image embeddings (module docstring for the file)."""

  def __init__(self, weights: Sequence[tuple[np.ndarray, np.ndarray]], activation: str = "relu",
               normalize: str = "l2", output: str = "raw", name: str = ""):
    if activation not in ("relu", "none") or normalize not in ("l2", "none") or \
        output not in ("raw", "sigmoid"):
      raise ValueError(f"score head {name}: activation relu|none, normalize l2|none, output "
                       f"raw|sigmoid; got {activation!r}, {normalize!r}, {output!r}")
    self.weights = [(np.asarray(w, np.float32), np.asarray(b, np.float32)) for w, b in weights]
    for k, (w, b) in enumerate(self.weights):
      if w.ndim != 2 or b.shape != (w.shape[1],):
        raise ValueError(f"score head {name}: w{k} {w.shape} and b{k} {b.shape} do not make a "
                         "layer ([in, out] and [out])")
      if k and w.shape[0] != self.weights[k - 1][0].shape[1]:
        raise ValueError(f"score head {name}: w{k} takes {w.shape[0]} inputs, w{k - 1} gives "
                         f"{self.weights[k - 1][0].shape[1]}")
    if self.weights[-1][0].shape[1] != 1:
      raise ValueError(f"score head {name}: the last layer must have one output")
    self.activation, self.normalize, self.output, self.name = activation, normalize, output, name

  @property
  def input_dim(self) -> int:
    return self.weights[0][0].shape[0]

  def __call__(self, embeddings: np.ndarray) -> np.ndarray:
    x = np.asarray(embeddings, np.float32)
    if x.ndim != 2 or x.shape[1] != self.input_dim:
      raise ValueError(f"score head {self.name} takes embeddings [N, {self.input_dim}], got "
                       f"{x.shape} (another CLIP model?)")
    if self.normalize == "l2":
      x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    for k, (w, b) in enumerate(self.weights):
      x = x @ w + b
      if self.activation == "relu" and k < len(self.weights) - 1:
        x = np.maximum(x, 0.0)
    x = x[:, 0]
    return 1.0 / (1.0 + np.exp(-x)) if self.output == "sigmoid" else x


_SETTINGS = ("activation", "normalize", "output")


def load_head(path: str, name: str = "") -> ScoreHead:
  """A ``ScoreHead`` from ``.npz`` or ``.safetensors`` (module docstring)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"score head {name or ''} file {path} does not exist")
  if path.endswith(".safetensors"):
    from safetensors import safe_open
    with safe_open(path, "np") as f:
      arrays = {k: f.get_tensor(k) for k in f.keys()}
      settings = dict(f.metadata() or {})
  else:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files if k not in _SETTINGS}
      settings = {k: str(f[k]) for k in f.files if k in _SETTINGS}
  layers = []
  while f"w{len(layers)}" in arrays:
    k = len(layers)
    if f"b{k}" not in arrays:
      raise ValueError(f"score head {path}: w{k} has no b{k}")
    layers.append((arrays[f"w{k}"], arrays[f"b{k}"]))
  if not layers:
    raise ValueError(f"score head {path} holds no w0/b0 (arrays: {sorted(arrays)})")
  return ScoreHead(layers, **{k: settings[k] for k in _SETTINGS if k in settings},
                   name=name or os.path.basename(path))


def save_head(path: str, weights: Iterable[tuple[np.ndarray, np.ndarray]], *,
              activation: str = "relu", normalize: str = "l2", output: str = "raw") -> None:
  arrays = {}
  for k, (w, b) in enumerate(weights):
    arrays[f"w{k}"], arrays[f"b{k}"] = np.asarray(w, np.float32), np.asarray(b, np.float32)
  settings = {"activation": activation, "normalize": normalize, "output": output}
  if path.endswith(".safetensors"):
    import safetensors.numpy
    safetensors.numpy.save_file(arrays, path, metadata=settings)
  else:
    with open(path, "wb") as f:
      np.savez(f, **arrays, **{k: np.array(v) for k, v in settings.items()})


def clip_thumbnail(image: np.ndarray, size: int) -> np.ndarray:
  """Shorter side resized to ``size`` (bicubic), centre crop ``size`` x ``size``: CLIP's image
  preprocessing done on the host, so images of any shape batch together."""
  h, w = image.shape[:2]
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
  top, left = (nh - size) // 2, (nw - size) // 2
  return resized[top:top + size, left:left + size]


def head_scores(heads: Mapping[str, ScoreHead], embeddings: np.ndarray) -> dict[str, np.ndarray]:
  return {name: head(embeddings) for name, head in heads.items()}
