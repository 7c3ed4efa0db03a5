"""Bias-free deep MLPs and CNNs for the theory of PAPER.md §6, written as pure functions.

A network is a `NetSpec` (static, hashable: widths, activation, pools) plus a list of weight
arrays. `forward` returns every layer's output z^l; `readouts` turns each z^l into the vector
the loss sees (the identity for an MLP, average pooling + flatten for a CNN).

Conventions (rows are examples):
  MLP: x has shape (n, d_0); W^l has shape (d_l, d_{l-1}); z^l = act(z^{l-1} @ W^l.T).
  CNN: x has shape (n, H, W, C_0); kernel^l has shape (k, k, C_{l-1}, C_l) (HWIO), stride k,
       no padding, so every layer is a non-overlapping patch map: H_l = H_{l-1} / k.
"""

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Params = list[jax.Array]

ACTIVATIONS = ('linear', 'relu')
INITS = ('orthogonal', 'default')


@dataclasses.dataclass(frozen=True)
class NetSpec:
  """The static description of a theory network.

  Attributes:
    kind: 'mlp' or 'cnn'.
    widths: output width of every layer (MLP units, or CNN channels), d_1..d_L.
    activation: 'linear' (identity) or 'relu', applied after every layer.
    pools: CNN only: the average-pool size k_l applied to z^l before the loss (1 = none). An
      empty tuple means no pooling at any layer.
    kernel: CNN only: kernel size and stride of every convolution.
  """
  kind: str
  widths: tuple[int, ...]
  activation: str = 'linear'
  pools: tuple[int, ...] = ()
  kernel: int = 2

  def __post_init__(self):
    if self.kind not in ('mlp', 'cnn'):
      raise ValueError(f'NetSpec.kind must be "mlp" or "cnn", got {self.kind!r}.')
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'NetSpec.activation must be one of {ACTIVATIONS}, '
                       f'got {self.activation!r}.')
    if self.pools and len(self.pools) != len(self.widths):
      raise ValueError(f'NetSpec.pools has {len(self.pools)} entries for '
                       f'{len(self.widths)} layers.')
    if self.pools and self.kind != 'cnn':
      raise ValueError('NetSpec.pools is only meaningful for kind="cnn".')

  @property
  def num_layers(self) -> int:
    return len(self.widths)


def host_rng(key: jax.Array) -> np.random.Generator:
  """A numpy Generator seeded by a JAX key (initialisation runs once, on the host)."""
  return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def semi_orthogonal(key: jax.Array, rows: int, cols: int) -> jax.Array:
  """A Haar-random matrix with orthonormal rows (rows <= cols) or columns (rows > cols).

  Args:
    key: PRNG key.
    rows: number of rows.
    cols: number of columns.

  Returns:
    A (rows, cols) float array M with M M^T = I if rows <= cols, else M^T M = I.
  """
  big, small = max(rows, cols), min(rows, cols)
  # Drawn and factorised on the host: no XLA compilation for every new shape.
  q, r = np.linalg.qr(host_rng(key).normal(size=(big, small)))
  # Fixing the signs of diag(R) makes Q Haar-distributed, not just orthonormal.
  q = q * np.sign(np.diagonal(r))[None, :]
  return jnp.asarray(q if rows >= cols else q.T, dtype=jnp.asarray(0.0).dtype)


