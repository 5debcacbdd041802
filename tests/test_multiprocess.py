"""Two processes with 4 CPU devices each (gloo, 127.0.0.1) train like one process with 8.

Also: their checkpoint restores in a single process (another process count, so the data
iterator is rebuilt from the step), and SIGTERM in a multi-process run checkpoints and exits.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from tests import helpers

TOTAL = 8
ARGS = ["--config=configs/ascan_t.py:runlocal",
        "--config.model.layout=C-CT-CT-CT", "--config.model.widths=(16,32,64,64)",
        "--config.model.stem_width=16", "--config.model.head_dim=16",
        "--config.model.embed_dim=64", "--config.batch_size=32", "--config.eval_batch_size=200",
        f"--config.total_steps={TOTAL}", "--config.optim.warmup_steps=2",
        "--config.log.every_steps=1", "--config.checkpoint.every_steps=2",
        f"--config.eval.every_steps={TOTAL}", "--config.augment.mixup_alpha=0.8",
        "--config.augment.cutmix_alpha=1.0", "--config.log.tensorboard=False"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  env.setdefault("ASCAN_COMPILATION_CACHE", os.path.join(helpers.REPO, ".jax_cache"))
  return env


def _start_two(workdir, extra=()):
  port = _free_port()
  procs = []
  for pid in range(2):
    cmd = [sys.executable, "main.py", *ARGS, *extra, f"--workdir={workdir}",
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
           f"--process_id={pid}"]
    procs.append(subprocess.Popen(cmd, cwd=helpers.REPO, env=_env(4), stdout=subprocess.PIPE,
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


def test_two_processes_match_one_and_restore_in_one(tmp_path):
  single = tmp_path / "one_process"
  helpers.run_main(*ARGS, f"--workdir={single}", devices=8)
  multi = tmp_path / "two_processes"
  _finish(_start_two(multi))
  ref, ref_rows = _losses(single)
  got, rows = _losses(multi)
  assert sorted(got) == list(range(1, TOTAL + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)],
                             rtol=2e-5)
  final = [r for r in rows if "eval/top1" in r][-1]
  ref_final = [r for r in ref_rows if "eval/top1" in r][-1]
  assert final["eval/examples"] == 1000  # every held-out example once over both processes.
  assert abs(final["eval/top1"] - ref_final["eval/top1"]) <= 0.002
  # Only process 0 writes the run files.
  assert not any(name.startswith("metrics") and name != "metrics.jsonl"
                 for name in os.listdir(multi))

  # The 2-process checkpoint of step 6 restores in one process with 1 device and continues.
  resumed = tmp_path / "resumed"
  shutil.copytree(multi, resumed)
  for step in os.listdir(resumed / "checkpoints"):
    if step.isdigit() and int(step) > 6:
      shutil.rmtree(resumed / "checkpoints" / step)
  proc = helpers.run_main(*ARGS, f"--workdir={resumed}", devices=1)
  assert "resumed from step 6 (data iterator rebuilt from the step)" in proc.stderr
  cont, _ = _losses(resumed)
  np.testing.assert_allclose([cont[7], cont[8]], [ref[7], ref[8]], rtol=2e-5)


def test_sigterm_in_a_two_process_run(tmp_path):
  workdir = tmp_path / "preempted"
  procs = _start_two(workdir, ["--config.total_steps=200", "--config.eval.every_steps=200"])
  path = workdir / "metrics.jsonl"
  t0 = time.time()
  while not (path.exists() and len(path.read_text().splitlines()) >= 3):
    assert time.time() - t0 < 600 and all(p.poll() is None for p in procs), \
        procs[0].stderr.read()[-3000:] if procs[0].poll() is not None else "timeout"
    time.sleep(0.05)
  for p in procs:  # a preemption notice reaches every worker.
    p.send_signal(signal.SIGTERM)
  outs = _finish(procs, timeout=600)
  stopped = int(outs[0][0].split("preempted: checkpoint at step ")[1].split()[0])
  assert stopped < 200
  assert str(stopped) in os.listdir(workdir / "checkpoints")
