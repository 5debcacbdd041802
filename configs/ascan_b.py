"""AsCAN-B (base) on ImageNet-1K at 224x224 with the paper's recipe.

Train:    python main.py --config=configs/ascan_b.py --workdir=DIR
          (Cloud TPU pod or GPU host; ImageNet prepared as tfds ArrayRecord, see README.)
Expected: top-1 not public (the paper's Table 7 is an image) after 300 epochs.
Try it:   python main.py --config=configs/ascan_b.py:runlocal --workdir=DIR
          (a 2-core CPU; the embedded MNIST digits; see README for the measured result.)
Inspect:  --mode=summary (parameters, MACs, memory) and --mode=bench (throughput, MFU).
"""
from configs import classification_common


def get_config(arg=None):
  return classification_common.get_config("B", arg)
