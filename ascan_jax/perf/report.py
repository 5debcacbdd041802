"""The accelerator report's outputs from its JSON: ratios, a Markdown page and a throughput plot.

Pure functions of the ``report.json`` dict written by ``ascan_jax.tools.accelerator_report`` (no
JAX, no models), so a report measured elsewhere can be re-rendered:
``python -c "import json; from ascan_jax.perf import report; r = json.load(open('DIR/report.json'));
open('DIR/report.md', 'w').write(report.markdown(r)); report.plot(r, 'DIR/throughput.png')"``.

A row is a dict with ``section`` (classification | train | diffusion | t2i | segmentation),
``model``, ``framework`` (jax | pytorch), ``impl``, ``batch``, ``metric`` and ``value`` (its headline
number in that metric), ``images_per_second``, ``mfu``, ``status`` (ok | skipped | failed) and
``reason``, and timing details. The ratios compare each of our classification rows measured with
the default attention (``auto``) against every peer at the same batch.
"""
from __future__ import annotations

import math

SECTION_TITLES = {
    "classification": "Classification inference",
    "train": "Training step (the loop's jitted step: loss, AdamW, EMA, donation)",
    "diffusion": "Class-conditional diffusion UNet",
    "t2i": "Text-to-image UNet",
    "segmentation": "Segmentation",
}


def _ok(rows, section=None):
  return [r for r in rows if r.get("status") == "ok" and (section is None or
                                                          r["section"] == section)]


def ratios(rows: list[dict]) -> list[dict]:
  """``{model, batch, peer, peer_impl, ratio}`` of img/s for every (ours with ``auto``, peer)
  pair measured at the same batch."""
  rows = _ok(rows, "classification")
  ours = [r for r in rows if r["framework"] == "jax" and str(r.get("impl", "")).startswith("auto")]
  peers = [r for r in rows if r["framework"] == "pytorch"]
  out = []
  for o in ours:
    for p in peers:
      if p["batch"] == o["batch"]:
        out.append({"model": o["model"], "batch": o["batch"], "peer": p["model"],
                    "peer_impl": p["impl"],
                    "ratio": o["images_per_second"] / p["images_per_second"]})
  return out


def _fmt(x, digits=4) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "-"
  if isinstance(x, float):
    return f"{x:.{digits}g}" if abs(x) < 1e5 else f"{x:.0f}"
  return str(x)


def _pct(x) -> str:
  return "-" if x is None else f"{100 * x:.1f} %"


