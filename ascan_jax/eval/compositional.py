"""A GenEval-style compositional judge for images of coloured digits (the digit scenes' GenEval).

GenEval (Ghosh et al. 2023, arXiv 2310.11513; rules from djghosh13/geneval
``evaluation/evaluate_images.py`` and ``summary_scores.py``, re-implemented here) checks an image
against its prompt's metadata with an object detector. Here the detector is built for digits on a
dark canvas (``ascan_jax.data.digit_scenes``):

1. **Find objects**: connected components of the foreground (brightest channel >=
   ``FOREGROUND_LEVEL``), after a dilation that joins a digit's pieces (radius
   ``digit_scenes.merge_radius``, less than half the gap the generator keeps between objects);
   regions smaller than ``min_area`` are dropped. Box: the region's foreground pixels.
2. **Colour**: the mean colour of the brighter half of the region's foreground pixels, divided by
   its brightest channel, as a point (saturation cos hue, saturation sin hue); the nearest palette
   colour's point names it (white sits at the centre).
3. **Class**: a classifier callable ``classify(crops uint8 [N, S, S, 3]) -> logits [N, 10]`` on
   MNIST-like crops (white stroke on black: the brightest channel minus the background level,
   only the region's pixels, scaled so the longer side is 20/28 of ``S`` and centred by centre of
   mass, as MNIST was made). Confidence: the softmax probability of the top class; for a
   classifier trained with label smoothing eps (whose probabilities cannot pass 1 - eps + eps/10,
   0.91 for the runlocal classifier's 0.1) pass ``label_smoothing=eps`` and the confidence is
   read on the unsmoothed scale, (p - eps/10) / (1 - eps), so GenEval's thresholds keep their
   meaning.
4. **Rules** (GenEval's): detections with confidence above ``threshold`` (``counting_threshold``
   for counting prompts), at most ``max_objects`` per class, most confident first. Each
   ``include`` item needs at least ``count`` detections of its class; with a ``color``, its
   ``count`` most confident detections must all have that colour; with a ``position``
   [relation, j], every one of them must stand in that relation to every object matched by
   include item j (which must itself have matched). Relation from box centres with
   GenEval's margin: the offset shrunk by 0.1 of the two boxes' summed size per axis, divided by
   the offset's length, beyond 0.5 on an axis. Each ``exclude`` item fails the image when at
   least ``count`` detections of its class exist. An image is correct only if all items hold.
   One deliberate difference: GenEval keeps detections above 0.3, but above 0.9 for counting
   prompts, to drop the duplicate and partial boxes Mask2Former proposes when objects repeat.
   This detector gives every object exactly one region, so that role is void, while on a
   classifier's softmax 0.9 drops correctly read digits (the runlocal classifier: about 5 % of
   them on the unsmoothed scale, counting accuracy 0.81 instead of 0.94 on real held-out scenes;
   ``results/scenes/calibration.json``). ``counting_threshold`` therefore defaults to 0.3 like
   every other tag; ``GENEVAL_COUNTING_THRESHOLD`` gives GenEval's value.
5. **Summary** (GenEval's): accuracy per tag, and the overall score is the mean of the per-tag
   accuracies (not of all images).

``contradict`` makes metadata that no image holding exactly the described objects satisfies (the
calibration's wrong metadata). The classifier comes from the caller (``eval/`` imports neither
``train/`` nor ``tasks/``): ``tools/judge_scenes.py`` passes the trained judge classifier's
``Judge.predict`` logits.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Callable, Sequence

import cv2
import numpy as np

from ascan_jax.data import digit_scenes
from ascan_jax.data import scene_captions

TAGS = digit_scenes.TAGS
RELATIONS = scene_captions.RELATIONS
ITEM_KEYS = ("class", "count", "color", "position")
GENEVAL_THRESHOLD = 0.3
GENEVAL_COUNTING_THRESHOLD = 0.9
COUNTING_THRESHOLD = GENEVAL_THRESHOLD  # see the module docstring, rule 4.
GENEVAL_MAX_OBJECTS = 16
GENEVAL_POSITION_THRESHOLD = 0.1
MNIST_DIGIT_FRACTION = 20 / 28  # MNIST fits each digit in 20x20 and centres it in 28x28.

Classifier = Callable[[np.ndarray], np.ndarray]


class MetadataError(ValueError):
  """A metadata line that is not GenEval's schema; the message names the line and the key."""


