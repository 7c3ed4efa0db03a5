"""Local vs BP gradients at the optimal B: the measurement protocol of PAPER.md §6.

For one batch and frozen weights W:
  1. fit the top B of the global (BP) model to its exact optimum B^L_*;
  2. copy it to the local model's top layer and fit every lower B^l to its own optimum (or
     use given fixed B^l, for the random / oracle baselines);
  3. compute the local gradients (sum of layer losses, every layer's input stop-gradiented)
     and the BP gradients (top loss only, no stop-gradient), and, per layer, the cosine
     similarity of the flattened weight updates dL/dW^l and of the errors dL/dz^l.

Global loss: L_global = L^L(B^L; targets s^L, context sg(s^L)), differentiated through all W.
Local loss: sum_l L^l(B^l; targets s^l, context sg(c^l)), c^l = s^l (lateral) or s^L (DFB).

What holds exactly (tests/test_theory.py), with Q_l = W^L ... W^{l+1} and P_l = Q_l^T Q_l:
  * Theorem 3.1 (square orthogonal W^2..W^L, linear): for every convex f here (softplus,
    phyll, linear, hinge) B^l_* = Q_l^T B^L_* Q_l (lateral) or Q_l^T B^L_* (DFB) and the local
    update equals BP's. Why: z^l = Q_l^T z^L, so L^l(B) = L^L(Q_l B Q_l^T) (lateral) and
    ||Q_l B Q_l^T|| = ||B||; the scores, hence dL/ds, then agree in every layer. The penalty
    lambda > 0 is needed: without it linear f is unbounded below and softplus has no
    minimiser on separable batches; and it must be orthogonally invariant (Frobenius).
    W^1 need not be square: it only multiplies the input.
  * Theorem 3.3 (semi-orthogonal, shrinking widths): the three optima minimise the same
    convex function over nested subspaces {P B P} (BP) c {B P} (DFB) c {all B} (lateral) of
    effective feedback matrices acting on the layer's context. For linear f the Hessian is
    lambda I, so each optimum is the orthogonal projection of the lateral one and
    ||B_DFB Q_l - Q_l^T B^L_* Q_l||_F <= ||B_lat - Q_l^T B^L_* Q_l||_F exactly. The weight
    updates multiply B by batch-dependent context differences, so for them the inequality is
    typical (every layer and seed at widths 128-64-32-16-8-4) but not an identity: tiny
    networks give counterexamples. For softplus f the Hessian is not isotropic and the
    inequality can fail (fig3a: DFB ~ lateral in the first layers).
  * Proposition 3.5: a linear stride = kernel CNN whose flattened layer maps are orthogonal
    is a Theorem 3.1 network when B ranges over all (channel, position) pairs (no pooling);
    average pooling before the loss gives every position of a pooling window the same error.
"""

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from localssl.theory import losses
from localssl.theory import networks
from localssl.theory import optimal_b


@dataclasses.dataclass(frozen=True)
class BatchComparison:
  """Per-layer comparison of local and BP updates on one batch.

  Attributes:
    weight_cos: (L,) cosine between the flattened local and BP dL/dW^l.
    error_cos: (L,) cosine between the flattened local and BP dL/dz^l.
    weight_dist: (L,) ||dW_local - dW_BP||_F / ||dW_BP||_F.
    local_bs: the B^l used by the local model (top = the global optimum).
    residuals: relative optimality certificate of every fitted B (||dL/dB|| / ||dL/dB at
      0||, or the hinge's relative duality gap); nan for fixed B.
    b_grad_norms: ||dL/dB^l||_F of every fitted B (the hinge: its duality gap); nan if fixed.
    local_grads: the local dL/dW^l.
    bp_grads: the BP dL/dW^l.
  """
  weight_cos: np.ndarray
  error_cos: np.ndarray
  weight_dist: np.ndarray
  local_bs: list[jax.Array]
  residuals: np.ndarray
  b_grad_norms: np.ndarray
  local_grads: list[jax.Array]
  bp_grads: list[jax.Array]


def cosine(a: jax.Array, b: jax.Array) -> float:
  """Cosine similarity of two flattened arrays (nan if either is zero)."""
  a, b = np.ravel(np.asarray(a)), np.ravel(np.asarray(b))
  denom = np.linalg.norm(a) * np.linalg.norm(b)
  return float(a @ b / denom) if denom > 0 else float('nan')


def layer_terms(reps: Sequence[jax.Array], context: str, f: str
                ) -> list[tuple[jax.Array, jax.Array]]:
  """The (T, C) term matrices of every layer's local loss."""
  contexts = losses.context_reps(reps, context)
  return [losses.build_terms(r, ctx, f) for r, ctx in zip(reps, contexts)]


