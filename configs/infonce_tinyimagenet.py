r"""BP-InfoNCE on Tiny ImageNet (prepare it first: python -m data.prepare tiny_imagenet ...).

  python main.py --config=configs/infonce_tinyimagenet.py --workdir=runs/infonce_tinyimagenet
  python main.py --config=configs/infonce_tinyimagenet.py:tiny --workdir=runs/infonce_tinyimagenet_tiny

Presets: symmetric (2N NT-Xent instead of the one-directional loss), bf16, tiny.
"""

from localssl import config_lib


def get_config(arg: str | None = None):
  """Returns the config; `arg` is a comma-separated list of presets."""
  return config_lib.infonce_config('tiny_imagenet', arg)
