r"""BP-InfoNCE on STL-10 (`unlabelled` for pretraining, `train` / `test` for the probe).

  python main.py --config=configs/infonce_stl10.py --workdir=runs/infonce_stl10
  python main.py --config=configs/infonce_stl10.py:tiny --workdir=runs/infonce_stl10_tiny

Presets: symmetric (2N NT-Xent instead of the one-directional loss), bf16, tiny.
with_train: pretrain on train+unlabelled.
"""

from localssl import config_lib


def get_config(arg: str | None = None):
  """Returns the config; `arg` is a comma-separated list of presets."""
  return config_lib.infonce_config('stl10', arg)
