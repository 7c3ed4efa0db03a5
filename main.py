r"""Pretrain with a local SSL rule, probe it linearly, or measure gradient alignment.

  python main.py --config=configs/clapp_cifar.py --workdir=runs/clapp_cifar
  python main.py --config=configs/clapp_cifar.py --workdir=runs/clapp_cifar --mode=linear_eval
  python main.py --config=configs/clapp_cifar.py:dfb,tiny --workdir=runs/dfb_tiny \
      --config.num_train_steps=100

A run resumes by itself from the newest checkpoint in --workdir.
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import tensorflow as tf

from localssl import checkpointing
from localssl import grad_align
from localssl import input_pipeline
from localssl import linear_eval
from localssl import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path.py[:presets]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, events and results go here.')
_MODE = flags.DEFINE_enum('mode', 'pretrain', ['pretrain', 'linear_eval', 'grad_align'],
                          'What to run.')
flags.mark_flags_as_required(['config', 'workdir'])

_USER_ERRORS = (ValueError, input_pipeline.DatasetNotFoundError, checkpointing.CheckpointError,
                train.NonFiniteLossError)

# Environment variables that mean "this is one process of a multi-process job".
_MULTIHOST_ENV = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # TensorFlow only feeds data: keep it off the accelerators JAX uses.
  tf.config.set_visible_devices([], 'GPU')
  config = _CONFIG.value
  if config.multihost or any(name in os.environ for name in _MULTIHOST_ENV):
    jax.distributed.initialize()
  logging.info('JAX %s, process %d of %d, devices: %s', jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())
  modes = {'pretrain': train.train_and_evaluate, 'linear_eval': linear_eval.evaluate,
           'grad_align': grad_align.run}
  try:
    modes[_MODE.value](config, _WORKDIR.value)
  except train.PreemptedError as error:
    logging.warning('%s', error)
    raise SystemExit(143) from None  # 128 + SIGTERM: schedulers restart the job.
  except _USER_ERRORS as error:
    # A bad config, a missing dataset or checkpoint, a diverged run: the message says what
    # to do; the traceback would only hide it (it is still logged at debug level).
    logging.debug('Traceback:', exc_info=True)
    raise SystemExit(f'localssl {_MODE.value} failed: {type(error).__name__}: {error}') from None


if __name__ == '__main__':
  app.run(main)
