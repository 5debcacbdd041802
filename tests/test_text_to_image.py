"""The text-to-image task: caption dropout, the empty prompt as guidance's unconditional branch,
sampling independent of batch and devices, --mode=sample's files, the stage chain, init_from
refusing another shape, and a bucketed stage resumed after SIGKILL with identical losses and one
compilation per bucket shape."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ascan_jax import config_validation as cv
from ascan_jax import tasks
from ascan_jax.parallel import mesh as mesh_lib
from ascan_jax.tasks import diffusion as diffusion_task
from ascan_jax.tasks import text_to_image
from ascan_jax.tasks import text_to_image_sampling as sampling
from ascan_jax.train import builder
from ascan_jax.train import init_from
from tests import helpers

STEPS = 8  # of stage A and of the stage killed and resumed.


_write_config = helpers.write_tiny_t2i_config


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """The stand-in encoder, the tiny config file and a finished 8-step stage ('stage A', run by
  main.py: its compiled step, of the same config, is then in the compilation cache for the
  SIGKILL test's runs)."""
  root = tmp_path_factory.mktemp("t2i")
  _, config_path, stage_a = helpers.train_tiny_t2i(root, STEPS)
  return dict(root=root, encoder=root / "t5", config_path=config_path, stage_a=stage_a)


def _config(env, **sample):
  config = diffusion_task.load_config_file(env["config_path"])
  config.sample.update(sample)
  return config


def _setup(config, devices):
  config.mesh.shape = (len(devices), 1, 1)
  task = tasks.get_task(config)
  return task, builder.build(task, config, None, mesh=mesh_lib.make_mesh(config, devices))


def _nudged(params, setup):
  """``params`` plus noise, so that every layer (and the prompt) matters: the output layer
  starts at zero and two steps barely move it. In ``setup``'s shardings."""
  rng = np.random.default_rng(0)
  noisy = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(p.dtype),
                       jax.device_get(params))
  return jax.device_put(noisy, setup.state_shardings.params)


def test_caption_dropout_rate_and_the_cached_field_contract(env):
  config = _config(env)
  config.text.cached = True  # batches carry text_embedding / text_mask: no encoder in the step.
  task = tasks.get_task(config)
  n, length, width = 20000, 4, 3
  text = jax.random.normal(jax.random.key(0), (n, length, width)).astype(jnp.bfloat16)
  mask = jnp.ones((n, length), jnp.int32)
  frozen = {"null_text": jnp.full((1, length, width), 7.0),
            "null_mask": jnp.asarray([[1, 0, 0, 0]])}
  batch = {"text_embedding": text, "text_mask": mask}
  out = jax.jit(lambda b, k: task.preprocess(frozen, b, k, True))(batch, jax.random.key(1))
  dropped = np.all(np.asarray(out["text_embedding"]) == 7.0, axis=(1, 2))
  rate = config.text.caption_dropout
  assert rate == 0.1
  sigma = np.sqrt(rate * (1 - rate) / n)
  assert abs(dropped.mean() - rate) < 4 * sigma, dropped.mean()
  np.testing.assert_array_equal(np.asarray(out["text_mask"])[dropped],
                                [[1, 0, 0, 0]] * dropped.sum())
  kept = ~dropped
  np.testing.assert_array_equal(np.asarray(out["text_embedding"])[kept],
                                np.asarray(text.astype(jnp.float32))[kept])
  np.testing.assert_array_equal(np.asarray(out["text_mask"])[kept], np.asarray(mask)[kept])
  other = jax.jit(lambda b, k: task.preprocess(frozen, b, k, True))(batch, jax.random.key(2))
  assert not np.array_equal(np.all(np.asarray(other["text_embedding"]) == 7.0, axis=(1, 2)),
                            dropped)  # a fresh draw per step.
  evaluation = task.preprocess(frozen, batch, jax.random.key(1), False)
  assert not np.any(np.all(np.asarray(evaluation["text_embedding"]) == 7.0, axis=(1, 2)))


