r"""CLAPP++ and BP-CLAPP++ on Tiny ImageNet: pretrain on `train` (100k), probe on `train`, test
on `validation`; pools 8-8-8-4-4-2 at 64 px, weight decay 1e-5 (PAPER.md §3-4). Prepare the
data first: python -m data.prepare tiny_imagenet --manual_dir=DIR --data_dir=DIR2

  python main.py --config=configs/clapp_tinyimagenet.py --workdir=runs/clapp_tinyimagenet
  python main.py --config=configs/clapp_tinyimagenet.py:dfb,tiny --workdir=runs/clapp_tinyimagenet_tiny

Presets (comma-separated after ":"): both (default: CLAPP++both), dfb (CLAPP++DFB),
lateral (CLAPP++), nospatial (CLAPP++ without 2D spatial dependence), bp (BP-CLAPP++),
ff (B = identity, Forward-Forward style), fixedb (fixed random B), bf16, tiny (1/8 width,
a few CPU minutes).
"""

from localssl import config_lib


def get_config(arg: str | None = None):
  """Returns the config; `arg` is a comma-separated list of presets."""
  return config_lib.clapp_config('tiny_imagenet', arg)
