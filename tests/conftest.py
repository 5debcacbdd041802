"""Test set-up: 8 fake CPU devices, a persistent compilation cache, parsed absl flags.

The device count must be fixed before JAX starts a backend, so it is set here, at import.
"""
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.setdefault("ASCAN_COMPILATION_CACHE", os.path.join(REPO, ".jax_cache"))
sys.path.insert(0, REPO)

import jax  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_compilation_cache_dir", CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags.

# The test files that take longest on the 2-core CI machine (`--durations`), run first: with
# `pytest -n 2 --dist loadfile` each file goes whole to the next free worker in collection
# order, so starting the longest files first keeps one worker from finishing minutes after the
# other. Order only; every test still runs.
SLOW_FIRST = ("test_multiprocess.py", "test_diffusion_task.py", "test_sharding.py",
              "test_train_loop.py", "test_init_from.py", "test_summary_bench.py",
              "test_failures.py", "test_optim_and_step.py")


def pytest_collection_modifyitems(config, items):
  def rank(item):
    name = os.path.basename(str(item.fspath))
    return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)
  items.sort(key=rank)  # stable: the order inside each file and among the rest is kept.
