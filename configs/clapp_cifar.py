r"""CLAPP++ and BP-CLAPP++ on CIFAR-10 (PAPER.md §3-4).

  python main.py --config=configs/clapp_cifar.py --workdir=runs/clapp_cifar
  python main.py --config=configs/clapp_cifar.py:dfb,tiny --workdir=runs/dfb_tiny

Presets (comma-separated after ':'): both (default: CLAPP++both, the paper's best),
dfb (CLAPP++DFB), lateral (CLAPP++), nospatial (CLAPP++ without 2D spatial dependence),
bp (BP-CLAPP++), ff (B = identity, Forward-Forward style), fixedb (fixed random B),
bf16 (bfloat16 compute), tiny (1/8 width, a few CPU minutes).
"""

from localssl import config_lib


def get_config(arg: str | None = None):
  """Returns the config; `arg` is a comma-separated list of presets."""
  return config_lib.clapp_config('cifar10', arg)
