"""The accelerator report: the command end to end with tiny models, and its parts.

* the whole command (``--tiny``: every section with tiny models, the PyTorch peer where torch
  is installed) writes a report whose rows, ratios, profiles and files agree with each other;
* the training batch probe goes down on out-of-memory and nothing else;
* the profile summary categorises HLO (including GPU custom calls) and folds op sources;
* ``attention_impl=auto`` follows a recorded measurement and keeps the rules without one.
"""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ascan_jax.diffusion import guidance as guidance_lib
from ascan_jax.diffusion import samplers
from ascan_jax.models import attention
from ascan_jax.perf import attention_table
from ascan_jax.perf import profile_summary
from ascan_jax.perf import synthetic
from ascan_jax.perf import torch_peers
from ascan_jax.tools import accelerator_report as ar


def _ok(rows, section, **match):
  return [r for r in rows if r["section"] == section and r["status"] == "ok"
          and all(r.get(k) == v for k, v in match.items())]


def test_report_command_end_to_end_with_tiny_models(tmp_path):
  out = str(tmp_path / "report")
  result = ar.main(["--out", out, "--tiny"])
  for name in ("report.json", "report.md", "throughput.png", "attention_choices.json"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  with open(os.path.join(out, "throughput.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(out, "report.json")) as f:
    saved = json.load(f)
  assert saved["rows"] == json.loads(json.dumps(result["rows"]))
  rows = saved["rows"]
  failed = [r for r in rows if r["status"] == "failed"]
  assert not failed, failed

  ours = _ok(rows, "classification", framework="jax")
  assert [r["batch"] for r in ours] == [2] and ours[0]["impl"] == "auto (xla)"
  (train,) = _ok(rows, "train")
  assert train["batch"] == 4 and train["oom_batches"] == []
  for r in ours + [train]:
    assert r["images_per_second"] > 0 and r["seconds_min"] <= r["seconds_median"]
    assert 0 < r["mfu"] and r["gmacs_per_image"] > 0
  # Training counts 6 FLOPs per MAC, inference 2: the same MACs and peak behind both MFUs.
  assert train["mfu"] == pytest.approx(
      6 * train["gmacs_per_image"] * 1e9 * train["images_per_second"] /
      saved["meta"]["peak_flops"])

  fwd, implied, measured = _ok(rows, "diffusion")
  nfe = samplers.nfe("heun", 2, guidance_lib.constant(1.78))
  assert implied["value"] == pytest.approx(fwd["images_per_second"] / nfe)
  assert measured["impl"] == "sampling (measured)" and measured["value"] > 0
  evaluation, sample = _ok(rows, "t2i")
  assert sample["value"] == pytest.approx(nfe * evaluation["value"])
  assert _ok(rows, "segmentation")[0]["value"] > 0

  peers = [r for r in rows if r["framework"] == "pytorch"]
  assert peers and all(r["model"] == "ConvNeXt-T" for r in peers)
  if saved["meta"]["torch"]["available"]:
    (peer,) = _ok(rows, "classification", framework="pytorch")
    assert peer["impl"] == "eager" and "not compiled" in peer["note"]
    (ratio,) = saved["ratios"]
    assert ratio["ratio"] == pytest.approx(ours[0]["images_per_second"] /
                                           peer["images_per_second"])
  else:
    assert all(r["status"] == "skipped" and r["reason"] for r in peers)

  assert len(saved["profiles"]) == 2
  for p in saved["profiles"].values():
    assert p["events"] > 0 and p["unmatched_share"] == 0
    assert sum(p["by_category_ms"].values()) == pytest.approx(p["op_ms_per_step"])
    assert set(p["by_category_ms"]) <= set(profile_summary.CATEGORIES)
  train_profile = next(p for k, p in saved["profiles"].items() if "training" in k)
  assert any(s["source"].startswith("bwd: ") for s in train_profile["top_sources"])

  entries = attention_table.check_entries(saved["attention_choices"])
  assert {e["choice"] for e in entries} == {"xla"}  # the only implementation on a CPU.

  md = open(os.path.join(out, "report.md")).read()
  for text in ("AsCAN-tiny", "Training step", "UNet tiny", "UperNet-AsCAN-tiny",
               "Where the time goes", "| convolution |"):
    assert text in md, text


def test_deadline_skips_rows_and_says_why(tmp_path):
  settings = ar.parse_args(["--out", str(tmp_path), "--tiny", "--sections=diffusion,t2i",
                            "--deadline_s=1"])[0]
  report = ar.Report(settings, str(tmp_path))
  report.start -= 10  # the deadline has passed.
  report.run_jobs(report.plan())
  assert report.rows and all(r["status"] == "skipped" for r in report.rows)
  assert all("deadline" in r["reason"] for r in report.rows)


def test_largest_fitting_batch_probes_down_on_out_of_memory_only():
  def attempt(b):
    if b > 16:
      raise RuntimeError(f"RESOURCE_EXHAUSTED: Out of memory while allocating for batch {b}")
    return {"batch": b}

  batch, result, tried = ar.largest_fitting((8, 64, 16, 32), attempt)
  assert batch == 16 and result == {"batch": 16}
  assert [t["batch"] for t in tried] == [64, 32]

  with pytest.raises(ValueError, match="not memory"):
    ar.largest_fitting((8,), lambda b: (_ for _ in ()).throw(ValueError("not memory")))
  with pytest.raises(RuntimeError, match="no batch of \\[2, 1\\] fits"):
    ar.largest_fitting((1, 2), lambda b: attempt(100))


def test_profile_of_a_traced_call_sums_by_category_and_source(tmp_path):
  def f(x, w, m):
    with jax.named_scope("stage1_block1_C"), jax.named_scope("expand_conv"):
      y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    with jax.named_scope("stage2_block1_T"), jax.named_scope("mlp_in"):
      z = y.reshape(-1, y.shape[-1]) @ m
    return jnp.tanh(z).T

  args = (jnp.ones((2, 32, 32, 16)), jnp.ones((3, 3, 16, 64)) * 0.01, jnp.ones((64, 128)) * 0.1)
  compiled = jax.jit(f).lower(*args).compile()
  summary = profile_summary.profile_call(lambda: jax.block_until_ready(compiled(*args)),
                                         compiled.as_text(), 2, str(tmp_path))
  assert summary["steps"] == 2 and summary["wall_ms_per_step"] > 0
  assert summary["by_category_ms"]["convolution"] > 0 and summary["by_category_ms"]["dot"] > 0
  sources = {s["source"] for s in summary["top_sources"]}
  assert "C block/expand_conv/conv_general_dilated" in sources
  assert "T block/mlp_in/dot_general" in sources


HLO = """HloModule jit_step, entry_computation_layout={()->f32[]}

%fused_conv (p0: f32[1,8,8,4], p1: f32[3,3,4,4]) -> f32[1,8,8,4] {
  %p0 = f32[1,8,8,4]{3,2,1,0} parameter(0)
  %p1 = f32[3,3,4,4]{3,2,1,0} parameter(1)
  %convolution.1 = f32[1,8,8,4]{3,2,1,0} convolution(%p0, %p1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(step)/transpose(jvp(AsCAN))/stage2_block3_C/expand_conv/conv_general_dilated"}
  ROOT %add.1 = f32[1,8,8,4]{3,2,1,0} add(%convolution.1, %convolution.1), metadata={op_name="jit(step)/AsCAN/add"}
}

%fused_transpose (p0.1: f32[4,8]) -> f32[8,4] {
  %p0.1 = f32[4,8]{1,0} parameter(0)
  ROOT %transpose.2 = f32[8,4]{0,1} transpose(%p0.1), dimensions={1,0}
}

ENTRY %main (a: f32[1,8,8,4], b: f32[3,3,4,4], c: f32[4,8]) -> f32[] {
  %a = f32[1,8,8,4]{3,2,1,0} parameter(0)
  %b = f32[3,3,4,4]{3,2,1,0} parameter(1)
  %c = f32[4,8]{1,0} parameter(2)
  %loop_conv_fusion = f32[1,8,8,4]{3,2,1,0} fusion(%a, %b), kind=kCustom, calls=%fused_conv, metadata={op_name="jit(step)/AsCAN/add"}
  %transpose_fusion = f32[8,4]{0,1} fusion(%c), kind=kLoop, calls=%fused_transpose
  %custom-call.3 = (bf16[2,49,4,32]{3,2,1,0}, u8[0]{0}) custom-call(%a), custom_call_target="__cudnn$fmhaSoftmaxBias", metadata={op_name="jit(step)/AsCAN/stage4_block2_T/attention/dot_product_attention"}
  %custom-call.4 = f32[8,8]{1,0} custom-call(%c, %c), custom_call_target="__cublas$gemm"
  %all-reduce-start.5 = f32[8,4]{1,0} all-reduce-start(%transpose_fusion), replica_groups={}, to_apply=%fused_transpose
  ROOT %r = f32[] constant(0)
}
"""


def test_hlo_categories_cover_gpu_custom_calls_and_fused_sources():
  table, module = profile_summary.classify_program(HLO)
  assert module == "jit_step"
  assert table["loop_conv_fusion"] == (
      "convolution", "bwd: C block/expand_conv/conv_general_dilated")
  assert table["transpose_fusion"][0] == "copy/transpose"
  assert table["custom-call.3"] == ("attention kernel",
                                    "T block/attention/dot_product_attention")
  assert table["custom-call.4"][0] == "dot"
  assert table["all-reduce-start.5"][0] == "collective"
  assert profile_summary.source_group("jit(f)/AsCAN/head_conv/conv_general_dilated") == \
      "head_conv/conv_general_dilated"
  assert profile_summary.source_group("") == "(no source)"


def test_auto_attention_follows_recorded_measurements_and_keeps_rules_without():
  entry = {"platform": "gpu", "device_kind": "NVIDIA H200", "dtype": "bfloat16", "head_dim": 32,
           "seq_len_min": 0, "seq_len_max": 1000, "choice": "xla"}
  table = attention_table.check_entries([entry])
  resolve = lambda **kw: attention.resolve_implementation(
      "auto", kw.pop("dtype", jnp.bfloat16), kw.pop("seq", 784), kw.pop("hd", 32), "gpu",
      table=table, **kw)
  assert resolve(device_kind="nvidia h200") == "xla"  # measured: xla beats cuDNN here.
  assert resolve(device_kind="NVIDIA H200", seq=3136) == "cudnn"  # outside the range: rules.
  assert resolve(device_kind="NVIDIA A100") == "cudnn"  # another device: rules.
  assert resolve(device_kind="NVIDIA H200", hd=64) == "cudnn"
  assert resolve(device_kind=None) == "cudnn"  # no device kind: rules.
  unusable = attention_table.check_entries([{**entry, "dtype": "float32", "choice": "cudnn"}])
  assert attention.resolve_implementation("auto", jnp.float32, 784, 32, "gpu",
                                          device_kind="NVIDIA H200", table=unusable) == "xla"
  # The table in the repository is well formed, and on this CPU auto stays xla.
  attention_table.load()
  assert attention.resolve_implementation("auto", jnp.float32, 784, 32) == "xla"
  with pytest.raises(attention_table.AttentionTableError, match="entry 0.*choice 'flash'"):
    attention_table.check_entries([{**entry, "choice": "flash"}])
  with pytest.raises(attention_table.AttentionTableError, match="entry 0 lacks"):
    attention_table.check_entries([{"platform": "gpu"}])


def test_sweep_choices_cover_every_length_once():
  results = [{"head_dim": 32, "seq_len": n, "choice": c, "ms_no_bias_plus_bias": {"xla": 1.0}}
             for n, c in ((49, "xla"), (196, "cudnn"), (784, "cudnn"))]
  entries = attention_table.entries_from_sweep(results, "gpu", "NVIDIA H200", "bfloat16")
  attention_table.check_entries(entries)
  for n in range(1, 5000):
    hits = [e for e in entries if e["seq_len_min"] <= n and
            (e["seq_len_max"] is None or n <= e["seq_len_max"])]
    assert len(hits) == 1, n
  choose = lambda n: attention_table.choose(entries, platform="gpu", device_kind="NVIDIA H200",
                                            dtype="bfloat16", seq_len=n, head_dim=32)
  assert [choose(n) for n in (49, 98, 99, 196, 392, 393, 5000)] == \
      ["xla", "xla", "cudnn", "cudnn", "cudnn", "cudnn", "cudnn"]


def test_filled_like_is_finite_nonzero_and_follows_names():
  tree = {"params": {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.float32),
                              "bias": jax.ShapeDtypeStruct((8,), jnp.float32)},
                     "bn": {"scale": jax.ShapeDtypeStruct((8,), jnp.float32)}},
          "batch_stats": {"bn": {"mean": jax.ShapeDtypeStruct((8,), jnp.float32),
                                 "var": jax.ShapeDtypeStruct((8,), jnp.float32)}},
          "step": jax.ShapeDtypeStruct((), jnp.int32)}
  out = synthetic.filled_like(tree)
  kernel = np.asarray(out["params"]["conv"]["kernel"])
  assert np.all(np.isfinite(kernel)) and np.count_nonzero(kernel) == kernel.size
  assert np.abs(kernel).max() <= 1 / math.sqrt(3 * 3 * 4) + 1e-6
  np.testing.assert_array_equal(out["batch_stats"]["bn"]["var"], 1.0)
  np.testing.assert_array_equal(out["params"]["bn"]["scale"], 1.0)
  np.testing.assert_array_equal(out["batch_stats"]["bn"]["mean"], 0.0)
  assert out["step"].dtype == jnp.int32


def test_peers_report_why_they_cannot_run():
  info = torch_peers.versions()
  if not info["available"]:
    assert info["reason"]
    return
  with pytest.raises(torch_peers.PeersUnavailable, match="tpu"):
    torch_peers.torch_device("tpu")
  with pytest.raises(ValueError, match="unknown peer"):
    torch_peers.PeerModel("ResNet-50", platform="cpu", low_precision=False)
