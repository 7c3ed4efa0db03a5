"""The pure training step: `(state, batch, rng) -> (state, metrics)`, with no jit inside.

The sum of all layer losses is differentiated once; the stop-gradients placed by the encoder
(between blocks) and by the objectives (on every context) keep each layer's update local.
"""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from localssl import objectives


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. `first_nonfinite_step` is -1 while all losses are finite."""
  step: jax.Array
  params: Any
  opt_state: Any
  first_nonfinite_step: jax.Array
  nonfinite_layer: jax.Array


def create_train_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
  """The state at step 0 for `params`."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    first_nonfinite_step=jnp.full((), -1, jnp.int32),
                    nonfinite_layer=jnp.full((), -1, jnp.int32))


def _group_norms(tree: Any, prefix: str) -> dict[str, jax.Array]:
  norms = {f'{prefix}/{group}': optax.tree.norm(sub) for group, sub in tree.items() if
           jax.tree.leaves(sub)}
  norms[prefix] = optax.tree.norm(tree)
  return norms


def make_train_step(config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                    schedules: dict[str, Callable[[Any], jax.Array]]
                    ) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
  """Returns the pure train step of the configured rule.

  Args:
    config: the experiment config.
    tx: the optimizer from `optim.make_optimizer`.
    schedules: its learning-rate schedule per group, logged as metrics.

  Returns:
    `train_step(state, batch, rng) -> (new_state, metrics)`. The rules of the paper are
    deterministic; `rng` is folded with the step for any stochastic extension.
  """

  def loss_fn(params, batch):
    losses, metrics = objectives.losses_and_metrics(config, params, batch)
    total = objectives.total_loss(config, losses)
    return total, (jnp.stack(losses), dict(metrics, total_loss=total))

  def train_step(state: TrainState, batch: dict, rng: jax.Array):
    del rng  # No rule of the paper samples anything inside the step.
    grads, (losses, metrics) = jax.grad(loss_fn, has_aux=True)(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A finite loss can still give Inf/NaN gradients: then the parameters are not trusted.
    finite = jnp.isfinite(losses) & jnp.isfinite(optax.tree.norm(grads))
    newly_bad = jnp.logical_and(state.first_nonfinite_step < 0, ~jnp.all(finite))
    # The first layer whose loss is not finite, or -1 when only the gradients are.
    bad_layer = jnp.where(jnp.all(jnp.isfinite(losses)), -1,
                          jnp.argmin(jnp.isfinite(losses)))
    metrics = dict(metrics)  # total_loss: the weighted sum that was differentiated.
    metrics.update(_group_norms(grads, 'grad_norm'))
    metrics.update(_group_norms(params, 'param_norm'))
    metrics.update({f'learning_rate/{group}': schedule(state.step)
                    for group, schedule in schedules.items()})
    new_state = TrainState(
        step=state.step + 1, params=params, opt_state=opt_state,
        first_nonfinite_step=jnp.where(newly_bad, state.step, state.first_nonfinite_step),
        nonfinite_layer=jnp.where(newly_bad, bad_layer.astype(jnp.int32),
                                  state.nonfinite_layer))
    return new_state, metrics

  return train_step
