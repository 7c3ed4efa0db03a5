"""Gradient alignment of local rules with backprop on the VGG encoder."""

import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import clapp_cifar
from localssl import grad_align
from localssl import objectives
from localssl import train


def small_config(preset='both'):
  config = clapp_cifar.get_config(f'{preset},tiny')
  config.model.width_multiplier = 1 / 16
  config.batch_size = 8
  config.alignment_batches = 2
  return config


def batch(seed=0):
  config = small_config()
  return next(train.synthetic_data(config, 8).batches(seed))


@pytest.mark.parametrize('preset', ['both', 'dfb', 'lateral'])
def test_top_layer_is_exactly_bp_and_lower_layers_are_not(preset):
  config = small_config(preset)
  cosines = grad_align.make_alignment_fn(config)(train.initial_params(config), batch())
  rules = grad_align.comparable_rules(config)
  assert set(cosines) == {f'{r}/layer{l}' for r in rules for l in range(6)}
  for rule in rules:
    assert float(cosines[f'{rule}/layer5']) == pytest.approx(1.0, abs=1e-5)
    assert float(cosines[f'{rule}/layer0']) < 0.99


def test_local_update_of_a_layer_is_the_gradient_of_its_own_loss():
  config = small_config('lateral')
  params = train.initial_params(config)
  data = batch(1)
  layer = 2
  local = jax.grad(lambda p: objectives.layer_losses(config, p, data)[layer])(params)
  bp = jax.grad(lambda p: objectives.losses_and_metrics(config, p, data, local=False)[0][-1])(
      params)
  flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(
      g['encoder'][f'block{layer}_conv0'])])
  a, b = flat(local), flat(bp)
  expected = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
  got = grad_align.make_alignment_fn(config)(params, data)[f'lateral/layer{layer}']
  np.testing.assert_allclose(float(got), expected, rtol=1e-4, atol=1e-5)


def test_rules_follow_the_b_matrices_the_run_holds():
  assert grad_align.comparable_rules(small_config('both')) == ('lateral', 'dfb', 'both')
  assert grad_align.comparable_rules(small_config('dfb')) == ('dfb',)
  with pytest.raises(ValueError, match='already BP'):
    grad_align.comparable_rules(small_config('bp'))


def test_grad_align_mode_writes_json_and_plot(tmp_path):
  config = small_config()
  with tfds.testing.mock_data(num_examples=32):
    result = grad_align.run(config, str(tmp_path))
  with open(tmp_path / 'grad_align.json') as f:
    written = json.load(f)
  assert written['checkpoint_step'] is None and written['num_batches'] == 2
  assert written['cosine']['both']['layer5']['mean'] == pytest.approx(1.0, abs=1e-5)
  assert result['rules'] == ['lateral', 'dfb', 'both']
  assert os.path.getsize(tmp_path / 'grad_align.png') > 10_000
