"""SFT on critique-and-revision demonstrations (SL-CAI, Bai et al. 2022): the SFT model
fine-tuned on its own revisions, as printed by experiments/critique_revise.py.

  python -m experiments.train --config=configs/sft_revisions.py --workdir=runs/sl_cai \
      --config.init.checkpoint=runs/sft --config.data.dataset_dir=<printed dataset dir>
"""

from configs import sft


def get_config():
  c = sft.get_config()
  c.data.source = "dataset"    # a demonstration dataset: (prompt, final revision) pairs
  return c
