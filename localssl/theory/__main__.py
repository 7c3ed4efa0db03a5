r"""Runs one theory experiment of PAPER.md §6 and writes DIR/<experiment>.json and .png.

    python -m localssl.theory --experiment=fig2 --out=DIR \
        [--data_dir=../shared/tensorflow_datasets] [--num_batches=50] [--batch_images=32]

Experiments: fig2, fig3a, fig3b, fig4b (see localssl/theory/README.md); repeating
--experiment runs several in one process. --synthetic uses
smooth random images instead of CIFAR-10 (for tests and machines without the data).
"""

import os

from absl import app
from absl import flags

from localssl.theory import experiments

_EXPERIMENT = flags.DEFINE_multi_enum(
    'experiment', None, list(experiments.EXPERIMENTS),
    'Which figure of PAPER.md §6 to reproduce (repeat the flag to run several in turn).')
_OUT = flags.DEFINE_string('out', None, 'Output folder for <experiment>.json and .png.')
_DATA_DIR = flags.DEFINE_string('data_dir', os.environ.get('TFDS_DATA_DIR'),
                                'TFDS data dir holding cifar10 (default: $TFDS_DATA_DIR).')
_SYNTHETIC = flags.DEFINE_bool('synthetic', False,
                               'Use smooth random images instead of CIFAR-10.')
_NUM_BATCHES = flags.DEFINE_integer('num_batches', 50, 'Batches averaged over.')
_BATCH_IMAGES = flags.DEFINE_integer('batch_images', 32,
                                     'Images per batch (two views each: 2N rows).')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 4096, 'Images loaded per split.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the weights and the batches.')
_LAM = flags.DEFINE_float('lam', 0.01, 'L2 penalty lambda on every B.')
_TRAIN_STEPS = flags.DEFINE_integer('train_steps', 300,
                                    'fig3b: steps of global BP training of the ReLU MLP.')
_ORACLE_STEPS = flags.DEFINE_integer('oracle_steps', 300,
                                     'fig3b: steps fitting the oracle B to the BP errors.')
_WIDTH = flags.DEFINE_integer('width', 512, 'fig3b: hidden width of the ReLU MLP.')

flags.mark_flags_as_required(['experiment', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = experiments.RunConfig(
      data_dir=_DATA_DIR.value, synthetic=_SYNTHETIC.value, num_batches=_NUM_BATCHES.value,
      batch_images=_BATCH_IMAGES.value, num_images=_NUM_IMAGES.value, seed=_SEED.value,
      lam=_LAM.value, train_steps=_TRAIN_STEPS.value, oracle_steps=_ORACLE_STEPS.value,
      width=_WIDTH.value)
  for name in _EXPERIMENT.value:
    result = experiments.run_experiment(name, _OUT.value, config)
    print(f"{result['title']}  ({result['runtime_s']:.1f} s)")
    for curve in result['curves']:
      means = ' '.join(f'{m:.4f}' for m in curve['weight_cos_mean'])
      print(f"  {curve['name']:<40s} weight cos per layer: {means}")


if __name__ == '__main__':
  app.run(main)
