"""The learning rules: locality, pairing, pooling, contexts, three-factor form, sizes."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import clapp_cifar
from configs import infonce_cifar
from localssl import config_lib
from localssl import models
from localssl import objectives
from localssl import optim
from localssl import validation

LOCAL_PRESETS = ('lateral', 'dfb', 'both', 'nospatial', 'ff', 'fixedb')


def small_config(preset: str, infonce: bool = False):
  config = (infonce_cifar if infonce else clapp_cifar).get_config(preset)
  config.model.width_multiplier = 1 / 16
  validation.validate(config)
  return config


def random_batch(num_images: int = 4, size: int = 32, seed: int = 0):
  key_a, key_b = jax.random.split(jax.random.key(seed))
  return {'view_a': jax.random.normal(key_a, (num_images, size, size, 3)),
          'view_b': jax.random.normal(key_b, (num_images, size, size, 3))}


def owner_of(path) -> int:
  """The layer a parameter belongs to, from its path (block{l}_conv / layer{l})."""
  names = [str(getattr(p, 'key', p)) for p in path]
  for name in names:
    for prefix in ('block', 'layer'):
      if name.startswith(prefix):
        return int(name[len(prefix):].split('_')[0])
  raise AssertionError(f'no layer in {names}')


def per_loss_gradients(config, params, batch):
  return jax.jacrev(lambda p: jnp.stack(objectives.layer_losses(config, p, batch)))(params)


@pytest.mark.parametrize('preset', LOCAL_PRESETS)
def test_each_layer_loss_reaches_only_its_own_parameters(preset):
  config = small_config(f'{preset}')
  if preset == 'fixedb':
    config.loss.context = 'both'
  params = objectives.init_params(config, jax.random.key(0))
  jacobians = per_loss_gradients(config, params, random_batch())
  num_layers = len(objectives.block_output_shapes(config))
  fixed_b = config.loss.predictor == 'fixed'

  def check(path, jacobian):
    owner = owner_of(path)
    names = [str(getattr(p, 'key', p)) for p in path]
    nonzero = [bool(jnp.any(jacobian[layer] != 0)) for layer in range(num_layers)]
    if fixed_b and names[0] == 'predictor':
      assert not any(nonzero), f'{names}: a fixed B must get no gradient'
      return
    assert nonzero == [layer == owner for layer in range(num_layers)], (
        f'{preset}: parameter {"/".join(names)} gets gradient from losses {nonzero}')

  jax.tree_util.tree_map_with_path(check, jacobians)


@pytest.mark.parametrize('preset,infonce', [('bp', False), ('', True), ('symmetric', True)])
def test_global_baselines_send_the_top_loss_into_the_first_block(preset, infonce):
  config = small_config(preset, infonce)
  params = objectives.init_params(config, jax.random.key(0))
  losses = objectives.layer_losses(config, params, random_batch())
  assert len(losses) == 1
  grads = jax.grad(lambda p: objectives.layer_losses(config, p, random_batch())[0])(params)
  for leaf in jax.tree.leaves(grads):
    assert jnp.any(leaf != 0)
  assert float(jnp.abs(grads['encoder']['block0_conv0']['kernel']).max()) > 0


def test_local_encoder_stops_gradient_between_blocks_and_bp_encoder_does_not():
  config = small_config('lateral')
  params = objectives.init_params(config, jax.random.key(0))
  batch = random_batch()
  for local, expect_flow in ((True, False), (False, True)):
    top_output = lambda p: jnp.sum(objectives.encode(config, p, batch, local=local)[-1])
    grads = jax.grad(top_output)(params)
    first = grads['encoder']['block0_conv0']['kernel']
    assert bool(jnp.any(first != 0)) == expect_flow


def loop_scores(z, predicted):
  """u+ and u- written row by row, as PAPER.md §2 says."""
  rows = z.shape[0]
  n = rows // 2
  positive = lambda i: (i + n) % rows
  u_pos = np.array([z[positive(i)] @ predicted[i] for i in range(rows)])
  u_neg = np.array([z[positive((i + 1) % rows)] @ predicted[i] for i in range(rows)])
  return u_pos, u_neg


def test_paired_scores_match_a_row_by_row_loop():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(10, 7))
  predicted = rng.normal(size=(10, 7))
  u_pos, u_neg = objectives.paired_scores(jnp.asarray(z), jnp.asarray(predicted))
  expected_pos, expected_neg = loop_scores(z, predicted)
  np.testing.assert_allclose(u_pos, expected_pos, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(u_neg, expected_neg, rtol=1e-5, atol=1e-5)
  # The negative of every row is another image: rows p(i+1) and p(i) differ modulo N.
  n = 5
  for i in range(10):
    assert (i + 1 + n) % 10 % n != (i + n) % 10 % n


def test_paired_scores_reject_batches_without_a_negative_image():
  with pytest.raises(ValueError, match='N >= 2'):
    objectives.paired_scores(jnp.ones((2, 3)), jnp.ones((2, 3)))


def loop_avgpool(h, k):
  n, height, width, c = h.shape
  out = np.zeros((n, height // k, width // k, c))
  for i, j in itertools.product(range(height // k), range(width // k)):
    out[:, i, j] = h[:, i * k:(i + 1) * k, j * k:(j + 1) * k].mean(axis=(1, 2))
  return out.reshape(n, -1)


@pytest.mark.parametrize('score_fn', ['hinge', 'softhinge', 'linear', 'phyll'])
@pytest.mark.parametrize('context', ['lateral', 'dfb', 'both'])
def test_layer_losses_match_a_direct_computation(context, score_fn):
  config = small_config(context)
  config.loss.score_fn = score_fn
  params = objectives.init_params(config, jax.random.key(1))
  batch = random_batch(seed=3)
  outputs = [np.asarray(o, np.float64) for o in objectives.encode(config, params, batch)]
  pools = config.loss.pool_sizes
  reps = [loop_avgpool(h, k) for h, k in zip(outputs, pools)]
  f = {'hinge': lambda x: np.maximum(0, 1 - x), 'softhinge': lambda x: np.logaddexp(0, 1 - x),
       'linear': lambda x: -x}.get(score_fn)

  def term(z, context_rows, kernel):
    u_pos, u_neg = loop_scores(z, context_rows @ kernel)
    if score_fn == 'phyll':
      return np.mean(np.logaddexp(0, u_neg - u_pos))
    return np.mean(f(u_pos) + f(-u_neg))

  top = len(reps) - 1
  expected = []
  for layer, z in enumerate(reps):
    kernel = lambda group: np.asarray(params['predictor'][group][f'layer{layer}']['kernel'])
    loss = 0.0
    if layer == top or context in ('lateral', 'both'):
      loss += term(z, z, kernel('lateral'))
    if layer != top and context in ('dfb', 'both'):
      loss += term(z, reps[top], kernel('feedback'))
    expected.append(loss)
  got = objectives.layer_losses(config, params, batch)
  np.testing.assert_allclose(np.array(got), np.array(expected), rtol=2e-4, atol=1e-5)


def test_pooled_representation_is_the_flattened_average_pool():
  h = np.random.default_rng(0).normal(size=(2, 8, 8, 3))
  for k in (1, 2, 4, 8):
    np.testing.assert_allclose(objectives.pooled_representation(jnp.asarray(h), k),
                               loop_avgpool(h, k), rtol=1e-5, atol=1e-6)


def test_info_nce_matches_a_direct_computation():
  for symmetric in (False, True):
    config = small_config('symmetric' if symmetric else '', infonce=True)
    params = objectives.init_params(config, jax.random.key(2))
    batch = random_batch(num_images=5)
    top = np.asarray(objectives.encode(config, params, batch)[-1], np.float64).mean(axis=(1, 2))
    p = top @ np.asarray(params['predictor']['projection']['kernel'], np.float64)
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    n, tau = 5, config.loss.temperature
    terms = []
    for i in range(2 * n if symmetric else n):
      candidates = [j for j in range(2 * n) if j != i] if symmetric else list(range(n, 2 * n))
      logits = np.array([p[i] @ p[j] / tau for j in candidates])
      target = candidates.index((i + n) % (2 * n))
      terms.append(-(logits[target] - np.log(np.sum(np.exp(logits)))))
    got = objectives.layer_losses(config, params, batch)[0]
    np.testing.assert_allclose(got, np.mean(terms), rtol=1e-4)


def test_hinge_update_of_a_dense_layer_is_the_three_factor_rule():
  """-dL/dW_ij = sum over pairs of gamma (B c)_j relu'(a_j) x_i, in float64."""
  with jax.enable_x64(True):
    config = small_config('lateral')
    rng = np.random.default_rng(0)
    n, d_in, d_out = 3, 5, 4
    x = rng.normal(size=(2 * n, d_in))
    w = rng.normal(size=(d_in, d_out))
    kernel = rng.normal(size=(d_out, d_out)) * 0.3

    def loss(w):
      z = jax.nn.relu(jnp.asarray(x) @ w)
      return objectives.clapp_term(z, z, jnp.asarray(kernel), config)[0]

    grad = np.asarray(jax.grad(loss)(jnp.asarray(w)))
    assert grad.dtype == np.float64
    a = x @ w
    predicted = np.maximum(a, 0) @ kernel  # B c_i, c_i = the row's own (lateral) activity
    u_pos, u_neg = loop_scores(np.maximum(a, 0), predicted)
    rows = 2 * n
    update = np.zeros((d_in, d_out))
    for i in range(rows):
      pos_row, neg_row = (i + n) % rows, (i + 1 + n) % rows
      gamma_pos = float(u_pos[i] < 1)  # +f'(u+) for the hinge: 1 while the hinge is active
      gamma_neg = -float(u_neg[i] > -1)
      # Each factor uses the paired sample's own activities (x and relu'(a)).
      update += gamma_pos * np.outer(x[pos_row], predicted[i] * (a[pos_row] > 0))
      update += gamma_neg * np.outer(x[neg_row], predicted[i] * (a[neg_row] > 0))
    assert 0 < np.sum(u_pos < 1) and 0 < np.sum(u_neg > -1)
    np.testing.assert_allclose(-grad, update / rows, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize('dataset,pools', [('cifar10', (4, 4, 4, 2, 2, 1)),
                                           ('stl10', (12, 12, 12, 6, 6, 3)),
                                           ('tiny_imagenet', (8, 8, 8, 4, 4, 2))])
def test_paper_pools_give_the_paper_dimensions(dataset, pools):
  config = config_lib.base_config(dataset)
  assert tuple(config.loss.pool_sizes) == pools
  assert objectives.representation_dims(config) == [8192, 4096, 4096, 8192, 4096, 4096]


@pytest.mark.parametrize('pools,message', [
    ((12, 12, 12, 6, 6, 3), r'loss.pool_sizes\[0\] = 12 .* layer 0, whose feature map is 32x32'),
    ((4, 4, 4, 2, 2, 3), r'loss.pool_sizes\[5\] = 3 .* layer 5, whose feature map is 2x2'),
    ((3, 4, 4, 2, 2, 1), r'loss.pool_sizes\[0\] = 3 .* 32x32'),
    ((4, 4, 4), r'3 entries but the encoder has 6 layers'),
])
def test_pools_that_do_not_fit_fail_with_the_layer_map_and_pool(pools, message):
  config = clapp_cifar.get_config()
  config.loss.pool_sizes = pools
  with pytest.raises(ValueError, match=message):
    validation.validate(config)


def test_parameter_counts_at_full_width():
  config = clapp_cifar.get_config('lateral')
  shapes = jax.eval_shape(lambda: objectives.init_params(config, jax.random.key(0)))
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  encoder, predictor = count(shapes['encoder']), count(shapes['predictor'])
  print(f'VGG-6 encoder: {encoder:,} parameters; lateral spatial B: {predictor:,}')
  assert encoder == 16_226_816
  assert predictor == 201_326_592
  nospatial = jax.eval_shape(lambda: objectives.init_params(
      clapp_cifar.get_config('nospatial'), jax.random.key(0)))
  assert count(nospatial['predictor']) == sum(c * c for c in (128, 256, 256, 512, 1024, 1024))


def test_torch_init_bounds_and_float32_parameters_under_bfloat16():
  config = small_config('lateral,bf16')
  params = objectives.init_params(config, jax.random.key(0))
  for leaf in jax.tree.leaves(params):
    assert leaf.dtype == jnp.float32
  kernel = params['encoder']['block1_conv0']['kernel']
  bound = 1 / np.sqrt(9 * kernel.shape[2])
  assert float(jnp.abs(kernel).max()) <= bound
  assert float(jnp.abs(kernel).max()) > 0.9 * bound
  outputs = objectives.encode(config, params, random_batch())
  assert outputs[0].dtype == jnp.bfloat16
  assert all(np.isfinite(float(l)) for l in objectives.layer_losses(config, params,
                                                                   random_batch()))


@pytest.mark.parametrize('size', [4, 6, 16])  # Small maps also run forward as matmuls.
def test_matmul_convolution_and_its_gradients_equal_xla(size):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, size, size, 5)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 5, 7)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(2, size, size, 7)), jnp.float32)
  np.testing.assert_allclose(models.conv3x3_patches(x, kernel),
                             models._conv_same(x, kernel), rtol=1e-4, atol=1e-4)  # pylint: disable=protected-access
  def loss(conv):
    return lambda x, k: jnp.sum(conv(x, k) * cotangent)
  xla = jax.grad(loss(models._conv_same), argnums=(0, 1))(x, kernel)  # pylint: disable=protected-access
  patches = jax.grad(loss(models.conv3x3_patches), argnums=(0, 1))(x, kernel)
  for a, b in zip(xla, patches):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_encoder_blocks_and_width_multiplier():
  blocks = models.parse_blocks(models.ARCH_BLOCKS['vgg6'], 0.25)
  assert blocks == (((32,), False), ((64,), True), ((64,), False), ((128,), True),
                    ((256,), True), ((256,), True))
  assert len(models.parse_blocks(models.ARCH_BLOCKS['vgg8'])) == 8
  with pytest.raises(ValueError, match='Block 1'):
    models.parse_blocks(((8,), ('M',)))


