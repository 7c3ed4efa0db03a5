"""Linear evaluation of a frozen encoder (PAPER.md §4), from a checkpoint or at random init.

Features: every chosen block's output, average-pooled with the paper's spatial pools
(`config.loss.pool_sizes`, whatever pooling the loss used), flattened and concatenated; with
`eval.per_layer`, one more probe per layer. Two protocols:
  - 'cached': features computed once (no augmentation), probes trained on them. Fast.
  - 'paper': every probe batch is augmented (random resized crop + flip) and encoded anew.
A held-out part of the labelled train split (`eval.val_size`) selects the epoch; the test
split is read only after training, once, with each probe's selected parameters.
"""

import dataclasses
import json
import os
from typing import Any, Iterator

from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax

from localssl import checkpointing
from localssl import input_pipeline
from localssl import logging_utils
from localssl import models
from localssl import objectives
from localssl import train
from localssl import validation

ALL = 'all'  # Name of the probe on the concatenation of the chosen layers.


@dataclasses.dataclass(frozen=True)
class ProbeData:
  """Disjoint train and validation parts of the labelled split (indices into it)."""
  train_index: np.ndarray
  val_index: np.ndarray


def split_train_val(num_examples: int, val_size: int, seed: int,
                    max_train_examples: int = -1) -> ProbeData:
  """A fixed random validation part of `val_size` examples; the rest (capped) trains.

  Raises:
    ValueError: when the validation part leaves no training example.
  """
  if val_size >= num_examples:
    raise ValueError(f'config.eval.val_size = {val_size} leaves no training example out of '
                     f'{num_examples}: lower it.')
  order = np.random.default_rng([seed, 7]).permutation(num_examples)
  train_index = order[val_size:]
  if max_train_examples > 0:
    train_index = train_index[:max_train_examples]
  return ProbeData(train_index=np.sort(train_index), val_index=np.sort(order[:val_size]))


def probe_layers(config: ml_collections.ConfigDict) -> list[int]:
  """The layers whose features are concatenated (all by default)."""
  num_layers = len(objectives.block_output_shapes(config))
  return sorted(config.eval.layers) if config.eval.layers else list(range(num_layers))


def layer_feature_dims(config: ml_collections.ConfigDict) -> list[int]:
  """Feature size of every layer with the paper's spatial pools."""
  shapes = objectives.block_output_shapes(config)
  return objectives.pooled_dims(shapes,
                                objectives.check_pool_sizes(config.loss.pool_sizes, shapes))


def probe_slices(config: ml_collections.ConfigDict) -> dict[str, tuple[int, int]]:
  """Column range of each probe's input within the concatenated features."""
  dims = layer_feature_dims(config)
  layers = probe_layers(config)
  starts = np.cumsum([0] + [dims[l] for l in layers])
  slices = {ALL: (0, int(starts[-1]))}
  if config.eval.per_layer:
    for position, layer in enumerate(layers):
      slices[f'layer{layer}'] = (int(starts[position]), int(starts[position + 1]))
  return slices


def encoder_features(config: ml_collections.ConfigDict, encoder_params: Any,
                     images: jax.Array) -> jax.Array:
  """Concatenated pooled features of the chosen layers, with no gradient to the encoder."""
  encoder = models.make_encoder(config.model, local=True)
  # Frozen encoder: nothing the probe learns may flow back into it.
  outputs = encoder.apply({'params': jax.lax.stop_gradient(encoder_params)}, images)
  pools = config.loss.pool_sizes
  return jnp.concatenate([objectives.pooled_representation(outputs[l], pools[l])
                          for l in probe_layers(config)], axis=-1)


def init_probes(config: ml_collections.ConfigDict, rng: jax.Array) -> dict[str, Any]:
  """One linear layer with bias per probe (PyTorch-default init)."""
  probes = {}
  for name, (start, stop) in probe_slices(config).items():
    rng, kernel_rng, bias_rng = jax.random.split(rng, 3)
    init = models.torch_uniform_init(stop - start)
    probes[name] = {'kernel': init(kernel_rng, (stop - start, config.eval.num_classes)),
                    'bias': init(bias_rng, (config.eval.num_classes,))}
  return probes


