"""A small task for tests of the task contract: frozen weights and array-valued evaluation sums.

``ToyTask`` (``config.task = "toy_frozen"``) classifies random vectors: a *frozen* projection
(loaded from its own seed, never trained) maps ``x`` to features inside the jitted step
(``preprocess``), a trainable linear layer maps features to logits. Its projection is applied
through a function whose backward pass raises, so if the loop ever differentiated the frozen
weights, tracing would fail. Its evaluation sums a confusion matrix (int32) and a count.
Run by tests in this process, and by ``python -m tests.toy_tasks`` in a 2-process evaluation.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ascan_jax import config_defaults
from ascan_jax.data import pipeline
from ascan_jax.data import pp
from ascan_jax.tasks import base

FROZEN_SHAPE = (24, 40)  # distinctive: no trainable or optimizer array has this shape.


class FrozenGradientError(RuntimeError):
  pass


@jax.custom_vjp
def frozen_matmul(x, w):
  return x @ w


def _fwd(x, w):
  return x @ w, None


def _bwd(res, g):
  raise FrozenGradientError("the frozen projection was differentiated")


frozen_matmul.defvjp(_fwd, _bwd)


class ArraySource:
  """``n`` random vectors with labels from a fixed rule (learnable), deterministic by seed."""

  def __init__(self, n: int, dim: int, num_classes: int, seed: int):
    rng = np.random.default_rng(seed)
    self.x = rng.normal(size=(n, dim)).astype(np.float32)
    w = np.random.default_rng(0).normal(size=(dim, num_classes))
    self.labels = np.argmax(self.x @ w, axis=-1).astype(np.int32)
    self.num_classes = num_classes
    self.description = f"toy arrays ({n})"

  def __len__(self):
    return len(self.labels)

  def load(self, i):
    return {"x": self.x[i], "label": int(self.labels[i])}


def default_config() -> ml_collections.ConfigDict:
  c = config_defaults.base()
  c.task = "toy_frozen"
  c.batch_size = 16
  c.eval_batch_size = 16
  c.total_steps = 4
  c.model = ml_collections.ConfigDict(dict(num_classes=5))
  c.data = ml_collections.ConfigDict(dict(train_records=64, eval_records=50, eval_split="val",
                                          worker_count=0, worker_buffer_size=1))
  c.evals.val = config_defaults.dataset_evaluator()
  c.evals.val.every_steps = 2
  c.checkpoint.every_steps = 2
  c.log.every_steps = 1
  c.log.tensorboard = False
  return c


def _codec(dim: int):
  placeholder = {"x": np.zeros((dim,), np.float32), "label": np.int32(0)}
  return pp.Preprocess([], [], placeholder)


@base.register
class ToyTask(base.Task):
  name = "toy_frozen"
  default_metric = "eval/accuracy"

  @classmethod
  def default_config(cls):
    return default_config()

  def __init__(self, config):
    super().__init__(config)
    self.model = self.build_model()

  def build_model(self, **overrides):
    return nn.Dense(self.config.model.num_classes, **overrides)

  def init_variables(self, key, model=None):
    return (model or self.model).init(key, jnp.zeros((1, FROZEN_SHAPE[1])))

  def forward(self, variables, batch, model=None):
    return (model or self.model).apply(variables, batch["features"])

  def frozen_spec(self):
    shape = jax.ShapeDtypeStruct(FROZEN_SHAPE, jnp.float32)
    return {"proj": nn.LogicallyPartitioned(shape, ("embed", "mlp"))}

  def load_frozen(self, shardings):
    values = np.random.default_rng(123).normal(size=FROZEN_SHAPE).astype(np.float32)
    return {"proj": jax.make_array_from_callback(FROZEN_SHAPE, shardings["proj"],
                                                 lambda index: values[index])}

  def preprocess(self, frozen, batch, key, train):
    return {**batch, "features": frozen_matmul(batch["x"], frozen["proj"])}

  @functools.lru_cache(maxsize=None)
  def source(self, split):
    n = self.config.data.train_records if split == "train" else self.config.data.eval_records
    return ArraySource(n, FROZEN_SHAPE[0], self.config.model.num_classes,
                       seed=1 if split == "train" else 2)

  def num_train_examples(self):
    return len(self.source("train"))

  def train_batches(self, sharding, total_steps, start_step=0):
    return pipeline.train_dataset(self.source("train"), _codec(FROZEN_SHAPE[0]), self.config,
                                  sharding, total_steps, start_step)

  def eval_batches(self, sharding, split):
    return pipeline.eval_dataset(self.source(split), _codec(FROZEN_SHAPE[0]), self.config,
                                 sharding)

  def input_spec(self, batch_size, train=True):
    return {"x": jax.ShapeDtypeStruct((batch_size, FROZEN_SHAPE[0]), jnp.float32),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
            "mask": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}

  def synthetic_batch(self, batch_size, key):
    return {"x": jax.random.normal(key, (batch_size, FROZEN_SHAPE[0])),
            "label": jnp.zeros((batch_size,), jnp.int32),
            "mask": jnp.ones((batch_size,), jnp.float32)}

  def loss_fn(self, params, model_state, batch, key):
    logits = self.model.apply({"params": params}, batch["features"])
    onehot = jax.nn.one_hot(batch["label"], self.config.model.num_classes)
    per = -jnp.sum(onehot * jax.nn.log_softmax(logits), -1)
    loss = jnp.sum(per * batch["mask"]) / jnp.maximum(jnp.sum(batch["mask"]), 1.0)
    return loss, (model_state, {})

  def eval_fn(self, params, model_state, batch):
    k = self.config.model.num_classes
    logits = self.model.apply({"params": params}, batch["features"])
    pred = jnp.argmax(logits, -1)
    valid = (batch["mask"] > 0).astype(jnp.int32)
    cm = jnp.zeros((k, k), jnp.int32).at[batch["label"], pred].add(valid)
    return {"confusion": cm, "count": jnp.sum(valid)}

  def summarize_eval(self, sums):
    cm = np.asarray(sums["confusion"])
    return {"accuracy": float(np.trace(cm)) / max(int(sums["count"]), 1),
            "confusion": cm.tolist(), "examples": int(sums["count"])}


def reference_confusion(task, params) -> np.ndarray:
  """The evaluation's confusion matrix computed with numpy on the host, example by example."""
  src = task.source(task.config.data.eval_split)
  w = np.random.default_rng(123).normal(size=FROZEN_SHAPE).astype(np.float32)
  kernel, bias = np.asarray(params["kernel"]), np.asarray(params["bias"])
  pred = np.argmax((src.x @ w) @ kernel + bias, -1)
  k = task.config.model.num_classes
  cm = np.zeros((k, k), np.int64)
  np.add.at(cm, (src.labels, pred), 1)
  return cm


def _distributed_main():
  """One process of a 2-process evaluation: prints the confusion matrix process 0 computed."""
  import json
  import sys
  port, pid = sys.argv[1], int(sys.argv[2])
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=pid)
  from ascan_jax.eval import evaluator as evaluator_lib
  from ascan_jax.train import builder
  config = default_config()
  task = ToyTask(config)
  setup = builder.build(task, config, None)
  state = builder.create_state(setup)
  ev = task.make_evaluators(setup)["val"]
  out = ev.run(evaluator_lib.EvalInputs({"raw": (state.params, state.model_state),
                                         "ema": (state.ema_params, state.ema_model_state)},
                                        setup.frozen, 0, ""))
  params = jax.tree.map(np.asarray, jax.experimental.multihost_utils.process_allgather(
      state.params, tiled=True))
  print(json.dumps({"confusion": out["eval/confusion"],
                    "reference": reference_confusion(task, params).tolist(),
                    "examples": out["eval/examples"]}), flush=True)


if __name__ == "__main__":
  import jax.experimental.multihost_utils  # noqa: F401
  _distributed_main()
