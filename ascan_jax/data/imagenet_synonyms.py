"""WordNet synonyms of the 1000 ImageNet-1K classes, for ImageNet recast as text-to-image.

The paper's stage 1 (following SD3, Esser et al. 2024) captions every ImageNet image "a photo of
a <class name>", the name drawn at random per example from the class's synonyms. The synonyms are
the lemma names of each class's WordNet 3.0 synset, as ImageNet's ``LOC_synset_mapping.txt`` lists
them (``n01440764 tench, Tinca tinca``). ``imagenet_synonyms.json`` (next to this file) holds them
in the label order of tfds ``imagenet2012`` (its ``labels.txt``: the synset ids, sorted), one
``[wnid, [lemma, ...]]`` per class. It was generated once with::

  SITE=.venv/lib/python3.11/site-packages
  python -m ascan_jax.data.imagenet_synonyms \\
      --labels=$SITE/tensorflow_datasets/datasets/imagenet2012/labels.txt \\
      --lemmas=$SITE/timm/data/_info/imagenet_synset_to_lemma.txt

(the lemma file is timm's copy of ImageNet's synset-to-words mapping; any ``wnid<TAB>a, b, c``
file works). Lemmas keep WordNet's spelling (``Tinca tinca``, ``jack-o'-lantern``); two classes
share the lemma ``crane`` (bird and machine) and two ``maillot``, as in WordNet.
"""
from __future__ import annotations

import functools
import json
import os
import sys

DATA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_synonyms.json")
NUM_CLASSES = 1000


@functools.lru_cache(maxsize=1)
def load() -> tuple[tuple[str, tuple[str, ...]], ...]:
  """``((wnid, (lemma, ...)), ...)`` for the 1000 classes in tfds label order."""
  with open(DATA_FILE) as f:
    rows = json.load(f)
  return tuple((wnid, tuple(lemmas)) for wnid, lemmas in rows)


def generate(labels_path: str, lemmas_path: str) -> list[list]:
  """The JSON rows from a label file (one wnid a line) and a ``wnid<TAB>lemma, lemma`` file."""
  with open(labels_path) as f:
    wnids = [line.strip() for line in f if line.strip()]
  lemmas = {}
  with open(lemmas_path, encoding="utf-8") as f:
    for line in f:
      wnid, _, names = line.rstrip("\n").partition("\t")
      lemmas[wnid] = [n.strip() for n in names.split(",") if n.strip()]
  missing = [w for w in wnids if not lemmas.get(w)]
  if missing:
    raise ValueError(f"{lemmas_path} has no lemmas for {len(missing)} classes, e.g. {missing[0]}")
  return [[w, lemmas[w]] for w in wnids]


def main(argv: list[str]) -> None:
  args = dict(a.lstrip("-").split("=", 1) for a in argv[1:])
  rows = generate(args["labels"], args["lemmas"])
  if len(rows) != NUM_CLASSES:
    raise SystemExit(f"expected {NUM_CLASSES} classes, got {len(rows)}")
  with open(args.get("out", DATA_FILE), "w") as f:
    json.dump(rows, f, ensure_ascii=False, separators=(",", ":"))
    f.write("\n")
  print(f"wrote {len(rows)} classes, {sum(len(r[1]) for r in rows)} synonyms")


if __name__ == "__main__":
  main(sys.argv)