@dataclasses.dataclass
class Detection:
  """One object found in an image; ``box`` is [y0, x0, y1, x1] with exclusive ends."""
  box: tuple[int, int, int, int]
  area: int
  color: str
  label: int = -1
  confidence: float = 0.0

  def to_dict(self) -> dict:
    name = digit_scenes.DIGIT_NAMES[self.label] if 0 <= self.label < 10 else None
    return {"box": list(self.box), "area": self.area, "color": self.color, "class": name,
            "confidence": round(self.confidence, 4)}


# --- metadata ---

def validate_metadata(obj, index: int | None = None, *, classes: Sequence[str] | None = None,
                      colors: Sequence[str] | None = None) -> dict:
  """GenEval metadata (a dict or one JSON line) checked and returned as a dict.

  Required: ``tag`` (one of GenEval's six), ``include`` (a non-empty list), ``prompt``. Items:
  ``class`` (str; in ``classes`` when given), ``count`` (int >= 1), optional ``color`` (str; in
  ``colors`` when given), optional ``position`` [relation, j] with j an earlier include item.
  Raises ``MetadataError`` naming the line ``index`` and the key.
  """
  where = f"metadata line {index}" if index is not None else "metadata"
  if isinstance(obj, (str, bytes)):
    try:
      obj = json.loads(obj)
    except json.JSONDecodeError as e:
      raise MetadataError(f"{where}: not JSON ({e})") from None
  if not isinstance(obj, dict):
    raise MetadataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  for key in ("tag", "include", "prompt"):
    if key not in obj:
      raise MetadataError(f"{where}: missing key {key!r} (GenEval metadata needs tag, include, "
                          "prompt; exclude is optional)")
  if obj["tag"] not in TAGS:
    raise MetadataError(f"{where}: key 'tag' is {obj['tag']!r}, not one of {TAGS}")
  if not isinstance(obj["prompt"], str):
    raise MetadataError(f"{where}: key 'prompt' must be a string")
  for group in ("include", "exclude"):
    items = obj.get(group, [])
    if not isinstance(items, list) or (group == "include" and not items):
      raise MetadataError(f"{where}: key {group!r} must be a "
                          f"{'non-empty ' if group == 'include' else ''}list of objects")
    for k, item in enumerate(items):
      _check_item(item, f"{where}: {group}[{k}]", k, group, classes, colors)
  return obj


def _check_item(item, where: str, k: int, group: str, classes, colors) -> None:
  if not isinstance(item, dict):
    raise MetadataError(f"{where}: expected an object, got {type(item).__name__}")
  for key in ("class", "count"):
    if key not in item:
      raise MetadataError(f"{where}: missing key {key!r}")
  unknown = sorted(set(item) - set(ITEM_KEYS))
  if unknown:
    raise MetadataError(f"{where}: unknown key(s) {unknown}; allowed: {ITEM_KEYS}")
  if not isinstance(item["class"], str) or (classes is not None and item["class"] not in classes):
    allowed = f"one of {tuple(classes)}" if classes is not None else "a string"
    raise MetadataError(f"{where}: key 'class' is {item['class']!r}, not {allowed}")
  count = item["count"]
  if isinstance(count, bool) or not isinstance(count, int) or count < 1:
    raise MetadataError(f"{where}: key 'count' must be an integer >= 1, got {count!r}")
  if "color" in item and (not isinstance(item["color"], str) or (
      colors is not None and item["color"] not in colors)):
    allowed = f"one of {tuple(colors)}" if colors is not None else "a string"
    raise MetadataError(f"{where}: key 'color' is {item['color']!r}, not {allowed}")
  if "position" in item:
    pos = item["position"]
    if group != "include":
      raise MetadataError(f"{where}: key 'position' is only allowed in include items")
    if (not isinstance(pos, (list, tuple)) or len(pos) != 2 or pos[0] not in RELATIONS
        or isinstance(pos[1], bool) or not isinstance(pos[1], int) or not 0 <= pos[1] < k):
      raise MetadataError(f"{where}: key 'position' must be [relation, j] with relation in "
                          f"{RELATIONS} and j an earlier include item (0 <= j < {k}), got {pos!r}")