@pytest.fixture(scope="module")
def eight(env):
  """Stage A's model on all 8 devices, sampling with guidance scale 0 (only the unconditional
  branch runs)."""
  config = _config(env, guidance="constant", scale=0.0)
  config.mesh.shape = (jax.device_count(), 1, 1)
  task = tasks.get_task(config)
  context = builder.restore(task, config, env["stage_a"])
  params = _nudged(context.state.ema_params, context.setup)
  return task, context.setup, params, context.state.replace(ema_params=params)


PROMPTS = ["a photo of a seven", "a photo of the digit 2", "", "a photo of a handwritten nine",
           "a photo of the number one", "a photo of a 4"]


def test_the_empty_prompt_is_the_unconditional_branch(env, eight):
  task, setup, params, _ = eight
  frozen = setup.frozen
  ids, mask = task.tokenize([""])
  np.testing.assert_array_equal(mask[0, :2], [1, 0])  # "" is [EOS] then padding.
  encoded = jax.jit(task.encode)(frozen["encoder"], ids, mask)
  np.testing.assert_allclose(np.asarray(frozen["null_text"]), np.asarray(encoded), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(frozen["null_mask"]), mask)
  unconditional = task.text_sampler(setup)  # scale 0: the unconditional branch alone.
  seeds = np.arange(len(PROMPTS)) % 2
  uncond = unconditional(params, PROMPTS, seeds, np.zeros(len(PROMPTS)))
  assert uncond.shape == (6, 32, 32, 3) and uncond.dtype == np.uint8
  np.testing.assert_array_equal(uncond[0], uncond[2])  # every prompt: the same image ...
  assert not np.array_equal(uncond[0], uncond[1])  # ... per seed.
  # Guided (scale 2) with the empty prompt: both branches see "" and the result is the
  # conditional sample of "". It equals the unconditional sample only if the unconditional
  # branch is the empty prompt's encoding.
  guided_config = _config(env, guidance="constant", scale=2.0)
  guided = sampling.TextSampler(text_to_image.Task(guided_config), setup, 8)
  empty = guided(params, [""] * 2, [0, 1], [0, 0])
  assert np.abs(empty.astype(int) - uncond[:2].astype(int)).max() <= 1
  prompted = guided(params, PROMPTS[:2], [0, 1], [0, 0])
  assert np.abs(prompted.astype(int) - empty.astype(int)).mean() > 1.0  # the prompt matters.


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_the_text_sampler_reads_the_prediction(env, prediction):
  """At initialisation the network outputs zeros: eps = 0 as an eps prediction, eps =
  sqrt(1 - abar) x_t as a v prediction. The sampler's images equal the sampler run by hand on
  that eps with the text sampler's noise (seed 0, noise index j) and loop key (the first seed)."""
  config = _config(env, guidance="none", batch_size=4)
  config.diffusion.prediction = prediction
  task, setup = _setup(config, jax.devices()[:1])
  params = builder.create_state(setup).params
  images = task.text_sampler(setup)(params, PROMPTS[:4], [0] * 4)
  want = helpers.zero_network_samples(task, jax.random.key(0), jax.random.key(0), 4)
  assert np.abs(images.astype(int) - want.astype(int)).max() <= 1


def test_sampling_does_not_depend_on_batch_size_or_device_count(env, eight):
  task, setup, params, _ = eight
  seeds = [3, 3, 4, 5, 3, 4]
  on_eight = task.text_sampler(setup)(params, PROMPTS, seeds)  # batch 8: one padded batch.
  config = _config(env, guidance="constant", scale=0.0, batch_size=4)
  one_task, one_setup = _setup(config, jax.devices()[:1])
  params_on_one = jax.device_put(jax.device_get(params), one_setup.state_shardings.params)
  on_one = one_task.text_sampler(one_setup)(params_on_one, PROMPTS, seeds)  # 4 a batch, 1 device.
  helpers.assert_same_images_across_device_shapes(on_one, on_eight)  # a v network (runlocal).
  one_sampler = one_task.text_sampler(one_setup)
  few = one_sampler(params_on_one, PROMPTS[:3], seeds[:3])  # under a batch: no padding to 4.
  assert one_sampler.compiled_batch_sizes == (3, 4)
  helpers.assert_same_images_across_device_shapes(few, on_one[:3])
  again = task.text_sampler(setup)(params, PROMPTS[3:], seeds[3:], np.arange(3, 6))
  np.testing.assert_array_equal(again, on_eight[3:])  # sample j: (prompt, seed, index) only.


