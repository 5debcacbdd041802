"""tools.curate on a webdataset of embedded scenes with planted defects; filters; score heads."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from PIL import Image

from ascan_jax.data import caption_sources, curation, webdataset
from ascan_jax.tools import curate
from tests import helpers

NUM_CLEAN = 24


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def _jpeg(image: np.ndarray, quality: int = 90) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


def _config():
  c = curation.curation_config()
  c.min_side, c.max_aspect = 32, 3.0
  c.min_laplacian_var = 400.0  # clean scenes: > 1000; the planted blur: about 140.
  c.dedup_max_distance = 2  # clean scenes differ by >= 4 bits; the planted copies by <= 2.
  return c


def write_planted_webdataset(root) -> dict:
  """Two shards under ``root``: clean scenes plus one example of every defect; returns the
  clean records and the keys each filter must drop (also used by results/data/)."""
  data = caption_sources.data_config()
  data.scenes.sizes, data.scenes.eval_examples = ("64x64", "64x96"), NUM_CLEAN + 2
  scenes = caption_sources.get_caption_source(data, "validation")
  clean = [scenes.load(i) for i in range(NUM_CLEAN)]
  extra = [scenes.load(i) for i in range(NUM_CLEAN, NUM_CLEAN + 2)]
  samples = [{"key": f"clean{i:02d}", "png": _png(r["image"]), "txt": r["caption"]}
             for i, r in enumerate(clean)]
  grey = np.full((64, 64, 3), 120, np.uint8)
  grey[::7, ::5] += 2  # near-constant, not exactly constant.
  defects = {
      "duplicate": [{"key": "dup_exact", "png": _png(clean[0]["image"]), "txt": "a copy"},
                    {"key": "dup_jpeg", "jpg": _jpeg(clean[5]["image"]),
                     "json": json.dumps({"caption": "a re-encoded copy"})}],
      "blur": [{"key": "blurred", "png": _png(cv2.GaussianBlur(clean[2]["image"], (0, 0), 2.0)),
                "txt": "a blurred scene"}],
      "resolution": [{"key": "tiny", "png": _png(cv2.resize(extra[0]["image"], (24, 24))),
                      "txt": "a tiny scene"}],
      "aspect_ratio": [{"key": "extreme", "png": _png(cv2.resize(extra[1]["image"], (200, 40))),
                        "txt": "a stretched scene"}],
      "unreadable": [{"key": "corrupt", "png": _png(clean[3]["image"])[:60], "txt": "broken"},
                     {"key": "latin1", "png": _png(clean[4]["image"]),
                      "txt": "une sc\xe8ne".encode("latin-1")}],
      "caption_length": [{"key": "empty", "png": _png(cv2.flip(clean[6]["image"], 0)),
                          "txt": "  "}],
      "near_constant": [{"key": "flat", "png": _png(grey), "txt": "a grey square"}],
  }
  planted_samples = [s for group in defects.values() for s in group]
  os.makedirs(root, exist_ok=True)
  # The copies land in the second shard: de-duplication must work across shards.
  webdataset.write_shard(os.path.join(root, "shard-00000.tar"), samples[:12] + planted_samples[2:])
  webdataset.write_shard(os.path.join(root, "shard-00001.tar"), samples[12:] + planted_samples[:2])
  return {"clean": clean, "dropped": {f: sorted(s["key"] for s in group)
                                      for f, group in defects.items()}}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("wds"))
  return root, write_planted_webdataset(root)


def test_planted_defects_are_dropped_for_their_reason(planted, tmp_path):
  root, expect = planted
  out = str(tmp_path / "curated")
  report = curate.curate(root, out, config=_config(), chunk_size=8, progress=False)
  assert {f: sorted(keys) for f, keys in report["dropped_keys"].items()} == expect["dropped"]
  assert report["kept"] == NUM_CLEAN and report["total"] == NUM_CLEAN + 9
  assert report["reasons"]["unreadable"] == {"cannot decode image": 1,
                                             "caption is not UTF-8": 1}
  assert sorted(report["duplicates"]) == [["dup_exact", "clean00"], ["dup_jpeg", "clean05"]]
  assert set(report["contact_sheets"]) == set(expect["dropped"])
  sheet = np.asarray(Image.open(os.path.join(out, report["contact_sheets"]["blur"])))
  assert sheet.ndim == 3 and sheet.shape[0] > curate.CELL

  # The kept records, read back as a caption source: every clean scene, bytes as stored.
  data = caption_sources.config_for_input(out)
  assert data.name == "caption_array_record"
  curated = caption_sources.get_caption_source(data, "train")
  assert len(curated) == NUM_CLEAN
  by_key = {curated.load(i)["key"]: curated.load(i) for i in range(len(curated))}
  assert sorted(by_key) == [f"clean{i:02d}" for i in range(NUM_CLEAN)]
  for i, record in enumerate(expect["clean"]):
    got = by_key[f"clean{i:02d}"]
    np.testing.assert_array_equal(got["image"], record["image"])
    assert got["caption"] == record["caption"] and got["captions"] == (record["caption"],)
    assert curated.image_size(list(by_key).index(f"clean{i:02d}")) == record["image"].shape[:2]


def _files(directory):
  out = {}
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      with open(path, "rb") as f:
        out[name] = f.read()
  return out


def _curate_cmd(root, out, *extra):
  return [sys.executable, "-m", "ascan_jax.tools.curate", f"--input={root}", f"--output={out}",
          "--chunk_size=4", "--config.min_side=32", "--config.min_laplacian_var=400",
          "--config.dedup_max_distance=2", *extra]


def test_kill_then_restart_on_two_processes_is_byte_identical(planted, tmp_path):
  root, _ = planted
  reference = str(tmp_path / "uninterrupted")
  curate.curate(root, reference, config=_config(), chunk_size=4, progress=False)

  out = str(tmp_path / "killed")
  env = dict(os.environ, PYTHONPATH=helpers.REPO)
  proc = subprocess.Popen(_curate_cmd(root, out), cwd=helpers.REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  state = os.path.join(out, curate.STATE)
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(state) and any(n.startswith("scan-") and n.endswith(".json")
                                    for n in os.listdir(state)):
      break
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(out, "metadata.json")), "killed too late"
  scanned = [n for n in os.listdir(state) if n.startswith("scan-") and n.endswith(".json")]
  assert 1 <= len(scanned) < 9

  # Restart as two processes sharing the output: the same bytes as the uninterrupted run.
  procs = [subprocess.Popen(_curate_cmd(root, out, f"--process_index={p}", "--process_count=2"),
                            cwd=helpers.REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for p in (0, 1)]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
  assert _files(out) == _files(reference)
  assert _files(state) == _files(os.path.join(reference, curate.STATE))

  # A missing input is one clear message, no traceback.
  bad = subprocess.run(_curate_cmd(str(tmp_path / "nowhere"), str(tmp_path / "o")),
                       cwd=helpers.REPO, env=env, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  assert "nowhere" in bad.stderr and "does not exist" in bad.stderr


def test_restart_with_other_thresholds_is_refused(planted, tmp_path):
  root, _ = planted
  out = str(tmp_path / "o")
  curate.curate(root, out, config=_config(), chunk_size=16, progress=False, limit=16)
  other = _config()
  other.min_side = 48
  with pytest.raises(ValueError, match="config differ"):
    curate.curate(root, out, config=other, chunk_size=16, progress=False, limit=16)


def test_recaptioning_merges_a_captions_file(planted, tmp_path):
  root, _ = planted
  captions = tmp_path / "captions.jsonl"
  captions.write_text(json.dumps({"key": "empty", "caption": "a flipped scene of digits"}) + "\n"
                      + json.dumps({"key": "clean01", "text": "a long new caption"}) + "\n")
  config = _config()
  config.captions, config.recaption_mode = str(captions), "add"
  out = str(tmp_path / "recaptioned")
  report = curate.curate(root, out, config=config, chunk_size=64, progress=False)
  assert "caption_length" not in report["dropped"]  # the empty caption was replaced.
  src = caption_sources.CuratedSource(out, "train")
  records = {src.load(i)["key"]: src.load(i) for i in range(len(src))}
  assert records["empty"]["captions"] == ("a flipped scene of digits", "")
  assert records["clean01"]["caption"] == "a long new caption"
  assert records["clean01"]["captions"][1] != "a long new caption"
  assert records["clean02"]["captions"] == (records["clean02"]["caption"],)


def _brute_force_duplicates(hashes, distance):
  kept, out = [], {}
  for i, h in enumerate(hashes):
    if h is None:
      continue
    close = [j for j in kept if (h ^ hashes[j]).bit_count() <= distance]
    if close:
      out[i] = min(close)
    else:
      kept.append(i)
  return out


def test_keep_first_rule_compares_with_kept_records_only():
  a = 0
  b = a ^ 0b111  # 3 bits from a
  c = b ^ 0b111000  # 3 bits from b, 6 from a
  assert curation.find_duplicates([a, b, c], 3) == {1: 0}  # c is kept: b was dropped.
  assert curation.find_duplicates([b, a, c], 3) == {1: 0, 2: 0}
  assert curation.find_duplicates([a, b, c], -1) == {}


@pytest.mark.parametrize("distance", [0, 3, 6])
def test_find_duplicates_equals_brute_force(distance):
  rng = np.random.default_rng(distance)
  base = [int(v) for v in rng.integers(0, 2**63, 60, dtype=np.int64)]
  hashes = list(base)
  for _ in range(120):  # near copies: a few bits flipped.
    h = base[int(rng.integers(len(base)))]
    for bit in rng.choice(64, int(rng.integers(0, 8)), replace=False):
      h ^= 1 << int(bit)
    hashes.append(h)
  hashes[7] = None
  got = curation.find_duplicates(hashes, distance)
  assert got == _brute_force_duplicates(hashes, distance)
  assert len(got) > 5


def test_score_head_file_formats_and_math(tmp_path):
  rng = np.random.default_rng(0)
  layers = [(rng.normal(size=(8, 5)), rng.normal(size=5)), (rng.normal(size=(5, 1)),
                                                            rng.normal(size=1))]
  x = rng.normal(size=(4, 8)).astype(np.float32)
  unit = x / np.linalg.norm(x, axis=1, keepdims=True)
  expected = 1 / (1 + np.exp(-(np.maximum(unit @ layers[0][0] + layers[0][1], 0) @ layers[1][0]
                               + layers[1][1])[:, 0]))
  for name in ("head.npz", "head.safetensors"):
    curation.save_head(str(tmp_path / name), layers, output="sigmoid")
    head = curation.load_head(str(tmp_path / name))
    np.testing.assert_allclose(head(x), expected, rtol=1e-5)
  with pytest.raises(ValueError, match=r"embeddings \[N, 8\]"):
    head(x[:, :6])
  np.savez(tmp_path / "bad.npz", w0=np.zeros((8, 2)), b0=np.zeros(2))
  with pytest.raises(ValueError, match="one output"):
    curation.load_head(str(tmp_path / "bad.npz"))


def test_learned_heads_drop_by_threshold_with_a_random_clip(planted, tmp_path):
  from ascan_jax.eval import clip_score
  from ascan_jax.tools import make_random_clip
  root, _ = planted
  clip_dir = str(tmp_path / "clip")
  make_random_clip.make_random_clip(clip_dir, make_random_clip.PRESETS["tiny"], seed=0,
                                    num_merges=50)
  rng = np.random.default_rng(1)
  curation.save_head(str(tmp_path / "aesthetic.npz"),
                     [(rng.normal(size=(32, 16)), rng.normal(size=16)),
                      (rng.normal(size=(16, 1)), np.zeros(1))])
  config = _config()
  config.clip_dir, config.aesthetic_head = clip_dir, str(tmp_path / "aesthetic.npz")
  src = webdataset.WebDatasetSource(root)
  # The records no other filter drops: the clean scenes and the two planted copies.
  clean = [i for i in range(len(src)) if src.key(i).startswith(("clean", "dup"))]
  images = np.stack([curation.clip_thumbnail(src.load(i)["image"], 32) for i in clean])
  scores = curation.load_head(config.aesthetic_head)(
      clip_score.CLIPScorer(clip_dir).image_features(images))
  config.min_aesthetic = float(np.median(scores))
  report = curate.curate(root, str(tmp_path / "out"), config=config, chunk_size=64,
                         progress=False)
  low = sorted(src.key(i) for i, s in zip(clean, scores) if s < config.min_aesthetic)
  assert sorted(report["dropped_keys"]["aesthetic"]) == low and len(low) == len(clean) // 2
