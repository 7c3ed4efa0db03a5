"""The VGG encoder of the paper, as a Flax linen module that returns every block's output.

A block is a few 3x3 convolutions (stride 1, padding 1, bias), each followed by a ReLU, and an
optional 2x2 max-pool after the last ReLU. There is no normalisation layer. In local mode the
input of every block is stop-gradiented, so that a block can only learn from its own loss.
"""

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Blocks as in PAPER.md §4: each block lists its conv widths, then "M" for a 2x2 max-pool.
ARCH_BLOCKS = {
    'vgg6': ((128,), (256, 'M'), (256,), (512, 'M'), (1024, 'M'), (1024, 'M')),
    'vgg8': ((128,), (256, 'M'), (512, 'M'), (512,), (1024, 'M'), (1024, 'M'), (1024,),
             (1024, 'M')),
}

BlockSpec = tuple[tuple[int, ...], bool]  # (conv widths, max-pool after the block)


def parse_blocks(blocks: Sequence[Sequence[Any]],
                 width_multiplier: float = 1.0) -> tuple[BlockSpec, ...]:
  """Turns a block spec like `((128,), (256, "M"))` into scaled `(widths, pool)` pairs.

  Args:
    blocks: one entry per block: conv widths, optionally followed by "M".
    width_multiplier: scales every width (rounded, at least 1 channel).

  Returns:
    A tuple of `(widths, pool)` per block.

  Raises:
    ValueError: if a block has no convolution or an entry that is neither int nor "M".
  """
  if width_multiplier <= 0:
    raise ValueError(f'model.width_multiplier must be > 0, got {width_multiplier}.')
  parsed = []
  for index, block in enumerate(blocks):
    items = list(block)
    pool = bool(items) and items[-1] == 'M'
    widths = items[:-1] if pool else items
    if not widths or not all(isinstance(w, int) and w > 0 for w in widths):
      raise ValueError(f'Block {index} of the encoder spec is {block!r}: expected positive '
                       'conv widths optionally followed by "M", e.g. (256, "M").')
    scaled = tuple(max(1, round(w * width_multiplier)) for w in widths)
    parsed.append((scaled, pool))
  return tuple(parsed)


def torch_uniform_init(fan_in: int) -> jax.nn.initializers.Initializer:
  """PyTorch's default init for conv and linear layers: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding='SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _shifted_windows(x: jax.Array) -> list[jax.Array]:
  """The 9 windows [N, H, W, C] of the zero-padded map, in kernel order (row, column)."""
  _, height, width, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return [padded[:, i:i + height, j:j + width, :] for i in range(3) for j in range(3)]


def conv3x3_as_matmuls(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The same 3x3 'SAME' convolution as a sum of 9 matmuls over shifted windows."""
  n, height, width, cin = x.shape
  cout = kernel.shape[-1]
  taps = kernel.reshape(9, cin, cout)
  out = sum(jnp.dot(window.reshape(-1, cin), taps[k], preferred_element_type=jnp.float32)
            for k, window in enumerate(_shifted_windows(x)))
  return out.reshape(n, height, width, cout).astype(x.dtype)


# Below this map size XLA:CPU's convolution ran slower than 9 matmuls (8x8: 88 vs 125
# GFLOP/s, 4x4: 51 vs 98; at 16x16 and 32x32 XLA was faster: 146-173 vs 70-95).
_MATMUL_FORWARD_BELOW = 16


def _conv3x3_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
  if x.shape[1] < _MATMUL_FORWARD_BELOW:
    return conv3x3_as_matmuls(x, kernel)
  return _conv_same(x, kernel)


@jax.custom_vjp
def conv3x3_patches(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A 3x3 "SAME" convolution tuned for XLA:CPU: its filter gradient is 9 matmuls.

  XLA:CPU's filter gradient ran at 20-34 GFLOP/s on this CPU's full-width layers; as
  matmuls over the 9 shifted windows it runs at 90-124 (see README, Performance). The
  forward pass is XLA's
  convolution on large maps and 9 matmuls on small ones; the input gradient is XLA's own
  and is dead code, removed by XLA, when the input is stop-gradiented (local rules).

  Args:
    x: NHWC input.
    kernel: HWIO kernel of spatial size 3x3.

  Returns:
    The NHWC output, equal to `lax.conv_general_dilated` up to float rounding.
  """
  return _conv3x3_forward(x, kernel)


def _conv3x3_patches_fwd(x, kernel):
  return _conv3x3_forward(x, kernel), (x, kernel)


def _conv3x3_patches_bwd(residuals, grad_out):
  x, kernel = residuals
  cin, cout = kernel.shape[2], kernel.shape[3]
  grad_rows = grad_out.reshape(-1, cout)
  grad_kernel = jnp.stack([
      jax.lax.dot_general(window.reshape(-1, cin), grad_rows, (((0,), (0,)), ((), ())),
                          preferred_element_type=jnp.float32)
      for window in _shifted_windows(x)])
  return _conv3x3_input_grad(grad_out, kernel), grad_kernel.reshape(kernel.shape).astype(
      kernel.dtype)


def _conv3x3_input_grad(grad_out: jax.Array, kernel: jax.Array) -> jax.Array:
  """dL/dx: XLA's on large maps; on small ones 9 matmuls, each added back at its shift."""
  n, height, width, cout = grad_out.shape
  cin = kernel.shape[2]
  if height >= _MATMUL_FORWARD_BELOW:
    # The transpose of a stride-1 'SAME' 3x3 convolution: the flipped, transposed kernel.
    return _conv_same(grad_out, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))
  taps = kernel.reshape(9, cin, cout)
  rows = grad_out.reshape(-1, cout)
  padded = 0.0
  for k in range(9):
    i, j = divmod(k, 3)
    tap = jnp.dot(rows, taps[k].T, preferred_element_type=jnp.float32).reshape(
        n, height, width, cin)
    # Window (i, j) read input pixel p + (i - 1, j - 1): its gradient goes back there.
    padded = padded + jnp.pad(tap, ((0, 0), (i, 2 - i), (j, 2 - j), (0, 0)))
  return padded[:, 1:height + 1, 1:width + 1, :].astype(grad_out.dtype)


