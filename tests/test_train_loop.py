"""The loop end to end through main.py: exact resume after SIGKILL, SIGTERM, eval, outputs."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import helpers

TOTAL = 20
TINY = [*helpers.TINY_CLASSIFIER, f"--config.total_steps={TOTAL}",
        "--config.optim.warmup_steps=5", "--config.log.every_steps=1",
        "--config.checkpoint.every_steps=4",
        "--config.evals.val.every_steps=10", "--config.augment.mixup_alpha=0.8",
        "--config.augment.cutmix_alpha=1.0"]


def _losses(workdir):
  rows = helpers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  steps = [r["step"] for r in rows]
  assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
  return {r["step"]: r["train/loss"] for r in rows}, rows


def _start(workdir):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  env.setdefault("ASCAN_COMPILATION_CACHE", os.path.join(helpers.REPO, ".jax_cache"))
  return subprocess.Popen([sys.executable, "main.py", *TINY, f"--workdir={workdir}"],
                          cwd=helpers.REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _finished_checkpoints(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _wait_for_lines(proc, workdir, n, min_checkpoint=0, timeout=600):
  """Waits until metrics.jsonl has n lines and a finished checkpoint >= min_checkpoint exists."""
  path = os.path.join(workdir, "metrics.jsonl")
  t0 = time.time()
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      raise AssertionError(f"run ended early:\n{proc.stderr.read()[-3000:]}")
    if os.path.exists(path):
      with open(path) as f:
        lines = sum(1 for line in f if line.strip())
      done = _finished_checkpoints(workdir)
      if lines >= n and (min_checkpoint == 0 or (done and done[-1] >= min_checkpoint)):
        return
    time.sleep(0.02)
  raise AssertionError("timed out waiting for metrics")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  helpers.run_main(*TINY, f"--workdir={workdir}")
  return workdir


def test_outputs_of_a_run(uninterrupted):
  losses, rows = _losses(uninterrupted)
  assert sorted(losses) == list(range(1, TOTAL + 1))
  for key in ("train/loss", "train/lr", "train/grad_norm", "perf/images_per_second"):
    assert key in rows[0], key
  evals = [r for r in rows if "eval/top1" in r]
  assert [r["step"] for r in evals] == [10, 20]
  assert all("eval/ema_top1" in r and 0 <= r["eval/top1"] <= 1 for r in evals)
  assert evals[-1]["eval/examples"] == 1000  # every held-out example exactly once.
  config = json.loads((uninterrupted / "config.json").read_text())
  assert config["resolved"]["total_steps"] == TOTAL
  assert config["config"]["model"]["layout"] == "C-CT"
  events = [f for f in os.listdir(uninterrupted / "tensorboard") if "tfevents" in f]
  assert events
  data = (uninterrupted / "tensorboard" / events[0]).read_bytes()
  assert b"train/loss" in data and b"eval/top1" in data
  steps = sorted(int(s) for s in os.listdir(uninterrupted / "checkpoints") if s.isdigit())
  # keep=3 latest (12, 16, 20) plus the best evaluated one (10 or 20).
  assert steps[-3:] == [12, 16, 20] and len(steps) <= 4


def test_sigkill_at_any_moment_resumes_with_identical_losses(uninterrupted, tmp_path):
  reference, _ = _losses(uninterrupted)
  workdir = tmp_path / "killed"
  # Killed three times: before any checkpoint finished, after one, and after an evaluation
  # (possibly while an async checkpoint is being written).
  for lines, min_checkpoint in ((3, 0), (6, 4), (13, 12)):
    proc = _start(workdir)
    _wait_for_lines(proc, workdir, lines, min_checkpoint)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  helpers.run_main(*TINY, f"--workdir={workdir}")
  losses, rows = _losses(workdir)
  assert sorted(losses) == list(range(1, TOTAL + 1))
  assert losses == reference  # bit-for-bit: same data order, randomness and arithmetic.
  ref_rows = {r["step"]: r for r in helpers.read_jsonl(uninterrupted / "metrics.jsonl")}
  for r in rows:
    if "eval/top1" in r:
      assert r["eval/top1"] == ref_rows[r["step"]]["eval/top1"]


def test_sigterm_checkpoints_exits_cleanly_and_resumes(uninterrupted, tmp_path):
  reference, _ = _losses(uninterrupted)
  workdir = tmp_path / "preempted"
  proc = _start(workdir)
  _wait_for_lines(proc, workdir, 7)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  stopped = int(out.split("checkpoint at step ")[1].split()[0])
  assert 7 <= stopped < TOTAL
  assert str(stopped) in os.listdir(workdir / "checkpoints")
  second = helpers.run_main(*TINY, f"--workdir={workdir}")
  assert f"resumed from step {stopped} " in second.stdout
  losses, _ = _losses(workdir)
  assert losses == reference


def test_eval_mode_latest_and_named_step(uninterrupted):
  out = helpers.run_main(*TINY, f"--workdir={uninterrupted}", "--mode=eval")
  final = [r for r in helpers.read_jsonl(uninterrupted / "metrics.jsonl") if "eval/top1" in r]
  evals = helpers.read_jsonl(uninterrupted / "eval.jsonl")
  assert evals[-1]["step"] == TOTAL
  assert evals[-1]["eval/top1"] == final[-1]["eval/top1"]
  assert evals[-1]["eval/ema_top1"] == final[-1]["eval/ema_top1"]
  assert '"eval/top5"' in out.stdout
  helpers.run_main(*TINY, f"--workdir={uninterrupted}", "--mode=eval",
                   "--config.checkpoint.step=16")
  assert helpers.read_jsonl(uninterrupted / "eval.jsonl")[-1]["step"] == 16
  missing = helpers.run_main(*TINY, f"--workdir={uninterrupted}", "--mode=eval",
                             "--config.checkpoint.step=3", check=False)
  assert missing.returncode != 0 and "no checkpoint for step 3" in missing.stderr


def test_resume_with_another_model_is_refused(uninterrupted, tmp_path):
  proc = helpers.run_main(*TINY, f"--workdir={uninterrupted}", "--config.model.embed_dim=32",
                          "--config.total_steps=24", check=False)
  assert proc.returncode == 2
  assert "written by a different model" in proc.stderr and "head_conv" in proc.stderr
