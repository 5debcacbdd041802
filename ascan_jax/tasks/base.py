"""The task contract: what every task gives the generic loop, the evaluators and the modes.

A task is a subclass of ``Task`` registered under ``Task.name`` (``@register``). The loop, the
evaluators and the ``eval``/``sample``/``bench``/``summary`` modes call only the methods below;
optional hooks have no-op defaults here, so nothing probes with ``hasattr``. Required hooks are
abstract (instantiating a task that lacks one names it), and a subclass method whose name is one
edit away from a hook (``on_stpe``) is refused at class creation, so a misspelt hook can never be
silently skipped.

What a task supplies:
* its config schema (``default_config``), value checks (``validate``) and the schemas of the
  evaluator types it understands (``evaluator_schemas``);
* the trainable model (``build_model``, ``init_variables``, ``forward``) and, optionally, frozen
  weights (``frozen_spec`` + ``load_frozen``: a text encoder, a VAE, a frozen backbone) that the
  loop shards by the same rules and passes to the step as a separate argument; never
  differentiated, optimised, EMA-averaged or checkpointed;
* ``preprocess(frozen, batch, key, train)``: on-device work with the frozen weights inside the
  jitted step (encode text or images), under ``stop_gradient``;
* data: ``train_batches`` (host-local batches, see ``ascan_jax.data.pipeline``), ``input_spec``
  (the device fields and their shapes), ``host_fields`` (batch fields that stay on the host:
  ``index``, captions), ``synthetic_batch``;
* ``loss_fn``; evaluation (``eval_batches``, ``eval_fn`` returning array-valued *sums*,
  ``summarize_eval``, ``make_evaluators`` for the evaluators named in ``config.evals``);
* optional: ``prerequisites`` (runs to train first, e.g. a judge classifier), ``sample``
  (``--mode=sample``), ``geneval`` (``--mode=geneval``), ``bench_extra`` (task-specific
  benchmark rows).
"""
from __future__ import annotations

import abc
import difflib
import importlib
from typing import Any, Callable, ClassVar

import ml_collections

from ascan_jax import config_defaults

_REGISTRY: dict[str, type["Task"]] = {}
# Built-in tasks: config.task -> module. Others register themselves when their module is imported
# (``ascan_jax.tasks.<name>`` is tried for an unknown name).
BUILTIN = {"classification": "ascan_jax.tasks.classification",
           "diffusion": "ascan_jax.tasks.diffusion",
           "segmentation": "ascan_jax.tasks.segmentation",
           "text_to_image": "ascan_jax.tasks.text_to_image"}


class TaskError(ValueError):
  """A task that does not satisfy the contract, or an unknown task name."""


