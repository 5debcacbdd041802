"""Digit scenes: tag mix, captions parsed back against metadata and objects, masks, determinism,
held-out digits, aspect ratios, the single-digit mode, and the captioned grid of the preview tool.
"""
import json
import re

import numpy as np
import pytest

from ascan_jax import viz
from ascan_jax.data import digit_scenes, scene_captions, sources
from ascan_jax.tools import render_scenes

WEIGHTS = {"single_object": 1, "two_object": 1, "counting": 2, "colors": 1, "position": 1,
           "color_attr": 0}
N = 300


@pytest.fixture(scope="module")
def scenes():
  src = digit_scenes.DigitScenesSource("train", height=64, width=64, num_examples=N,
                                       tag_weights=WEIGHTS)
  return src, [src.load(i) for i in range(N)]


# --- caption parser: independent of scene_captions' templates, it only knows the words. ---
WORDS = {}
for d, name in enumerate(scene_captions.DIGIT_NAMES):
  WORDS.update({name: d, str(d): d, scene_captions.PLURAL_NAMES[d]: d, f"{d}s": d})


def _parse_part(text):
  """(digits named, colours named) of a caption part, in order."""
  tokens = re.findall(r"[a-z0-9]+", text)
  return ([WORDS[t] for t in tokens if t in WORDS],
          [t for t in tokens if t in digit_scenes.COLOR_NAMES])


def _relation_in(caption):
  found = []
  for relation, phrases in scene_captions.RELATION_PHRASES.items():
    for phrase in sorted(phrases, key=len, reverse=True):
      if f" {phrase} " in caption:
        found.append((relation, phrase))
        break
  return found


def test_tags_follow_weights_and_objects_fit_tags(scenes):
  src, examples = scenes
  stats = digit_scenes.scene_statistics(src, N)
  total = sum(WEIGHTS.values())
  for tag, weight in WEIGHTS.items():
    p = weight / total
    sigma = np.sqrt(N * p * (1 - p))
    assert abs(stats["tags"].get(tag, 0) - N * p) <= 4 * sigma + 1e-9, (tag, stats["tags"])
  assert set(stats["classes"]) == set(digit_scenes.DIGIT_NAMES)
  assert set(stats["colors"]) == set(digit_scenes.COLOR_NAMES)
  assert set(stats["objects_per_scene"]) == {1, 2, 3, 4}
  for ex in examples:
    meta, objects = json.loads(ex["metadata"]), json.loads(ex["objects"])
    include = meta["include"]
    classes = [o["name"] for o in objects]
    assert meta["prompt"] == ex["caption"]
    if meta["tag"] == "counting":
      assert 2 <= len(objects) <= 4 and len(set(classes)) == 1
      assert include == [{**include[0], "class": classes[0], "count": len(objects)}]
      assert meta["exclude"] == [{"class": classes[0], "count": len(objects) + 1}]
      if "color" in include[0]:
        assert {o["color"] for o in objects} == {include[0]["color"]}
    else:
      assert "exclude" not in meta
      assert classes == [item["class"] for item in include]
      assert len(objects) == {"single_object": 1, "colors": 1}.get(meta["tag"], 2)
      assert len(set(classes)) == len(classes)
      for o, item in zip(objects, include):
        if "color" in item:
          assert o["color"] == item["color"]
      named = {"color" in item for item in include}
      expected = {"colors": {True}, "color_attr": {True}, "single_object": {False},
                  "two_object": {False}}.get(meta["tag"])
      assert len(named) == 1 and (expected is None or named == expected), meta


def test_captions_name_the_objects_colours_and_relations(scenes):
  _, examples = scenes
  for ex in examples:
    meta, caption = json.loads(ex["metadata"]), ex["caption"]
    include = meta["include"]
    if meta["tag"] == "counting":
      digits, colors = _parse_part(caption)
      assert digits == [include[0]["count"], scene_captions.DIGIT_NAMES.index(include[0]["class"])]
      assert colors == ([include[0]["color"]] if "color" in include[0] else []), caption
      continue
    if meta["tag"] == "position":
      (relation, phrase), = _relation_in(caption)
      assert relation == include[1]["position"][0], caption
      subject, reference = caption.split(f" {phrase} ")
      parts, items = [subject, reference], [include[1], include[0]]
    elif meta["tag"] in ("two_object", "color_attr"):
      parts, items = caption.split(" and "), include
      assert not _relation_in(caption)
    else:
      parts, items = [caption], include
    assert len(parts) == len(items), caption
    for part, item in zip(parts, items):
      digits, colors = _parse_part(part)
      assert digits == [scene_captions.DIGIT_NAMES.index(item["class"])], (caption, item)
      assert colors == ([item["color"]] if "color" in item else []), (caption, item)


def test_masks_and_boxes_agree(scenes):
  _, examples = scenes
  for ex in examples:
    image, seg = ex["image"], ex["segmentation"]
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    assert seg.dtype == np.uint8 and seg.shape == (64, 64)
    objects = json.loads(ex["objects"])
    # Foreground (brightest channel over the level) is exactly the digits' mask.
    np.testing.assert_array_equal(image.max(-1) >= digit_scenes.FOREGROUND_LEVEL, seg > 0)
    covered = np.zeros_like(seg, bool)
    gap = digit_scenes.gap_pixels(64, 64)
    for k, o in enumerate(objects):
      y0, x0, y1, x1 = o["box"]
      assert 0 <= y0 < y1 <= 64 and 0 <= x0 < x1 <= 64
      inside = seg[y0:y1, x0:x1]
      assert set(np.unique(inside)) - {0} == {o["class"] + 1}
      # The box is tight: its border rows and columns hold mask pixels.
      assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
      covered[y0:y1, x0:x1] = True
      for other in objects[:k]:
        b = other["box"]
        assert y0 >= b[2] + gap or b[0] >= y1 + gap or x0 >= b[3] + gap or b[1] >= x1 + gap
    assert not (seg[~covered] > 0).any()


