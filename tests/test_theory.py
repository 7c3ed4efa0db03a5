"""The deep-linear-network theory of PAPER.md §6, checked exactly in float64."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from localssl.theory import alignment
from localssl.theory import losses
from localssl.theory import networks
from localssl.theory import optimal_b

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def float64():
  # Scoped to each test, so other test files in the same session keep JAX's default.
  with jax.enable_x64(True):
    yield


def view_pairs(seed: int, num_images: int, dim: int, noise: float = 0.3) -> jax.Array:
  """Rows [a_1..a_N, b_1..b_N] with b_i a noisy copy of a_i (positive pairs correlate)."""
  key_a, key_b = jax.random.split(jax.random.key(seed))
  a = jax.random.normal(key_a, (num_images, dim))
  return jnp.concatenate([a, a + noise * jax.random.normal(key_b, (num_images, dim))])


def mlp(widths, activation='linear', init='orthogonal', in_dim=None, seed=0):
  spec = networks.NetSpec('mlp', tuple(widths), activation)
  return spec, networks.init_params(jax.random.key(seed), spec, in_dim or widths[0], init)


# ----------------------------------------------------------------------------- building blocks


def test_float64_is_used_and_required():
  spec, params = mlp((8, 8, 8))
  x = view_pairs(0, 4, 8)
  comp = alignment.compare_batch(params, spec, x)
  assert x.dtype == jnp.float64 and params[0].dtype == jnp.float64
  assert all(b.dtype == jnp.float64 for b in comp.local_bs)
  assert all(g.dtype == jnp.float64 for g in comp.local_grads + comp.bp_grads)
  with jax.enable_x64(False):
    with pytest.raises(RuntimeError, match='float64'):
      optimal_b.require_float64()


def test_pairing_follows_the_paper():
  pos, neg = losses.pair_indices(8)  # N = 4: rows a_1..a_4, b_1..b_4
  np.testing.assert_array_equal(pos, [4, 5, 6, 7, 0, 1, 2, 3])
  np.testing.assert_array_equal(neg, pos[[1, 2, 3, 4, 5, 6, 7, 0]])
  # The negative is always another image than the row's own.
  assert np.all(neg % 4 != np.arange(8) % 4)
  with pytest.raises(ValueError):
    losses.pair_indices(2)


def test_scores_and_losses_match_their_definitions():
  reps = view_pairs(1, 3, 5)
  b = jax.random.normal(jax.random.key(2), (5, 5))
  c = reps  # lateral context
  pos, neg = losses.pair_indices(6)
  u_pos = jnp.einsum('id,de,ie->i', reps[pos], b, c)
  u_neg = jnp.einsum('id,de,ie->i', reps[neg], b, c)
  expected = {
      'softplus': jax.nn.softplus(1 - u_pos) + jax.nn.softplus(1 + u_neg),
      'linear': u_neg - u_pos,
      'hinge': jnp.maximum(0, 1 - u_pos) + jnp.maximum(0, 1 + u_neg),
      'phyll': jax.nn.softplus(u_neg - u_pos),
  }
  for f, per_row in expected.items():
    t, cc = losses.build_terms(reps, c, f)
    got = losses.term_loss(b, t, cc, f, 0.01, losses.term_weight(6))
    want = per_row.mean() + 0.005 * jnp.sum(b * b)
    np.testing.assert_allclose(got, want, rtol=1e-13)


def test_context_is_stop_gradiented():
  reps = view_pairs(3, 3, 4)
  b = jax.random.normal(jax.random.key(4), (4, 4))

  def loss(targets, contexts):
    t, c = losses.build_terms(targets, contexts, 'softplus')
    return losses.term_loss(b, t, c, 'softplus', 0.01, 1 / 6)

  grad_targets, grad_contexts = jax.grad(loss, argnums=(0, 1))(reps, reps)
  assert float(jnp.abs(grad_targets).max()) > 0
  assert float(jnp.abs(grad_contexts).max()) == 0


def test_patch_conv_equals_lax_conv():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  kernel = jax.random.normal(jax.random.key(1), (2, 2, 3, 5))
  spec = networks.NetSpec('cnn', (5,), 'linear')
  got = networks.forward([kernel], spec, x, local=False)[0]
  want = jax.lax.conv_general_dilated(x, kernel, (2, 2), 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(got, want, atol=1e-13)


def test_pool_larger_than_map_is_an_error():
  with pytest.raises(ValueError, match='does not divide'):
    networks.pool_and_flatten(jnp.zeros((1, 2, 2, 3)), 4)


# ----------------------------------------------------------------------------- optimal B


@pytest.mark.parametrize('f', ['softplus', 'phyll', 'linear'])
def test_optimal_b_has_zero_gradient(f):
  reps = view_pairs(5, 8, 20)
  t, c = losses.build_terms(reps, reps, f)
  sol = optimal_b.solve_optimal_b(t, c, f, 0.01, losses.term_weight(16))
  grad = optimal_b.b_gradient(sol.b, t, c, f, 0.01, losses.term_weight(16))
  assert float(jnp.linalg.norm(grad)) < 1e-12
  assert sol.residual < 1e-12
  # It is the minimum: every random direction increases the loss.
  loss = lambda b: losses.term_loss(b, t, c, f, 0.01, losses.term_weight(16))
  for i in range(5):
    direction = jax.random.normal(jax.random.key(i), sol.b.shape)
    assert loss(sol.b + 1e-3 * direction) > loss(sol.b)
  # The coefficients are dL/ds at the optimum.
  np.testing.assert_allclose(
      sol.coeffs, losses.term_weight(16) * losses.h_derivatives(f, losses.scores(sol.b, t, c))[0],
      atol=1e-15)


def test_linear_f_optimum_is_the_closed_form():
  reps = view_pairs(6, 6, 10)
  pos, neg = losses.pair_indices(12)
  sol = optimal_b.solve_optimal_b(*losses.build_terms(reps, reps, 'linear'), 'linear', 0.01,
                                  1 / 12)
  closed = (reps[pos] - reps[neg]).T @ reps / (0.01 * 12)
  np.testing.assert_allclose(sol.b, closed, atol=1e-12)


def test_hinge_optimum_is_certified_by_the_dual():
  reps = view_pairs(7, 8, 6)
  t, c = losses.build_terms(reps, reps, 'hinge')
  weight = losses.term_weight(16)
  sol = optimal_b.solve_optimal_b(t, c, 'hinge', 0.01, weight)
  assert abs(sol.residual) < 1e-12  # relative primal-dual gap
  # KKT: alpha = 1 below the margin, 0 above, in between only on it.
  alpha = -np.asarray(sol.coeffs) / weight
  s = np.asarray(losses.scores(sol.b, t, c))
  assert np.all(alpha[s < 1 - 1e-9] == 1) and np.all(alpha[s > 1 + 1e-9] == 0)
  loss = lambda b: losses.term_loss(b, t, c, 'hinge', 0.01, weight)
  for i in range(5):
    direction = jax.random.normal(jax.random.key(i), sol.b.shape)
    assert loss(sol.b + 1e-4 * direction) >= loss(sol.b)


def test_fixed_coefficients_give_the_true_gradient_for_smooth_f():
  spec, params = mlp((6, 6, 6))
  x = view_pairs(8, 4, 6)
  reps = alignment.representations(params, spec, x)
  sols = alignment.solve_layer_bs(reps, 'lateral', 'softplus', 0.01)
  bs = [s.b for s in sols]
  true = alignment.gradients(params, x, bs, [None] * 3, 0.01, spec=spec, model='local',
                             context='lateral', f='softplus')
  fixed = alignment.gradients(params, x, bs, [s.coeffs for s in sols], 0.01, spec=spec,
                              model='local', context='lateral', f='softplus')
  for a, b in zip(jax.tree.leaves(true), jax.tree.leaves(fixed)):
    np.testing.assert_allclose(a, b, atol=1e-14)


# ----------------------------------------------------------------------------- Theorem 3.1


@pytest.mark.parametrize('f', ['softplus', 'phyll', 'linear', 'hinge'])
@pytest.mark.parametrize('context', ['lateral', 'dfb'])
def test_theorem_3_1_exact_equivalence(f, context):
  width = 16
  spec, params = mlp((width,) * 5, seed=1)
  x = view_pairs(10, 8, width)
  comp = alignment.compare_batch(params, spec, x, context=context, f=f)
  assert np.all(comp.weight_cos >= 1 - 1e-9), comp.weight_cos
  assert np.all(comp.error_cos >= 1 - 1e-9), comp.error_cos
  assert np.all(comp.weight_dist <= 1e-9)
  qs = [np.asarray(q) for q in alignment.top_maps(params, spec, (width,))]
  top = np.asarray(comp.local_bs[-1])
  for q, b in zip(qs, comp.local_bs):
    expected = q.T @ top @ q if context == 'lateral' else q.T @ top
    np.testing.assert_allclose(b, expected, atol=1e-8)


@pytest.mark.parametrize('activation,init', [('linear', 'default'), ('relu', 'orthogonal')])
def test_breaking_an_assumption_breaks_the_equivalence(activation, init):
  spec, params = mlp((16,) * 5, activation, init, seed=2)
  comp = alignment.compare_batch(params, spec, view_pairs(11, 8, 16))
  assert comp.weight_cos[0] < 0.99
  assert comp.weight_cos[-1] >= 1 - 1e-9  # the top layer's loss is the global loss


# ----------------------------------------------------------------------------- Theorem 3.3


def feedback_gaps(spec, params, x, in_dim):
  """Per layer l < L: ||B_eff - Q^T B^L Q||_F for lateral and DFB, and the gradient distances.

  The effective feedback matrix acting on the layer-l context is B^l (lateral) and B^l Q_l
  (DFB: c^L = Q_l z^l); BP's is Q_l^T B^L_* Q_l.
  """
  lat = alignment.compare_batch(params, spec, x, context='lateral', f='linear')
  dfb = alignment.compare_batch(params, spec, x, context='dfb', f='linear')
  qs = [np.asarray(q) for q in alignment.top_maps(params, spec, (in_dim,))]
  top = np.asarray(lat.local_bs[-1])
  gaps = [(np.linalg.norm(np.asarray(bl) - q.T @ top @ q),
           np.linalg.norm(np.asarray(bd) @ q - q.T @ top @ q))
          for q, bl, bd in zip(qs[:-1], lat.local_bs, dfb.local_bs)]
  return np.array(gaps), lat, dfb


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_theorem_3_3_dfb_is_closer_to_bp(seed):
  spec, params = mlp((128, 64, 32, 16, 8, 4), in_dim=144, seed=seed)
  x = view_pairs(20 + seed, 16, 144)
  gaps, lat, dfb = feedback_gaps(spec, params, x, 144)
  # Exact statement (linear f): the DFB feedback matrix is at least as close to BP's.
  assert np.all(gaps[:, 1] <= gaps[:, 0] * (1 + 1e-12))
  # And so are the weight updates, in every layer below the top (equal at the top).
  assert np.all(dfb.weight_dist[:-1] <= lat.weight_dist[:-1])
  assert np.all(dfb.weight_cos[:-1] >= lat.weight_cos[:-1])
  np.testing.assert_allclose(dfb.weight_dist[-1], 0, atol=1e-12)


def test_theorem_3_3_gradient_form_is_not_an_identity():
  # A tiny semi-orthogonal net (6 -> 4 -> 2 -> 1, N = 2) where the DFB *weight update* is
  # further from BP than the lateral one in layer 2, although the feedback-matrix inequality
  # (the exact statement) still holds: the update also multiplies B by the batch's context
  # differences, which can favour either rule.
  spec, params = mlp((4, 2, 1), in_dim=6, seed=470)
  x = jax.random.normal(jax.random.key(1470), (4, 6))
  gaps, lat, dfb = feedback_gaps(spec, params, x, 6)
  assert np.all(gaps[:, 1] <= gaps[:, 0] * (1 + 1e-12))
  assert dfb.weight_dist[1] > 1.2 * lat.weight_dist[1]


# ----------------------------------------------------------------------------- Proposition 3.5


def orthogonal_cnn(pools):
  # 8x8x1 -> 4x4x4 -> 2x2x16 -> 1x1x64: kernel 2 / stride 2 with square orthogonal
  # (4 C_in x C_out) kernels, so every flattened layer map is an orthogonal 64 x 64 matrix.
  spec = networks.NetSpec('cnn', (4, 16, 64), 'linear', pools=pools)
  return spec, networks.init_params(jax.random.key(3), spec, 1, 'orthogonal')


def image_pairs():
  x = jax.random.normal(jax.random.key(4), (12, 8, 8, 1))
  return x.at[6:].set(x[:6] + 0.3 * jax.random.normal(jax.random.key(5), (6, 8, 8, 1)))


def test_proposition_3_5_no_pooling_is_exact():
  spec, params = orthogonal_cnn((1, 1, 1))
  x = image_pairs()
  for context in ('lateral', 'dfb'):
    comp = alignment.compare_batch(params, spec, x, context=context)
    assert np.all(comp.weight_cos >= 1 - 1e-9), (context, comp.weight_cos)
    assert np.all(comp.error_cos >= 1 - 1e-9), (context, comp.error_cos)


def test_proposition_3_5_pooling_breaks_it():
  spec, params = orthogonal_cnn((4, 2, 1))  # global average pool before every loss
  comp = alignment.compare_batch(params, spec, image_pairs())
  assert comp.weight_cos[0] < 0.99
  assert comp.weight_cos[-1] >= 1 - 1e-9  # no pooling at the 1x1 top


# ----------------------------------------------------------------------------- experiments


def test_experiment_commands_write_json_and_png(tmp_path):
  experiments = ('fig2', 'fig3a', 'fig3b', 'fig4b')
  # One process runs the four commands in turn (repeated --experiment), to keep this fast.
  cmd = [sys.executable, '-m', 'localssl.theory', f'--out={tmp_path}', '--synthetic',
         '--num_batches=2', '--batch_images=2', '--num_images=16', '--train_steps=2',
         '--oracle_steps=2', '--width=16'] + [f'--experiment={e}' for e in experiments]
  path = os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH')) if p)
  # Tiny runs are dominated by XLA compilation; unoptimised CPU code compiles faster.
  env = dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_backend_optimization_level=0')
  subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
  for experiment in experiments:
    with open(tmp_path / f'{experiment}.json') as fh:
      result = json.load(fh)
    assert result['experiment'] == experiment and result['settings']['dtype'] == 'float64'
    for curve in result['curves']:
      num_layers = len(curve['layers'])
      for key in ('weight_cos_mean', 'weight_cos_sem', 'error_cos_mean', 'error_cos_sem'):
        assert len(curve[key]) == num_layers and all(np.isfinite(curve[key]))
      assert abs(curve['weight_cos_mean'][-1] - 1) < 1e-9  # top layer = global loss
    with open(tmp_path / f'{experiment}.png', 'rb') as fh:
      assert fh.read(8) == b'\x89PNG\r\n\x1a\n'
