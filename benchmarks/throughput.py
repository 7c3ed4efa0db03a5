r"""Throughput of the jitted train step of each rule, and of the input pipeline alone.

  python benchmarks/throughput.py --width=0.25 --batch=32 --image_size=32 --steps=20 \
      --json=bench_out/throughput.json

For each preset: compile time, median ms/step and images/s over --steps steps after
--warmup steps on synthetic data, and the compiled step's memory (from
`compiled.memory_analysis()`). Then the input pipeline alone on CIFAR-10 ($TFDS_DATA_DIR or
--data_dir), in images/s. Prints a table and writes JSON with the versions used.
"""

import json
import os
import platform
import statistics
import sys
import time

from absl import app
from absl import flags
import flax
import jax
import jaxlib
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import clapp_cifar
from configs import infonce_cifar
from localssl import input_pipeline
from localssl import optim
from localssl import train
from localssl import train_step as train_step_lib

_PRESETS = flags.DEFINE_list('presets', ['lateral', 'dfb', 'both', 'nospatial', 'bp',
                                         'infonce'], 'Rules to time (CIFAR presets).')
_WIDTH = flags.DEFINE_float('width', 1.0, 'Width multiplier.')
_BATCH = flags.DEFINE_integer('batch', 32, 'Images per step (two views each).')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 32, 'Image side (pools must fit).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
_CONV_IMPL = flags.DEFINE_enum('conv_impl', 'auto', ['auto', 'xla', 'patches'],
                               'Convolution filter-gradient implementation.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
_PIPELINE_BATCHES = flags.DEFINE_integer('pipeline_batches', 30,
                                         'Batches timed for the input pipeline; 0 skips it.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data dir for the pipeline.')
_JSON = flags.DEFINE_string('json', None, 'Write the results here as JSON.')


def preset_config(preset: str):
  """The CIFAR config of a preset, at the benchmark's width, size and dtype."""
  config = (infonce_cifar.get_config() if preset == 'infonce' else
            clapp_cifar.get_config(preset))
  config.model.width_multiplier = _WIDTH.value
  config.model.conv_impl = _CONV_IMPL.value
  config.model.compute_dtype = _DTYPE.value
  config.data.image_size = _IMAGE_SIZE.value
  config.batch_size = _BATCH.value
  return config


def time_step(preset: str) -> dict:
  """Compiles and times one rule's train step on a mesh of all devices."""
  config = preset_config(preset)
  mesh = train.make_mesh()
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  params = train.initial_params(config)
  tx, schedules = optim.make_optimizer(config, params, 1000, 100)
  state = jax.device_put(train_step_lib.create_train_state(params, tx), replicated)
  data = train.synthetic_data(config, config.batch_size)
  batch = train.global_batch(next(data.batches(0)), rows)
  step_fn = jax.jit(train_step_lib.make_train_step(config, tx, schedules),
                    in_shardings=(replicated, rows, replicated),
                    out_shardings=(replicated, replicated), donate_argnums=(0,))
  rng = jax.random.key(0)
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch, rng).compile()
  compile_seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  for _ in range(_WARMUP.value):
    state, metrics = compiled(state, batch, rng)
  jax.block_until_ready(state)
  times = []
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  result = {
      'preset': preset, 'ms_per_step': 1000 * median,
      'images_per_second': config.batch_size / median, 'compile_seconds': compile_seconds,
      'encoder_params': count(params['encoder']),
      'predictor_params': count(params['predictor']),
  }
  if memory is not None:
    for field in ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
                  'generated_code_size_in_bytes', 'alias_size_in_bytes'):
      result[field] = int(getattr(memory, field, 0) or 0)
    # Donated arguments alias their outputs, so peak ~ arguments + temporaries.
    result['peak_estimate_bytes'] = (result['argument_size_in_bytes'] +
                                     result['output_size_in_bytes'] -
                                     result['alias_size_in_bytes'] +
                                     result['temp_size_in_bytes'])
  return result


def time_pipeline() -> dict:
  """Images/s of the two-view augmentation pipeline alone on CIFAR-10."""
  config = preset_config('both')
  if _DATA_DIR.value:
    config.data.data_dir = _DATA_DIR.value
  start = time.perf_counter()
  data = input_pipeline.load_split(config, config.data.pretrain_split)
  load_seconds = time.perf_counter() - start
  rate = input_pipeline.measure_throughput(config, data, local_batch_size=config.batch_size,
                                           num_batches=_PIPELINE_BATCHES.value)
  return {'images_per_second': rate, 'load_seconds': load_seconds,
          'num_images': int(len(data['images'])), 'batch': config.batch_size}


def environment() -> dict:
  device = jax.devices()[0]
  return {'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'flax': flax.__version__,
          'optax': optax.__version__, 'python': platform.python_version(),
          'backend': jax.default_backend(), 'device_kind': device.device_kind,
          'device_count': jax.device_count(), 'cpu_count': os.cpu_count()}


def main(argv):
  del argv
  env = environment()
  print('Environment: ' + ', '.join(f'{k} {v}' for k, v in env.items()))
  print(f'width {_WIDTH.value}, batch {_BATCH.value} images ({2 * _BATCH.value} views), '
        f'{_IMAGE_SIZE.value} px, conv {_CONV_IMPL.value}, {_DTYPE.value}')
  header = (f'{"preset":<10} {"ms/step":>9} {"img/s":>8} {"compile s":>9} '
            f'{"peak MiB":>9} {"params (enc + B)":>20}')
  print(header)
  print('-' * len(header))
  steps = []
  for preset in _PRESETS.value:
    result = time_step(preset)
    steps.append(result)
    peak = result.get('peak_estimate_bytes', 0) / 2**20
    print(f'{preset:<10} {result["ms_per_step"]:9.1f} {result["images_per_second"]:8.1f} '
          f'{result["compile_seconds"]:9.1f} {peak:9.0f} '
          f'{result["encoder_params"]:>10,} + {result["predictor_params"]:,}', flush=True)
  pipeline = None
  if _PIPELINE_BATCHES.value > 0:
    pipeline = time_pipeline()
    print(f'input pipeline alone: {pipeline["images_per_second"]:.0f} images/s (two views '
          f'each, batch {pipeline["batch"]}); loading {pipeline["num_images"]} images took '
          f'{pipeline["load_seconds"]:.1f} s')
  if _JSON.value:
    os.makedirs(os.path.dirname(os.path.abspath(_JSON.value)), exist_ok=True)
    with open(_JSON.value, 'w') as f:
      json.dump({'environment': env, 'width': _WIDTH.value, 'batch': _BATCH.value,
                 'image_size': _IMAGE_SIZE.value, 'conv_impl': _CONV_IMPL.value,
                 'dtype': _DTYPE.value, 'train_step': steps, 'pipeline': pipeline}, f,
                indent=2)


if __name__ == '__main__':
  app.run(main)
