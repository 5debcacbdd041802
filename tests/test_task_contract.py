"""The task contract: frozen weights (never optimised, EMA-averaged, differentiated or
checkpointed; sharded by the rules), array-valued evaluation sums equal to a numpy reference on 8
devices and on 2 processes, hook names checked at class creation."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from ascan_jax import tasks
from ascan_jax.eval import evaluator as evaluator_lib
from ascan_jax.modes import train as train_mode
from ascan_jax.tasks import base
from ascan_jax.train import builder
from ascan_jax.train import init_from
from tests import helpers
from tests import toy_tasks


def _config(mesh=(1, 8, 1)):
  c = toy_tasks.default_config()
  c.mesh.shape = mesh
  return c


def _shapes(tree):
  return [tuple(np.shape(x)) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("toy")
  config = _config()
  task = toy_tasks.ToyTask(config)
  state = train_mode.train(task, config, str(workdir))
  return config, task, state, workdir


def test_frozen_weights_are_sharded_by_the_rules_and_stay_out_of_the_state(trained):
  config, task, state, workdir = trained
  setup = builder.build(task, config, None)
  proj = setup.frozen["proj"]
  assert proj.shape == toy_tasks.FROZEN_SHAPE
  # ("embed", "mlp") -> embed on fsdp (8 devices), mlp on tensor (size 1): split 8 ways.
  assert proj.sharding.spec[0] == "fsdp" and len(proj.addressable_shards) == 8
  assert proj.addressable_shards[0].data.shape == (3, 40)
  # Never in the params, the optimizer state or the EMA ...
  for part in (state.params, state.opt_state, state.ema_params, state.model_state):
    assert toy_tasks.FROZEN_SHAPE not in _shapes(part)
  # ... and never in a checkpoint.
  steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
  meta = init_from.state_metadata(str(workdir / "checkpoints" / str(steps[-1]) / "state"))
  saved = [tuple(m.shape) for m in jax.tree.leaves(meta, is_leaf=lambda x: hasattr(x, "shape"))]
  assert saved and toy_tasks.FROZEN_SHAPE not in saved


def test_training_never_differentiates_the_frozen_weights(trained):
  """The frozen projection's backward raises; training finished and learned."""
  config, task, state, workdir = trained
  rows = helpers.read_jsonl(workdir / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  with pytest.raises(toy_tasks.FrozenGradientError):
    jax.grad(lambda w: toy_tasks.frozen_matmul(np.ones((1, 24), np.float32), w).sum())(
        np.ones(toy_tasks.FROZEN_SHAPE, np.float32))


def test_confusion_matrix_on_8_devices_equals_numpy(trained):
  config, task, state, workdir = trained
  setup = builder.build(task, config, None)
  ev = task.make_evaluators(setup)["val"]
  out = ev.run(evaluator_lib.EvalInputs(train_mode.variants(state), setup.frozen, 4, ""))
  ref = toy_tasks.reference_confusion(task, jax.device_get(state.params))
  np.testing.assert_array_equal(out["eval/confusion"], ref)
  np.testing.assert_array_equal(
      out["eval/ema_confusion"], toy_tasks.reference_confusion(task, jax.device_get(
          state.ema_params)))
  assert out["eval/examples"] == 50  # 50 records, eval batch 16: padding counted nowhere.
  # The same numbers went into metrics.jsonl at the last step.
  last = helpers.read_jsonl(workdir / "metrics.jsonl")[-1]
  assert last["eval/confusion"] == ref.tolist()


def test_confusion_matrix_on_2_processes_equals_numpy(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-m", "tests.toy_tasks", str(port), str(pid)],
                            cwd=helpers.REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for pid in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  for r in results:
    assert r["confusion"] == r["reference"] and r["examples"] == 50
  assert results[0]["confusion"] == results[1]["confusion"]


def test_a_misspelt_hook_is_refused_at_class_creation():
  with pytest.raises(base.TaskError, match=r"preprocess"):
    class Typo(toy_tasks.ToyTask):  # pylint: disable=unused-variable
      def preproces(self, frozen, batch, key, train):
        return batch


def test_a_task_without_a_required_hook_cannot_register():
  with pytest.raises(base.TaskError, match="does not implement"):
    @base.register
    class Incomplete(base.Task):  # pylint: disable=unused-variable
      name = "incomplete"

      @classmethod
      def default_config(cls):
        return toy_tasks.default_config()


def test_unknown_task_and_evaluator_type_are_named():
  c = _config()
  c.task = "segmentaton"
  with pytest.raises(tasks.TaskError, match="not a known task"):
    tasks.task_class(c.task)
  c = _config()
  c.evals.val.type = "fid"
  with pytest.raises(tasks.TaskError, match="config.evals.val.type='fid'"):
    tasks.schema_for(c)