def probe_logits(config: ml_collections.ConfigDict, probes: dict[str, Any],
                 features: jax.Array) -> dict[str, jax.Array]:
  """Logits of every probe from the concatenated features."""
  slices = probe_slices(config)
  return {name: features[:, slices[name][0]:slices[name][1]] @ p['kernel'] + p['bias']
          for name, p in probes.items()}


def probe_loss(config: ml_collections.ConfigDict, probes: dict[str, Any],
               features: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Summed cross-entropy of the independent probes over the real (unmasked) rows."""
  weights = mask.astype(jnp.float32) / jnp.maximum(jnp.sum(mask), 1)
  total = 0.0
  for logits in probe_logits(config, probes, features).values():
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    total += jnp.sum(losses * weights)
  return total


def _correct(config, probes, features, labels, mask) -> dict[str, jax.Array]:
  return {name: jnp.sum((jnp.argmax(logits, -1) == labels) & mask)
          for name, logits in probe_logits(config, probes, features).items()}


class _Runner:
  """Jitted, sharded pieces shared by both protocols."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    self.config = config
    self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self.rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    self.tx = optax.adam(config.eval.learning_rate)
    features = lambda params, images: encoder_features(config, params, images)

    def train_step(probes, opt_state, features, labels, mask):
      grads = jax.grad(lambda p: probe_loss(config, p, features, labels, mask))(probes)
      updates, opt_state = self.tx.update(grads, opt_state, probes)
      return optax.apply_updates(probes, updates), opt_state

    def image_train_step(probes, opt_state, encoder_params, images, labels, mask):
      return train_step(probes, opt_state, features(encoder_params, images), labels, mask)

    self.features = jax.jit(features, in_shardings=(self.replicated, self.rows),
                            out_shardings=self.rows)
    self.train_step = jax.jit(train_step, donate_argnums=(0, 1))
    self.image_train_step = jax.jit(image_train_step, donate_argnums=(0, 1))
    self.correct = jax.jit(lambda p, f, l, m: _correct(config, p, f, l, m))

  def to_global(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Every process holds the same global batch; each device takes its own rows of it."""
    return {k: jax.make_array_from_callback(v.shape, self.rows, lambda index, v=v: v[index])
            for k, v in batch.items()}


def _subset(data: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
  return {k: v[index] for k, v in data.items()}


def _batches(config, data, *, batch_size, augment=False, epoch=0) -> Iterator[dict]:
  return input_pipeline.eval_batches(config, data, batch_size=batch_size, augment=augment,
                                     seed=config.seed, epoch=epoch)


def _to_host(x: jax.Array) -> np.ndarray:
  """A global array gathered on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return multihost_utils.process_allgather(x, tiled=True)


def _cached_features(runner: _Runner, encoder_params, data) -> dict[str, np.ndarray]:
  """Features of every example of `data` (eval view), kept on the host."""
  features, labels = [], []
  for batch in _batches(runner.config, data, batch_size=runner.config.eval.batch_size):
    mask = batch['mask']
    images = runner.to_global({'image': batch['image']})['image']
    features.append(_to_host(runner.features(encoder_params, images))[mask])
    labels.append(batch['label'][mask])
  return {'features': np.concatenate(features), 'labels': np.concatenate(labels)}


def _feature_batches(features: dict[str, np.ndarray], batch_size: int,
                     order: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
  for start in range(0, len(order), batch_size):
    index = order[start:start + batch_size]
    pad = batch_size - len(index)
    mask = np.concatenate([np.ones(len(index), bool), np.zeros(pad, bool)])
    index = np.concatenate([index, np.zeros(pad, index.dtype)])
    yield {'features': features['features'][index], 'label': features['labels'][index],
           'mask': mask}


def _accuracy(runner: _Runner, probes, batches) -> dict[str, float]:
  correct, total = {}, 0
  for batch in batches:
    total += int(np.sum(batch['mask']))
    batch = runner.to_global(batch)
    for name, value in runner.correct(probes, batch['features'], batch['label'],
                                      batch['mask']).items():
      correct[name] = correct.get(name, 0) + int(value)
  return {name: value / max(total, 1) for name, value in correct.items()}


def _encoded(runner: _Runner, encoder_params, batches) -> Iterator[dict]:
  """Host batches of features, labels and masks of image batches."""
  for batch in batches:
    images = runner.to_global({'image': batch['image']})['image']
    yield {'features': _to_host(runner.features(encoder_params, images)),
           'label': batch['label'], 'mask': batch['mask']}


def _select(best: dict[str, dict], probes: dict[str, Any], val: dict[str, float],
            epoch: int) -> None:
  """Keeps, per probe, the parameters of the epoch with the best validation accuracy."""
  for name, accuracy in val.items():
    if name not in best or accuracy > best[name]['val_accuracy']:
      best[name] = {'val_accuracy': accuracy, 'epoch': epoch,
                    'params': jax.device_get(probes[name])}


def train_probes(config: ml_collections.ConfigDict, runner: _Runner, encoder_params: Any,
                 train_data: dict, val_data: dict, writer) -> dict[str, dict]:
  """Trains every probe; returns per probe its best epoch, val accuracy and params."""
  probes = jax.device_put(init_probes(config, jax.random.key(config.seed + 1)),
                          runner.replicated)
  opt_state = jax.jit(runner.tx.init, out_shardings=runner.replicated)(probes)
  batch_size = config.eval.batch_size
  cached = config.eval.protocol == 'cached'
  if cached:
    train_features = _cached_features(runner, encoder_params, train_data)
    val_features = _cached_features(runner, encoder_params, val_data)
  best = {}
  for epoch in range(config.eval.num_epochs):
    if cached:
      order = np.random.default_rng([config.seed, 11, epoch]).permutation(
          len(train_features['labels']))
      for batch in _feature_batches(train_features, batch_size, order):
        batch = runner.to_global(batch)
        probes, opt_state = runner.train_step(probes, opt_state, batch['features'],
                                              batch['label'], batch['mask'])
      val_batches = _feature_batches(val_features, batch_size,
                                     np.arange(len(val_features['labels'])))
    else:
      for batch in _batches(config, train_data, batch_size=batch_size, augment=True,
                            epoch=epoch):
        batch = runner.to_global(batch)
        probes, opt_state = runner.image_train_step(probes, opt_state, encoder_params,
                                                    batch['image'], batch['label'],
                                                    batch['mask'])
      val_batches = _encoded(runner, encoder_params,
                             _batches(config, val_data, batch_size=batch_size))
    if len(val_data['labels']):
      val = _accuracy(runner, probes, val_batches)
      _select(best, probes, val, epoch)
    else:  # No validation part: the last epoch is the one reported.
      val = {}
      best = {name: {'val_accuracy': None, 'epoch': epoch,
                     'params': jax.device_get(probes[name])} for name in probes}
    writer.scalars(epoch + 1, {f'linear_eval/val_accuracy/{k}': v for k, v in val.items()})
    logging_utils.log_line(f'probe epoch {epoch + 1}/{config.eval.num_epochs} val accuracy '
                           + ' '.join(f'{k}={v:.4f}' for k, v in val.items()))
  return best


def test_accuracy(config: ml_collections.ConfigDict, runner: _Runner, encoder_params: Any,
                  best: dict[str, dict], test_data: dict) -> dict[str, float]:
  """Accuracy of each probe's selected parameters on the test split (its only use)."""
  probes = jax.device_put({name: entry['params'] for name, entry in best.items()},
                          runner.replicated)
  batches = _encoded(runner, encoder_params,
                     _batches(config, test_data, batch_size=config.eval.batch_size))
  return _accuracy(runner, probes, batches)


def load_encoder_params(config: ml_collections.ConfigDict, workdir: str,
                        sharding: jax.sharding.NamedSharding) -> tuple[Any, int]:
  """The encoder parameters to probe and their step (0 for the random-init baseline)."""
  initial = jax.device_put(train.initial_params(config), sharding)
  if config.eval.random_init:
    return initial['encoder'], 0
  source = config.eval.checkpoint_dir or workdir
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          initial)
  step = config.eval.checkpoint_step if config.eval.checkpoint_step >= 0 else None
  params, restored_step = checkpointing.restore_params(source, abstract, step)
  return params['encoder'], restored_step


def method_name(config: ml_collections.ConfigDict) -> str:
  """E.g. 'clapp/both', 'clapp/lateral/global_pool', 'bp_clapp/global_pool', 'bp_infonce'."""
  parts = [config.loss.method]
  if objectives.is_local(config):
    parts.append(config.loss.context)
  if config.loss.global_pool and config.loss.method != 'bp_infonce':
    parts.append('global_pool')
  return '/'.join(parts)


def plot_per_layer(result: dict, path: str) -> None:
  """Bar plot of validation and test accuracy of each layer's probe."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  layers = sorted(result['per_layer'], key=lambda name: int(name[len('layer'):]))
  test = [100 * result['per_layer'][l]['test_accuracy'] for l in layers]
  val = [100 * (result['per_layer'][l]['val_accuracy'] or 0) for l in layers]
  x = np.arange(len(layers))
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.bar(x - 0.2, val, 0.4, label='validation (held out from train)')
  ax.bar(x + 0.2, test, 0.4, label='test')
  ax.axhline(100 * result['test_accuracy'], color='k', ls='--',
             label=f'all chosen layers concatenated (test {100 * result["test_accuracy"]:.1f}%)')
  ax.set_xticks(x, [f'block {l[len("layer"):]}' for l in layers])
  ax.set_ylabel('linear probe top-1 accuracy (%)')
  init = 'random-init encoder' if result['random_init'] else f'step {result["checkpoint_step"]}'
  ax.set_title(f'{result["dataset"]}: {result["method"]} ({init}), protocol '
               f'"{result["protocol"]}"')
  ax.legend(loc='lower right', fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def evaluate(config: ml_collections.ConfigDict, workdir: str, *,
             devices=None) -> dict[str, Any]:
  """Restores params (or random init), trains linear probes, reports test accuracy.

  Args:
    config: the experiment config (`config.eval.*`, and the model/loss of pretraining).
    workdir: the run's workdir; results go to `workdir/linear_eval.json` (or
      `linear_eval_random_init.json` for the random-init baseline).
    devices: devices of the data mesh (default: all).

  Returns:
    The result dict written to the JSON file.
  """
  validation.validate(config)
  mesh = train.make_mesh(devices)
  if config.eval.batch_size % mesh.devices.size:
    raise ValueError(f'config.eval.batch_size = {config.eval.batch_size} must be a multiple '
                     f'of the {mesh.devices.size} devices.')
  runner = _Runner(config, mesh)
  encoder_params, step = load_encoder_params(config, workdir, runner.replicated)
  labelled = input_pipeline.load_split(config, config.eval.probe_split)
  parts = split_train_val(len(labelled['labels']), config.eval.val_size, config.seed,
                          config.eval.max_train_examples)
  os.makedirs(workdir, exist_ok=True)
  writer = logging_utils.MetricWriter(os.path.join(workdir, 'tensorboard'))
  best = train_probes(config, runner, encoder_params, _subset(labelled, parts.train_index),
                      _subset(labelled, parts.val_index), writer)
  del labelled
  test_data = input_pipeline.load_split(config, config.eval.test_split)
  test = test_accuracy(config, runner, encoder_params, best, test_data)
  result = {
      'test_accuracy': test[ALL], 'val_accuracy': best[ALL]['val_accuracy'],
      'best_epoch': best[ALL]['epoch'] + 1, 'checkpoint_step': step,
      'feature_dim': probe_slices(config)[ALL][1], 'protocol': config.eval.protocol,
      'layers': probe_layers(config), 'random_init': bool(config.eval.random_init),
      'dataset': config.data.name,
      'method': method_name(config),
      'width_multiplier': config.model.width_multiplier,
      'num_train': len(parts.train_index), 'num_val': len(parts.val_index),
      'num_test': len(test_data['labels']), 'probe_epochs': config.eval.num_epochs,
  }
  if config.eval.per_layer:
    result['per_layer'] = {name: {'test_accuracy': test[name],
                                  'val_accuracy': best[name]['val_accuracy'],
                                  'best_epoch': best[name]['epoch'] + 1}
                           for name in best if name != ALL}
  writer.scalars(step, {'linear_eval/test_accuracy': test[ALL]})
  writer.close()
  name = 'linear_eval_random_init' if config.eval.random_init else 'linear_eval'
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f'{name}.json'), 'w') as f:
      json.dump(result, f, indent=2)
    if config.eval.per_layer:
      plot_per_layer(result, os.path.join(workdir, f'{name}_layers.png'))
  logging.info('Linear evaluation (%s): test accuracy %.4f, val accuracy %s, step %d',
               config.eval.protocol, test[ALL], best[ALL]['val_accuracy'], step)
  print(json.dumps(result, indent=2))
  return result