def test_optimizer_labels_cover_every_parameter_and_groups_are_separate():
  for preset in ('both', 'fixedb', 'bp'):
    config = small_config(preset)
    params = objectives.init_params(config, jax.random.key(0))
    labels = optim.param_labels(config, params)
    assert jax.tree.structure(labels) == jax.tree.structure(params)
    assert set(jax.tree.leaves(labels['encoder'])) == {'encoder'}
    expected = {'frozen'} if preset == 'fixedb' else {'predictor'}
    assert set(jax.tree.leaves(labels['predictor'])) == expected
  config = small_config('both')
  config.optim.per_layer = True
  params = objectives.init_params(config, jax.random.key(0))
  labels = optim.param_labels(config, params)
  assert labels['encoder']['block3_conv0']['kernel'] == 'encoder/layer3'
  assert labels['predictor']['feedback']['layer2']['kernel'] == 'predictor/layer2'


def test_a_label_without_a_transform_fails_at_init():
  config = small_config('lateral')
  params = objectives.init_params(config, jax.random.key(0))
  labels = optim.param_labels(config, params)
  tx = optax.partition({'encoder': optax.adamw(1e-3)}, labels)
  with pytest.raises(Exception, match='predictor'):
    tx.init(params)


def test_groups_get_their_own_learning_rates_and_fixed_b_never_moves():
  config = small_config('fixedb')
  config.optim.predictor_learning_rate = 1e-2
  params = objectives.init_params(config, jax.random.key(0))
  tx, schedules = optim.make_optimizer(config, params, total_steps=10, steps_per_epoch=5)
  assert set(schedules) == {'encoder'}
  grads = jax.grad(lambda p: sum(objectives.layer_losses(config, p, random_batch())))(params)
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates['predictor']))
  config = small_config('lateral')
  config.optim.predictor_learning_rate = 1e-2
  _, schedules = optim.make_optimizer(config, params, 10, 5)
  assert float(schedules['predictor'](0)) == pytest.approx(1e-2)
  assert float(schedules['encoder'](0)) == pytest.approx(2e-4)


def test_identity_predictor_needs_equal_sizes():
  config = clapp_cifar.get_config('ff')
  config.loss.context = 'dfb'
  with pytest.raises(ValueError, match='identity'):
    validation.validate(config)


def test_encoder_gradients_agree_across_convolution_implementations():
  config = small_config('both')
  params = objectives.init_params(config, jax.random.key(0))
  grads = {}
  for impl in ('xla', 'patches'):
    config.model.conv_impl = impl
    grads[impl] = jax.grad(lambda p: sum(objectives.layer_losses(config, p, random_batch())))(
        params)
  for a, b in zip(jax.tree.leaves(grads['xla']), jax.tree.leaves(grads['patches'])):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-5)
  assert models.use_matmul_conv('cpu_auto', 128, 256)
  assert not models.use_matmul_conv('cpu_auto', 64, 128)
  assert models.use_matmul_conv('patches', 3, 8) and not models.use_matmul_conv('xla', 512, 512)
