"""The local-SSL loss family of PAPER.md §1-2 in the "term" form used by the theory.

Batch layout (PAPER.md §2): rows [a_1..a_N, b_1..b_N] (2N rows). Row i's context is
c_i = sg(context representation of row i); its positive target is the other view of the same
image, row p(i) = (i + N) mod 2N; its negative target is the positive target of the next row,
row p(i + 1). Scores use one matrix B per layer: u = z^T B c.

Every loss is written as a weighted sum of scalar convex functions of bilinear scores,

    L(B) = w * sum_k h(s_k) + (lambda / 2) ||B||_F^2,    s_k = t_k^T B c_k,    w = 1 / 2N,

(the mean over the 2N rows) with one "term" k per (target vector t_k, context c_k):
  * 'softplus' (the paper's theory, "type 2" softhinge f(x) = softplus(1 - x), called
    'logsig' in the authors' code): L_i = f(u+_i) + f(-u-_i). Terms (t = z+_i, c_i) and
    (t = -z-_i, c_i), h = f. This is the default.
  * 'linear' f(x) = -x, type 2: L_i = u-_i - u+_i (same terms, h(s) = -s).
  * 'hinge' f(x) = max(0, 1 - x), type 2 (CLAPP).
  * 'phyll' ("type 1"): L_i = softplus(u-_i - u+_i). One term (t = z-_i - z+_i, c_i),
    h = softplus.
Writing the loss this way makes the optimal-B problem a regularised generalised linear
model in B (see optimal_b.py) and keeps the pairing in one place.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

LOSSES = ('softplus', 'linear', 'hinge', 'phyll')
CONTEXTS = ('lateral', 'dfb')
DEFAULT_LAMBDA = 0.01


def check_loss(f: str) -> None:
  """Raises ValueError if `f` is not a known loss name."""
  if f not in LOSSES:
    raise ValueError(f'Unknown loss f={f!r}; expected one of {LOSSES}.')


def pair_indices(num_rows: int) -> tuple[np.ndarray, np.ndarray]:
  """The positive and negative target rows of every row (PAPER.md §2).

  Args:
    num_rows: 2N, the number of rows [a_1..a_N, b_1..b_N].

  Returns:
    (pos, neg): pos[i] = (i + N) mod 2N, neg[i] = pos[(i + 1) mod 2N].

  Raises:
    ValueError: if num_rows is odd or < 4 (then the negative could be the same image).
  """
  if num_rows % 2 or num_rows < 4:
    raise ValueError(f'Need an even number >= 4 of rows (two views of N >= 2 images), '
                     f'got {num_rows}.')
  rows = np.arange(num_rows)
  pos = (rows + num_rows // 2) % num_rows
  neg = pos[(rows + 1) % num_rows]
  return pos, neg


def build_terms(targets: jax.Array, contexts: jax.Array, f: str
                ) -> tuple[jax.Array, jax.Array]:
  """Builds the term matrices (T, C) with s_k = T[k] @ B @ C[k].

  Args:
    targets: (2N, d_t) representations that receive gradient (the layer's own z).
    contexts: (2N, d_c) context representations; stop-gradiented here (the asymmetric form:
      no weight transport, PAPER.md §1).
    f: loss name.

  Returns:
    T of shape (M, d_t) and C of shape (M, d_c), M = 4N for type 2 losses, 2N for 'phyll'.
  """
  check_loss(f)
  contexts = jax.lax.stop_gradient(contexts)
  pos, neg = pair_indices(targets.shape[0])
  if f == 'phyll':
    return targets[neg] - targets[pos], contexts
  return (jnp.concatenate([targets[pos], -targets[neg]]),
          jnp.concatenate([contexts, contexts]))


def term_weight(num_rows: int) -> float:
  """w = 1 / 2N: every loss is a mean over the 2N rows."""
  return 1.0 / num_rows


def scores(b: jax.Array, t: jax.Array, c: jax.Array) -> jax.Array:
  """s_k = t_k^T B c_k for every term."""
  return jnp.sum((t @ b) * c, axis=1)


def h_value(f: str, s: jax.Array) -> jax.Array:
  """The scalar function h of one term (see the module docstring)."""
  if f == 'softplus':
    return jax.nn.softplus(1.0 - s)
  if f == 'linear':
    return -s
  if f == 'hinge':
    return jnp.maximum(0.0, 1.0 - s)
  if f == 'phyll':
    return jax.nn.softplus(s)
  raise ValueError(f'Unknown loss f={f!r}.')


def h_derivatives(f: str, s: jax.Array) -> tuple[jax.Array, jax.Array]:
  """h'(s) and h''(s) of a smooth loss (hinge has no second derivative: not accepted).

  Args:
    f: 'softplus', 'linear' or 'phyll'.
    s: scores.

  Returns:
    (h', h'').
  """
  if f == 'softplus':
    sig = jax.nn.sigmoid(1.0 - s)
    return -sig, sig * (1.0 - sig)
  if f == 'phyll':
    sig = jax.nn.sigmoid(s)
    return sig, sig * (1.0 - sig)
  if f == 'linear':
    return -jnp.ones_like(s), jnp.zeros_like(s)
  raise ValueError(f'h_derivatives needs a smooth loss, got f={f!r}.')


def term_loss(b: jax.Array, t: jax.Array, c: jax.Array, f: str, lam: float,
              weight: float, coeffs: jax.Array | None = None) -> jax.Array:
  """L(B) = w sum_k h(s_k) + lam/2 ||B||^2, or its linearisation in the scores.

  Args:
    b: (d_t, d_c) matrix B.
    t: (M, d_t) term targets.
    c: (M, d_c) term contexts.
    f: loss name.
    lam: L2 penalty lambda on B.
    weight: w, the weight of every term (1 / 2N).
    coeffs: optional fixed dL/ds_k. If given, the data part is replaced by
      sum_k sg(coeffs_k) s_k, which has the same gradient w.r.t. the network's weights at
      the point where coeffs were computed. Used for the hinge loss at its optimum, where
      the scores of the margin support vectors sit exactly on the kink and the subgradient
      must be the one certified by the solver (the dual variables), not an arbitrary one.

  Returns:
    Scalar loss.
  """
  s = scores(b, t, c)
  if coeffs is None:
    data = weight * jnp.sum(h_value(f, s))
  else:
    data = jnp.sum(jax.lax.stop_gradient(coeffs) * s)
  return data + 0.5 * lam * jnp.sum(b * b)


def context_reps(reps: Sequence[jax.Array], context: str) -> list[jax.Array]:
  """The context representation of every layer (stop-gradient is applied in build_terms).

  Args:
    reps: [s^1..s^L].
    context: 'lateral' (c^l from layer l itself) or 'dfb' (direct feedback: every layer's
      context is the top layer, c^l = s^L).

  Returns:
    A list of L context representations.
  """
  if context not in CONTEXTS:
    raise ValueError(f'context must be one of {CONTEXTS}, got {context!r}.')
  if context == 'lateral':
    return list(reps)
  return [reps[-1]] * len(reps)

