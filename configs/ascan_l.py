"""AsCAN-L (large) on ImageNet-1K at 224x224 with the paper's recipe.

Train:    python main.py --config=configs/ascan_l.py --workdir=DIR
          (Cloud TPU pod or GPU host; ImageNet prepared as tfds ArrayRecord, see README.)
Expected: top-1 about 85.2% (paper, AsCAN-L) after 300 epochs.
Try it:   python main.py --config=configs/ascan_l.py:runlocal --workdir=DIR
          (a 2-core CPU; the embedded MNIST digits; see README for the measured result.)
Inspect:  --mode=summary (parameters, MACs, memory) and --mode=bench (throughput, MFU).
"""
from configs import classification_common


def get_config(arg=None):
  return classification_common.get_config("L", arg)
