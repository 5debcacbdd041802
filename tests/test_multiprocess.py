"""Two processes with 4 CPU devices each (gloo, 127.0.0.1) train like one process with 8.

Classification: the same per-step losses as 1 process x 8 devices, evaluation that counts every
example once across processes, SIGTERM to every worker (JAX's preemption sync point: all save
the same step and exit 0), and the restore of that checkpoint in a single process with one
device (another process count, so the data stream is rebuilt from the step), which then
continues with the reference losses.

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
