"""Curates an image-caption source into ArrayRecord shards, with a report of what was dropped.

  python -m ascan_jax.tools.curate --input=SOURCE --output=OUT [--split=train]
      [--config.min_side=256 --config.max_aspect=3 --config.dedup_max_distance=4 ...]
      [--config.clip_dir=CLIP --config.aesthetic_head=HEAD.npz --config.min_aesthetic=5 ...]
      [--config.captions=RECAPTIONS.jsonl] [--data.scenes.sizes=64x64,48x80 ...]
      [--chunk_size=1024] [--process_index=P --process_count=N] [--sheet_size=32]

``SOURCE`` is anything ``data.caption_sources.config_for_input`` reads: webdataset shards (a
folder, glob or brace range of ``.tar``), a folder with ``metadata.jsonl``, a curated output,
``tfds:coco_captions@DATA_DIR``, ``tfds:imagenet2012@DATA_DIR`` or ``embedded_digit_scenes``
(``--data.*`` sets the other data keys). The filters and their thresholds are
``data.curation`` (``--config.*``); ``--config.captions`` merges captions a captioning model wrote
(a ``.jsonl`` of ``{"key": ..., "caption": ...}``; ``"index"`` and ``"text"`` are accepted too).

OUT receives ``<split>-KKKKK-of-NNNNN.array_record`` (the kept records of chunk ``K``: the
original encoded image bytes where the source has them, else PNG, the caption(s), key, size and
source index; ``data.name=caption_array_record`` reads them), ``report.json`` (totals, dropped per
filter and reason, every filter's failures, duplicate pairs, the config), one contact sheet
``dropped_<filter>.png`` per filter that dropped something (the first ``--sheet_size`` examples,
each captioned with its key and reason) and, last, ``metadata.json``.

How it splits and resumes. The records are cut into chunks of ``--chunk_size``; process ``p`` of
``N`` owns chunks ``p, p + N, ...``. Pass 1 measures every record of its chunks (decode, sizes,
blur, pixel spread, perceptual hash, optional CLIP head scores) into ``OUT/.curate/scan-K.json``.
De-duplication needs every hash, so each process waits until all chunks are scanned (a
filesystem barrier: the processes share OUT), then computes the same keep-first decision
(``data.curation.find_duplicates``) from the scan files; pass 2 writes the shards of its chunks;
process 0 waits for every shard and writes the report, sheets and metadata. Every file is written
whole under a temporary name (``data.shard_files``), so a process killed at any moment and
restarted (with any process count) skips what exists and produces output byte-identical to an
uninterrupted run. A restart with another config is refused (``.curate/config.json``).
"""
from __future__ import annotations

import io
import json
import sys
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image
from tqdm import tqdm

from ascan_jax import viz
from ascan_jax.data import caption_sources
from ascan_jax.data import curation
from ascan_jax.data import shard_files
from ascan_jax.data import sources

STATE = ".curate"
CELL = 96


