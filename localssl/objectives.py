"""Every learning rule of the paper as pure functions of (config, params, batch).

Rows, pairing and negatives follow PAPER.md §2: the two views are stacked as 2N rows
[a_1..a_N, b_1..b_N]; row i is scored against its positive target, row p(i) = (i + N) mod 2N,
and against one negative, the positive target of the next row, p((i + 1) mod 2N). A layer's
score is u = z^T B c with the context c stop-gradiented (lateral: the row's own representation
at this layer; feedback, "DFB": the row's top-layer representation).

Parameters are `{"encoder": <flax params>, "predictor": {...}}` where the predictor holds
the B matrices as `kernel`s of shape (d_context, d_layer), so that `B c` is `c @ kernel`:
  - local rule ('clapp'): `predictor/lateral/layer{l}` and/or `predictor/feedback/layer{l}`;
  - BP-CLAPP++: `predictor/lateral/layer{L-1}`;
  - BP-InfoNCE: `predictor/projection` (the shared projection P, no bias).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from localssl import models

Params = dict[str, Any]
Batch = dict[str, jax.Array]


def is_local(config: ml_collections.ConfigDict) -> bool:
  """Whether the configured rule is local (stop-gradient between blocks)."""
  return config.loss.method == 'clapp'


@functools.lru_cache(maxsize=64)
def _block_shapes(model_key: tuple[Any, ...], image_size: int) -> tuple[tuple[int, ...], ...]:
  arch, width_multiplier = model_key
  blocks = models.parse_blocks(models.ARCH_BLOCKS[arch], width_multiplier)
  encoder = models.VGGEncoder(blocks=blocks, conv_impl='xla')
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(encoder.init, jax.random.key(0), x)
  outputs = jax.eval_shape(encoder.apply, variables, x)
  return tuple(tuple(o.shape[1:]) for o in outputs)


def block_output_shapes(config: ml_collections.ConfigDict) -> list[tuple[int, int, int]]:
  """(H, W, C) of every block's output for the configured image size and encoder."""
  key = (config.model.arch, float(config.model.width_multiplier))
  return list(_block_shapes(key, int(config.data.image_size)))


def check_pool_sizes(pool_sizes, shapes) -> list[int]:
  """Validates per-layer pool sizes against the block output shapes.

  Args:
    pool_sizes: one average-pool size k_l per layer.
    shapes: (H, W, C) per layer.

  Returns:
    The pool sizes as a list of ints.

  Raises:
    ValueError: naming the layer, its map size and the pool, if the count is wrong or a
      pool is not positive, larger than its map, or does not divide it.
  """
  if len(pool_sizes) != len(shapes):
    raise ValueError(
        f'loss.pool_sizes has {len(pool_sizes)} entries but the encoder has {len(shapes)} '
        f'layers with maps {[s[0] for s in shapes]}: give one pool size per layer.')
  for layer, (k, (height, width, _)) in enumerate(zip(pool_sizes, shapes)):
    if k < 1 or k > min(height, width) or height % k or width % k:
      raise ValueError(
          f'loss.pool_sizes[{layer}] = {k} does not fit layer {layer}, whose feature map is '
          f'{height}x{width}: the pool must be between 1 and {min(height, width)} and divide '
          f'the map (e.g. the paper uses 4-4-4-2-2-1 for 32 px, 12-12-12-6-6-3 for 96 px).')
  return [int(k) for k in pool_sizes]


def loss_pool_sizes(config: ml_collections.ConfigDict) -> list[int]:
  """Pool size of each layer's loss representation (its map size when global_pool)."""
  shapes = block_output_shapes(config)
  pools = check_pool_sizes(config.loss.pool_sizes, shapes)
  if config.loss.global_pool:
    return [height for height, _, _ in shapes]
  return pools