class Task(abc.ABC):
  """Base class of every task; see the module docstring."""
  name: ClassVar[str] = ""
  default_metric: ClassVar[str] = ""  # what checkpoint.best_metric defaults to.
  default_metric_mode: ClassVar[str] = "max"  # "max" or "min": which value is best.
  host_fields: ClassVar[tuple[str, ...]] = ()  # batch fields kept on the host besides "index".

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  # ---- config ------------------------------------------------------------------------------
  @classmethod
  @abc.abstractmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    """Every key this task understands, with its default (the schema configs are checked
    against)."""

  @classmethod
  def validate(cls, config, *, num_devices: int, num_processes: int, mode: str) -> None:
    """Task-specific impossible values; raise ``config_validation.ConfigError`` naming the key."""

  @classmethod
  def upgrade_config(cls, saved: dict) -> dict:
    """A config saved by an older version (``config.json``) brought up to date: keys added since
    get the value the older code implied. Default: unchanged."""
    return saved

  @classmethod
  def evaluator_schemas(cls) -> dict[str, Callable[[], ml_collections.ConfigDict]]:
    """Evaluator type -> its config schema, for the entries of ``config.evals``."""
    return {"dataset": config_defaults.dataset_evaluator}

  # ---- model -------------------------------------------------------------------------------
  @abc.abstractmethod
  def build_model(self, **overrides):
    """The trainable flax module (``overrides`` replace constructor arguments)."""

  @abc.abstractmethod
  def init_variables(self, key, model=None):
    """Initial variables (``params`` plus mutable collections) of ``model`` (default: the task's)."""

  @abc.abstractmethod
  def forward(self, variables, batch, model=None):
    """One inference forward pass (what summary counts and bench times)."""

  # ---- frozen weights ----------------------------------------------------------------------
  def frozen_spec(self):
    """A boxed abstract tree (``nn.LogicallyPartitioned`` leaves with logical axis names, e.g.
    ``jax.eval_shape`` of an init) of the frozen weights, or None for none."""
    return None

  def load_frozen(self, shardings):
    """The frozen weights, each array created in its sharding from ``shardings`` (the tree of
    ``NamedSharding``s of ``frozen_spec``). Only called when ``frozen_spec`` is not None."""
    raise TaskError(f"task {self.name!r} declares frozen weights but does not load them")

  def preprocess(self, frozen, batch: dict, key, train: bool) -> dict:
    """On-device preprocessing with the frozen weights, inside the jitted step and evaluation
    (the result is not differentiated). Default: the batch unchanged."""
    del frozen, key, train
    return batch

  def parameter_layer(self) -> Callable[[str], tuple[int, int]] | None:
    """For layer-wise lr decay (``optim.layer_decay`` < 1): ``f(path) -> (layer, num_layers)``
    of a parameter path ``a/b/kernel``; None when the task has no notion of layers."""
    return None

  # ---- data --------------------------------------------------------------------------------
  def num_train_examples(self) -> int | None:
    """Size of the training set (for epoch-based durations), or None when unknown."""
    return None

  @abc.abstractmethod
  def train_batches(self, sharding, total_steps: int, start_step: int = 0):
    """Host-local training batches for steps ``start_step .. total_steps - 1``."""

  @abc.abstractmethod
  def input_spec(self, batch_size: int, train: bool = True) -> dict:
    """``ShapeDtypeStruct``s of the device fields of a batch."""

  @abc.abstractmethod
  def synthetic_batch(self, batch_size: int, key) -> dict:
    """A random batch with the shapes of ``input_spec`` (benchmarks, tests)."""

  # ---- training ----------------------------------------------------------------------------
  @abc.abstractmethod
  def loss_fn(self, params, model_state, batch: dict, key):
    """``(loss, (new model_state, metrics))`` of a (preprocessed) batch."""

  # ---- evaluation --------------------------------------------------------------------------
  def eval_batches(self, sharding, split: str):
    """Host-local evaluation batches of ``split`` covering every record once (padding masked)."""
    raise TaskError(f"task {self.name!r} has no dataset evaluation")

  def eval_fn(self, params, model_state, batch: dict) -> dict:
    """Per-batch *sums* (arrays of any shape; integer ones are summed exactly) of a
    preprocessed evaluation batch."""
    raise TaskError(f"task {self.name!r} has no dataset evaluation")

  def summarize_eval(self, sums: dict) -> dict:
    """Metrics from the totals of ``eval_fn`` over a whole evaluation."""
    raise TaskError(f"task {self.name!r} has no dataset evaluation")

  def make_evaluators(self, context) -> dict:
    """``{name: evaluator}`` for ``config.evals`` (see ``ascan_jax.eval.evaluator``)."""
    from ascan_jax.tasks import evaluators  # pylint: disable=g-import-not-at-top
    return evaluators.build_standard(self, context)

  def preflight(self, mode: str) -> None:
    """Opens every dataset the run will read before its first step, so a missing split, a wrong
    class count or an empty source fails at once with one line (not after hours of training).
    Default: the training set (train mode) and the split of every ``dataset`` evaluator."""
    from ascan_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    if mode == "train":
      self.num_train_examples()
    sharding = pipeline.Sharding(0, 1)
    for name in self.config.get("evals", {}).keys():
      e = self.config.evals[name]
      if e.type == "dataset":
        self.eval_batches(sharding, e.split or self.config.data.eval_split)

  # ---- optional modes ----------------------------------------------------------------------
  def prerequisites(self, workdir: str | None = None
                    ) -> list[tuple[ml_collections.ConfigDict, str]]:
    """``(config, workdir)`` runs that must be trained before this one (e.g. a judge, or the
    earlier stages of a chain, placed under this run's ``workdir``)."""
    del workdir
    return []

  def sample(self, context, workdir: str) -> dict:
    """``--mode=sample``."""
    raise TaskError(f"task {self.name!r} has no --mode=sample")

  def geneval(self, context, workdir: str) -> dict:
    """``--mode=geneval``: samples of GenEval's prompts in GenEval's layout."""
    raise TaskError(f"task {self.name!r} has no --mode=geneval (text-to-image tasks have)")

  def bench_extra(self, result: dict, make_context) -> dict:
    """Task-specific entries of ``--mode=bench`` (e.g. whole samples per second);
    ``make_context()`` builds a fresh ``train.builder.RunContext`` when one is needed."""
    del result, make_context
    return {}

  # ---- contract checks ---------------------------------------------------------------------
  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    hooks = {n for n in dir(Task) if not n.startswith("_")}
    for attr, value in vars(cls).items():
      if attr.startswith("_") or attr in hooks or not callable(value):
        continue
      close = difflib.get_close_matches(attr, hooks, n=1, cutoff=0.85)
      if close:
        raise TaskError(f"{cls.__name__}.{attr} looks like a misspelt hook {close[0]!r} of "
                        "ascan_jax.tasks.base.Task; rename it (a misspelt hook is never called)")


