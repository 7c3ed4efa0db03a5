r"""CLAPP++ and BP-CLAPP++ on STL-10: pretrain on `unlabelled` (100k), probe on `train`, test on
`test`; pools 12-12-12-6-6-3 at 96 px (PAPER.md §3-4).

  python main.py --config=configs/clapp_stl10.py --workdir=runs/clapp_stl10
  python main.py --config=configs/clapp_stl10.py:dfb,tiny --workdir=runs/clapp_stl10_tiny

Presets (comma-separated after ":"): both (default: CLAPP++both), dfb (CLAPP++DFB),
lateral (CLAPP++), nospatial (CLAPP++ without 2D spatial dependence), bp (BP-CLAPP++),
ff (B = identity, Forward-Forward style), fixedb (fixed random B), bf16, tiny (1/8 width,
a few CPU minutes).
with_train: pretrain on train+unlabelled.
"""

from localssl import config_lib


def get_config(arg: str | None = None):
  """Returns the config; `arg` is a comma-separated list of presets."""
  return config_lib.clapp_config('stl10', arg)