def _uniform_fan_in(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
  """PyTorch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)
  return jnp.asarray(host_rng(key).uniform(-bound, bound, size=shape),
                     dtype=jnp.asarray(0.0).dtype)


def init_params(key: jax.Array, spec: NetSpec, in_dim: int, init: str = 'orthogonal'
                ) -> Params:
  """Initialises the weights of a network.

  Args:
    key: PRNG key.
    spec: the network.
    in_dim: input features (MLP) or input channels (CNN).
    init: 'orthogonal' (semi-orthogonal weight matrices; for a CNN the (k*k*C_in, C_out)
      reshaped kernel is semi-orthogonal, as torch.nn.init.orthogonal_ does) or 'default'
      (PyTorch's default uniform init, +-1/sqrt(fan_in)).

  Returns:
    The list of L weight arrays.

  Raises:
    ValueError: for an unknown init.
  """
  if init not in INITS:
    raise ValueError(f'init must be one of {INITS}, got {init!r}.')
  params = []
  fan = in_dim
  for key_l, width in zip(jax.random.split(key, spec.num_layers), spec.widths):
    if spec.kind == 'mlp':
      shape, fan_in = (width, fan), fan
    else:
      shape, fan_in = (spec.kernel, spec.kernel, fan, width), spec.kernel ** 2 * fan
    if init == 'orthogonal':
      if spec.kind == 'mlp':
        weight = semi_orthogonal(key_l, width, fan)
      else:
        weight = semi_orthogonal(key_l, fan_in, width).reshape(shape)
    else:
      weight = _uniform_fan_in(key_l, shape, fan_in)
    params.append(weight)
    fan = width
  return params


def _patch_conv(h: jax.Array, kernel: jax.Array) -> jax.Array:
  """A convolution whose stride equals its kernel size k (no padding, no overlap).

  Every output position sees its own k x k input patch, so the convolution is a reshape of
  the input into patches followed by one matmul; it equals
  lax.conv_general_dilated(h, kernel, (k, k), 'VALID', ('NHWC', 'HWIO', 'NHWC')) and its
  gradients compile several times faster on CPU (tested in tests/test_theory.py).
  """
  n, height, width, channels = h.shape
  k = kernel.shape[0]
  if height % k or width % k:
    raise ValueError(f'Kernel/stride {k} does not divide the {height}x{width} input.')
  patches = h.reshape(n, height // k, k, width // k, k, channels).transpose(0, 1, 3, 2, 4, 5)
  return jnp.einsum('nyxijc,ijco->nyxo', patches, kernel)


def _layer(spec: NetSpec, weight: jax.Array, h: jax.Array) -> jax.Array:
  if spec.kind == 'mlp':
    a = h @ weight.T
  else:
    a = _patch_conv(h, weight)
  return jax.nn.relu(a) if spec.activation == 'relu' else a


def forward(params: Params, spec: NetSpec, x: jax.Array, *, local: bool,
            perturb: Sequence[jax.Array] | None = None) -> list[jax.Array]:
  """Runs the network and returns every layer's output.

  Args:
    params: the L weight arrays.
    spec: the network.
    x: input batch (rows [a_1..a_N, b_1..b_N]).
    local: if True, every layer's input is stop-gradiented (z^l = F_l(sg(z^{l-1}))), so a
      loss on z^l reaches only W^l; if False, gradients flow through all layers (BP).
    perturb: optional zeros added to each z^l; differentiating w.r.t. them gives dL/dz^l.

  Returns:
    [z^1, ..., z^L].
  """
  outputs = []
  h = x
  for l, weight in enumerate(params):
    z = _layer(spec, weight, jax.lax.stop_gradient(h) if local else h)
    if perturb is not None:
      z = z + perturb[l]
    outputs.append(z)
    h = z
  return outputs


def pool_and_flatten(z: jax.Array, pool: int) -> jax.Array:
  """Average-pools a (n, H, W, C) map with window = stride = `pool`, then flattens.

  Args:
    z: a feature map.
    pool: the pooling size k (1 = no pooling).

  Returns:
    (n, (H/k) * (W/k) * C) array.

  Raises:
    ValueError: if k does not divide the map (a pool larger than its map is a config error).
  """
  n, height, width, channels = z.shape
  if height % pool or width % pool:
    raise ValueError(f'Pool size {pool} does not divide the {height}x{width} feature map.')
  z = z.reshape(n, height // pool, pool, width // pool, pool, channels).mean(axis=(2, 4))
  return z.reshape(n, -1)


def readouts(spec: NetSpec, outputs: Sequence[jax.Array]) -> list[jax.Array]:
  """The per-layer vectors s^l the loss scores (pooled + flattened for a CNN).

  Args:
    spec: the network.
    outputs: [z^1..z^L] from `forward`.

  Returns:
    [s^1..s^L], each of shape (n, d_l).
  """
  if spec.kind == 'mlp':
    return list(outputs)
  pools = spec.pools or (1,) * spec.num_layers
  return [pool_and_flatten(z, k) for z, k in zip(outputs, pools)]


def flat_layer_matrix(spec: NetSpec, weight: jax.Array, in_shape: tuple[int, ...]
                      ) -> jax.Array:
  """The matrix M with flatten(layer(h)) = M @ flatten(h), for a linear layer (one example).

  Used by the tests and by Q_l = M_L ... M_{l+1}.

  Args:
    spec: the network (its activation is ignored: the linear part is returned).
    weight: the layer's weight.
    in_shape: shape of one input example ((d,) for an MLP, (H, W, C) for a CNN).

  Returns:
    (out_dim, in_dim) matrix.
  """
  linear_spec = dataclasses.replace(spec, activation='linear')
  in_dim = int(np.prod(in_shape))
  basis = jnp.eye(in_dim, dtype=weight.dtype).reshape((in_dim,) + tuple(in_shape))
  out = _layer(linear_spec, weight, basis).reshape(in_dim, -1)
  return out.T