def test_sample_mode_writes_one_png_per_prompt_and_seed_and_the_protocol(env, eight, tmp_path):
  task, setup, params, state = eight
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a photo of a seven\r\n\na photo of a 2\n")
  task.config.sample.update(dict(prompts=str(prompts), seed=5, name="mine"))
  out = sampling.sample_mode(task, builder.RunContext(setup, state, 7), str(tmp_path))
  folder = tmp_path / "samples" / "mine"
  assert out["folder"] == str(folder) and out["num_samples"] == 6
  protocol = json.loads((folder / "protocol.json").read_text())
  assert protocol["samples"][:2] == [
      {"file": "images/00000_seed5.png", "prompt": "a photo of a seven", "prompt_index": 0,
       "seed": 5},
      {"file": "images/00000_seed6.png", "prompt": "a photo of a seven", "prompt_index": 0,
       "seed": 6}]
  assert [s["prompt"] for s in protocol["samples"]][2:] == ["", "", "a photo of a 2",
                                                           "a photo of a 2"]
  for key, value in dict(sampler="ddim", steps=2, guidance="constant", seeds=[5, 6],
                         negative_prompt="", checkpoint_step=7, ema=True,
                         guidance_scales=[0.0, 0.0]).items():
    assert protocol[key] == value, key
  images = [np.asarray(Image.open(folder / s["file"])) for s in protocol["samples"]]
  assert all(im.shape == (32, 32, 3) for im in images)
  direct = task.text_sampler(setup)(params, ["a photo of a 2"], [6], [2])
  np.testing.assert_array_equal(images[5], direct[0])
  assert (folder / "grid.png").exists()
  from ascan_jax.tools import clip_score  # the reader of sample directories.
  _, samples = clip_score.read_protocol(str(folder))
  assert len(samples) == 6


def test_prerequisites_chain_the_stages_and_warm_start_the_last(env, tmp_path, monkeypatch):
  monkeypatch.setenv("ASCAN_CACHE", str(tmp_path / "cache"))
  from configs import t2i_common
  chain = t2i_common.get_config("runlocal")
  assert [e.split("=")[0] for e in chain.stages.previous] == ["stage1_single_digits",
                                                            "stage2_scenes64"]
  config = _config(env)
  spec = env["config_path"]
  config.stages.previous = (f"first={spec}", f"second={spec}")
  task = tasks.get_task(config)
  with pytest.raises(tasks.TaskError, match="workdir"):
    task.prerequisites()
  workdir = tmp_path / "run"
  shutil.copytree(env["stage_a"], workdir / "stages" / "first")  # a finished first stage.
  runs = task.prerequisites(str(workdir))
  assert [d for _, d in runs] == [str(workdir / "stages" / "second")]
  assert runs[0][0].init_from.workdir == str(workdir / "stages" / "first")
  assert config.init_from.workdir == str(workdir / "stages" / "second")
  config.stages.previous = ("no/name=x.py",)
  with pytest.raises(cv.ConfigError, match="config.stages.previous"):
    text_to_image.check_config(config)


def test_a_pixel_space_unet_narrower_than_twice_its_input_is_warned():
  """runlocal stage 1 sees 2x2x3 = 12 channels per token: 32 wide passes; with 4x4x3 = 48
  channels 32 and 48 wide are warned, 96 passes."""
  from ascan_jax.tasks import denoising
  from configs import t2i_common
  config = t2i_common.get_config("runlocal,stage=1")
  assert config.data.patch == 2 and config.model.channels[0] == 32
  assert denoising.pixel_width_warning(config) == ""
  config.data.patch = 4
  assert "32 wide, less than twice the UNet's 48 input channels" in (
      denoising.pixel_width_warning(config))
  config.model.channels = (48, 96, 128)
  assert "48 wide, less than twice the UNet's 48 input channels" in (
      denoising.pixel_width_warning(config))
  config.model.channels = (96, 96, 128)
  assert denoising.pixel_width_warning(config) == ""
  config.model.channels = (48, 96, 128)
  config.data.update(dict(name="cache", latent_dir="latents/x"))  # latents: not pixel space.
  assert denoising.pixel_width_warning(config) == ""