def pooled_dims(shapes, pools) -> list[int]:
  """d_l = C_l * (H_l / k_l) * (W_l / k_l) of flatten(avgpool_k(h)) for every layer."""
  return [c * (h // k) * (w // k) for (h, w, c), k in zip(shapes, pools)]


def representation_dims(config: ml_collections.ConfigDict) -> list[int]:
  """d_l of every layer's loss representation."""
  return pooled_dims(block_output_shapes(config), loss_pool_sizes(config))


def pooled_representation(h: jax.Array, pool: int) -> jax.Array:
  """flatten(avgpool_k(h)) for NHWC `h` with non-overlapping k x k windows, >= float32."""
  n, height, width, channels = h.shape
  h = h.astype(jnp.promote_types(h.dtype, jnp.float32)).reshape(n, height // pool, pool, width // pool, pool, channels)
  return h.mean(axis=(2, 4)).reshape(n, -1)


def predictor_shapes(config: ml_collections.ConfigDict) -> dict[str, dict[str, tuple]]:
  """Kernel shape (d_context, d_layer) of every predictor matrix, by group and layer name."""
  dims = representation_dims(config)
  top = len(dims) - 1
  method = config.loss.method
  if method == 'bp_infonce':
    channels = block_output_shapes(config)[-1][-1]
    return {'projection': {'kernel': (channels, config.loss.projection_dim or channels)}}
  if method == 'bp_clapp':
    return {'lateral': {f'layer{top}': (dims[top], dims[top])}}
  shapes = {'lateral': {}, 'feedback': {}}
  for layer, dim in enumerate(dims):
    if layer == top or config.loss.context in ('lateral', 'both'):
      shapes['lateral'][f'layer{layer}'] = (dim, dim)
    if layer != top and config.loss.context in ('dfb', 'both'):
      shapes['feedback'][f'layer{layer}'] = (dims[top], dim)
  return {group: layers for group, layers in shapes.items() if layers}


def _has_predictor_params(config: ml_collections.ConfigDict) -> bool:
  return config.loss.method == 'bp_infonce' or config.loss.predictor != 'identity'


def init_params(config: ml_collections.ConfigDict, rng: jax.Array) -> Params:
  """Initialises encoder and predictor parameters (PyTorch-default init for B and P).

  Args:
    config: the experiment config.
    rng: a JAX PRNG key.

  Returns:
    `{"encoder": ..., "predictor": ...}`; the predictor is empty for B = identity.
  """
  encoder_rng, predictor_rng = jax.random.split(rng)
  encoder = models.make_encoder(config.model, local=is_local(config))
  size = config.data.image_size
  encoder_params = encoder.init(encoder_rng, jnp.zeros((1, size, size, 3)))['params']
  predictor = {}
  if _has_predictor_params(config):
    shapes = predictor_shapes(config)
    if config.loss.method == 'bp_infonce':
      shape = shapes['projection']['kernel']
      return {'encoder': encoder_params,
              'predictor': {'projection': {'kernel': models.torch_uniform_init(shape[0])(
                  predictor_rng, shape)}}}
    for group, layers in shapes.items():
      predictor[group] = {}
      for layer, shape in layers.items():
        predictor_rng, key = jax.random.split(predictor_rng)
        kernel = models.torch_uniform_init(shape[0])(key, shape)
        predictor[group][layer] = {'kernel': kernel}
  return {'encoder': encoder_params, 'predictor': predictor}


def encode(config: ml_collections.ConfigDict, params: Params, batch: Batch,
           local: bool | None = None) -> list[jax.Array]:
  """Runs the encoder on the 2N stacked views; returns every block's output.

  Args:
    config: the experiment config.
    params: as from `init_params`.
    batch: `{"view_a": [N,H,W,3], "view_b": [N,H,W,3]}`, normalised float images.
    local: stop-gradient between blocks; defaults to the configured rule's choice.

  Returns:
    One NHWC array of 2N rows per block.
  """
  local = is_local(config) if local is None else local
  x = jnp.concatenate([batch['view_a'], batch['view_b']], axis=0)
  encoder = models.make_encoder(config.model, local=local)
  return encoder.apply({'params': params['encoder']}, x)


def paired_scores(z: jax.Array, predicted: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Positive and negative scores of every row (PAPER.md §2).

  Args:
    z: [2N, d] representations, rows [a_1..a_N, b_1..b_N]; the gradient flows through it.
    predicted: [2N, d] rows B c_i of every row's (stop-gradiented) context.

  Returns:
    `(u_pos, u_neg)`, each [2N]: u_pos[i] = z[p(i)] . Bc_i and
    u_neg[i] = z[p(i + 1)] . Bc_i, with p(i) = (i + N) mod 2N.
  """
  num_rows = z.shape[0]
  if num_rows % 2 or num_rows < 4:
    raise ValueError(f'Expected 2N rows with N >= 2 images, got {num_rows} rows.')
  positives = jnp.roll(z, -(num_rows // 2), axis=0)  # positives[i] = z[(i + N) % 2N]
  negatives = jnp.roll(positives, -1, axis=0)  # negatives[i] = positives[(i + 1) % 2N]
  return (jnp.sum(positives * predicted, axis=-1), jnp.sum(negatives * predicted, axis=-1))


def score_loss(u_pos: jax.Array, u_neg: jax.Array, score_fn: str) -> jax.Array:
  """Per-row loss f(u+) + f(-u-) (type 2), or softplus(u- - u+) for 'phyll' (type 1)."""
  if score_fn == 'hinge':
    return jax.nn.relu(1.0 - u_pos) + jax.nn.relu(1.0 + u_neg)
  if score_fn == 'softhinge':
    return jax.nn.softplus(1.0 - u_pos) + jax.nn.softplus(1.0 + u_neg)
  if score_fn == 'linear':
    return u_neg - u_pos
  if score_fn == 'phyll':
    return jax.nn.softplus(u_neg - u_pos)
  raise ValueError(f'loss.score_fn must be one of hinge, softhinge, linear, phyll; '
                   f'got {score_fn!r}.')


def predict(context: jax.Array, kernel: jax.Array | None, mode: str,
            compute_dtype: Any = jnp.float32) -> jax.Array:
  """B c for every row, computed once and shared by the positive and negative scores.

  Args:
    context: [2N, d_context] context rows.
    kernel: [d_context, d_layer] (B transposed), or None for B = identity.
    mode: 'trainable', 'fixed' (B gets no gradient) or 'identity'.
    compute_dtype: matmul input dtype; accumulation is float32.

  Returns:
    [2N, d_layer] float32.
  """
  # The context is a target, never learned through: no weight transport to other layers.
  context = jax.lax.stop_gradient(context)
  if mode == 'identity':
    return context
  if mode == 'fixed':
    kernel = jax.lax.stop_gradient(kernel)
  if compute_dtype == jnp.float32:
    return jnp.dot(context, kernel)  # Also keeps float64 inputs exact in the tests.
  return jnp.dot(context.astype(compute_dtype), kernel.astype(compute_dtype),
                 preferred_element_type=jnp.float32)


def clapp_term(z: jax.Array, context: jax.Array, kernel: jax.Array | None,
               config: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One CLAPP++ loss term: mean over rows of the paired score loss, and its metrics."""
  compute_dtype = models.dtype_from_name(config.model.compute_dtype)
  predicted = predict(context, kernel, config.loss.predictor, compute_dtype)
  u_pos, u_neg = paired_scores(z, predicted)
  loss = jnp.mean(score_loss(u_pos, u_neg, config.loss.score_fn))
  metrics = {
      'loss': loss,
      'pos_score': jnp.mean(u_pos),
      'neg_score': jnp.mean(u_neg),
      # The rule's third factor: rows whose hinge is active (non-zero plasticity).
      'active_pos': jnp.mean((u_pos < 1.0).astype(jnp.float32)),
      'active_neg': jnp.mean((u_neg > -1.0).astype(jnp.float32)),
  }
  return loss, metrics


def _kernel(params: Params, group: str, layer: int) -> jax.Array | None:
  entry = params['predictor'].get(group, {}).get(f'layer{layer}')
  return None if entry is None else entry['kernel']


def local_losses(config: ml_collections.ConfigDict, params: Params,
                 outputs: list[jax.Array]) -> tuple[list[jax.Array], dict[str, jax.Array]]:
  """Per-layer CLAPP++ losses (lateral, DFB or both) from the block outputs."""
  pools = loss_pool_sizes(config)
  reps = [pooled_representation(h, k) for h, k in zip(outputs, pools)]
  top = len(reps) - 1
  losses, metrics = [], {}
  for layer, z in enumerate(reps):
    terms = []
    if layer == top or config.loss.context in ('lateral', 'both'):
      terms.append(('lateral', z))
    if layer != top and config.loss.context in ('dfb', 'both'):
      terms.append(('feedback', reps[top]))
    layer_loss = 0.0
    for group, context in terms:
      loss, term_metrics = clapp_term(z, context, _kernel(params, group, layer), config)
      layer_loss += loss
      metrics.update({f'layer{layer}/{group}/{k}': v for k, v in term_metrics.items()})
    metrics[f'layer{layer}/loss'] = layer_loss
    losses.append(layer_loss)
  return losses, metrics


def bp_clapp_loss(config: ml_collections.ConfigDict, params: Params,
                  outputs: list[jax.Array]) -> tuple[list[jax.Array], dict[str, jax.Array]]:
  """BP-CLAPP++: the lateral CLAPP++ loss at the top layer only."""
  top = len(outputs) - 1
  z = pooled_representation(outputs[top], loss_pool_sizes(config)[top])
  loss, term_metrics = clapp_term(z, z, _kernel(params, 'lateral', top), config)
  metrics = {f'layer{top}/lateral/{k}': v for k, v in term_metrics.items()}
  metrics[f'layer{top}/loss'] = loss
  return [loss], metrics


def info_nce_loss(config: ml_collections.ConfigDict, params: Params,
                  outputs: list[jax.Array]) -> tuple[list[jax.Array], dict[str, jax.Array]]:
  """BP-InfoNCE on the projected, globally pooled top layer.

  The authors' form is one-directional: row a_i must pick b_i among all b_j. With
  `loss.symmetric`, the SimCLR NT-Xent over all 2N rows (self excluded) is used instead.
  """
  top = outputs[-1]
  pooled = jnp.mean(top.astype(jnp.promote_types(top.dtype, jnp.float32)), axis=(1, 2))
  projected = pooled @ params['predictor']['projection']['kernel']
  projected = projected / jnp.maximum(
      jnp.linalg.norm(projected, axis=-1, keepdims=True), 1e-12)
  num_images = projected.shape[0] // 2
  temperature = config.loss.temperature
  if config.loss.symmetric:
    logits = projected @ projected.T / temperature
    logits = jnp.where(jnp.eye(2 * num_images, dtype=bool), -jnp.inf, logits)
    targets = (jnp.arange(2 * num_images) + num_images) % (2 * num_images)
  else:
    logits = projected[:num_images] @ projected[num_images:].T / temperature
    targets = jnp.arange(num_images)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  loss = -jnp.mean(jnp.take_along_axis(log_probs, targets[:, None], axis=-1))
  positive_cosine = jnp.mean(
      jnp.sum(projected[:num_images] * projected[num_images:], axis=-1))
  accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))
  layer = len(outputs) - 1
  metrics = {f'layer{layer}/loss': loss, f'layer{layer}/infonce/pos_cosine': positive_cosine,
             f'layer{layer}/infonce/accuracy': accuracy}
  return [loss], metrics


_LOSSES = {'clapp': local_losses, 'bp_clapp': bp_clapp_loss, 'bp_infonce': info_nce_loss}


def losses_and_metrics(config: ml_collections.ConfigDict, params: Params, batch: Batch,
                       local: bool | None = None
                       ) -> tuple[list[jax.Array], dict[str, jax.Array]]:
  """Per-layer losses (one for global baselines) and their metrics.

  Args:
    config: the experiment config.
    params: as from `init_params`.
    batch: `{"view_a", "view_b"}` normalised NHWC images.
    local: override the stop-gradient between blocks (used by gradient alignment).

  Returns:
    `(losses, metrics)`: a list of scalar losses and a flat dict of scalar metrics.
  """
  outputs = encode(config, params, batch, local)
  return _LOSSES[config.loss.method](config, params, outputs)


def layer_losses(config: ml_collections.ConfigDict, params: Params, batch: Batch) -> list:
  """One scalar loss per layer (local rules) or the single top-layer loss (BP baselines)."""
  return losses_and_metrics(config, params, batch)[0]


def total_loss(config: ml_collections.ConfigDict,
               losses: list[jax.Array]) -> jax.Array:
  """Sum of the (optionally weighted) layer losses: differentiated once for all layers."""
  weights = config.loss.layer_weights or (1.0,) * len(losses)
  if len(weights) != len(losses):
    raise ValueError(f'loss.layer_weights has {len(weights)} entries for {len(losses)} '
                     'losses: give one weight per layer, or () for all 1.')
  return sum(w * loss for w, loss in zip(weights, losses))