def contradict(metadata: dict, rng: np.random.Generator,
               classes: Sequence[str] = digit_scenes.DIGIT_NAMES,
               colors: Sequence[str] = digit_scenes.COLOR_NAMES) -> dict:
  """Metadata false for every image that holds exactly the objects ``metadata`` describes.

  single_object / two_object: one included class becomes a class not named; colors: the colour
  becomes another; counting: the count goes up by one; position: the opposite relation;
  color_attr: the two colours swap (another colour when they are equal).
  """
  meta = json.loads(json.dumps(validate_metadata(metadata)))
  include, tag = meta["include"], meta["tag"]
  if tag in ("single_object", "two_object"):
    named = {item["class"] for item in include}
    k = int(rng.integers(len(include)))
    include[k]["class"] = str(rng.choice([c for c in classes if c not in named]))
  elif tag == "colors":
    include[0]["color"] = str(rng.choice([c for c in colors if c != include[0]["color"]]))
  elif tag == "counting":
    include[0]["count"] += 1
    for item in meta.get("exclude", []):
      item["count"] += 1
  elif tag == "position":
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    for item in include:
      if "position" in item:
        item["position"] = [opposite[item["position"][0]], item["position"][1]]
  elif tag == "color_attr":
    a, b = include[0].get("color"), include[1].get("color")
    if a is not None and b is not None and a != b:
      include[0]["color"], include[1]["color"] = b, a
    else:
      include[0]["color"] = str(rng.choice([c for c in colors if c != a]))
  return meta


# --- detection ---

@functools.lru_cache(maxsize=None)
def _palette_points() -> tuple[tuple[str, ...], np.ndarray]:
  names = tuple(digit_scenes.PALETTE)
  return names, np.stack([_chroma_point(np.asarray(digit_scenes.PALETTE[n], np.float64))
                          for n in names])


def _chroma_point(rgb: np.ndarray) -> np.ndarray:
  """(saturation cos hue, saturation sin hue) of one RGB colour (HSV hue and saturation)."""
  top, low = float(rgb.max()), float(rgb.min())
  if top <= 0 or top == low:
    return np.zeros(2)
  r, g, b = (float(v) for v in rgb)
  if top == r:
    hue = 60.0 * (((g - b) / (top - low)) % 6)
  elif top == g:
    hue = 60.0 * ((b - r) / (top - low) + 2)
  else:
    hue = 60.0 * ((r - g) / (top - low) + 4)
  sat = (top - low) / top
  return np.array([sat * math.cos(math.radians(hue)), sat * math.sin(math.radians(hue))])


def name_color(pixels: np.ndarray) -> str:
  """The palette colour nearest (in hue/saturation) to the brighter half of ``pixels`` [N, 3]."""
  pixels = np.asarray(pixels, np.float64).reshape(-1, 3)
  bright = pixels.max(-1)
  chosen = pixels[bright >= np.median(bright)]
  names, points = _palette_points()
  distance = np.linalg.norm(points - _chroma_point(chosen.mean(0)), axis=-1)
  return names[int(np.argmin(distance))]


