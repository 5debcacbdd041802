"""Two processes with 4 CPU devices each train text-to-image on aspect-ratio buckets
(``data.buckets``: every global batch one bucket, the batch shape changing from step to step)
with the same per-step losses as 1 process x 8 devices. A file of its own, so that pytest-xdist
(``--dist loadfile``) can run it beside ``test_multiprocess.py``."""
import numpy as np

from tests import helpers
from tests.test_multiprocess import _env, _finish, _losses, _start_two


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