def register(cls: type[Task]) -> type[Task]:
  """Class decorator: makes ``cls`` the task for ``config.task == cls.name``."""
  if not (isinstance(cls, type) and issubclass(cls, Task)):
    raise TaskError(f"{cls!r} is not a subclass of ascan_jax.tasks.base.Task")
  if not cls.name:
    raise TaskError(f"{cls.__name__} has no name")
  if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
    raise TaskError(f"two tasks are registered as {cls.name!r}: "
                    f"{_REGISTRY[cls.name].__module__} and {cls.__module__}")
  missing = sorted(getattr(cls, "__abstractmethods__", ()))
  if missing:
    raise TaskError(f"task {cls.name!r} ({cls.__module__}) does not implement {missing}")
  _REGISTRY[cls.name] = cls
  return cls


def known_tasks() -> list[str]:
  return sorted(set(BUILTIN) | set(_REGISTRY))


def task_class(name: str) -> type[Task]:
  """The registered task class for ``config.task``, importing its module when needed."""
  if name not in _REGISTRY:
    module = BUILTIN.get(name, f"ascan_jax.tasks.{name}" if name.isidentifier() else None)
    if module is not None:
      try:
        importlib.import_module(module)
      except ModuleNotFoundError as e:
        if e.name != module:
          raise
  if name not in _REGISTRY:
    raise TaskError(f"config.task={name!r} is not a known task; choose one of {known_tasks()}")
  return _REGISTRY[name]


def get_task(config) -> Task:
  return task_class(config.task)(config)


def schema_for(config) -> ml_collections.ConfigDict:
  """The schema ``config`` is checked against: the task's defaults, with the schema of each
  evaluator type named in ``config.evals``."""
  cls = task_class(config.get("task", ""))
  schema = cls.default_config()
  types = cls.evaluator_schemas()
  evals = config.get("evals")
  if evals is not None:
    with schema.unlocked():
      schema.evals = ml_collections.ConfigDict()
      for name in evals.keys():
        kind = evals[name].get("type") if isinstance(evals[name], ml_collections.ConfigDict) \
            else None
        if kind not in types:
          raise TaskError(f"config.evals.{name}.type={kind!r} is not an evaluator type of task "
                          f"{cls.name!r}; choose one of {sorted(types)}")
        schema.evals[name] = types[kind]()
  return schema


def config_from_saved(saved: dict) -> tuple[ml_collections.ConfigDict, list[str]]:
  """``(config, dropped keys)`` of a run's saved ``config.json`` ``config`` section: the task's
  current defaults with the saved values written over them (``Task.upgrade_config`` first)."""
  cls = task_class(saved.get("task", ""))
  saved = cls.upgrade_config(dict(saved))
  config = cls.default_config()
  evals = saved.get("evals")
  if isinstance(evals, dict) and evals:
    with config.unlocked():  # the saved evaluators replace the default ones.
      config.evals = ml_collections.ConfigDict()
  dropped = config_defaults.overlay(config, saved)
  return config, dropped


def validate(config, *, num_devices: int = 1, num_processes: int = 1,
             mode: str = "train") -> None:
  """Every check of a run's config (keys and types against the task's schema, generic values,
  the task's own values); raises ``config_validation.ConfigError`` naming the key."""
  from ascan_jax import config_validation as cv  # pylint: disable=g-import-not-at-top
  try:
    schema = schema_for(config)
  except TaskError as e:
    raise cv.ConfigError(str(e)) from None
  cv.check_keys_and_types(config, schema)
  cv.check_values(config, num_devices=num_devices, num_processes=num_processes, mode=mode)
  task_class(config.task).validate(config, num_devices=num_devices,
                                   num_processes=num_processes, mode=mode)