def test_config_errors_name_the_key(env):
  config = _config(env)
  config.text.encoder_dir = ""
  with pytest.raises(cv.ConfigError, match="config.text.encoder_dir"):
    text_to_image.check_config(config)
  config = _config(env, guidance="ramp", steps=2)
  with pytest.raises(cv.ConfigError, match="config.sample: guidance interval"):
    text_to_image.check_config(config)
  config = _config(env)
  config.data.width = 36
  with pytest.raises(cv.ConfigError, match="config.data.width: 36 is not divisible by 16"):
    text_to_image.check_config(config)
  config = _config(env)
  config.model.context_dim = 48
  with pytest.raises(tasks.TaskError, match="context_dim=48 but the text encoder"):
    tasks.get_task(config).frozen_spec()


def test_init_from_refuses_a_checkpoint_of_another_shape(env):
  config = _config(env)
  config.model.channels = (16, 32, 48)
  config.init_from.workdir = env["stage_a"]
  task = tasks.get_task(config)
  setup = builder.build(task, config, None, with_frozen=False)
  with pytest.raises(init_from.InitFromError) as err:  # checked before anything is read.
    init_from.warm_start(setup.abstract_state, setup.state_shardings, config.init_from,
                         setup.mesh)
  message = str(err.value)
  assert "have another shape" in message
  assert "unet/down3_downsample/conv/kernel" in message and "(3, 3, 32, 32)" in message
  assert "adapter/" not in message  # the adapter is unchanged.


def _losses(workdir):
  rows = helpers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: r["train/loss"] for r in rows}


def _wait(proc, workdir, lines, checkpoint, timeout=600):
  path = os.path.join(workdir, "metrics.jsonl")
  start = time.time()
  while time.time() - start < timeout:
    if proc.poll() is not None:
      raise AssertionError(f"run ended early:\n{proc.stderr.read()[-3000:]}")
    done = os.path.isdir(os.path.join(workdir, "checkpoints", str(checkpoint)))
    if done and os.path.exists(path) and len(_losses(workdir)) >= lines:
      return
    time.sleep(0.05)
  raise AssertionError("timed out")


BUCKETS = ("32x32", "32x48")  # 24 scenes each of 48: three global batches of 8 each. Stage A
# compiled the square one; each more bucket costs a compilation of the step (~35 s cold).


def _step_compilations(log: str) -> int:
  """How many times the process lowered (compiled, or loaded from the cache) the train step:
  ``JAX_LOG_COMPILES`` lines of the jitted ``step_in_mesh`` (``train/builder.py``)."""
  return sum(1 for line in log.splitlines() if "Compiling " in line and "step_in_mesh" in line)