@dataclasses.dataclass
class _Region:
  box: tuple[int, int, int, int]  # of the region's foreground pixels.
  window: tuple[int, int, int, int]  # of the grown region (foreground plus its dilation).
  mask: np.ndarray  # bool, the grown region inside ``window``.
  area: int


def _regions(grey: np.ndarray, foreground_level: int, radius: int | None,
             min_area: int | None) -> list[_Region]:
  """One region per object of a [H, W] brightest-channel image, in raster order."""
  h, w = grey.shape
  foreground = grey >= foreground_level
  radius = digit_scenes.merge_radius(h, w) if radius is None else radius
  min_area = max(3, math.ceil(0.002 * h * w)) if min_area is None else min_area
  grown = foreground.astype(np.uint8)
  if radius > 0:
    grown = cv2.dilate(grown, np.ones((2 * radius + 1, 2 * radius + 1), np.uint8))
  count, labels, stats, _ = cv2.connectedComponentsWithStats(grown, connectivity=8)
  out = []
  for k in range(1, count):
    x, y, bw, bh = (int(v) for v in stats[k, :4])
    mask = labels[y:y + bh, x:x + bw] == k
    fg = mask & foreground[y:y + bh, x:x + bw]
    area = int(fg.sum())
    if area < min_area:
      continue
    ys, xs = np.nonzero(fg)
    box = (y + int(ys.min()), x + int(xs.min()), y + int(ys.max()) + 1, x + int(xs.max()) + 1)
    out.append(_Region(box, (y, x, y + bh, x + bw), mask, area))
  return out


def _describe(image: np.ndarray, grey: np.ndarray, region: _Region,
              foreground_level: int) -> Detection:
  y0, x0, y1, x1 = region.window
  fg = region.mask & (grey[y0:y1, x0:x1] >= foreground_level)
  return Detection(region.box, region.area, name_color(image[y0:y1, x0:x1][fg]))


def find_objects(image: np.ndarray, *, foreground_level: int = digit_scenes.FOREGROUND_LEVEL,
                 radius: int | None = None, min_area: int | None = None) -> list[Detection]:
  """Objects of one uint8 [H, W, 3] image: box, area and colour (no class), in raster order."""
  image = _as_rgb(image)
  grey = image.max(-1)
  return [_describe(image, grey, r, foreground_level)
          for r in _regions(grey, foreground_level, radius, min_area)]


