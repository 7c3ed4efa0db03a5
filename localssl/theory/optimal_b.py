"""The exact optimum of B for one batch, in float64.

For a batch, a layer's loss as a function of B is (losses.py)

    L(B) = w * sum_k h(t_k^T B c_k) + (lambda / 2) ||B||_F^2,

convex in B (h is convex) and lambda-strongly convex, so the optimum B_* is unique. Setting
the gradient to zero gives the representer form

    B_* = sum_k a_k t_k c_k^T,    a_k = -(w / lambda) h'(s_k),    s = K a,
    K_kl = (t_k . t_l)(c_k . c_l)   (an M x M kernel, M = number of terms, 2N or 4N),

so the d_t x d_c problem reduces exactly to M unknowns, whatever the layer width.
  * linear f: h' = -1 is constant, so B_* = (w / lambda) sum_k t_k c_k^T (closed form).
  * softplus / phyll: Newton's method on r(a) = lambda a + w h'(K a) = 0. Its step is
    exactly the Newton step of L in B-space (Jacobian lambda I + w diag(h'') K, the Woodbury
    form of the B-space Hessian), globalised by backtracking on L; it converges
    quadratically to machine precision.
  * hinge: non-smooth; B_* = (w / lambda) sum_k alpha_k t_k c_k^T with alpha in [0, 1]^M the
    solution of the SVM-like dual max_alpha w sum(alpha) - (w^2 / 2 lambda) alpha^T K alpha,
    solved by dual coordinate ascent plus an exact active-set polish, certified by the
    primal-dual gap. The dual variables also pick the subgradient (dL/ds_k = -w alpha_k) used
    for the weight gradients.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from localssl.theory import losses


@dataclasses.dataclass(frozen=True)
class BSolution:
  """The optimum of B for one layer and one batch.

  Attributes:
    b: the optimal B, shape (d_t, d_c).
    coeffs: dL/ds_k at the optimum, shape (M,): w h'(s_k) for smooth losses, -w alpha_k
      (the certified subgradient) for the hinge.
    residual: optimality certificate: ||dL/dB||_F evaluated at B (independently of the
      solver's internal residual) for smooth losses; the relative primal-dual gap for the
      hinge.
    scale: ||dL/dB||_F at B = 0 (the size of the data term), to read `residual` against.
    iterations: Newton iterations (smooth), coordinate sweeps (hinge), 0 (closed form).
    method: 'closed_form', 'newton' or 'dual_coordinate_ascent'.
  """
  b: jax.Array
  coeffs: jax.Array
  residual: float
  scale: float
  iterations: int
  method: str

  @property
  def relative_residual(self) -> float:
    """residual / scale for smooth losses; the (already relative) gap for the hinge."""
    if self.method == 'dual_coordinate_ascent':
      return self.residual
    return self.residual / max(self.scale, np.finfo(np.float64).tiny)


def require_float64() -> None:
  """Raises RuntimeError unless JAX is in 64-bit mode (e.g. `with jax.enable_x64(True):`)."""
  if jnp.asarray(1.0).dtype != jnp.float64:
    raise RuntimeError('The theory code needs float64: run it under '
                       '`with jax.enable_x64(True):` (the CLI and tests do this).')


def kernel(t: jax.Array, c: jax.Array) -> jax.Array:
  """K_kl = <t_k c_k^T, t_l c_l^T>_F = (t_k . t_l)(c_k . c_l)."""
  return (t @ t.T) * (c @ c.T)


def b_from_coefficients(a: jax.Array, t: jax.Array, c: jax.Array) -> jax.Array:
  """B = sum_k a_k t_k c_k^T."""
  return t.T @ (a[:, None] * c)


@functools.partial(jax.jit, static_argnames=('f',))
def b_gradient(b: jax.Array, t: jax.Array, c: jax.Array, f: str, lam: float,
               weight: float) -> jax.Array:
  """dL/dB by automatic differentiation (the check of an optimum)."""
  return jax.grad(losses.term_loss)(b, t, c, f, lam, weight)


@functools.partial(jax.jit, static_argnames=('f', 'max_iter'))
def _newton(k: jax.Array, lam: float, weight: float, tol: float, *, f: str, max_iter: int
            ) -> tuple[jax.Array, jax.Array]:
  """Solves lambda a + w h'(K a) = 0 by globalised Newton; returns (a, iterations)."""

  def objective(a):
    s = k @ a
    return weight * jnp.sum(losses.h_value(f, s)) + 0.5 * lam * (a @ s)

  def residual(a):
    return lam * a + weight * losses.h_derivatives(f, k @ a)[0]

  def grad_norm(r):
    # ||dL/dB||_F for B = sum_k a_k t_k c_k^T equals sqrt(r^T K r).
    return jnp.sqrt(jnp.maximum(r @ (k @ r), 0.0))

  eye = jnp.eye(k.shape[0], dtype=k.dtype)

  def newton_step(state):
    a, iteration, norm, best, _ = state
    hpp = losses.h_derivatives(f, k @ a)[1]
    r = residual(a)
    delta = jnp.linalg.solve(lam * eye + weight * hpp[:, None] * k, -r)
    slope, current, r_norm = r @ (k @ delta), objective(a), jnp.linalg.norm(r)

    def backtrack(ls_state):
      step, _, count = ls_state
      candidate = a + step * delta
      armijo = objective(candidate) <= current + 1e-4 * step * slope
      # Near the optimum L changes below rounding; accept a step that shrinks the residual.
      shrinks = jnp.linalg.norm(residual(candidate)) < r_norm
      accepted = armijo | shrinks
      return jnp.where(accepted, step, 0.5 * step), accepted, count + 1

    step, _, _ = jax.lax.while_loop(lambda ls: (~ls[1]) & (ls[2] < 60), backtrack,
                                    (jnp.ones((), k.dtype), jnp.array(False), 0))
    a = a + step * delta
    new_norm = grad_norm(residual(a))
    # Stop at the tolerance, or when Newton has stalled at the rounding floor.
    done = (new_norm <= tol) | ((new_norm > 0.5 * jnp.minimum(best, norm)) &
                                (new_norm < 1e-10 * jnp.maximum(1.0, norm0)))
    return a, iteration + 1, new_norm, jnp.minimum(best, new_norm), done

  a0 = jnp.zeros(k.shape[0], dtype=k.dtype)
  norm0 = grad_norm(residual(a0))
  state = (a0, 0, norm0, norm0, norm0 <= tol)
  state = jax.lax.while_loop(lambda st: (~st[4]) & (st[1] < max_iter), newton_step, state)
  return state[0], state[1]


def _hinge_dual(k: np.ndarray, lam: float, weight: float, tol: float, max_sweeps: int
                ) -> tuple[np.ndarray, int]:
  """Dual coordinate ascent + active-set polish for the hinge; returns (alpha, sweeps)."""
  q = weight / lam  # s = q K alpha
  num = k.shape[0]
  alpha = np.zeros(num)
  s = np.zeros(num)
  diag = q * np.diag(k)

  def violation(alpha, s):
    g = 1.0 - s
    pg = np.where(alpha <= 0.0, np.maximum(g, 0.0), np.where(alpha >= 1.0, np.minimum(g, 0.0),
                                                             g))
    return np.max(np.abs(pg))

  for sweep in range(1, max_sweeps + 1):
    for j in range(num):
      if diag[j] <= 0.0:
        alpha[j] = 1.0  # t_j c_j^T = 0: the term is a constant w, its alpha is free.
        continue
      new = min(1.0, max(0.0, alpha[j] + (1.0 - s[j]) / diag[j]))
      if new != alpha[j]:
        s += q * k[:, j] * (new - alpha[j])
        alpha[j] = new
    if violation(alpha, s) < 1e-6:
      # Polish: the margin support vectors satisfy s_j = 1 exactly; solve for them.
      free = (alpha > 1e-10) & (alpha < 1 - 1e-10)
      upper = alpha >= 1 - 1e-10
      polished = np.where(upper, 1.0, 0.0)
      if free.any():
        rhs = 1.0 - q * k[np.ix_(free, upper)] @ np.ones(upper.sum())
        polished[free] = np.linalg.lstsq(q * k[np.ix_(free, free)], rhs, rcond=1e-13)[0]
      if np.all(polished >= -1e-12) and np.all(polished <= 1 + 1e-12):
        polished = np.clip(polished, 0.0, 1.0)
        s_polished = q * k @ polished
        if violation(polished, s_polished) <= tol:
          return polished, sweep
    if violation(alpha, s) <= tol:
      return alpha, sweep
  return alpha, max_sweeps


def solve_optimal_b(t: jax.Array, c: jax.Array, f: str, lam: float, weight: float, *,
                    tol: float = 1e-14, max_iter: int = 100) -> BSolution:
  """The exact minimiser of w sum_k h(t_k^T B c_k) + lam/2 ||B||^2 over B.

  Args:
    t: (M, d_t) term targets (values; no gradient flows through the solver).
    c: (M, d_c) term contexts.
    f: loss name (losses.LOSSES).
    lam: the L2 penalty lambda > 0 (it makes the optimum unique).
    weight: w, the weight of every term.
    tol: Newton stops when ||dL/dB||_F <= tol (or stops improving near it).
    max_iter: Newton iterations / hinge sweeps (x20) at most.

  Returns:
    A BSolution; its residual certifies the optimum.

  Raises:
    ValueError: if lam <= 0 or f is unknown.
    RuntimeError: if JAX is not in float64 mode.
  """
  require_float64()
  losses.check_loss(f)
  if lam <= 0:
    raise ValueError(f'The optimum of B needs lambda > 0, got {lam}.')
  t = jax.lax.stop_gradient(jnp.asarray(t))
  c = jax.lax.stop_gradient(jnp.asarray(c))
  if f == 'hinge':
    return _solve_hinge(t, c, lam, weight, max_sweeps=20 * max_iter)
  b, coeffs, residual, scale, iterations = _solve_smooth(t, c, lam, weight, tol, f=f,
                                                         max_iter=max_iter)
  return BSolution(b=b, coeffs=coeffs, residual=float(residual), scale=float(scale),
                   iterations=int(iterations),
                   method='closed_form' if f == 'linear' else 'newton')


def _solve_smooth(t, c, lam, weight, tol, *, f, max_iter):
  """Closed form (linear f) or Newton; returns (B, dL/ds, ||dL/dB||, scale, iterations)."""
  k = _kernel(t, c)
  if f == 'linear':
    a, iterations = jnp.full((k.shape[0],), weight / lam, dtype=k.dtype), 0
  else:
    # Jitted on its own: it depends on the layer only through M, so it compiles once.
    a, iterations = _newton(k, lam, weight, tol, f=f, max_iter=max_iter)
  return _finish(a, t, c, lam, weight, f=f) + (iterations,)


_kernel = jax.jit(kernel)


@functools.partial(jax.jit, static_argnames=('f',))
def _finish(a, t, c, lam, weight, *, f):
  """B from its coefficients, dL/ds at B, the certificate ||dL/dB||_F and its scale."""
  b = b_from_coefficients(a, t, c)
  coeffs = weight * losses.h_derivatives(f, losses.scores(b, t, c))[0]
  # The certificate is evaluated in B-space at B itself, not from the solver's residual r(a):
  # dL/dB = lam B + sum_k (dL/ds_k) t_k c_k^T (tests check it against autodiff).
  residual = jnp.linalg.norm(lam * b + b_from_coefficients(coeffs, t, c))
  scale = jnp.linalg.norm(b_from_coefficients(
      weight * losses.h_derivatives(f, jnp.zeros_like(coeffs))[0], t, c))
  return b, coeffs, residual, scale


def _solve_hinge(t: jax.Array, c: jax.Array, lam: float, weight: float, max_sweeps: int
                 ) -> BSolution:
  """The hinge optimum from its dual, certified by the relative primal-dual gap."""
  k = kernel(t, c)
  alpha, sweeps = _hinge_dual(np.asarray(k), lam, weight, tol=1e-12, max_sweeps=max_sweeps)
  alpha = jnp.asarray(alpha)
  b = b_from_coefficients(weight / lam * alpha, t, c)
  s = losses.scores(b, t, c)
  primal = 0.5 * lam * jnp.sum(b * b) + weight * jnp.sum(jnp.maximum(0.0, 1.0 - s))
  dual = weight * jnp.sum(alpha) - 0.5 * lam * jnp.sum(b * b)
  gap = float((primal - dual) / jnp.maximum(1.0, jnp.abs(primal)))
  scale = float(jnp.linalg.norm(b_from_coefficients(jnp.full_like(alpha, weight), t, c)))
  return BSolution(b=b, coeffs=-weight * alpha, residual=gap, scale=scale, iterations=sweeps,
                   method='dual_coordinate_ascent')
