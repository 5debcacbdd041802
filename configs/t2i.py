"""Text-to-image with AsCAN: the paper's whole multi-stage chain, or its CPU shrink, as one run.

Train:   python main.py --config=configs/t2i.py --workdir=DIR
         Stages 1, 2a, 2b, 2c run first in DIR/stages/<name> (each warm-starting from the one
         before), then stage 2d (aspect-ratio buckets) trains in DIR itself; a killed run restarts
         with the same command and continues where it stopped. Cached SDXL-VAE latents and
         Flan-T5-XXL embeddings (the data issue's cache) and many accelerators are needed.
Expected: GenEval 0.64 overall (paper, Table 3). Hardware: the paper's (not stated).
Try it:  python main.py --config=configs/t2i.py:runlocal --workdir=DIR
         (a 2-core CPU, pixel-space digit scenes, a random T5 stand-in; measured run in the
         README.) One stage alone: configs/t2i.py:runlocal,stage=1 (or 2, 3).
Inspect: the stages one by one: configs/t2i_stage{1,2a,2b,2c,2d}.py with --mode=summary.
Details and the choices the paper leaves open: configs/t2i_common.py.
"""
from configs import t2i_common


def get_config(arg=None):
  return t2i_common.get_config(arg)