def test_same_seed_same_bytes_in_any_order_other_seed_differs():
  kw = dict(height=48, width=64, num_examples=40)
  a = digit_scenes.DigitScenesSource("validation", seed=3, **kw)
  b = digit_scenes.DigitScenesSource("validation", seed=3, **kw)
  c = digit_scenes.DigitScenesSource("validation", seed=4, **kw)
  order = [7, 0, 31, 7, 12]
  first = {i: a.load(i) for i in order}
  for i in reversed(order):
    again = b.load(i)
    for key in ("image", "segmentation"):
      assert again[key].tobytes() == first[i][key].tobytes()
    for key in ("caption", "metadata", "objects"):
      assert again[key] == first[i][key]
  differ = sum(c.load(i)["image"].tobytes() != first[i]["image"].tobytes() for i in first)
  assert differ == len(first)
  assert a.load(1)["image"].tobytes() != a.load(2)["image"].tobytes()


@pytest.mark.parametrize("split,other", [("validation", "train"), ("train", "validation")])
def test_scenes_use_only_their_splits_digits(split, other):
  mine = sources.EmbeddedSource("embedded_mnist", split, 0.2)
  theirs = {im.tobytes() for im in sources.EmbeddedSource("embedded_mnist", other, 0.2).images}
  src = digit_scenes.DigitScenesSource(split, height=64, width=64, num_examples=120, seed=1)
  used = 0
  for i in range(len(src)):
    for o in json.loads(src.load(i)["objects"]):
      assert mine.labels[o["digit_index"]] == o["class"]
      assert mine.images[o["digit_index"]].tobytes() not in theirs
      used += 1
  assert used > 150


@pytest.mark.parametrize("height,width", [(64, 96), (96, 64), (32, 48)])
def test_any_aspect_ratio(height, width):
  src = digit_scenes.DigitScenesSource("validation", height=height, width=width,
                                       num_examples=60, seed=2)
  heights = []
  for i in range(len(src)):
    ex = src.load(i)
    assert ex["image"].shape == (height, width, 3) and ex["segmentation"].shape == (height, width)
    for o in json.loads(ex["objects"]):
      y0, x0, y1, x1 = o["box"]
      assert 0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width
      assert (ex["segmentation"][y0:y1, x0:x1] == o["class"] + 1).any()
      heights.append(y1 - y0)
  # Digit sizes scale with the canvas' shorter side.
  assert 0.15 * min(height, width) < np.median(heights) < 0.6 * min(height, width)


def test_single_digit_mode_is_one_centred_white_digit_with_a_photo_caption():
  src = digit_scenes.DigitScenesSource("train", height=64, width=64, num_examples=40,
                                       mode="single_digit")
  for i in range(len(src)):
    ex = src.load(i)
    (o,) = json.loads(ex["objects"])
    y0, x0, y1, x1 = o["box"]
    # Object-centric, as ImageNet's photos: large, and centred to within 6 % of the side.
    assert 0.65 * 64 <= y1 - y0 <= 0.86 * 64
    assert abs((y0 + y1) / 2 - 32) <= 0.06 * 64 + 1 and abs((x0 + x1) / 2 - 32) <= 0.06 * 64 + 1
    assert o["color"] == "white"
    assert ex["caption"].startswith("a photo of ")
    digits, colors = _parse_part(ex["caption"])
    assert digits == [o["class"]] and colors == []
    fg = ex["segmentation"] > 0
    np.testing.assert_array_equal(ex["image"][fg].min(-1), ex["image"][fg].max(-1))
    assert json.loads(ex["metadata"])["include"] == [{"class": o["name"], "count": 1}]


def test_bad_arguments_name_the_problem():
  kw = dict(height=64, width=64, num_examples=4)
  with pytest.raises(ValueError, match="'tests'"):
    digit_scenes.DigitScenesSource("tests", **kw)
  with pytest.raises(ValueError, match="'counts'"):
    digit_scenes.DigitScenesSource("train", tag_weights={"counts": 1.0}, **kw)
  with pytest.raises(ValueError, match="height and width"):
    digit_scenes.DigitScenesSource("train", height=16, width=64, num_examples=4)
  with pytest.raises(IndexError, match="scene 4"):
    digit_scenes.DigitScenesSource("train", **kw).load(4)


def test_captioned_grid_writes_images_and_captions(tmp_path):
  src = digit_scenes.DigitScenesSource("validation", height=32, width=48, num_examples=5)
  grid = render_scenes.render(src, num=5, columns=3, scale=2)
  assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
  assert grid.shape[1] == 4 + 3 * (96 + 4)
  # Each scene appears enlarged at its cell; some dark caption text sits right under it.
  first = src.load(0)["image"].repeat(2, 0).repeat(2, 1)
  np.testing.assert_array_equal(grid[4:4 + 64, 4:4 + 96], first)
  under = grid[4 + 64:4 + 64 + 14, 4:4 + 96]
  assert (under < 128).any()
  blank = viz.captioned_grid(np.zeros((2, 8, 8, 1), np.uint8), ["", ""], columns=2)
  assert blank.shape[0] == 8 + 3 * 4  # no caption lines: no text rows.
  path = tmp_path / "sub" / "grid.png"
  viz.save_png(str(path), grid)
  from PIL import Image
  np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)
  with pytest.raises(ValueError, match="captions"):
    viz.captioned_grid(np.zeros((2, 8, 8, 3), np.uint8), ["one"], columns=2)
