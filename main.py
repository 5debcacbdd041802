"""ascan_jax entry point: ``python main.py --config=configs/X.py[:arg] --workdir=DIR [--mode=M]``.

Modes: ``train`` (default; resumes from DIR if it holds a checkpoint), ``eval`` (the latest or
``--config.checkpoint.step``), ``summary`` (parameters, MACs, memory), ``bench`` (throughput,
MFU), ``sample`` (generative tasks), ``geneval`` (text-to-image: GenEval's prompts in GenEval's
layout, ``--config.eval.geneval_metadata=FILE``). The config is validated before anything is
written: an unknown key, a wrong type or an impossible value stops the run with one message
naming the key.
Multi-host: on Cloud TPU and under SLURM the distributed runtime starts by itself; elsewhere pass
``--coordinator_address``, ``--num_processes`` and ``--process_id``.
"""
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (file.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and outputs go.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "summary", "bench", "sample", "geneval"],
                  "What to do.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
flags.DEFINE_string("compilation_cache_dir", os.environ.get("ASCAN_COMPILATION_CACHE", ""),
                    "Persistent XLA compilation cache directory ('' disables).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def parse_flags(argv):
  """absl flag parsing that turns a bad ``--config...`` flag into one line naming the key."""
  try:
    return FLAGS(argv)
  except Exception as e:  # absl and ml_collections raise several types here.
    message = str(e).replace("\\n", "\n").replace("\\'", "'")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):  # an error inside get_config().
      lines = [lines[0].rstrip(":"), lines[-1]]
    message = " ".join(lines)
    for arg in argv[1:]:
      m = re.match(r"--config\.([\w.]+)", arg)
      if m and f"'{m.group(1).split('.')[-1]}'" in message and not isinstance(
          e, flags.IllegalFlagValueError):
        hint = re.search(r'Did you mean "(\w+)"', message)
        hint = f"; did you mean '{hint.group(1)}'?" if hint else ""
        _fail(f"config: unknown config key 'config.{m.group(1)}' (from {arg}){hint}")
    _fail(f"config: {message}")


def _check_workdir() -> None:
  """Before anything else: a --workdir that cannot be used is one line, and nothing is written."""
  from ascan_jax import fileio
  try:
    fileio.check_workdir(FLAGS.workdir, must_exist=FLAGS.mode in ("eval", "sample", "geneval"))
  except fileio.WorkdirError as e:
    _fail(str(e))


def _log_to_file() -> str:
  """Library INFO logs (orbax, grain, jax) go to a log file, the console shows warnings and the
  run's own lines. The file is ``DIR/logs/main.<host>.<pid>.log`` (a local cache directory when
  the workdir is remote); ``--alsologtostderr`` or ``--stderrthreshold`` override this."""
  import socket
  if "://" in FLAGS.workdir:
    log_dir = os.path.join(os.path.expanduser("~"), ".cache", "ascan_jax", "logs")
  else:
    log_dir = os.path.join(FLAGS.workdir, "logs")
  if FLAGS["alsologtostderr"].present or FLAGS["logtostderr"].value:
    return ""
  if FLAGS.mode in ("eval", "sample", "geneval"):  # read-only modes write no log file into the run.
    if not FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    return ""
  os.makedirs(log_dir, exist_ok=True)
  logging.get_absl_handler().use_absl_log_file(f"main.{socket.gethostname()}", log_dir)
  if not FLAGS["stderrthreshold"].present:
    FLAGS.stderrthreshold = "warning"
  return log_dir


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; options are --flag=value")
  _check_workdir()
  from ascan_jax import config_validation
  from ascan_jax import tasks
  config = FLAGS.config
  try:  # config_flags defers errors of loading the file until the config is used.
    config.keys()
  except Exception as e:  # pylint: disable=broad-except
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    _fail(f"config: could not load {FLAGS['config'].config_filename!r}: "
          f"{lines[0] if lines else e} {lines[-1] if len(lines) > 1 else ''}".strip())
  try:  # Keys and types need no devices: fail before starting any runtime.
    task_class = tasks.task_class(config.get("task", ""))
    config_validation.check_keys_and_types(config, tasks.schema_for(config))
  except (config_validation.ConfigError, tasks.TaskError) as e:
    _fail(f"config: {e}")

  from ascan_jax.parallel import distributed
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  import jax
  if FLAGS.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  try:
    checks = dict(num_devices=jax.device_count(), num_processes=jax.process_count(),
                  mode=FLAGS.mode)
    config_validation.check_values(config, **checks)
    task_class.validate(config, **checks)
  except config_validation.ConfigError as e:
    _fail(f"config: {e}")

  from ascan_jax.data import sources
  from ascan_jax.modes import train as train_mode
  from ascan_jax.train import builder
  from ascan_jax.train import checkpoint
  from ascan_jax.train import init_from
  try:
    task = task_class(config)
    if FLAGS.mode in ("train", "eval"):
      task.preflight(FLAGS.mode)  # a missing split or a wrong class count: before any write.
    _log_to_file()
    _run(config, task)
  except train_mode.Interrupted as e:
    sys.exit(e.exit_code)
  except (sources.DatasetError, config_validation.ConfigError, checkpoint.CheckpointMismatchError, checkpoint.CheckpointDamagedError,
          builder.NoCheckpointError, init_from.InitFromError, tasks.TaskError) as e:
    _fail(str(e))


def _run(config, task):
  import jax
  logging.info("task %s, mode %s, %d devices in %d processes", config.task, FLAGS.mode,
               jax.device_count(), jax.process_count())
  if FLAGS.mode == "summary":
    from ascan_jax.modes import summary
    summary.run(task, config, FLAGS.workdir)
  elif FLAGS.mode == "bench":
    from ascan_jax.modes import bench
    bench.run(task, config, FLAGS.workdir)
  elif FLAGS.mode == "train":
    from ascan_jax.modes import train
    train.train(task, config, FLAGS.workdir)
  elif FLAGS.mode == "eval":
    from ascan_jax.modes import evaluate
    evaluate.evaluate(task, config, FLAGS.workdir)
  elif FLAGS.mode == "sample":
    from ascan_jax.modes import sample
    sample.sample(task, config, FLAGS.workdir)
  elif FLAGS.mode == "geneval":
    from ascan_jax.modes import geneval
    geneval.geneval(task, config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
