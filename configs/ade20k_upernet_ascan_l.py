"""UperNet-AsCAN-L on ADE20K (512x512 crops, 160K iterations, batch 16) with the paper's recipe.

Prepare: python -m ascan_jax.tools.ade20k_to_array_record --input=ADEChallengeData2016 \
           --output=ade20k
Train:   python main.py --config=configs/ade20k_upernet_ascan_l.py:classifier=CLS_DIR \
           --workdir=DIR --config.data.data_dir=ade20k
         (CLS_DIR: the workdir of an ImageNet-1K run of configs/ascan_l.py; 8 GPUs or a TPU
         slice; the recipe is in configs/segmentation_common.py.)
Expected: the paper reports AsCAN's best ADE20K val mIoU as 50.3 (variant not stated); mmseg's
         UperNet with Swin-T/S/B gives 44.4 / 47.7 / 48.0 single-scale.
Evaluate: --mode=eval runs the canvas evaluator, single-scale and multi-scale + flip at the
         original resolution.
Inspect: --mode=summary (params, GMACs at 512x512; add --config.data.eval_size='(512, 2048)'
         for 512x2048) and --mode=bench (frames per second at 512x512, batch 1 and 16).
"""
from configs import segmentation_common


def get_config(arg=None):
  return segmentation_common.get_config("L", arg)
