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
