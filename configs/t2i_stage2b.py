"""Text-to-image AsCAN, stage 2b: 512², 200K iterations, batch 6,144, lr 1e-4 (final beta 0.02).

Train:   python main.py --config=configs/t2i_stage2b.py --workdir=DIR \
             --config.init_from.workdir=PREVIOUS_STAGE_DIR
         (configs/t2i.py runs every stage in order with this warm start.)
Inspect: python main.py --config=configs/t2i_stage2b.py --workdir=DIR --mode=summary
Numbers and choices: configs/t2i_common.py (paper §3.3.2, A.6).
"""
from configs import t2i_common


def get_config(arg=None):
  return t2i_common.get_config(arg, stage="2b")