def read_recaptions(path: str) -> dict:
  """``{key or int index: caption}`` from a ``.jsonl`` (module docstring)."""
  out = {}
  if not shard_files.exists(path):
    raise FileNotFoundError(f"captions file {path} does not exist")
  from etils import epath
  for line_no, raw in enumerate(epath.Path(path).read_bytes().split(b"\n"), 1):
    if not raw.strip():
      continue
    try:
      row = json.loads(raw.decode("utf-8"))
      caption = row.get("caption", row.get("text"))
      ident = row["key"] if "key" in row else int(row["index"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{path}:{line_no}: needs 'key' (or 'index') and 'caption' (or 'text') "
                       f"({type(e).__name__}: {e})") from None
    if not isinstance(caption, str):
      raise ValueError(f"{path}:{line_no}: caption is not a string")
    out[ident] = caption.strip()
  return out


def recaption(record: dict, index: int, recaptions: dict, mode: str) -> dict:
  new = recaptions.get(record.get("key"), recaptions.get(index))
  if new is None:
    return record
  captions = (new,) if mode == "replace" else (new,) + tuple(record.get("captions", ()))
  return dict(record, caption=new, captions=captions)


class Embedder:
  """CLIP image embeddings of host-side thumbnails, and the score heads on them."""

  def __init__(self, config):
    from ascan_jax.eval import clip_score
    self.scorer = clip_score.CLIPScorer(config.clip_dir, batch_size=32)
    self.size = self.scorer.model.config.vision.image_size
    self.heads = {h: curation.load_head(config[f"{h}_head"], h) for h in curation.HEADS
                  if config[f"{h}_head"]}
    dim = self.scorer.model.config.projection_dim
    for name, head in self.heads.items():
      if head.input_dim != dim:
        raise ValueError(f"score head {name} ({config[f'{name}_head']}) takes {head.input_dim}-d "
                         f"embeddings, {config.clip_dir} gives {dim}")

  def __call__(self, images: list[np.ndarray]) -> list[dict]:
    if not images:
      return []
    thumbs = np.stack([curation.clip_thumbnail(im, self.size) for im in images])
    scores = curation.head_scores(self.heads, self.scorer.image_features(thumbs))
    return [{k: round(float(v[i]), 6) for k, v in scores.items()} for i in range(len(images))]


def _key(source, i: int) -> str:
  return source.key(i) if hasattr(source, "key") else str(i)


def scan_chunk(source, lo: int, hi: int, config, recaptions: dict, embedder, bar) -> list[dict]:
  rows, pending = [], []
  for i in range(lo, hi):
    try:
      record = recaption(source.load(i), i, recaptions, config.recaption_mode)
    except sources.RecordError as e:
      rows.append({"i": i, "key": _key(source, i), "error": str(e),
                   "fail": [["unreadable", curation.unreadable_reason(str(e))]]})
      bar.update(1)
      continue
    m = curation.measure(record["image"], record["caption"], config)
    rows.append({"i": i, "key": record.get("key", str(i)), "m": m,
                 "fail": [list(f) for f in curation.failures(m, config)]})
    if embedder is not None:
      pending.append((rows[-1], record["image"]))
    bar.update(1)
  for start in range(0, len(pending), 32):
    part = pending[start:start + 32]
    for (row, _), scores in zip(part, embedder([im for _, im in part])):
      row["scores"] = scores
      row["fail"] += [list(f) for f in curation.score_failures(scores, config)]
  return rows


def decide(scans: list[list[dict]], config) -> list[dict]:
  """Every record's row with its verdict: ``drop`` = ``[filter, reason]`` or None."""
  rows = [row for chunk in scans for row in chunk]
  hashes = [int(r["m"]["phash"], 16) if not r["fail"] else None for r in rows]
  duplicates = curation.find_duplicates(hashes, config.dedup_max_distance)
  for pos, row in enumerate(rows):
    if row["fail"]:
      row["drop"] = row["fail"][0]
    elif pos in duplicates:
      j = duplicates[pos]
      d = (hashes[pos] ^ hashes[j]).bit_count()
      row["drop"] = ["duplicate", f"near-duplicate (of {rows[j]['key']}, distance {d})"]
      row["duplicate_of"] = rows[j]["key"]
    else:
      row["drop"] = None
  return rows


def _encoded(source, i: int, row: dict, recaptions: dict, mode: str) -> dict:
  if hasattr(source, "load_encoded"):
    record = source.load_encoded(i)
    encoded = record.pop("image")  # sources.EncodedImage: the bytes as the source holds them.
    data, fmt = encoded.data, (encoded.format or "").lower()
  else:
    record = source.load(i)
    buffer = io.BytesIO()
    Image.fromarray(record.pop("image")).save(buffer, format="PNG")
    data, fmt = buffer.getvalue(), "png"
  record = recaption(record, i, recaptions, mode)
  return {"key": record.get("key", str(i)), "image": data, "image_format": fmt,
          "caption": record["caption"], "captions": list(record.get("captions") or
                                                          [record["caption"]]),
          "height": row["m"]["height"], "width": row["m"]["width"], "source_index": i}


def _thumbnail(source, row: dict) -> np.ndarray:
  cell = np.full((CELL, CELL, 3), 200, np.uint8)
  if "m" not in row:
    return cell  # unreadable: a grey cell, the caption says why.
  image = source.load(row["i"])["image"]
  h, w = image.shape[:2]
  scale = CELL / max(h, w)
  nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
  small = np.asarray(Image.fromarray(image).resize((nw, nh), Image.NEAREST if scale > 1
                                                   else Image.BICUBIC))
  top, left = (CELL - nh) // 2, (CELL - nw) // 2
  cell[top:top + nh, left:left + nw] = small
  return cell


def report_of(rows: list[dict], description: str, split: str, config, shards: list[str],
              sheets: dict) -> dict:
  dropped = {f: 0 for f in curation.FILTERS}
  failing = {f: 0 for f in curation.FILTERS}
  reasons: dict[str, dict[str, int]] = {}
  for row in rows:
    for f, _ in row["fail"]:
      failing[f] += 1
    if row["drop"]:
      f, reason = row["drop"]
      dropped[f] += 1
      kind = curation.reason_kind(reason)
      reasons.setdefault(f, {})
      reasons[f][kind] = reasons[f].get(kind, 0) + 1
  failing["duplicate"] = dropped["duplicate"]
  return {"input": description, "split": split, "total": len(rows),
          "kept": sum(1 for r in rows if not r["drop"]),
          "dropped": {f: n for f, n in dropped.items() if n},
          "failing": {f: n for f, n in failing.items() if n},
          "reasons": reasons,
          "duplicates": [[r["key"], r["duplicate_of"]] for r in rows if "duplicate_of" in r],
          "dropped_keys": {f: [r["key"] for r in rows if r["drop"] and r["drop"][0] == f]
                           for f in curation.FILTERS if dropped[f]},
          "shards": shards, "contact_sheets": sheets, "config": config.to_dict()}


def _wait_for(paths: list[str], what: str, timeout: float) -> None:
  start, told = time.time(), False
  while True:
    missing = [p for p in paths if not shard_files.exists(p)]
    if not missing:
      return
    if time.time() - start > timeout:
      raise TimeoutError(f"waited {timeout:.0f}s for {len(missing)} {what} of other processes, "
                         f"e.g. {missing[0]}; are all --process_count processes running?")
    if not told:
      print(f"waiting for {len(missing)} {what} of other processes", file=sys.stderr, flush=True)
      told = True
    time.sleep(0.5)


def curate(input_spec: str, output: str, split: str = "train", config=None, data_config=None,
           chunk_size: int = 1024, process_index: int = 0, process_count: int = 1,
           sheet_size: int = 32, limit: int | None = None, wait_seconds: float = 86400.0,
           progress: bool = True) -> dict | None:
  """Runs (or resumes) the curation (module docstring); process 0 returns the report."""
  config = config or curation.curation_config()
  curation.check_config(config)
  if not 0 <= process_index < process_count:
    raise ValueError(f"--process_index={process_index} must be in [0, {process_count})")
  data = caption_sources.config_for_input(input_spec, data_config)
  source = caption_sources.get_caption_source(data, split)
  n = len(source) if limit is None else min(limit, len(source))
  num_chunks = max(1, -(-n // chunk_size))
  state = shard_files.join(output, STATE)
  shard_files.makedirs(state)
  settings = {"input": input_spec, "source": source.description, "split": split, "records": n,
              "chunk_size": chunk_size, "config": config.to_dict(), "data": data.to_dict()}
  settings_path = shard_files.join(state, "config.json")
  if shard_files.exists(settings_path):
    before = shard_files.read_json(settings_path)
    if before != json.loads(json.dumps(settings, sort_keys=True)):
      changed = sorted(k for k in settings if before.get(k) != json.loads(json.dumps(settings[k])))
      raise ValueError(f"{output} was started with other settings ({', '.join(changed)} differ); "
                       f"use a new --output or the same settings")
  elif process_index == 0:
    shard_files.write_json(settings_path, settings, f"p{process_index}")
  tag = f"p{process_index}"
  recaptions = read_recaptions(config.captions) if config.captions else {}
  mine = list(range(process_index, num_chunks, process_count))
  scan_path = lambda k: shard_files.join(state, f"scan-{k:05d}.json")
  shard_path = lambda k: shard_files.join(output, shard_files.shard_name(split, k, num_chunks))
  bounds = lambda k: (k * chunk_size, min(n, (k + 1) * chunk_size))

  todo = [k for k in mine if not shard_files.exists(scan_path(k))]
  embedder = Embedder(config) if any(config[f"{h}_head"] for h in curation.HEADS) and todo \
      else None
  with tqdm(total=sum(bounds(k)[1] - bounds(k)[0] for k in todo), desc=f"scanning {split}",
            unit="img", disable=not progress) as bar:
    for k in todo:
      rows = scan_chunk(source, *bounds(k), config, recaptions, embedder, bar)
      shard_files.write_json(scan_path(k), rows, tag)
  _wait_for([scan_path(k) for k in range(num_chunks)], "scanned chunks", wait_seconds)
  rows = decide([shard_files.read_json(scan_path(k)) for k in range(num_chunks)], config)

  todo = [k for k in mine if not shard_files.exists(shard_path(k))]
  with tqdm(total=sum(1 for k in todo for r in rows[bounds(k)[0]:bounds(k)[1]] if not r["drop"]),
            desc=f"writing {split}", unit="img", disable=not progress) as bar:
    for k in todo:
      kept = [r for r in rows[bounds(k)[0]:bounds(k)[1]] if not r["drop"]]

      def records(kept=kept):
        for r in kept:
          yield caption_sources.encode_curated(_encoded(source, r["i"], r, recaptions,
                                                        config.recaption_mode))
          bar.update(1)

      shard_files.write_records(shard_path(k), records(), tag,
                                options=shard_files.UNCOMPRESSED)  # images are compressed.
  if process_index != 0:
    return None
  _wait_for([shard_path(k) for k in range(num_chunks)], "shards", wait_seconds)
  sheets = {}
  for f in curation.FILTERS:
    dropped = [r for r in rows if r["drop"] and r["drop"][0] == f][:sheet_size]
    if not dropped:
      continue
    name = f"dropped_{f}.png"
    grid = viz.captioned_grid(np.stack([_thumbnail(source, r) for r in dropped]),
                              [f"{r['key']}: {r['drop'][1]}" for r in dropped], columns=8,
                              max_lines=4, font_size=9)
    viz.save_png(shard_files.join(output, name), grid)
    sheets[f] = name
  shards = [shard_files.shard_name(split, k, num_chunks) for k in range(num_chunks)]
  report = report_of(rows, source.description, split, config, shards, sheets)
  shard_files.write_json(shard_files.join(output, "report.json"), report, tag)
  shard_files.remove_stale_temporaries(output)
  shard_files.remove_stale_temporaries(state)
  meta_path = shard_files.join(output, "metadata.json")
  meta = shard_files.read_json(meta_path) if shard_files.exists(meta_path) else {"splits": {}}
  meta["format"] = caption_sources.CURATED_FORMAT
  meta["splits"][split] = {"shards": shards, "records": report["kept"],
                           "source": source.description, "source_records": n}
  shard_files.write_json(meta_path, meta, tag)
  return report


def _define_flags():
  from ml_collections import config_flags
  flags.DEFINE_string("input", None, "The source (see the module docstring).")
  flags.DEFINE_string("output", None, "Output folder (local or gs://).")
  flags.DEFINE_string("split", "train", "Split of the source.")
  config_flags.DEFINE_config_dict("config", curation.curation_config(), "Filter thresholds.")
  config_flags.DEFINE_config_dict("data", caption_sources.data_config(),
                                  "Other data keys of the source (scenes, index_dir, ...).")
  flags.DEFINE_integer("chunk_size", 1024, "Records per chunk (output shard, unit of resuming).")
  flags.DEFINE_integer("process_index", 0, "This process's index.")
  flags.DEFINE_integer("process_count", 1, "Number of processes sharing --output.")
  flags.DEFINE_integer("sheet_size", 32, "Examples per contact sheet.")
  flags.DEFINE_integer("limit", None, "Curate only the first N records.")
  flags.DEFINE_float("wait_seconds", 86400.0, "How long to wait for other processes.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  if not (f.input and f.output):
    raise app.UsageError("--input and --output are required")
  try:
    report = curate(f.input, f.output, f.split, f.config, f.data, f.chunk_size,
                    f.process_index, f.process_count, f.sheet_size, f.limit, f.wait_seconds)
  except (OSError, ValueError, TimeoutError) as e:  # bad input: one message, no traceback.
    print(f"curate: error: {e}", file=sys.stderr)
    sys.exit(1)
  if report is not None:
    print(f"curated {report['input']}: kept {report['kept']} of {report['total']}; dropped "
          + (", ".join(f"{k} {v}" for k, v in report["dropped"].items()) or "none")
          + f"; report in {f.output}/report.json")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
