"""What a user sees when things go wrong: damaged checkpoints, signals, unusable paths, late
failures, modes without a checkpoint, a finished run started again, bad conversion inputs."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ascan_jax.modes import train as train_mode
from ascan_jax.models import layout
from ascan_jax.train import builder
from ascan_jax.train import checkpoint as checkpoint_lib
from ascan_jax.train import metrics as metrics_lib
from tests import helpers
from tests import toy_tasks


def _toy(total=4):
  c = toy_tasks.default_config()
  c.total_steps = total
  c.optim.schedule, c.optim.warmup_steps = "constant", 0  # the same steps for any total.
  c.mesh.shape = (-1, 1, 1)
  return c, toy_tasks.ToyTask(c)


def _losses(workdir):
  return {r["step"]: r["train/loss"] for r in helpers.read_jsonl(workdir / "metrics.jsonl")}


def _damage(step_dir, kind):
  state = step_dir / "state"
  if kind == "truncated array file":
    data = [p for d in (state / "d", state / "ocdbt.process_0" / "d") if d.is_dir()
            for p in d.iterdir() if p.is_file()]
    assert data
    for target in data:  # the array data files, cut in half.
      target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
  elif kind == "missing _METADATA":
    (state / "_METADATA").unlink()
  elif kind == "missing item directory":
    shutil.rmtree(state)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("toy_reference")
  c, task = _toy(total=6)
  train_mode.train(task, c, str(workdir))
  return _losses(workdir)


@pytest.mark.parametrize("kind", ["truncated array file", "missing _METADATA",
                                  "missing item directory"])
def test_a_damaged_checkpoint_is_set_aside_and_the_run_resumes(kind, reference, tmp_path,
                                                                capsys):
  c, task = _toy(total=4)
  train_mode.train(task, c, str(tmp_path))  # checkpoints at steps 2 and 4.
  _damage(tmp_path / "checkpoints" / "4", kind)
  # --mode=eval names the damaged checkpoint and stops.
  with pytest.raises(checkpoint_lib.CheckpointDamagedError, match=r"checkpoints/4 is damaged"):
    builder.restore(task, c, str(tmp_path))
  capsys.readouterr()
  c6, task6 = _toy(total=6)
  train_mode.train(task6, c6, str(tmp_path))
  out = capsys.readouterr().out
  assert "checkpoints/4 is damaged" in out and "resuming from step 2" in out
  assert (tmp_path / "checkpoints_damaged" / "4").is_dir()  # kept, never deleted.
  losses = _losses(tmp_path)
  assert sorted(losses) == list(range(1, 7))
  np.testing.assert_array_equal([losses[s] for s in range(1, 7)],
                                [reference[s] for s in range(1, 7)])


def test_a_finished_run_started_again_says_so(tmp_path, capsys):
  c, task = _toy(total=2)
  train_mode.train(task, c, str(tmp_path))
  capsys.readouterr()
  train_mode.train(task, c, str(tmp_path))
  out = capsys.readouterr().out
  assert "is complete at step 2" in out and "metrics.jsonl" in out


def test_eta_counts_from_the_end_of_the_first_step():
  p = metrics_lib.Progress(0, 100)
  p.t0 -= 60.0  # a minute of compilation before the first step finished.
  assert p.eta(1, p.t0 + 60.0) == float("inf")  # nothing measured yet: "?".
  p.first_step_done(1)
  now = p.eta_t + 10.0  # then 10 steps in 10 seconds:
  assert p.eta(11, now) == pytest.approx(89.0)  # 89 steps left at 1 step/s, not 89 * 70/11.


def test_lower_case_layout_letters_are_refused():
  with pytest.raises(layout.LayoutError, match=r"lower-case 'c' at position 0.*'C-CCCT'"):
    layout.parse_layout("c-ccct")


def test_the_signal_handler_writes_nothing_and_the_loop_logs_the_signal_once(monkeypatch):
  """A handler that logs can interrupt a log line being written to the same stream ("reentrant
  call inside <_io.BufferedWriter>", a "--- Logging error ---" traceback on a clean exit)."""
  from absl import logging as absl_logging
  from ascan_jax.train import preemption
  lines = []
  monkeypatch.setattr(absl_logging, "warning", lambda *a, **k: lines.append(a[0] % a[1:]))
  watcher = preemption.PreemptionWatcher()
  try:
    assert not watcher.should_stop(4)
    watcher._on_signal(signal.SIGINT, None)  # pylint: disable=protected-access
    assert lines == [] and watcher.step_at_signal == 4
    assert watcher.should_stop(5) and watcher.should_stop(5)
    assert lines == ["received SIGINT (Ctrl-C): checkpointing step 5 and exiting"]
    assert watcher.exit_code == 130
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once.
      watcher._on_signal(signal.SIGINT, None)  # pylint: disable=protected-access
  finally:
    watcher.close()


# ---- through main.py ------------------------------------------------------------------------

TINY = [*helpers.TINY_CLASSIFIER, "--config.total_steps=400", "--config.log.every_steps=1000",
        "--config.evals.val.every_steps=1000", "--config.checkpoint.every_steps=4"]


def _wait_for_checkpoint(proc, workdir, step, timeout=600):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      raise AssertionError(f"run ended early:\n{proc.stderr.read()[-3000:]}")
    d = workdir / "checkpoints"
    if d.is_dir() and any(s.isdigit() and int(s) >= step for s in os.listdir(d)):
      return
    time.sleep(0.05)
  raise AssertionError("no checkpoint")


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_a_signal_writes_a_checkpoint_within_one_step_and_exits(signum, code, tmp_path):
  """log.every_steps=1000: before, the host ran up to a logging step ahead of the devices and
  the signal waited for all of it; now at most one step is in flight."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "main.py", *TINY, f"--workdir={tmp_path}"],
                          cwd=helpers.REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  _wait_for_checkpoint(proc, tmp_path, 8)
  t0 = time.time()
  proc.send_signal(signum)
  out, err = proc.communicate(timeout=300)
  seconds = time.time() - t0
  assert proc.returncode == code, err[-2000:]
  during = int(out.split("during step ")[1].split(":")[0])
  saved = int(out.split("checkpoint at step ")[1].split()[0])
  assert saved - during <= 1, out
  assert str(saved) in os.listdir(tmp_path / "checkpoints")
  assert "Traceback" not in err and "KeyboardInterrupt" not in err
  print(f"signal {int(signum)} -> exit in {seconds:.2f} s; during step {during}, saved {saved}")


def _main(*args, devices=1):
  return helpers.run_main(*args, check=False, timeout=300, devices=devices)


def _one_error_line(proc):
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert lines and lines[-1].startswith("error:"), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  return lines[-1]


def test_unusable_workdirs_are_one_line_and_nothing_is_written(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  line = _one_error_line(_main(*helpers.TINY_CLASSIFIER, f"--workdir={a_file}"))
  assert "is a file, not a directory" in line
  line = _one_error_line(_main(*helpers.TINY_CLASSIFIER, "--workdir=/proc/ascan_foo"))
  assert "/proc/ascan_foo cannot be created" in line


def test_late_failures_come_before_the_first_step(tmp_path):
  run = tmp_path / "run"
  line = _one_error_line(_main(*helpers.TINY_CLASSIFIER, f"--workdir={run}",
                               "--config.data.eval_split=valdation"))
  assert "valdation" in line
  assert not run.exists() or not any(run.iterdir())  # nothing written.


def test_modes_without_a_checkpoint_are_one_line(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  for mode in ("eval", "sample"):
    args = (helpers.TINY_DIFFUSION if mode == "sample" else helpers.TINY_CLASSIFIER)
    line = _one_error_line(_main(*args, f"--workdir={empty}", f"--mode={mode}",
                                 "--config.evals.samples.num_samples=0" if mode == "sample"
                                 else "--config.seed=0"))
    assert f"no checkpoint in {empty}" in line
  assert not any(empty.iterdir())
  line = _one_error_line(_main(*helpers.TINY_CLASSIFIER, f"--workdir={tmp_path / 'none'}",
                               "--mode=eval"))
  assert "does not exist" in line


# ---- folder_to_array_record ----------------------------------------------------------------

def _convert(input_dir, output):
  return subprocess.run([sys.executable, "-m", "ascan_jax.tools.folder_to_array_record",
                         f"--input={input_dir}", f"--output={output}"], cwd=helpers.REPO,
                        capture_output=True, text=True, timeout=120)


def _png(path, value=0):
  from PIL import Image
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_folder_conversion_refuses_what_cannot_become_a_dataset(tmp_path):
  out = tmp_path / "out"
  for setup, fragment in (
      (lambda d: None, "does not exist"),
      (lambda d: d.mkdir(), "has no class sub-folders"),
      (lambda d: _png(d / "loose.png"), "holds 1 images directly"),
      (lambda d: (_png(d / "cat" / "a.png"), (d / "dog").mkdir()), "hold no images (dog)"),
  ):
    d = tmp_path / f"in{len(fragment)}"
    setup(d)
    proc = _convert(d, out)
    assert proc.returncode == 2 and fragment in proc.stderr, proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr
  assert not out.exists()


def test_folder_conversion_names_skipped_files(tmp_path):
  d = tmp_path / "in"
  for c in ("cat", "dog"):
    for i in range(3):
      _png(d / c / f"{i}.png", value=40 * i)
  (d / "dog" / "broken.png").write_bytes(b"not a png")
  proc = _convert(d, tmp_path / "out")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "dog/broken.png" in proc.stderr + proc.stdout
  import json
  meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
  skipped = [s["path"] for split in meta["splits"].values() for s in split["skipped"]]
  assert skipped == ["dog/broken.png"]