def _perturbations(params, spec, x):
  shapes = jax.eval_shape(
      lambda p: networks.forward(p, spec, x, local=True), params)
  return [jnp.zeros(s.shape, s.dtype) for s in shapes]


def global_loss(params: networks.Params, spec: networks.NetSpec, x: jax.Array,
                b_top: jax.Array, f: str, lam: float, coeffs: jax.Array | None = None,
                perturb: Sequence[jax.Array] | None = None) -> jax.Array:
  """The BP-SSL loss: the loss at the top layer only, gradients through every layer.

  Args:
    params: weights.
    spec: network.
    x: batch, rows [a_1..a_N, b_1..b_N].
    b_top: B^L.
    f: loss name.
    lam: L2 penalty on B.
    coeffs: optional fixed dL/ds (see losses.term_loss; used for the hinge optimum).
    perturb: optional zeros added to every z^l (to read off dL/dz^l).

  Returns:
    Scalar loss.
  """
  reps = networks.readouts(spec, networks.forward(params, spec, x, local=False,
                                                  perturb=perturb))
  t, c = losses.build_terms(reps[-1], reps[-1], f)
  return losses.term_loss(b_top, t, c, f, lam, losses.term_weight(x.shape[0]), coeffs)


def local_loss(params: networks.Params, spec: networks.NetSpec, x: jax.Array,
               bs: Sequence[jax.Array], context: str, f: str, lam: float,
               coeffs: Sequence[jax.Array | None] | None = None,
               perturb: Sequence[jax.Array] | None = None) -> jax.Array:
  """The sum of the layer-local losses (each layer's input and context stop-gradiented).

  Args:
    params: weights.
    spec: network.
    x: batch.
    bs: B^1..B^L.
    context: 'lateral' or 'dfb'.
    f: loss name.
    lam: L2 penalty on every B^l.
    coeffs: optional per-layer fixed dL/ds (None entries use the true loss).
    perturb: optional zeros added to every z^l.

  Returns:
    Scalar sum of the L layer losses.
  """
  reps = networks.readouts(spec, networks.forward(params, spec, x, local=True,
                                                  perturb=perturb))
  weight = losses.term_weight(x.shape[0])
  coeffs = coeffs if coeffs is not None else [None] * len(bs)
  total = 0.0
  for b, (t, c), co in zip(bs, layer_terms(reps, context, f), coeffs):
    total = total + losses.term_loss(b, t, c, f, lam, weight, co)
  return total


@functools.partial(jax.jit, static_argnames=('spec', 'model', 'context', 'f'))
def gradients(params: networks.Params, x: jax.Array, bs: Sequence[jax.Array],
              coeffs: Sequence[jax.Array | None], lam: float, *, spec: networks.NetSpec,
              model: str, context: str, f: str
              ) -> tuple[list[jax.Array], list[jax.Array]]:
  """dL/dW^l and dL/dz^l for every layer, of the local or the global model.

  Args:
    params: weights.
    x: batch.
    bs: B^1..B^L (local) or [B^L] (global).
    coeffs: same length as bs; fixed dL/ds or None.
    lam: L2 penalty on B.
    spec: network.
    model: 'local' or 'global'.
    context: 'lateral' or 'dfb' (ignored for the global model).
    f: loss name.

  Returns:
    (weight gradients, errors dL/dz^l), each a list of L arrays.
  """
  perturb = _perturbations(params, spec, x)
  if model == 'global':
    fn = lambda p, e: global_loss(p, spec, x, bs[0], f, lam, coeffs[0], e)
  elif model == 'local':
    fn = lambda p, e: local_loss(p, spec, x, bs, context, f, lam, coeffs, e)
  else:
    raise ValueError(f'model must be "local" or "global", got {model!r}.')
  return jax.grad(fn, argnums=(0, 1))(params, perturb)


@functools.partial(jax.jit, static_argnames=('spec',))
def representations(params: networks.Params, spec: networks.NetSpec, x: jax.Array
                    ) -> list[jax.Array]:
  """The per-layer readouts s^l of a batch (values, W frozen)."""
  return networks.readouts(spec, networks.forward(params, spec, x, local=True))


def solve_layer_bs(reps: Sequence[jax.Array], context: str, f: str, lam: float,
                   top: optimal_b.BSolution | None = None) -> list[optimal_b.BSolution]:
  """The optimal B^l of every local layer loss; the top one is `top` if given (the copy).

  Args:
    reps: readouts s^1..s^L.
    context: 'lateral' or 'dfb'.
    f: loss name.
    lam: L2 penalty.
    top: the global model's optimal B^L, copied to the local top layer.

  Returns:
    L BSolutions.
  """
  weight = losses.term_weight(reps[0].shape[0])
  terms = layer_terms(reps, context, f)
  sols = [optimal_b.solve_optimal_b(t, c, f, lam, weight) for t, c in terms[:-1]]
  if top is None:
    top = optimal_b.solve_optimal_b(*terms[-1], f, lam, weight)
  return sols + [top]