conv3x3_patches.defvjp(_conv3x3_patches_fwd, _conv3x3_patches_bwd)


def max_pool_2x2(h: jax.Array) -> jax.Array:
  """2x2 max-pool, stride 2, as a reshape and a max.

  Same values as `nn.max_pool`; its gradient avoids XLA:CPU's select-and-scatter, which was
  20x slower here. Ties share the gradient, but after a ReLU they only occur at 0, where
  the ReLU passes no gradient anyway.
  """
  n, height, width, channels = h.shape
  if height % 2 or width % 2:
    raise ValueError(f'Max-pool 2x2 needs an even map, got {height}x{width}: use an image '
                     'size divisible by 2 ** (number of pooling blocks).')
  return jnp.max(h.reshape(n, height // 2, 2, width // 2, 2, channels), axis=(2, 4))


# On CPU, XLA's filter gradient is slow only for wide layers: at width 1/4 it beat the
# matmuls up to 64 -> 128 channels (32 vs 56 ms), tied at 128 -> 256, lost above; at full
# width (128 -> 256 and up) the matmuls were 3-5x faster.
_MATMUL_CONV_MIN_CHANNEL_PRODUCT = 128 * 256


def resolve_conv_impl(conv_impl: str, local: bool) -> str:
  """'auto': 'cpu_auto' on CPU (chosen per layer, for local and BP rules alike), else 'xla'."""
  del local  # Both gain on CPU: the filter gradient is the slow part either way.
  if conv_impl == 'auto':
    return 'cpu_auto' if jax.default_backend() == 'cpu' else 'xla'
  return conv_impl


def use_matmul_conv(conv_impl: str, in_channels: int, out_channels: int) -> bool:
  """Whether a layer uses `conv3x3_patches` rather than XLA's convolution."""
  if conv_impl == 'cpu_auto':
    return in_channels * out_channels >= _MATMUL_CONV_MIN_CHANNEL_PRODUCT
  return conv_impl == 'patches'


class Conv3x3(nn.Module):
  """3x3 convolution, stride 1, padding 1, with bias; parameters in float32."""
  features: int
  compute_dtype: Any = jnp.float32
  param_init: str = 'torch'
  conv_impl: str = 'xla'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1] * 9
    if self.param_init == 'torch':
      kernel_init = bias_init = torch_uniform_init(fan_in)
    else:
      kernel_init, bias_init = nn.initializers.lecun_normal(), nn.initializers.zeros_init()
    kernel = self.param('kernel', kernel_init, (3, 3, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', bias_init, (self.features,), jnp.float32)
    x = x.astype(self.compute_dtype)
    kernel = kernel.astype(self.compute_dtype)
    conv = conv3x3_patches if use_matmul_conv(self.conv_impl, x.shape[-1],
                                               self.features) else _conv_same
    return conv(x, kernel) + bias.astype(self.compute_dtype)


class VGGEncoder(nn.Module):
  """VGG encoder returning the output of every block (after ReLU and max-pool).

  Attributes:
    blocks: `(widths, pool)` per block, from `parse_blocks`.
    local: stop the gradient at every block's input (local learning) or not (backprop).
    compute_dtype: dtype of activations and matmuls; parameters stay float32.
    param_init: 'torch' (PyTorch default uniform) or 'lecun' (Flax default).
    conv_impl: 'xla', 'patches' (see `conv3x3_patches`) or 'cpu_auto' (per layer).
  """
  blocks: tuple[BlockSpec, ...]
  local: bool = True
  compute_dtype: Any = jnp.float32
  param_init: str = 'torch'
  conv_impl: str = 'xla'

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    outputs = []
    h = x
    for index, (widths, pool) in enumerate(self.blocks):
      if self.local:
        # Locality: block `index` must not send gradient into the blocks below it.
        h = jax.lax.stop_gradient(h)
      for conv_index, width in enumerate(widths):
        h = Conv3x3(width, self.compute_dtype, self.param_init, self.conv_impl,
                    name=f'block{index}_conv{conv_index}')(h)
        h = nn.relu(h)
      if pool:
        h = max_pool_2x2(h)
      outputs.append(h)
    return outputs


@functools.cache
def dtype_from_name(name: str) -> Any:
  """The jnp dtype of a config name, "float32" or "bfloat16"."""
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[name]


def make_encoder(model_config, local: bool) -> VGGEncoder:
  """Builds the encoder described by `config.model`.

  Args:
    model_config: `config.model` (arch, width_multiplier, compute_dtype, init, conv_impl).
    local: stop-gradient between blocks (local rules) or not (backprop baselines).

  Returns:
    A `VGGEncoder`.
  """
  return VGGEncoder(
      blocks=parse_blocks(ARCH_BLOCKS[model_config.arch], model_config.width_multiplier),
      local=local,
      compute_dtype=dtype_from_name(model_config.compute_dtype),
      param_init=model_config.init,
      conv_impl=resolve_conv_impl(model_config.conv_impl, local))
