"""CLIP: flax towers vs transformers, tokenizer, CLIPImageProcessor, CLIP score, the tool.

Parity with transformers' ``CLIPModel`` (float32, CPU, random weights, every parameter perturbed
so biases and LayerNorms matter) is checked for the ViT-B/32 shape (vision hidden 768, 12 heads,
patch 32, image 224; text hidden 512, 8 heads, 77 positions; projection 512) and the ViT-L/14
shape (vision 1024, 16 heads, patch 14; text 768, 12 heads; projection 768). To stay in the CI
time budget both towers have 2 layers instead of 12/24 and the vocabulary is 1000 tokens; every
other dimension is the real one. The B/32 config uses OpenAI's legacy ``eos_token_id=2``
(pooling at the argmax of the ids), the L/14 one a real EOS id (pooling at the first EOS).

Tests that need the PyTorch stack (transformers, torchmetrics) skip without it; the others
(tool, sharding, error messages) run on the JAX stack alone.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from ascan_jax import config_defaults
from ascan_jax.data import clip_tokenizer
from ascan_jax.eval import clip_score
from ascan_jax.models import clip
from ascan_jax.models import hf_checkpoint
from ascan_jax.tools import make_random_clip
from tests import torch_reference

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY_TOLERANCE = 1e-4
SCORE_TOLERANCE = 1e-3
PROMPTS = ["a red seven", "A photo of a BLUE cat!", "two green dogs in the snow",
           "the tree is purple", "an oil painting of a white boat at sunset", "a cat"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  """A random tiny CLIPModel directory written by make_random_clip (no torch)."""
  path = str(tmp_path_factory.mktemp("openai-clip-tiny"))
  make_random_clip.make_random_clip(path, make_random_clip.PRESETS["tiny"], seed=0)
  return path


@pytest.fixture(scope="module")
def tiny_scorer(tiny_dir):
  return clip_score.CLIPScorer(tiny_dir, batch_size=8)


def _images(n, height, width, seed=0):
  """Random uint8 images, the last ``n // 3`` of them flat (red, white, black, ...)."""
  images = np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)
  for i in range(n // 3):
    images[n - 1 - i] = ((255, 0, 0), (255, 255, 255), (0, 0, 0))[i % 3]
  return images


# ---------------------------------------------------------------------------------------------
# Without torch.


def test_tokenizer_bos_eos_truncation_padding(tiny_dir):
  tok = clip_tokenizer.CLIPTokenizer.from_directory(tiny_dir)
  ids, mask = tok.encode(["a red seven", "", "seven " * 200], max_length=77)
  assert ids.shape == mask.shape == (3, 77) and ids.dtype == mask.dtype == np.int32
  assert (ids[:, 0] == tok.bos_id).all()
  lengths = mask.sum(1)
  assert lengths[1] == 2 and lengths[2] == 77
  for row, n in zip(ids, lengths):
    assert row[n - 1] == tok.eos_id and (row[n:] == tok.pad_id).all()
  assert tok.pad_id == tok.eos_id  # OpenAI's pad token, written by make_random_clip.
  assert tok.decode(ids[0]) == "a red seven"


def test_config_and_weight_errors_name_the_problem(tiny_dir, tmp_path):
  bad = dict(json.load(open(os.path.join(tiny_dir, "config.json"))), model_type="siglip")
  with pytest.raises(ValueError, match="model_type is 'siglip'"):
    clip.CLIPConfig.from_hf_dict(bad)
  d = json.load(open(os.path.join(tiny_dir, "config.json")))
  d["vision_config"]["hidden_act"] = "swish"
  with pytest.raises(ValueError, match="vision_config.hidden_act 'swish'"):
    clip.CLIPConfig.from_hf_dict(d)
  # One tensor missing, one extra: both are named.
  for name in ("config.json", "preprocessor_config.json"):
    with open(os.path.join(tiny_dir, name)) as src, open(tmp_path / name, "w") as dst:
      dst.write(src.read())
  tensors = safetensors.numpy.load_file(os.path.join(tiny_dir, "model.safetensors"))
  tensors["extra.weight"] = tensors.pop("text_model.final_layer_norm.bias")
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(hf_checkpoint.WeightsMismatchError,
                     match=r"(?s)missing.*text_model\.final_layer_norm\.bias.*unexpected.*extra"):
    clip.from_pretrained(str(tmp_path))


def test_sharded_scorer_equals_unsharded(tiny_dir, tiny_scorer):
  """8 fake devices (data x fsdp): batch 5 is padded to 8 and the padding dropped."""
  mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  sharded = clip_score.CLIPScorer(tiny_dir, batch_size=5, mesh=mesh,
                                  rules=config_defaults.DEFAULT_RULES)
  assert sharded.batch_size == 8
  fc1 = sharded.params["vision_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]
  assert fc1.sharding.spec[0] == "fsdp"  # the "embed" axis of the kernel is FSDP-sharded.
  images, prompts = _images(5, 32, 32), PROMPTS[:5]
  # The reference: all five pairs in one unpadded, unsharded call of the model functions.
  model, params = tiny_scorer.model, tiny_scorer.params
  ids, mask = tiny_scorer.tokenizer.encode(prompts)
  image_features = clip.image_embeddings(model, params, jnp.asarray(images))
  cosines = jnp.sum(clip.image_embeddings(model, params, jnp.asarray(images), normalize=True)
                    * clip.text_embeddings(model, params, ids, mask, normalize=True), axis=-1)
  ours = sharded.score(images, prompts)
  np.testing.assert_allclose(ours["cosine"], cosines, atol=1e-6)
  np.testing.assert_allclose(ours["per_sample"], 100 * np.maximum(cosines, 0), atol=1e-4)
  np.testing.assert_allclose(sharded.image_features(images), image_features, atol=1e-5)


def _write_sample_dir(root, images):
  """PNGs and protocol.json of two seeds per prompt; the last image is saved grey (mode "L"),
  and ``images`` is changed in place to what reading it back as RGB gives."""
  os.makedirs(root / "images")
  from PIL import Image
  samples = []
  images[-1] = images[-1, :, :, :1]
  for i, image in enumerate(images):
    prompt_index, seed = i // 2, i % 2
    name = f"images/{prompt_index:05d}_seed{seed}.png"
    Image.fromarray(image[:, :, 0] if i == len(images) - 1 else image).save(root / name)
    samples.append({"file": name, "prompt": PROMPTS[prompt_index], "prompt_index": prompt_index,
                    "seed": seed})
  with open(root / "protocol.json", "w") as f:
    json.dump({"sampler": "ddim", "steps": 3, "samples": samples}, f)
  return samples


def _run_tool(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env.setdefault("ASCAN_COMPILATION_CACHE", os.path.join(REPO, ".jax_cache"))
  return subprocess.run([sys.executable, "-m", "ascan_jax.tools.clip_score", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


def test_tool_end_to_end_and_errors(tiny_dir, tiny_scorer, tmp_path):
  images = _images(6, 40, 48, seed=3)
  samples = _write_sample_dir(tmp_path / "samples", images)
  out = tmp_path / "score.json"
  proc = _run_tool(f"--clip={tiny_dir}", f"--samples={tmp_path / 'samples'}", f"--output={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.load(open(out))
  expected = tiny_scorer.score(images, [s["prompt"] for s in samples])
  np.testing.assert_allclose([s["clip_score"] for s in result["per_sample"]],
                             expected["per_sample"], atol=1e-4)
  assert result["clip_score"] == pytest.approx(expected["clip_score"], abs=1e-4)
  assert result["mean_cosine"] == pytest.approx(expected["cosine"].mean(), abs=1e-6)
  assert [p["prompt"] for p in result["per_prompt"]] == PROMPTS[:3]
  for p in result["per_prompt"]:
    pair = expected["per_sample"][2 * p["prompt_index"]:2 * p["prompt_index"] + 2]
    assert p["num_images"] == 2 and p["clip_score"] == pytest.approx(pair.mean(), abs=1e-4)
  assert result["clip_config_sha256"] == clip.config_sha256(tiny_dir)
  assert result["protocol"] == str(tmp_path / "samples" / "protocol.json")
  assert "CLIP score" in proc.stdout and PROMPTS[0] in proc.stdout

  # No protocol.json: one line, exit status 2.
  (tmp_path / "empty").mkdir()
  proc = _run_tool(f"--clip={tiny_dir}", f"--samples={tmp_path / 'empty'}")
  assert proc.returncode == 2
  assert proc.stderr.strip().count("\n") == 0 and "has no protocol.json" in proc.stderr
  # A missing and an undecodable image are named.
  os.remove(tmp_path / "samples" / samples[3]["file"])
  proc = _run_tool(f"--clip={tiny_dir}", f"--samples={tmp_path / 'samples'}")
  assert proc.returncode == 2
  assert "00001_seed1.png" in proc.stderr and "does not exist" in proc.stderr
  with open(tmp_path / "samples" / samples[3]["file"], "wb") as f:
    f.write(b"not a png")
  proc = _run_tool(f"--clip={tiny_dir}", f"--samples={tmp_path / 'samples'}")
  assert proc.returncode == 2 and "00001_seed1.png cannot be decoded" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Against the PyTorch stack.


@pytest.fixture(scope="module")
def torch_stack():
  torch = torch_reference.import_torch()
  transformers = pytest.importorskip("transformers")
  return torch, transformers


SHAPES = {  # name: (text config, vision config, projection_dim)
    "vit_b32": (dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                     eos_token_id=2),
                dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                     patch_size=32), 512),
    "vit_l14": (dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                     eos_token_id=999),
                dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                     patch_size=14), 768),
}


def _torch_clip(torch, transformers, name, seed=0):
  text, vision, projection = SHAPES[name]
  config = transformers.CLIPConfig(
      text_config=dict(text, vocab_size=1000, num_hidden_layers=2, max_position_embeddings=77,
                       bos_token_id=998, hidden_act="quick_gelu"),
      vision_config=dict(vision, num_hidden_layers=2, image_size=224, hidden_act="quick_gelu"),
      projection_dim=projection)
  torch.manual_seed(seed)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():  # biases are 0 and LayerNorms 1/0 after init: make them matter.
    for pname, p in model.named_parameters():
      if pname.endswith("bias") or "norm" in pname:
        p.add_(0.1 * torch.randn_like(p))
  return model


def _text_inputs(rng, eos=999, bos=998):
  ids = rng.integers(0, bos, (3, 77))
  mask = np.zeros_like(ids)
  for row, (n, pad) in enumerate(((6, eos), (77, eos), (30, 0))):  # pad with EOS or with "!".
    ids[row, 0], ids[row, n - 1], ids[row, n:] = bos, eos, pad
    mask[row, :n] = 1
  return ids, mask


@pytest.mark.parametrize("name", list(SHAPES))
def test_parity_with_transformers(torch_stack, name, tmp_path):
  torch, transformers = torch_stack
  reference = _torch_clip(torch, transformers, name)
  reference.save_pretrained(str(tmp_path), safe_serialization=True)
  model, params = clip.from_pretrained(str(tmp_path))
  assert model.config.text.eos_token_id == SHAPES[name][0]["eos_token_id"]
  rng = np.random.default_rng(0)
  pixels = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
  ids, mask = _text_inputs(rng)
  with torch.no_grad():
    want_image = reference.get_image_features(torch.from_numpy(pixels)).pooler_output.numpy()
    text_out = reference.get_text_features(torch.from_numpy(ids), torch.from_numpy(mask))
    want_text, want_hidden = text_out.pooler_output.numpy(), text_out.last_hidden_state.numpy()

  @jax.jit
  def forward(params, pixels, ids, mask):
    variables = {"params": params}
    return (model.apply(variables, pixels, method=clip.CLIPModel.get_image_features),
            model.apply(variables, ids, mask, method=clip.CLIPModel.get_text_features),
            model.apply(variables, ids, mask, method=lambda m, i, k: m.text_model(i, k)[0]))

  image, text, hidden = forward(params, pixels.transpose(0, 2, 3, 1), ids.astype(np.int32),
                                mask.astype(np.int32))
  diffs = {"image": float(np.abs(np.asarray(image) - want_image).max()),
           "text": float(np.abs(np.asarray(text) - want_text).max()),
           "text_hidden": float(np.abs(np.asarray(hidden) - want_hidden).max())}
  print(f"parity {name}: max abs differences {diffs}; embedding scale "
        f"{float(np.abs(want_image).max()):.2f} / {float(np.abs(want_text).max()):.2f}")
  assert max(diffs.values()) <= PARITY_TOLERANCE, diffs


def _copy_tokenizer(source, target, pad_in=()):
  """The tokenizer files of ``source`` in ``target``, with ``pad_token: "!"`` in the JSON files
  named in ``pad_in``."""
  os.makedirs(target, exist_ok=True)
  for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
               "special_tokens_map.json"):
    with open(os.path.join(source, name)) as f:
      content = f.read()
    if name in pad_in:
      content = json.dumps(dict(json.loads(content), pad_token="!"))
    with open(os.path.join(target, name), "w") as f:
      f.write(content)
  return str(target)


def test_tokenizer_matches_transformers(torch_stack, tiny_dir, tmp_path):
  _, transformers = torch_stack
  texts = PROMPTS + ["", "  Leading\tand   trailing  ", "naïve café, 東京 😀 it's 3.14",
                     "word " * 100, "<|endoftext|> inside a prompt"]
  cases = [  # (directory, the pad token transformers should pick)
      (tiny_dir, "<|endoftext|>"),  # OpenAI's convention.
      # LAION / Stable Diffusion 2: "!" in both files.
      (_copy_tokenizer(tiny_dir, tmp_path / "laion",
                       ("tokenizer_config.json", "special_tokens_map.json")), "!"),
      # Conflicting legacy files: special_tokens_map.json wins.
      (_copy_tokenizer(tiny_dir, tmp_path / "conflict", ("tokenizer_config.json",)),
       "<|endoftext|>"),
  ]
  for directory, pad in cases:
    ours = clip_tokenizer.CLIPTokenizer.from_directory(directory)
    ids, mask = ours.encode(texts, max_length=77)
    for cls in (transformers.AutoTokenizer, transformers.CLIPTokenizer):
      hf = cls.from_pretrained(directory)
      want = hf(texts, padding="max_length", truncation=True, max_length=77, return_tensors="np")
      assert hf.pad_token == pad and ours.pad_token == pad and ours.pad_id == hf.pad_token_id
      np.testing.assert_array_equal(ids, want["input_ids"], err_msg=f"{cls.__name__} {pad}")
      np.testing.assert_array_equal(mask, want["attention_mask"])
  assert mask[texts.index("word " * 100)].sum() == 77


def test_preprocessing_matches_clip_image_processor(torch_stack, tiny_dir, tmp_path):
  torch, transformers = torch_stack
  # The tiny model (32 px) and CLIP's 224 px processor, downscaling, upscaling, odd sizes.
  cases = [(tiny_dir, (48, 40)), (tiny_dir, (100, 37)), (tiny_dir, (20, 20)),
           (tiny_dir, (32, 32)), (None, (256, 256)), (None, (300, 500)), (None, (180, 150))]
  worst = 0.0
  for directory, (h, w) in cases:
    if directory is None:
      processor, config = transformers.CLIPImageProcessor(), clip.ImageProcessingConfig()
    else:
      processor = transformers.CLIPProcessor.from_pretrained(directory).image_processor
      config = clip.load_config(directory).image_processing
    images = _images(3, h, w, seed=h)
    want = processor(images=[torch.from_numpy(i.transpose(2, 0, 1)) for i in images],
                     return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    ours = np.asarray(jax.jit(clip.preprocess_images, static_argnums=1)(images, config))
    assert ours.shape == want.shape
    worst = max(worst, float(np.abs(ours - want).max()))
  print(f"preprocessing vs CLIPImageProcessor: max abs difference {worst:.2e}")
  assert worst <= 1e-6  # float rounding of the normalisation; the resized pixels are equal.


def test_clip_score_matches_torchmetrics(torch_stack, tmp_path):
  """torchmetrics' CLIPScore on the same directory, images and prompts.

  torchmetrics 1.9.0 calls ``CLIPModel.get_*_features`` and expects tensors; transformers 5
  returns ``BaseModelOutputWithPooling`` (torchmetrics issue #3407, fixed after 1.9.0 by
  unwrapping ``pooler_output``). The model is passed through ``model_name_or_path``'s callable
  form with that unwrapping; torchmetrics' preprocessing (CLIPProcessor) and arithmetic run
  unchanged. A random CLIP gives all pairs a similar cosine, negative for this seed: the text
  projection is negated so that the mean is positive (torchmetrics clamps the mean) while some
  pairs stay negative (we clamp per pair), and both cases are compared."""
  torch, transformers = torch_stack
  pytest.importorskip("torchmetrics")
  from torchmetrics.multimodal.clip_score import CLIPScore
  directory = str(tmp_path / "openai-clip-tiny")
  make_random_clip.make_random_clip(directory, make_random_clip.PRESETS["tiny"], seed=0)
  weights = os.path.join(directory, "model.safetensors")
  tensors = safetensors.numpy.load_file(weights)
  tensors["text_projection.weight"] = -tensors["text_projection.weight"]
  safetensors.numpy.save_file(tensors, weights, metadata={"format": "pt"})

  class Unwrapped(torch.nn.Module):
    def __init__(self, model):
      super().__init__()
      self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
      return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
      return self.model.get_text_features(*args, **kwargs).pooler_output

  metric = CLIPScore(model_name_or_path=lambda: (
      Unwrapped(transformers.CLIPModel.from_pretrained(directory).eval()),
      transformers.CLIPProcessor.from_pretrained(directory)))
  images = _images(len(PROMPTS), 48, 40, seed=1)  # resized and cropped to 32x32 by both.
  as_torch = [torch.from_numpy(i.transpose(2, 0, 1)) for i in images]
  ours = clip_score.CLIPScorer(directory, batch_size=4).score(images, PROMPTS)
  metric.update(as_torch, PROMPTS)
  whole = float(metric.compute())
  per_pair = []
  for image, prompt in zip(as_torch, PROMPTS):
    metric.reset()
    metric.update(image, prompt)
    per_pair.append(float(metric.compute()))
  per_pair = np.asarray(per_pair)
  diffs = {"set": abs(whole - ours["torchmetrics_clip_score"]),
           "per_pair": float(np.abs(per_pair - ours["per_sample"]).max()),
           "mean_of_pairs": abs(per_pair.mean() - ours["clip_score"])}
  print(f"CLIP score vs torchmetrics: {diffs}; torchmetrics set score {whole:.4f}, pairs "
        f"{np.round(per_pair, 4).tolist()}")
  assert whole > 0 and (per_pair == 0).any() and (per_pair > 0).any(), (whole, per_pair)
  assert max(diffs.values()) <= SCORE_TOLERANCE, diffs
