"""--mode=summary and --mode=bench through main.py, and the HLO MAC counter."""
import json

import jax
import jax.numpy as jnp

from ascan_jax.perf import hlo_macs
from tests import helpers


def test_hlo_mac_counter_counts_convs_and_dots():
  def f(x, w, a):
    y = jax.lax.conv_general_dilated(x, w, (2, 2), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    z = jnp.einsum("bnd,de->bne", y.reshape(2, -1, 8), a)
    return jnp.einsum("bqd,bkd->bqk", z, z)
  args = (jax.ShapeDtypeStruct((2, 16, 16, 4), jnp.float32),
          jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.float32),
          jax.ShapeDtypeStruct((8, 16), jnp.float32))
  macs = hlo_macs.count_macs(jax.jit(f).lower(*args).compile().as_text())
  assert macs["conv"] == 2 * 8 * 8 * 8 * (3 * 3 * 4)
  assert macs["dot"] == 2 * 64 * 16 * 8 + 2 * 64 * 64 * 16


def test_grouped_convolution_counts_per_group():
  def f(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", feature_group_count=4,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  args = (jax.ShapeDtypeStruct((1, 8, 8, 4), jnp.float32),
          jax.ShapeDtypeStruct((3, 3, 1, 4), jnp.float32))
  macs = hlo_macs.count_macs(jax.jit(f).lower(*args).compile().as_text())
  assert macs["conv"] == 8 * 8 * 4 * 9


def test_summary_mode_writes_params_and_macs(tmp_path):
  proc = helpers.run_main("--config=configs/ascan_t.py", "--mode=summary",
                          f"--workdir={tmp_path}", timeout=600)
  s = json.loads((tmp_path / "summary.json").read_text())
  assert s["params"] == 21_686_188
  assert abs(s["macs"] / 1e9 - 4.145) < 0.01
  assert s["layout"] == "C-CCCT-CCTT-CTTT" and s["depths"] == [1, 4, 4, 4]
  assert s["heads"] == [0, 4, 8, 16]
  assert s["inference_temp_bytes"] > 0 and s["train_temp_bytes"] > s["inference_temp_bytes"]
  assert "parameters" in proc.stdout and "MACs / example" in proc.stdout


def test_bench_mode_writes_throughput_and_mfu(tmp_path):
  helpers.run_main(*helpers.TINY_CLASSIFIER, "--mode=bench", f"--workdir={tmp_path}",
                   "--config.bench.repeats=2", "--config.bench.warmup=1",
                   "--config.bench.min_seconds=0.05", "--config.bench.batch_sizes=(1,4)",
                   "--config.bench.train_batch_size=8",
                   timeout=600)
  r = json.loads((tmp_path / "bench.json").read_text())
  assert r["device_kind"] and r["platform"] == "cpu"
  assert set(r["inference"]) == {"1", "4"}
  for x in list(r["inference"].values()) + [r["train"]]:
    assert x["examples_per_second"] > 0 and 0 < x["mfu"] < 1
    assert x["seconds_min"] <= x["seconds_median"] <= x["seconds_max"]
  assert r["peak_source"].startswith("measured")


def test_imagenet256_diffusion_summary_is_about_400m(tmp_path):
  """Paper: the class-conditional UNet has about 400M parameters (within 10 %)."""
  helpers.run_main("--config=configs/imagenet256_diffusion.py", "--mode=summary",
                   f"--workdir={tmp_path}", timeout=600)
  s = json.loads((tmp_path / "summary.json").read_text())
  assert abs(s["params"] - 400e6) / 400e6 < 0.10
  assert s["input_shapes"]["latent"] == [32, 32, 4]  # SD VAE latents of 256x256 images.
  assert 25e9 < s["macs"] < 40e9


def test_diffusion_bench_reports_params_gflops_and_sampling_rate(tmp_path):
  helpers.run_main(*helpers.TINY_DIFFUSION, "--mode=bench", f"--workdir={tmp_path}",
                   "--config.bench.repeats=2", "--config.bench.warmup=1",
                   "--config.bench.min_seconds=0", "--config.bench.batch_sizes=(1,4)",
                   "--config.bench.train_batch_size=0", "--config.bench.measure_sampling=True",
                   timeout=600)
  r = json.loads((tmp_path / "bench.json").read_text())
  assert r["params"] > 0 and r["train"] is None
  assert abs(r["gflops_per_example"] - 2 * r["macs_per_example"] / 1e9) < 1e-9
  s = r["sampling"]
  assert s["sampler"] == "ddim" and s["nfe_per_sample"] == 6 and s["batch"] == 4
  fwd = r["inference"]["4"]["examples_per_second"]
  assert abs(s["samples_per_second_from_forward"] - fwd / 6) < 1e-6 * fwd
  assert s["samples_per_second_measured"] > 0
