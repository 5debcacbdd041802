"""Caption-set FID: tools.make_caption_set draws a deterministic caption set (and its reference
crops), the caption_fid evaluator samples one image per caption and returns finite FID, sFID,
IS, precision and recall with the caption file's sha256 in the protocol; bad caption lines are
named."""
import hashlib
import json

import jax
import numpy as np
import pytest
from PIL import Image

from ascan_jax import tasks
from ascan_jax.data import caption_sets
from ascan_jax.modes import train as train_mode
from ascan_jax.parallel import mesh as mesh_lib
from ascan_jax.tasks import diffusion as diffusion_task
from ascan_jax.tasks import text_to_image
from ascan_jax.tasks import text_to_image_sampling as sampling
from ascan_jax.tools import compute_reference_stats
from ascan_jax.tools import make_caption_set
from ascan_jax.train import builder
from tests import helpers


class FakeCocoSource:
  """Records like coco_captions': five captions an image, COCO-like numeric keys."""
  description = "fake coco"

  def __len__(self):
    return 50

  def load(self, i):
    rng = np.random.default_rng(i)
    return {"image": rng.integers(0, 256, (40, 56, 3), dtype=np.uint8),
            "captions": tuple(f"image {i} caption {c}" for c in range(5)), "key": str(1000 + i)}


def test_the_caption_set_is_a_function_of_the_seed(tmp_path):
  a, b, c = (tmp_path / f"{n}.jsonl" for n in "abc")
  rows = make_caption_set.make(FakeCocoSource(), 10, 0, str(a), str(tmp_path / "ref"),
                               image_size=32, progress=False)
  make_caption_set.make(FakeCocoSource(), 10, 0, str(b), progress=False)
  make_caption_set.make(FakeCocoSource(), 10, 1, str(c), progress=False)
  assert a.read_bytes() == b.read_bytes() and a.read_bytes() != c.read_bytes()
  lines = [json.loads(line) for line in a.read_text().splitlines()]
  assert lines == rows and len(lines) == 10 and all(set(r) == {"caption", "image_id"}
                                                     for r in lines)
  ids = [r["image_id"] for r in lines]
  assert ids == sorted(set(ids)) and all(isinstance(i, int) for i in ids)  # distinct, in order.
  assert len({r["caption"].split()[-1] for r in lines}) > 1  # not always the first caption.
  assert caption_sets.read(str(a)) == lines
  ref = sorted((tmp_path / "ref").iterdir())
  assert [p.name for p in ref] == [f"{k:05d}.png" for k in range(10)]
  first = FakeCocoSource().load(ids[0] - 1000)["image"]  # 40x56: short side to 32, centre crop.
  expected = np.asarray(Image.fromarray(first).resize((45, 32), Image.BICUBIC))[:, 6:38]
  np.testing.assert_array_equal(np.asarray(Image.open(ref[0])), expected)
  with pytest.raises(ValueError, match="cannot draw 51 records from a source of 50"):
    caption_sets.select(50, 51, 0)


def test_a_bad_caption_line_is_named(tmp_path):
  path = tmp_path / "captions.jsonl"
  path.write_text('{"caption": "a dog", "image_id": 1}\n{"caption": "a cat"}\n')
  with pytest.raises(caption_sets.CaptionSetError, match=f"{path}: line 2 misses key 'image_id'"):
    caption_sets.read(str(path))
  path.write_text('{"caption": "a dog", "image_id": 1}\n{"caption": 3, "image_id": 2}\n')
  with pytest.raises(caption_sets.CaptionSetError, match="line 2: key 'caption' is not a string"):
    caption_sets.read(str(path))
  path.write_text('{"caption": "a dog", "image_id": 1}\nnot json\n')
  with pytest.raises(caption_sets.CaptionSetError, match="line 2 is not UTF-8 JSON"):
    caption_sets.read(str(path))


def test_caption_fid_evaluator_gives_finite_metrics_and_the_protocol(tmp_path, monkeypatch):
  # A caption set and its reference crops from a folder source (imagefolder, what the tool takes
  # besides coco_captions), statistics with a random-weight Inception.
  folder = tmp_path / "images" / "validation"
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  with open(folder / "metadata.jsonl", "w") as f:
    for i in range(12):
      Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
      f.write(json.dumps({"file_name": f"{i}.png", "text": f"a photo of a {i}"}) + "\n")
  captions = tmp_path / "captions.jsonl"
  source = make_caption_set.open_source(str(tmp_path / "images"), "validation")
  make_caption_set.make(source, 10, 0, str(captions), str(tmp_path / "ref"), image_size=32,
                        progress=False)
  inception = helpers.random_inception_weights(tmp_path / "inception.safetensors")
  reference = str(tmp_path / "ref.npz")
  compute_reference_stats.compute_reference(str(tmp_path / "ref"), inception, reference,
                                            batch_size=10, store_images=True, progress=False)

  encoder = tmp_path / "t5"
  config = diffusion_task.load_config_file(helpers.write_tiny_t2i_config(tmp_path, encoder, 1))
  text_to_image.make_standin_encoder(str(encoder), config)
  config.evals.fid = sampling.caption_fid_evaluator_schema()
  config.evals.fid.update(caption_file=str(captions), inception_path=inception,
                          reference_path=reference, grid_size=4)
  config.mesh.shape = (jax.device_count(), 1, 1)
  tasks.validate(config, num_devices=jax.device_count(), mode="eval")
  task = tasks.get_task(config)
  setup = builder.build(task, config, None, mesh=mesh_lib.make_mesh(config, jax.devices()))
  state = builder.create_state(setup)
  noise = np.random.default_rng(0)  # the output layer starts at zero: make the samples differ.
  params = jax.device_put(jax.tree.map(
      lambda p: p + 0.05 * noise.standard_normal(p.shape).astype(p.dtype),
      jax.device_get(state.ema_params)), setup.state_shardings.params)
  state = state.replace(ema_params=params)
  evaluators = task.make_evaluators(setup)
  assert isinstance(evaluators["fid"], sampling.CaptionFidEvaluator)
  sampler, drawn = task.text_sampler(setup), []
  draw = sampler.chunks

  def spy(params, prompts, seeds, index=None, progress=False):
    drawn.append((list(prompts), np.asarray(seeds).tolist(), np.asarray(index).tolist()))
    return draw(params, prompts, seeds, index, progress)

  monkeypatch.setattr(sampler, "chunks", spy)
  metrics = train_mode.run_evaluators({"fid": evaluators["fid"]}, state, setup, 5, str(tmp_path))
  # Caption k (line k) is drawn with seed 3 + k and noise index k: independent of the batching.
  rows = caption_sets.read(str(captions))
  assert drawn == [([r["caption"] for r in rows], list(range(3, 13)), list(range(10)))]
  for key in ("fid", "sfid", "inception_score", "precision", "recall"):
    assert np.isfinite(metrics[f"eval/caption_{key}"]), key
  protocol = json.loads((tmp_path / metrics["eval/caption_sample_protocol"]).read_text())
  assert protocol["caption_file"] == str(captions) and protocol["num_captions"] == 10
  assert protocol["caption_file_sha256"] == hashlib.sha256(captions.read_bytes()).hexdigest()
  assert protocol["reference_sha256"] == hashlib.sha256(open(reference, "rb").read()).hexdigest()
  assert protocol["sampler"] == "ddim" and protocol["steps"] == 2
  assert protocol["checkpoint_step"] == 5 and protocol["num_samples"] == 10
  assert (tmp_path / metrics["eval/caption_sample_protocol"].replace(".json", ".png")).exists()