def _classification_table(rows: list[dict], headline: int) -> list[str]:
  rows = _ok(rows, "classification")
  batches = sorted({r["batch"] for r in rows})
  keys = []
  for r in rows:
    k = (r["model"], r["framework"], r["impl"])
    if k not in keys:
      keys.append(k)
  head = ["model", "framework", "implementation"] + [f"batch {b}" for b in batches] + \
         [f"MFU (batch {headline})", "params (M)", "GMACs / image"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for k in keys:
    mine = {r["batch"]: r for r in rows if (r["model"], r["framework"], r["impl"]) == k}
    any_row = next(iter(mine.values()))
    cells = list(k) + [_fmt(mine[b]["images_per_second"]) if b in mine else "-"
                       for b in batches]
    hr = mine.get(headline)
    cells += [_pct(hr.get("mfu")) if hr else "-", _fmt(any_row.get("params", 0) / 1e6),
              _fmt(any_row.get("gmacs_per_image"))]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def _ratio_table(result: dict) -> list[str]:
  rs = result.get("ratios") or ratios(result["rows"])
  if not rs:
    return []
  peers = []
  for r in rs:
    if r["peer"] not in peers:
      peers.append(r["peer"])
  keys = []
  for r in rs:
    if (r["model"], r["batch"]) not in keys:
      keys.append((r["model"], r["batch"]))
  head = ["ours (auto attention)", "batch"] + [f"/ {p}" for p in peers]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for model, batch in keys:
    by_peer = {r["peer"]: r["ratio"] for r in rs if (r["model"], r["batch"]) == (model, batch)}
    lines.append("| " + " | ".join([model, str(batch)] +
                                   [f"{by_peer[p]:.2f}x" if p in by_peer else "-"
                                    for p in peers]) + " |")
  return lines


def _other_table(rows: list[dict], section: str) -> list[str]:
  rows = _ok(rows, section)
  if not rows:
    return []
  head = ["model", "what", "batch", "value", "MFU", "compile s", "note"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    note = r.get("note", "")
    if r.get("oom_batches"):
      note += "; out of memory at " + ", ".join(str(t["batch"]) for t in r["oom_batches"])
    lines.append("| " + " | ".join([r["model"], str(r.get("impl", "")), str(r["batch"]),
                                    f"{_fmt(r['value'])} {r['metric']}", _pct(r.get("mfu")),
                                    _fmt(r.get("compile_seconds"), 3), note]) + " |")
  return lines


def _profile_lines(name: str, p: dict) -> list[str]:
  if "error" in p:
    return [f"### {name}", "", f"Not profiled: {p['error']}", ""]
  lines = [f"### {name}", "",
           f"{p['steps']} call(s) traced: {_fmt(p.get('wall_ms_per_step'))} ms wall, "
           f"{_fmt(p['busy_ms_per_step'])} ms with an op running (idle "
           f"{_fmt(p.get('idle_ms_per_step'))} ms), {_fmt(p['op_ms_per_step'])} ms of op time "
           f"per call (ops may overlap on a CPU's threads); events not matched to an HLO "
           f"instruction: {_pct(p.get('unmatched_share'))}.", "",
           "| op type | ms / call | share |", "|---|---|---|"]
  for c, ms in sorted(p["by_category_ms"].items(), key=lambda kv: -kv[1]):
    lines.append(f"| {c} | {_fmt(ms)} | {_pct(p['by_category_share'][c])} |")
  lines += ["", "| source (block / module / primitive) | ms / call | share |", "|---|---|---|"]
  for s in p["top_sources"]:
    lines.append(f"| `{s['source']}` | {_fmt(s['ms'])} | {_pct(s['share'])} |")
  return lines + [""]


def markdown(result: dict) -> str:
  """The report as a Markdown page."""
  m = result["meta"]
  s = m["settings"]
  t = m.get("torch") or {}
  torch_text = (f"torch {t['torch']}, timm {t['timm']}" if t.get("available")
                else f"no PyTorch peers ({t.get('reason', 'not measured')})")
  lines = [f"# Accelerator report: {m['device_kind']} ({m['platform']}), {m['compute_dtype']}",
           "",
           f"{m.get('date', '')}; preset `{s['preset']}`; jax {m['jax_version']}; {torch_text}; "
           f"one device of {m['devices_present']}; peak {m['peak_flops'] / 1e12:.3g} TFLOP/s "
           f"({m['peak_source']}); whole run {m['wall_seconds']:.0f} s.",
           "",
           f"Each number is the median of {s['repeats']} timings (each repeats the call for at "
           f"least {s['min_seconds']} s) after {s['warmup']} warm-up calls, inputs already on "
           f"the device. MFU: model FLOPs (2 x MACs per image for inference, 6 x for a training "
           f"step; MACs counted from the HLO with XLA attention) over the peak. Images "
           f"{s['image_size']}x{s['image_size']}.", ""]
  if m.get("command"):
    lines[2:2] = [f"Command: `{m['command']}`", ""]
  rows = result["rows"]
  if _ok(rows, "classification"):
    lines += [f"## {SECTION_TITLES['classification']} (img/s)", ""]
    lines += _classification_table(rows, s["headline_batch"]) + [""]
  ratio_lines = _ratio_table(result)
  if ratio_lines:
    lines += ["## Ours / peers (img/s ratio, same batch, same device, same run)", ""]
    lines += ratio_lines + [""]
  for section in ("train", "diffusion", "t2i", "segmentation"):
    table = _other_table(rows, section)
    if table:
      lines += [f"## {SECTION_TITLES[section]}", ""] + table + [""]
  if result.get("profiles"):
    lines += ["## Where the time goes (jax.profiler trace, by op type and source)", ""]
    for name, p in result["profiles"].items():
      lines += _profile_lines(name, p)
  if result.get("attention_sweep"):
    lines += ["## Attention sweep (ms for no bias + dense bias; batch as listed)", "",
              "| head dim | tokens | heads | batch | times | fastest |", "|---|---|---|---|---|---|"]
    for r in result["attention_sweep"]:
      times = ", ".join(f"{k} {_fmt(v)}" for k, v in r["ms_no_bias_plus_bias"].items())
      lines.append(f"| {r['head_dim']} | {r['seq_len']} | {r['heads']} | {r['batch']} | "
                   f"{times} | {r['choice']} |")
    lines.append("")
  bad = [r for r in rows if r.get("status") != "ok"]
  if bad:
    lines += ["## Not measured", "", "| section | model | batch | status | reason |",
              "|---|---|---|---|---|"]
    for r in bad:
      lines.append(f"| {r['section']} | {r['model']} | {r.get('batch', '-')} | {r['status']} | "
                   f"{r.get('reason', '')} |")
    lines.append("")
  notes = sorted({r["note"] for r in _ok(rows, "classification") if r.get("note")})
  if notes:
    lines += ["Notes: " + "; ".join(notes) + ".", ""]
  return "\n".join(lines)


def plot(result: dict, path: str) -> None:
  """Classification img/s against batch (log-log), one line per model and implementation."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  m = result["meta"]
  rows = _ok(result["rows"], "classification")
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
  series: dict[tuple, list] = {}
  for r in rows:
    series.setdefault((r["model"], r["framework"], r["impl"]), []).append(
        (r["batch"], r["images_per_second"]))
  for (model, framework, impl), pts in series.items():
    pts.sort()
    style = "-o" if framework == "jax" else "--s"
    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{model} ({impl})")
  if series:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.legend(fontsize=7)
  else:
    ax.text(0.5, 0.5, "no classification rows measured", ha="center", va="center")
  ax.set_xlabel("batch")
  ax.set_ylabel("images / s")
  ax.set_title(f"{m['device_kind']} ({m['platform']}), {m['compute_dtype']}, "
               f"{m['settings']['image_size']}px", fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
