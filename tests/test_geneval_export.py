"""--mode=geneval writes GenEval's layout (read back the way GenEval's evaluate_images.py walks it),
resumes only unfinished prompts, refuses a bad metadata line by line and key; GenEval's
results.jsonl becomes geneval/<tag> lines of metrics.jsonl."""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from ascan_jax import tasks
from ascan_jax.eval import geneval_files
from ascan_jax.tasks import diffusion as diffusion_task
from ascan_jax.tasks import text_to_image_geneval as geneval
from ascan_jax.tools import geneval_scores
from tests import helpers

# Ten prompts in GenEval's schema (as in its prompts/evaluation_metadata.jsonl), all six tags.
METADATA = [
    {"tag": "single_object", "include": [{"class": "dog", "count": 1}],
     "prompt": "a photo of a dog"},
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}],
     "prompt": "a photo of a bench"},
    {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "car", "count": 1}],
     "prompt": "a photo of a cat and a car"},
    {"tag": "counting", "include": [{"class": "clock", "count": 3}],
     "exclude": [{"class": "clock", "count": 4}], "prompt": "a photo of three clocks"},
    {"tag": "counting", "include": [{"class": "cup", "count": 2}],
     "exclude": [{"class": "cup", "count": 3}], "prompt": "a photo of two cups"},
    {"tag": "colors", "include": [{"class": "apple", "count": 1, "color": "green"}],
     "prompt": "a photo of a green apple"},
    {"tag": "colors", "include": [{"class": "bus", "count": 1, "color": "yellow"}],
     "prompt": "a photo of a yellow bus"},
    {"tag": "position", "include": [{"class": "bench", "count": 1},
                                    {"class": "dog", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of a dog right of a bench"},
    {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                      {"class": "vase", "count": 1, "color": "blue"}],
     "prompt": "a photo of a red car and a blue vase"},
    {"tag": "color_attr", "include": [{"class": "kite", "count": 1, "color": "white"},
                                      {"class": "bird", "count": 1, "color": "black"}],
     "prompt": "a photo of a white kite and a black bird"},
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("geneval")
  _, config_path, workdir = helpers.train_tiny_t2i(root)
  metadata = root / "evaluation_metadata.jsonl"
  metadata.write_text("".join(json.dumps(m) + "\n" for m in METADATA))
  return dict(root=root, config_path=config_path, workdir=workdir, metadata=str(metadata))


def _export(run, *extra, check=True, devices=1):
  return helpers.run_main(f"--config={run['config_path']}", f"--workdir={run['workdir']}",
                          "--mode=geneval", f"--config.eval.geneval_metadata={run['metadata']}",
                          *extra, check=check, devices=devices)


def _walk_like_geneval(out):
  """GenEval's evaluate_images.py: numbered folders in sorted order, metadata.jsonl read with
  json.load, samples/<digits>.png."""
  found = []
  for folder in sorted(os.listdir(out)):
    path = os.path.join(out, folder)
    if not os.path.isdir(path) or not folder.isdigit():
      continue
    with open(os.path.join(path, "metadata.jsonl")) as fp:
      metadata = json.load(fp)
    sample_dir = os.path.join(path, "samples")
    images = [name for name in sorted(os.listdir(sample_dir))
              if os.path.isfile(os.path.join(sample_dir, name)) and re.match(r"\d+\.png", name)]
    found.append((folder, metadata, images))
  return found


def _mtimes(out):
  return {os.path.relpath(os.path.join(d, f), out): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, files in os.walk(out) for f in files}


def test_export_has_genevals_layout_and_resumes_only_unfinished_prompts(run):
  proc = _export(run)
  out = re.search(r"-> (\S+) \(0 already there\)", proc.stdout).group(1)
  assert os.path.dirname(out) == os.path.join(run["workdir"], "geneval")
  assert os.path.basename(out).startswith("step0000008_ddim2_")  # step, sampler, steps, ...
  found = _walk_like_geneval(out)
  assert [f for f, _, _ in found] == [f"{i:05d}" for i in range(10)]
  for (folder, metadata, images), expected in zip(found, METADATA):
    assert metadata == expected
    assert images == ["0000.png", "0001.png", "0002.png", "0003.png"]
    for name in images:
      with Image.open(os.path.join(out, folder, "samples", name)) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    assert os.path.isfile(os.path.join(out, folder, "grid.png"))
  protocol = json.loads(open(os.path.join(out, "protocol.json")).read())
  assert protocol["num_prompts"] == 10 and protocol["samples_per_prompt"] == 4
  assert protocol["seeds"] == [0, 1, 2, 3] and protocol["checkpoint_step"] == 8
  assert f"python evaluation/evaluate_images.py {out} --outfile {out}/results.jsonl" in proc.stdout
  assert f"python evaluation/summary_scores.py {out}/results.jsonl" in proc.stdout

  # Resume on 8 devices: one missing sample -> only its prompt is drawn again, the same image.
  lost = os.path.join(out, "00003", "samples", "0002.png")
  before = np.asarray(Image.open(lost))
  os.remove(lost)
  mtimes = _mtimes(out)
  proc = _export(run, devices=8)
  assert "(9 already there)" in proc.stdout
  after = _mtimes(out)
  changed = sorted(k for k in after if after[k] != mtimes.get(k))
  assert changed == sorted(["protocol.json", "00003/metadata.jsonl", "00003/grid.png"] +
                           [f"00003/samples/{j:04d}.png" for j in range(4)])
  helpers.assert_same_images_across_device_shapes(Image.open(lost), before)  # now on 8 devices.

  # Another protocol into the same folder stops instead of mixing samples.
  proc = _export(run, "--config.eval.geneval_samples=2", f"--config.eval.geneval_output={out}",
                 check=False)
  assert proc.returncode == 2 and "samples_per_prompt" in proc.stderr


def test_a_bad_metadata_line_names_the_file_line_and_key(run, tmp_path):
  bad = tmp_path / "meta.jsonl"
  lines = [json.dumps(m) for m in METADATA[:3]]
  lines[1] = json.dumps({"tag": "single_object", "include": [{"class": "dog", "count": 1}]})
  bad.write_text("\n".join(lines) + "\n")
  with pytest.raises(geneval_files.MetadataError,
                     match=f"{bad}: metadata line 2: missing key 'prompt'"):
    geneval_files.read_metadata(str(bad))
  lines[1] = '{"tag": "single_object",'
  bad.write_text("\n".join(lines) + "\n")
  with pytest.raises(geneval_files.MetadataError, match="metadata line 2: not JSON"):
    geneval_files.read_metadata(str(bad))
  lines[1] = json.dumps({"tag": "colors", "include": [{"class": "dog"}], "prompt": "a dog"})
  bad.write_text("\n".join(lines) + "\n")
  with pytest.raises(geneval_files.MetadataError,
                     match=r"metadata line 2: include\[0\]: missing key 'count'"):
    geneval_files.read_metadata(str(bad))
  # In the mode: the error comes before any checkpoint is read or sample drawn.
  config = diffusion_task.load_config_file(run["config_path"])
  config.eval.geneval_metadata = str(bad)
  with pytest.raises(tasks.TaskError, match="config.eval.geneval_metadata: .*line 2"):
    geneval.export(tasks.get_task(config), None, str(tmp_path))
  proc = _export(dict(run, metadata=str(bad)), check=False)  # main.py: one line, exit 2.
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: config.eval.geneval_metadata: {bad}: metadata line 2: include[0]: missing key "
      "'count'")


def test_results_reader_writes_per_tag_and_overall_scores(tmp_path):
  rows = ([("single_object", True)] * 3 + [("single_object", False)] +  # 0.75
          [("two_object", True), ("two_object", False)] +  # 0.5
          [("counting", False)] * 4 +  # 0.0
          [("colors", True)] * 2 +  # 1.0
          [("position", True)] + [("position", False)] * 3 +  # 0.25
          [("color_attr", True)] * 3 + [("color_attr", False)])  # 0.75
  results = tmp_path / "out" / "results.jsonl"
  results.parent.mkdir()
  results.write_text("".join(json.dumps({"filename": f"x/{i}.png", "tag": t, "correct": c,
                                         "reason": ""}) + "\n" for i, (t, c) in enumerate(rows)))
  (tmp_path / "out" / "protocol.json").write_text(json.dumps({"checkpoint_step": 8}))
  workdir = tmp_path / "run"
  line = geneval_scores.record(str(results), str(workdir))
  written = helpers.read_jsonl(workdir / "metrics.jsonl")
  assert written == [line]
  expected = {"single_object": 0.75, "two_object": 0.5, "counting": 0.0, "colors": 1.0,
              "position": 0.25, "color_attr": 0.75}
  for tag, value in expected.items():
    assert line[f"geneval/{tag}"] == pytest.approx(value)
  assert line["geneval/overall"] == pytest.approx(np.mean(list(expected.values())))  # 0.5417
  assert line["step"] == 8 and line["geneval/num_images"] == len(rows)
  results.write_text(json.dumps({"tag": "colors", "correct": True}) + "\n" +
                     json.dumps({"tag": "colors"}) + "\n")
  with pytest.raises(ValueError, match="line 2 misses key 'correct'"):
    geneval_scores.record(str(results), str(workdir))
