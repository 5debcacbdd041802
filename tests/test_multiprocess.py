"""Two processes with 4 CPU devices each (gloo, 127.0.0.1) train like one process with 8.

Classification: the same per-step losses as 1 process x 8 devices, evaluation that counts every
example once across processes, SIGTERM to every worker (JAX's preemption sync point: all save
the same step and exit 0), and the restore of that checkpoint in a single process with one
device (another process count, so the data stream is rebuilt from the step), which then
continues with the reference losses.

Text-to-image on aspect-ratio buckets (``data.buckets``): every global batch one bucket, the
batch shape changing from step to step; the same per-step losses as 1 process x 8 devices.

Diffusion: training with a sample grid and a sample-based evaluation judged where the samples
were drawn (the 1-process classification run is the judge), then ``--mode=sample``; the judged
numbers equal the judge's on the samples the run wrote, and ``--mode=sample`` redraws the grid.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import helpers

TOTAL = 8
ARGS = [*helpers.TINY_CLASSIFIER, f"--config.total_steps={TOTAL}",
        "--config.optim.warmup_steps=2", "--config.log.every_steps=1",
        "--config.checkpoint.every_steps=2",
        "--config.evals.val.every_steps=4", "--config.augment.mixup_alpha=0.8",
        "--config.augment.cutmix_alpha=1.0", "--config.log.tensorboard=False"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices, cache=True, xla_flags=""):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {xla_flags}".strip())
  env.setdefault("ASCAN_COMPILATION_CACHE", os.path.join(helpers.REPO, ".jax_cache"))
  if not cache:
    env["ASCAN_COMPILATION_CACHE"] = ""
  return env


def _start_two(workdir, extra=(), args=ARGS, xla_flags=""):
  port = _free_port()
  procs = []
  for pid in range(2):
    cmd = [sys.executable, "main.py", *args, *extra, f"--workdir={workdir}",
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
           f"--process_id={pid}"]
    # No persistent compilation cache: JAX writes entries from process 0 only and process 1's
    # keys differ, so with a warm cache process 0 loads in seconds what process 1 compiles for
    # a minute, and its first collective gives up waiting (gloo's 30 s context timeout).
    procs.append(subprocess.Popen(cmd, cwd=helpers.REPO, env=_env(4, False, xla_flags),
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return procs


def _finish(procs, timeout=900):
  outs = [p.communicate(timeout=timeout) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, f"process failed ({p.returncode}):\n{err[-4000:]}"
  return outs


def _losses(workdir):
  rows = helpers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: r["train/loss"] for r in rows}, rows


@pytest.fixture(scope="module")
def one_process_classifier(tmp_path_factory):
  """The 1-process x 8-device reference run; its classifier also judges the diffusion samples."""
  single = tmp_path_factory.mktemp("one_process")
  helpers.run_main(*ARGS, f"--workdir={single}", devices=8)
  return single


def test_two_processes_match_one_survive_sigterm_and_restore_in_one(tmp_path,
                                                                   one_process_classifier):
  ref, ref_rows = _losses(one_process_classifier)

  # Two processes x 4 devices (evaluating at step 4), preempted by SIGTERM to every worker.
  multi = tmp_path / "two_processes"
  procs = _start_two(multi)
  path = multi / "metrics.jsonl"
  t0 = time.time()
  while not (path.exists() and len(path.read_text().splitlines()) >= 5):
    if time.time() - t0 > 600 or any(p.poll() is not None for p in procs):
      for p in procs:
        p.kill()
      raise AssertionError("the 2-process run ended early or timed out:\n"
                           + procs[0].stderr.read()[-3000:])
    time.sleep(0.05)
  for p in procs:
    p.send_signal(signal.SIGTERM)
  outs = _finish(procs, timeout=600)
  stopped = int(outs[0][0].split("checkpoint at step ")[1].split()[0])
  assert 5 <= stopped < TOTAL
  assert str(stopped) in os.listdir(multi / "checkpoints")
  got, rows = _losses(multi)
  two_eval = [r for r in rows if r["step"] == 4][0]  # each process read its share of the data.
  ref_eval = [r for r in ref_rows if r["step"] == 4][0]
  assert two_eval["eval/examples"] == 1000
  assert abs(two_eval["eval/top1"] - ref_eval["eval/top1"]) <= 0.002
  assert sorted(got) == list(range(1, stopped + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(got)],
                             rtol=2e-5)
  # Only process 0 writes the run files.
  assert [n for n in os.listdir(multi) if n.startswith("metrics")] == ["metrics.jsonl"]

  # The 2-process checkpoint restores in one process with one device; the data stream is
  # rebuilt from the step and the rest of the run matches the 1-process reference.
  proc = helpers.run_main(*ARGS, f"--workdir={multi}", devices=1)
  assert f"resumed from step {stopped} of" in proc.stdout
  cont, rows = _losses(multi)
  assert sorted(cont) == list(range(1, TOTAL + 1))
  np.testing.assert_allclose([cont[s] for s in range(1, TOTAL + 1)],
                             [ref[s] for s in range(1, TOTAL + 1)], rtol=2e-5)
  final = [r for r in rows if "eval/top1" in r][-1]
  ref_final = [r for r in ref_rows if "eval/top1" in r][-1]
  assert final["eval/examples"] == 1000
  assert abs(final["eval/top1"] - ref_final["eval/top1"]) <= 0.002


def test_two_processes_diffusion_grid_sample_evaluation_and_sample_mode(tmp_path,
                                                                       one_process_classifier):
  run = tmp_path / "diffusion"
  args = [*helpers.TINY_DIFFUSION, "--config.total_steps=2", "--config.checkpoint.every_steps=2",
          "--config.evals.val.every_steps=2", "--config.evals.grid.every_steps=2",
          "--config.evals.samples.every_steps=2", "--config.evals.samples.num_samples=20",
          f"--config.evals.samples.judge_dir={one_process_classifier}",
          "--config.evals.samples.train_judge=False", "--config.log.tensorboard=False"]
  _finish(_start_two(run, args=args))
  last = helpers.read_jsonl(run / "metrics.jsonl")[-1]
  assert last["step"] == 2 and np.isfinite(last["eval/loss"])
  tag = "ddim3_constant3_seed"
  grid = np.load(run / "samples" / f"grid_step0000002_{tag}0_ema.npz")
  assert grid["images"].shape == (20, 32, 32, 1)  # 10 classes x 2, on every process

  # The judged numbers are the judge's own (one process, numpy) on the samples the run wrote:
  # every sample of both processes counted once.
  written = np.load(run / "samples" / f"eval_step0000002_{tag}1_ema.npz")
  assert written["images"].shape == (20, 32, 32, 1)
  np.testing.assert_array_equal(np.sort(written["labels"]), np.sort(np.arange(20) % 10))
  from ascan_jax.tasks import judge as judge_lib
  judge = judge_lib.Judge.from_workdir(str(one_process_classifier))
  real = judge.real_features(limit=50)  # TINY_DIFFUSION's real_samples
  want = judge.evaluate(written["images"], written["labels"], real)
  assert last["eval/sample_class_accuracy"] == want["sample_class_accuracy"]
  assert last["eval/fd_classifier"] == pytest.approx(want["fd_classifier"], rel=1e-4)

  _finish(_start_two(run, ["--mode=sample"], args=args))
  drawn = np.load(run / "samples" / f"sample_step0000002_{tag}0_ema.npz")
  np.testing.assert_array_equal(drawn["labels"], grid["labels"])
  np.testing.assert_array_equal(drawn["images"], grid["images"])  # the final grid, redrawn


# Quicker XLA compilation (LLVM at -O0) for the bucketed runs below, on both sides of the
# comparison: every bucket shape is compiled by every process, with no compilation cache.
QUICK_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
T2I_BUCKETS = ("32x32", "32x48")
T2I_STEPS = 4


def test_two_processes_train_on_buckets_like_one(tmp_path):
  """A tiny text-to-image run on two aspect-ratio buckets (scenes rendered at their canvases,
  captions tokenized on the host, the stand-in T5 in the step): 2 processes x 4 devices give the
  1-process x 8-device losses, step by step, through both bucket shapes."""
  from ascan_jax.tasks import diffusion as diffusion_task
  from ascan_jax.tasks import text_to_image
  encoder = tmp_path / "t5"
  base = helpers.write_tiny_t2i_config(tmp_path, encoder, T2I_STEPS)
  config_path = tmp_path / "bucketed.py"
  config_path.write_text(
      "import importlib.util\n"
      f"_s = importlib.util.spec_from_file_location('tiny', {base!r})\n"
      "_m = importlib.util.module_from_spec(_s)\n_s.loader.exec_module(_m)\n\n\n"
      "def get_config(arg=None):\n  c = _m.get_config(arg)\n"
      f"  c.data.update(dict(buckets={T2I_BUCKETS!r}, num_train_examples=32))\n"
      # One level, one T block and one C block: a quicker compilation per bucket.
      "  c.model.update(dict(channels=(16,), down_layout='T', mid_layout='C', adapter_blocks=1))\n"
      # The output layer starts at zero: with no warm-up and a large rate every step after the
      # first moves the model far enough that the loss depends on the batch's images and text.
      "  c.optim.update(dict(warmup_steps=0, peak_lr=1e-2))\n"
      "  return c\n")
  config = diffusion_task.load_config_file(str(config_path))
  text_to_image.make_standin_encoder(str(encoder), config)  # once, before the processes start.
  from ascan_jax import tasks
  plan = tasks.get_task(config).bucket_plan()
  buckets = [plan.bucket_at(s) for s in range(T2I_STEPS)]
  assert sorted(set(buckets)) == [0, 1], buckets  # both shapes are trained.
  args = [f"--config={config_path}"]

  one = tmp_path / "one_process"
  helpers.run_main(*args, f"--workdir={one}", devices=8,
                   env={"XLA_FLAGS": _env(8, xla_flags=QUICK_XLA)["XLA_FLAGS"]})
  two = tmp_path / "two_processes"
  _finish(_start_two(two, args=args, xla_flags=QUICK_XLA), timeout=600)
  ref, ref_rows = _losses(one)
  got, rows = _losses(two)
  assert sorted(ref) == sorted(got) == list(range(1, T2I_STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(got)],
                             rtol=2e-5)
  for r in [*rows, *ref_rows]:  # one compilation of the step per bucket shape met so far.
    assert r["perf/step_compilations"] == len(set(buckets[:r["step"]])), r