def mnist_crop(grey: np.ndarray, region: np.ndarray, size: int,
               background_level: int = digit_scenes.BACKGROUND_MAX) -> np.ndarray:
  """An MNIST-like uint8 [size, size, 3] crop (white stroke on black) of one object.

  ``grey``: the brightest channel of the image (or of a window of it); ``region``: a boolean mask
  of the same shape, True on the object's pixels and their surroundings (other objects False).
  """
  stroke = np.clip((grey.astype(np.float32) - background_level)
                   * (255.0 / (255.0 - background_level)), 0, 255)
  stroke = np.where(region, stroke, 0.0)
  ys, xs = np.nonzero(stroke > 0)
  out = np.zeros((size, size), np.float32)
  if len(ys) == 0:
    return np.zeros((size, size, 3), np.uint8)
  crop = stroke[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
  scale = size * MNIST_DIGIT_FRACTION / max(crop.shape)
  new_h = min(size, max(1, int(round(crop.shape[0] * scale))))
  new_w = min(size, max(1, int(round(crop.shape[1] * scale))))
  interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
  small = cv2.resize(crop, (new_w, new_h), interpolation=interp)
  total = float(small.sum())
  if total > 0:  # centre of mass at the centre, as MNIST was made.
    cy = float(np.arange(new_h) @ small.sum(1)) / total
    cx = float(np.arange(new_w) @ small.sum(0)) / total
  else:
    cy, cx = (new_h - 1) / 2, (new_w - 1) / 2
  top = int(np.clip(round((size - 1) / 2 - cy), 0, size - new_h))
  left = int(np.clip(round((size - 1) / 2 - cx), 0, size - new_w))
  out[top:top + new_h, left:left + new_w] = small
  grey_u8 = np.clip(np.rint(out), 0, 255).astype(np.uint8)
  return np.repeat(grey_u8[..., None], 3, axis=-1)


def detect(images: Sequence[np.ndarray], classify: Classifier, input_size: int, *,
           label_smoothing: float = 0.0, batch_size: int = 512,
           foreground_level: int = digit_scenes.FOREGROUND_LEVEL,
           background_level: int = digit_scenes.BACKGROUND_MAX) -> list[list[Detection]]:
  """Objects of every image with box, colour, class and confidence (one classify pass).

  ``label_smoothing``: that of the classifier's training; confidences are mapped back to the
  unsmoothed scale (module docstring).
  """
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
  per_image, crops = [], []
  for image in images:
    image = _as_rgb(image)
    grey = image.max(-1)
    found = []
    for region in _regions(grey, foreground_level, None, None):
      found.append(_describe(image, grey, region, foreground_level))
      y0, x0, y1, x1 = region.window
      crops.append(mnist_crop(grey[y0:y1, x0:x1], region.mask, input_size, background_level))
    per_image.append(found)
  if crops:
    crops = np.stack(crops)
    logits = np.concatenate([np.asarray(classify(crops[i:i + batch_size]), np.float64)
                             for i in range(0, len(crops), batch_size)])
    if logits.shape != (len(crops), 10):
      raise ValueError(f"classify must return logits [N, 10], got {logits.shape} for "
                       f"{len(crops)} crops")
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.clip((probs.max(-1) - label_smoothing / 10) / (1.0 - label_smoothing), 0.0, 1.0)
    flat = [d for found in per_image for d in found]
    for d, p, confidence in zip(flat, probs, top):
      d.label, d.confidence = int(np.argmax(p)), float(confidence)
  return per_image


def _as_rgb(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


# --- GenEval's rules ---

def relative_position(box_a, box_b, threshold: float = GENEVAL_POSITION_THRESHOLD) -> set[str]:
  """Relations of box A to box B ([y0, x0, y1, x1]) by GenEval's rule (see the module doc)."""
  a, b = np.asarray(box_a, np.float64), np.asarray(box_b, np.float64)
  center_a = np.array([(a[1] + a[3]) / 2, (a[0] + a[2]) / 2])  # (x, y)
  center_b = np.array([(b[1] + b[3]) / 2, (b[0] + b[2]) / 2])
  size_a, size_b = np.array([a[3] - a[1], a[2] - a[0]]), np.array([b[3] - b[1], b[2] - b[0]])
  offset = center_a - center_b
  shrunk = np.maximum(np.abs(offset) - threshold * (size_a + size_b), 0) * np.sign(offset)
  if np.all(np.abs(shrunk) < 1e-3):
    return set()
  dx, dy = shrunk / np.linalg.norm(offset)
  relations = set()
  if dx < -0.5:
    relations.add("left of")
  if dx > 0.5:
    relations.add("right of")
  if dy < -0.5:
    relations.add("above")
  if dy > 0.5:
    relations.add("below")
  return relations


def evaluate(metadata: dict, detections: Sequence[Detection], *,
             threshold: float = GENEVAL_THRESHOLD,
             counting_threshold: float = COUNTING_THRESHOLD,
             max_objects: int = GENEVAL_MAX_OBJECTS,
             position_threshold: float = GENEVAL_POSITION_THRESHOLD) -> tuple[bool, str]:
  """(correct, reasons) of one image's detections against its validated metadata."""
  keep_above = counting_threshold if metadata["tag"] == "counting" else threshold
  by_class: dict[str, list[Detection]] = {}
  for d in sorted(detections, key=lambda d: -d.confidence):
    if d.confidence > keep_above and 0 <= d.label < 10:
      found = by_class.setdefault(digit_scenes.DIGIT_NAMES[d.label], [])
      if len(found) < max_objects:
        found.append(d)
  correct, reasons, matched = True, [], []
  for item in metadata["include"]:
    name, count = item["class"], item["count"]
    found = by_class.get(name, [])[:count]
    ok = len(found) >= count
    if not ok:
      reasons.append(f"expected {name}>={count}, found {len(found)}")
    if ok and "color" in item:
      have = sum(d.color == item["color"] for d in found)
      if have < count:
        ok = False
        reasons.append(f"expected {item['color']} {name}>={count}, found {have} "
                       f"(colours {[d.color for d in found]})")
    if ok and "position" in item:
      relation, target = item["position"]
      if matched[target] is None:
        ok = False
        reasons.append(f"no target for {name} to be {relation}")
      else:
        pairs = [(d, t) for d in found for t in matched[target]]
        for d, t in pairs:
          seen = relative_position(d.box, t.box, position_threshold)
          if relation not in seen:
            ok = False
            reasons.append(f"expected {name} {relation} target, found "
                           f"{' and '.join(sorted(seen)) or 'no relation'}")
            break
    matched.append(found if ok else None)
    correct &= ok
  for item in metadata.get("exclude", []):
    have = len(by_class.get(item["class"], []))
    if have >= item["count"]:
      correct = False
      reasons.append(f"expected {item['class']}<{item['count']}, found {have}")
  return correct, "; ".join(reasons)


def summarize(tags: Sequence[str], correct: Sequence[bool]) -> dict:
  """GenEval's summary: accuracy per tag (first-seen order) and their mean as the overall score."""
  per_tag: dict[str, list[int]] = {}
  for tag, ok in zip(tags, correct):
    per_tag.setdefault(tag, [0, 0])
    per_tag[tag][0] += int(bool(ok))
    per_tag[tag][1] += 1
  out = {f"geneval_{tag}": c / n for tag, (c, n) in per_tag.items()}
  out["geneval_overall"] = float(np.mean(list(out.values()))) if per_tag else float("nan")
  out["geneval_correct_images"] = float(np.mean(correct)) if len(correct) else float("nan")
  out["counts"] = {tag: {"correct": c, "total": n} for tag, (c, n) in per_tag.items()}
  return out


def score(images: Sequence[np.ndarray], metadata: Sequence, classify: Classifier,
          input_size: int, *, threshold: float = GENEVAL_THRESHOLD,
          counting_threshold: float = COUNTING_THRESHOLD,
          max_objects: int = GENEVAL_MAX_OBJECTS,
          position_threshold: float = GENEVAL_POSITION_THRESHOLD,
          label_smoothing: float = 0.0, batch_size: int = 512) -> dict:
  """Judges each image against its metadata (dict or JSON line) by GenEval's rules.

  Returns ``correct`` (per image), ``reasons``, ``tags``, ``detections`` (per image, dicts),
  ``geneval_<tag>`` (per-tag accuracy), ``geneval_overall`` (mean over tags),
  ``geneval_correct_images`` and ``counts``.
  """
  if len(images) != len(metadata):
    raise ValueError(f"{len(images)} images but {len(metadata)} metadata lines")
  metas = [validate_metadata(m, i, classes=digit_scenes.DIGIT_NAMES,
                             colors=digit_scenes.COLOR_NAMES) for i, m in enumerate(metadata)]
  detections = detect(images, classify, input_size, label_smoothing=label_smoothing,
                      batch_size=batch_size)
  results = [evaluate(m, d, threshold=threshold, counting_threshold=counting_threshold,
                      max_objects=max_objects, position_threshold=position_threshold)
             for m, d in zip(metas, detections)]
  correct = [ok for ok, _ in results]
  tags = [m["tag"] for m in metas]
  return {"correct": correct, "reasons": [r for _, r in results], "tags": tags,
          "detections": [[d.to_dict() for d in found] for found in detections],
          **summarize(tags, correct)}