def test_a_warm_started_bucketed_stage_resumes_after_sigkill_with_identical_losses(env, tmp_path):
  """A two-stage chain run by main.py (``stages.previous``, as ``configs/t2i.py:runlocal``) whose
  last stage trains on aspect-ratio buckets (``data.buckets``, as runlocal stage 3): the
  finished first stage sits in ``WORKDIR/stages/a``, so the run warm-starts from it, is killed
  (SIGKILL after the step-3 checkpoint, with later steps logged), and resumes. The steps
  trained twice span two buckets and have bit-identical losses; each run compiles the step once
  per bucket shape it meets (``perf/step_compilations`` and JAX's own compile log)."""
  spec = os.path.join(str(tmp_path), "chain.py")
  with open(spec, "w") as f:
    f.write("import importlib.util\n"
            f"_s = importlib.util.spec_from_file_location('tiny', {env['config_path']!r})\n"
            "_m = importlib.util.module_from_spec(_s)\n_s.loader.exec_module(_m)\n\n\n"
            "def get_config(arg=None):\n  c = _m.get_config(arg)\n"
            f"  c.stages.previous = ('a={env['config_path']}',)\n"
            f"  c.data.update(dict(buckets={BUCKETS!r}, num_train_examples=48))\n"
            "  return c\n")
  # The plan is a pure function of (seed, step): the bucket of every step, as the run sees it.
  plan = tasks.get_task(diffusion_task.load_config_file(spec)).bucket_plan()
  bucket = {s: plan.bucket_at(s - 1) for s in range(1, STEPS + 1)}  # of logged step s.
  workdir = str(tmp_path / "stage_b")
  shutil.copytree(env["stage_a"], os.path.join(workdir, "stages", "a"))  # a finished stage.
  args = [sys.executable, "main.py", f"--config={spec}", f"--workdir={workdir}"]
  run_env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
                 JAX_PLATFORMS="cpu", JAX_LOG_COMPILES="1")
  run_env.setdefault("ASCAN_COMPILATION_CACHE", os.path.join(helpers.REPO, ".jax_cache"))
  with open(tmp_path / "killed.log", "w") as log:  # a file: a full pipe would stall the run.
    proc = subprocess.Popen(args, cwd=helpers.REPO, env=run_env, stdout=log, stderr=log,
                            text=True)
    _wait(proc, workdir, 5, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  before = _losses(workdir)
  checkpoints = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
  report = os.path.join(workdir, "init_from.json")
  with open(report) as f:  # the chain's last stage warm-started from the stage before it.
    assert os.path.join(workdir, "stages", "a") in f.read()
  warm_started = os.stat(report).st_mtime_ns
  second = subprocess.run(args, cwd=helpers.REPO, env=run_env, capture_output=True, text=True,
                          timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  resumed = max(checkpoints)
  assert f"resumed from step {resumed} of" in second.stdout
  assert os.stat(report).st_mtime_ns == warm_started  # resumed, not warm-started again.
  rows = helpers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  after = {r["step"]: r["train/loss"] for r in rows}
  assert sorted(after) == list(range(1, STEPS + 1))
  redone = [s for s in before if s > resumed]
  assert len({bucket[s] for s in redone}) >= 2, (redone, bucket)  # trained twice, two shapes.
  for step in before:  # steps after the checkpoint were trained twice: bit-identical.
    assert after[step] == before[step], (step, before[step], after[step])
  # One compilation per bucket shape: rows up to the checkpoint count the killed run's shapes,
  # later rows the resumed run's (the loop counts from where it starts).
  assert len(set(bucket.values())) == len(BUCKETS)
  for r in rows:
    first = resumed + 1 if r["step"] > resumed else 1
    seen = {bucket[s] for s in range(first, r["step"] + 1)}
    assert r["perf/step_compilations"] == len(seen), (r["step"], seen)
  compiled = _step_compilations(second.stderr)  # by the resumed run.
  assert compiled == len({bucket[s] for s in range(resumed + 1, STEPS + 1)}), compiled


def test_trains_on_buckets_from_the_caption_latent_cache_with_cached_text(env, tmp_path):
  """A handful of single-digit scenes at two aspect ratios, cached by tools.cache_latents (a
  random VAE, the stand-in T5): every batch is one bucket, its text fields are the cache's
  embeddings (no encoder in the step), and four steps train with one compilation per bucket."""
  from ascan_jax.data import caption_sources
  from ascan_jax.data import latents
  from ascan_jax.data import pipeline
  from ascan_jax.models import vae as vae_lib
  from ascan_jax.modes import train as train_mode
  from ascan_jax.tools import cache_latents
  from ascan_jax.tools import make_random_vae
  vae_dir, cache = str(tmp_path / "vae"), str(tmp_path / "cache")
  make_random_vae.make_random_vae(vae_dir, vae_lib.VAEConfig(
      block_out_channels=(8, 16), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4), seed=0)
  data = caption_sources.data_config()
  data.scenes.sizes, data.scenes.mode = ("32x32", "32x48"), "single_digit"
  data.scenes.train_examples = 32
  cache_latents.cache_captions(data, vae_dir, cache, ["train"], table=((32, 32), (32, 48)),
                               text_encoder=str(env["encoder"]), max_length=16, batch_size=16,
                               records_per_shard=16, progress=False)
  config = _config(env)
  config.data.update(dict(name="cache", latent_dir=cache, height=32, width=32))
  config.text.cached = True
  config.total_steps = config.checkpoint.every_steps = 4
  config.model.update(dict(channels=(16, 32), down_layout="C-T", mid_layout="T"))  # quicker.
  text_to_image.check_config(config)
  task = tasks.get_task(config)
  assert task.sample_shape() == (16, 16, 4)  # the square bucket's latents.
  assert sorted(task.frozen_spec()) == ["null_mask", "null_text"]  # no encoder in the step.
  table = latents.CaptionLatentSource(cache, "train").text_table()
  shapes = []
  for batch in task.train_batches(pipeline.Sharding(0, 1), 4):
    shapes.append(batch["latent"].shape)
    assert "input_ids" not in batch and batch["text_embedding"].shape == (8, 16, 32)
    for caption, embedding, mask in zip(batch["caption"], batch["text_embedding"],
                                        batch["text_mask"]):
      expected, expected_mask = table.lookup(caption)
      np.testing.assert_array_equal(embedding, expected)
      np.testing.assert_array_equal(mask, expected_mask)
  assert sorted(set(shapes)) == [(8, 16, 16, 4), (8, 16, 24, 4)]
  # The held-out loss reads one bucket (16 records of each here: the first), in one batch.
  [held_out] = list(task.eval_batches(pipeline.Sharding(0, 1), "train"))
  assert held_out["latent"].shape == (16, 16, 16, 4) and held_out["mask"].tolist() == [1.0] * 16
  # Online text on the same cache: the drawn prompt is tokenized on the host.
  online = config.copy_and_resolve_references()
  online.text.cached = False
  online_task = tasks.get_task(online)
  batch = next(iter(online_task.train_batches(pipeline.Sharding(0, 1), 1)))
  assert "text_embedding" not in batch
  ids, mask = online_task.tokenize(list(batch["caption"]))
  np.testing.assert_array_equal(batch["input_ids"], ids)
  np.testing.assert_array_equal(batch["text_mask"], mask)
  workdir = tmp_path / "run"
  train_mode.train(task, config, str(workdir))
  rows = helpers.read_jsonl(workdir / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all(np.isfinite(r["train/loss"]) for r in rows)
  assert rows[-1]["perf/step_compilations"] == 2
  config.text.max_length = 12
  with pytest.raises(tasks.TaskError, match="16 tokens x 32 wide"):
    tasks.get_task(config).num_train_examples()


def test_the_aspect_ratio_stage_batches_one_bucket_of_tokenized_scenes_per_step(env):
  """Pixel space with data.buckets (runlocal stage 3's path): scenes rendered at the bucket
  canvases, one bucket per global batch, captions tokenized on the host."""
  from ascan_jax.data import pipeline
  from configs import t2i_common
  for stage in t2i_common.RUNLOCAL_STAGES:
    text_to_image.check_config(t2i_common.get_config(f"runlocal,stage={stage}"))
  assert t2i_common.get_config("runlocal,stage=3").data.buckets
  config = _config(env)
  config.data.update(dict(buckets=("32x32", "32x48", "48x32"), num_train_examples=48))
  text_to_image.check_config(config)
  task = tasks.get_task(config)
  shapes = []
  for batch in task.train_batches(pipeline.Sharding(0, 1), 6):
    shapes.append(batch["image"].shape)
    assert batch["image"].dtype == np.uint8 and batch["mask"].tolist() == [1.0] * 8
    ids, mask = task.tokenize(list(batch["caption"]))
    np.testing.assert_array_equal(batch["input_ids"], ids)
    np.testing.assert_array_equal(batch["text_mask"], mask)
  assert sorted(set(shapes)) == [(8, 32, 32, 3), (8, 32, 48, 3), (8, 48, 32, 3)]
  config.data.buckets = ("32x32", "32x40")
  with pytest.raises(cv.ConfigError, match="config.data.buckets: bucket '32x40' is not divisible"):
    text_to_image.check_config(config)