def solve_global_b(reps: Sequence[jax.Array], f: str, lam: float) -> optimal_b.BSolution:
  """The optimal B^L of the global model (top layer, lateral context = its own top)."""
  t, c = losses.build_terms(reps[-1], reps[-1], f)
  return optimal_b.solve_optimal_b(t, c, f, lam, losses.term_weight(reps[-1].shape[0]))


def compare_batch(params: networks.Params, spec: networks.NetSpec, x: jax.Array, *,
                  context: str = 'lateral', f: str = 'softplus',
                  lam: float = losses.DEFAULT_LAMBDA,
                  fixed_bs: Sequence[jax.Array] | None = None) -> BatchComparison:
  """Runs the PAPER.md §6 protocol on one batch and compares local with BP updates.

  Args:
    params: frozen weights.
    spec: network.
    x: batch, rows [a_1..a_N, b_1..b_N].
    context: 'lateral' or 'dfb'.
    f: loss name.
    lam: L2 penalty on B (0.01 in the paper).
    fixed_bs: optional B^1..B^{L-1} to use instead of the optimal ones (random-B and oracle
      baselines); the top B is always the global optimum.

  Returns:
    A BatchComparison.
  """
  optimal_b.require_float64()
  reps = representations(params, spec, x)
  top = solve_global_b(reps, f, lam)
  use_dual = f == 'hinge'
  if fixed_bs is None:
    sols = solve_layer_bs(reps, context, f, lam, top)
    local_bs = [s.b for s in sols]
    local_coeffs = [s.coeffs if use_dual else None for s in sols]
    residuals = np.array([s.relative_residual for s in sols])
    b_grad_norms = np.array([s.residual for s in sols])
  else:
    if len(fixed_bs) != spec.num_layers - 1:
      raise ValueError(f'fixed_bs needs {spec.num_layers - 1} matrices, got {len(fixed_bs)}.')
    local_bs = list(fixed_bs) + [top.b]
    local_coeffs = [None] * (spec.num_layers - 1) + [top.coeffs if use_dual else None]
    residuals = np.array([np.nan] * (spec.num_layers - 1) + [top.relative_residual])
    b_grad_norms = np.array([np.nan] * (spec.num_layers - 1) + [top.residual])
  bp_w, bp_e = gradients(params, x, [top.b], [top.coeffs if use_dual else None], lam,
                         spec=spec, model='global', context='lateral', f=f)
  loc_w, loc_e = gradients(params, x, local_bs, local_coeffs, lam, spec=spec,
                           model='local', context=context, f=f)
  weight_cos = np.array([cosine(a, b) for a, b in zip(loc_w, bp_w)])
  error_cos = np.array([cosine(a, b) for a, b in zip(loc_e, bp_e)])
  weight_dist = np.array([np.linalg.norm(np.asarray(a) - np.asarray(b)) /
                          np.linalg.norm(np.asarray(b)) for a, b in zip(loc_w, bp_w)])
  return BatchComparison(weight_cos=weight_cos, error_cos=error_cos,
                         weight_dist=weight_dist, local_bs=local_bs, residuals=residuals,
                         b_grad_norms=b_grad_norms,
                         local_grads=list(loc_w), bp_grads=list(bp_w))


def top_maps(params: networks.Params, spec: networks.NetSpec, in_shape: tuple[int, ...]
             ) -> list[jax.Array]:
  """Q_l = M_L ... M_{l+1} for every layer l (Q_L = I), for a linear, unpooled network.

  M_l is the flattened linear map of layer l (networks.flat_layer_matrix), so for an MLP
  Q_l = W^L ... W^{l+1}.

  Args:
    params: weights.
    spec: network (its activation is ignored; pooling must be absent).
    in_shape: shape of one input example.

  Returns:
    [Q_1, ..., Q_L], Q_l of shape (d_L, d_l).
  """
  if spec.kind == 'mlp':
    maps = [np.asarray(w) for w in params]
  else:
    maps, shape = [], tuple(in_shape)
    for weight in params:
      maps.append(np.asarray(networks.flat_layer_matrix(spec, weight, shape)))
      shape = (shape[0] // spec.kernel, shape[1] // spec.kernel, weight.shape[-1])
  qs = [np.eye(maps[-1].shape[0])]
  for m in reversed(maps[1:]):
    qs.insert(0, qs[0] @ m)
  return [jnp.asarray(q) for q in qs]
