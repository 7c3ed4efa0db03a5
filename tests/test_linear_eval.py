"""Linear evaluation: restore, frozen encoder, disjoint validation, test split used last."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import clapp_cifar
from localssl import checkpointing
from localssl import input_pipeline
from localssl import linear_eval
from localssl import train


def tiny_eval_config(protocol: str = 'cached'):
  config = clapp_cifar.get_config('both,tiny')
  config.model.width_multiplier = 1 / 16
  config.batch_size = 8
  config.num_train_steps = 2
  config.checkpoint_every_steps = 2
  config.eval.protocol = protocol
  config.eval.val_size = 16
  config.eval.num_epochs = 2
  config.eval.batch_size = 16
  config.eval.per_layer = True
  return config


@pytest.mark.parametrize('protocol', ['cached', 'paper'])
def test_pretrain_checkpoint_restore_and_probe_end_to_end(tmp_path, protocol):
  config = tiny_eval_config(protocol)
  with tfds.testing.mock_data(num_examples=64):
    state = train.train_and_evaluate(config, str(tmp_path))
    result = linear_eval.evaluate(config, str(tmp_path))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params)
  restored, step = checkpointing.restore_params(str(tmp_path), abstract)
  assert step == 2
  for saved, loaded in zip(jax.tree.leaves(state.params), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(saved), np.asarray(loaded))
  with open(tmp_path / 'linear_eval.json') as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(result))
  for field in ('test_accuracy', 'val_accuracy', 'checkpoint_step', 'feature_dim', 'protocol',
                'layers', 'random_init', 'per_layer'):
    assert field in written
  assert written['checkpoint_step'] == 2 and written['protocol'] == protocol
  assert written['layers'] == [0, 1, 2, 3, 4, 5] and not written['random_init']
  assert written['feature_dim'] == sum(linear_eval.layer_feature_dims(config))
  assert written['num_val'] == 16 and written['num_train'] == 48
  assert 0.0 <= written['test_accuracy'] <= 1.0
  assert set(written['per_layer']) == {f'layer{l}' for l in range(6)}
  assert os.path.exists(tmp_path / 'linear_eval_layers.png')


def test_paper_feature_size_is_32768_at_full_width_for_every_method():
  for preset in ('both', 'nospatial', 'bp'):
    config = clapp_cifar.get_config(preset)
    assert linear_eval.probe_slices(config)[linear_eval.ALL] == (0, 32768)


def test_random_init_baseline_needs_no_checkpoint(tmp_path):
  config = tiny_eval_config()
  config.eval.random_init = True
  config.eval.per_layer = False
  with tfds.testing.mock_data(num_examples=48):
    result = linear_eval.evaluate(config, str(tmp_path))
  assert result['random_init'] and result['checkpoint_step'] == 0
  assert os.path.exists(tmp_path / 'linear_eval_random_init.json')


def test_missing_checkpoint_says_what_to_do(tmp_path):
  with pytest.raises(checkpointing.CheckpointError, match='pretrain first'):
    linear_eval.evaluate(tiny_eval_config(), str(tmp_path))


def test_no_gradient_reaches_the_encoder():
  config = tiny_eval_config()
  params = train.initial_params(config)['encoder']
  probes = linear_eval.init_probes(config, jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  labels = jnp.array([0, 1, 2, 3])
  mask = jnp.ones(4, bool)

  def loss(encoder_params, probes):
    features = linear_eval.encoder_features(config, encoder_params, images)
    return linear_eval.probe_loss(config, probes, features, labels, mask)

  encoder_grads, probe_grads = jax.grad(loss, argnums=(0, 1))(params, probes)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(encoder_grads))
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(probe_grads))
  # The probe is linear in the features: logits(a f) - logits(0) = a (logits(f) - logits(0)).
  features = linear_eval.encoder_features(config, params, images)
  logits = lambda f: linear_eval.probe_logits(config, probes, f)[linear_eval.ALL]
  np.testing.assert_allclose(logits(3 * features) - logits(0 * features),
                             3 * (logits(features) - logits(0 * features)), rtol=1e-4,
                             atol=1e-4)


def test_validation_and_train_parts_are_disjoint_and_fixed():
  parts = linear_eval.split_train_val(1000, 100, seed=0)
  assert len(parts.val_index) == 100 and len(parts.train_index) == 900
  assert not set(parts.val_index) & set(parts.train_index)
  assert set(parts.val_index) | set(parts.train_index) == set(range(1000))
  again = linear_eval.split_train_val(1000, 100, seed=0)
  np.testing.assert_array_equal(parts.val_index, again.val_index)
  capped = linear_eval.split_train_val(1000, 100, seed=0, max_train_examples=50)
  assert len(capped.train_index) == 50 and not set(capped.train_index) & set(parts.val_index)
  with pytest.raises(ValueError, match='config.eval.val_size'):
    linear_eval.split_train_val(10, 10, seed=0)


def test_the_test_split_is_read_only_after_the_probes_are_trained(tmp_path, monkeypatch):
  events = []
  real_load, real_train = input_pipeline.load_split, linear_eval.train_probes

  def load_split(config, split, **kwargs):
    events.append(f'load {split}')
    return real_load(config, split, **kwargs)

  def train_probes(*args, **kwargs):
    result = real_train(*args, **kwargs)
    events.append('probes trained')
    return result

  monkeypatch.setattr(input_pipeline, 'load_split', load_split)
  monkeypatch.setattr(linear_eval, 'train_probes', train_probes)
  config = tiny_eval_config()
  config.eval.random_init = True
  with tfds.testing.mock_data(num_examples=48):
    linear_eval.evaluate(config, str(tmp_path))
  assert events == ['load train', 'probes trained', 'load test']
