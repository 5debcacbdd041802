"""Collectives in the optimised HLO of the classification train step, before and after the layout
fixes (row-parallel C blocks, mixup/cutmix pairs inside device-local groups).

Run from the repository root: ``.venv/bin/python results/collectives/measure.py`` (each case
compiles one train step for 8 fake CPU devices, about 30-60 s of CPU each; nothing is executed).
Writes ``collectives.json`` next to this file; ``NOTES.md`` there reads the numbers.

* The model and batch are ``tests/test_sharding.py``'s ``_config`` (the model the budget test
  ``tests/test_collectives.py`` checks): layout ``C-CT-CT-CT``, widths (16, 32, 64, 64), batch 16
  of 32x32 images, mixup 0.8 and cutmix 1.0, stochastic depth 0.2, float32.
* "before" is the package at commit ``BEFORE_COMMIT`` (extracted with ``git archive`` into a
  temporary folder), "after" the working tree.
* Extra cases: the review's conv-only model (``C-CC-CC-CC``) on the tensor-parallel mesh (its
  experiment E3 counted 111 all-gathers), and data parallelism with ``model.batch_norm=
  per_device`` (after only; the key did not exist before).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "collectives.json")
BEFORE_COMMIT = "0402180"
LAYOUTS = {"data parallel": (8, 1, 1), "fsdp": (1, 8, 1), "tensor parallel": (2, 1, 4),
           "mixed 2x2x2": (2, 2, 2)}
EXTRA = {"conv-only C-CC-CC-CC, tensor parallel": ((2, 1, 4), {"model.layout": "C-CC-CC-CC"}),
         "data parallel, batch_norm=per_device": ((8, 1, 1), {"model.batch_norm": "per_device"})}


def measure_one(tree: str, shape, overrides: dict) -> dict:
  """Runs in a subprocess whose ``sys.path`` starts with ``tree``."""
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path[:0] = [tree, REPO]
  import jax  # pylint: disable=g-import-not-at-top
  from ascan_jax import tasks  # pylint: disable=g-import-not-at-top
  from ascan_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from ascan_jax.train import builder  # pylint: disable=g-import-not-at-top
  from tests import hlo_collectives  # pylint: disable=g-import-not-at-top
  from tests import test_sharding  # pylint: disable=g-import-not-at-top
  c = test_sharding._config(tuple(shape))  # pylint: disable=protected-access
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  task = tasks.get_task(c)
  setup = builder.build(task, c, num_train_examples=4000, mesh=mesh_lib.make_mesh(c))
  params = jax.tree.leaves(setup.abstract_state.params)
  t0 = time.time()
  text = setup.train_step.lower(setup.abstract_state, {}, task.input_spec(c.batch_size)) \
      .compile().as_text()
  found = hlo_collectives.collectives(text)
  return {"mesh": list(shape), "compile_seconds": round(time.time() - t0, 1),
          "param_bytes": sum(p.size * p.dtype.itemsize for p in params),
          "collectives": {k: {"count": v.count, "bytes": v.bytes} for k, v in found.items()}}


def _run(tree: str, shape, overrides: dict) -> dict:
  args = json.dumps({"tree": tree, "shape": list(shape), "overrides": overrides})
  proc = subprocess.run([sys.executable, __file__, "--one", args], cwd=REPO, check=True,
                        capture_output=True, text=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
  results = {"before_commit": BEFORE_COMMIT, "host": platform.node(),
             "cpu_count": os.cpu_count(), "cases": {}}
  with tempfile.TemporaryDirectory() as before_tree:
    archive = subprocess.run(["git", "archive", BEFORE_COMMIT, "ascan_jax", "configs"],
                             cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", before_tree], input=archive, check=True)
    cases = [(name, shape, {}) for name, shape in LAYOUTS.items()]
    cases += [(name, shape, overrides) for name, (shape, overrides) in EXTRA.items()]
    for name, shape, overrides in cases:
      entry = {}
      for label, tree in (("before", before_tree), ("after", REPO)):
        if label == "before" and "model.batch_norm" in overrides:
          continue
        entry[label] = _run(tree, shape, overrides)
        print(name, label, json.dumps(entry[label]["collectives"]), flush=True)
      results["cases"][name] = entry
  with open(OUT, "w") as f:
    json.dump(results, f, indent=2)
  print("wrote", OUT)


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--one":
    spec = json.loads(sys.argv[2])
    print(json.dumps(measure_one(spec["tree"], spec["shape"], spec["overrides"])))
  else:
    main()
