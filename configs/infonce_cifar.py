r"""BP-InfoNCE (SimCLR-like global baseline) on CIFAR-10 (PAPER.md §3).

  python main.py --config=configs/infonce_cifar.py --workdir=runs/infonce_cifar
  python main.py --config=configs/infonce_cifar.py:tiny --workdir=runs/infonce_tiny

Presets: symmetric (2N NT-Xent instead of the authors' one-directional loss), bf16, tiny.
"""

from localssl import config_lib


def get_config(arg: str | None = None):
  """Returns the config; `arg` is a comma-separated list of presets."""
  return config_lib.infonce_config('cifar10', arg)
