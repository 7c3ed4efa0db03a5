"""The optimizer: one Optax transform per parameter group, chosen by parameter-path labels.

Groups are 'encoder' and 'predictor' (the B matrices or the InfoNCE projection), or, with
`optim.per_layer`, 'encoder/layer{l}' and 'predictor/layer{l}'. A fixed random B is in the
group 'frozen', whose updates are zero.
"""

import re
from typing import Any, Callable

import jax
import ml_collections
import optax

_LAYER_PATTERN = re.compile(r'(?:block|layer)(\d+)')


def _path_names(path) -> list[str]:
  return [str(getattr(entry, 'key', getattr(entry, 'name', entry))) for entry in path]


def label_for_path(config: ml_collections.ConfigDict, names: list[str]) -> str:
  """The group of one parameter from its path, e.g. ['encoder', 'block2_conv0', 'kernel'].

  Raises:
    ValueError: for a parameter outside 'encoder' and 'predictor', or without a layer
      index when per-layer groups are asked for.
  """
  group = names[0]
  if group not in ('encoder', 'predictor'):
    raise ValueError(f'Parameter {"/".join(names)} is neither under "encoder" nor '
                     '"predictor": the optimizer has no group for it.')
  if group == 'predictor' and config.loss.predictor == 'fixed' and names[1] != 'projection':
    return 'frozen'
  if not config.optim.per_layer or names[1] == 'projection':
    return group
  match = _LAYER_PATTERN.match(names[1]) or _LAYER_PATTERN.match(names[2])
  if match is None:
    raise ValueError(f'Parameter {"/".join(names)} has no layer index for per-layer groups.')
  return f'{group}/layer{int(match.group(1))}'


def param_labels(config: ml_collections.ConfigDict, params: Any) -> Any:
  """A pytree like `params` holding each parameter's group label."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: label_for_path(config, _path_names(path)), params)


def learning_rate_schedule(optim_config: ml_collections.ConfigDict, base_rate: float,
                           total_steps: int, steps_per_epoch: int) -> optax.Schedule:
  """Constant, or linear warm-up then cosine decay to 0 over `total_steps`."""
  if optim_config.schedule == 'constant':
    return optax.constant_schedule(base_rate)
  warmup_steps = int(optim_config.warmup_epochs * steps_per_epoch)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=base_rate, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=0.0)


def _group_transform(optim_config: ml_collections.ConfigDict, schedule: optax.Schedule,
                     weight_decay: float) -> optax.GradientTransformation:
  if optim_config.name == 'adamw':
    return optax.adamw(schedule, eps=optim_config.eps, weight_decay=weight_decay)
  return optax.lars(schedule, weight_decay=weight_decay, momentum=optim_config.momentum)


def group_hyperparameters(config: ml_collections.ConfigDict,
                          group: str) -> tuple[float, float]:
  """(learning rate, weight decay) of a group; a layer's rate is scaled per layer."""
  optim = config.optim
  rate, decay = optim.learning_rate, optim.weight_decay
  if group.startswith('predictor'):
    if optim.predictor_learning_rate >= 0:
      rate = optim.predictor_learning_rate
    if optim.predictor_weight_decay >= 0:
      decay = optim.predictor_weight_decay
  match = _LAYER_PATTERN.search(group)
  if match and optim.layer_lr_scales:
    rate *= optim.layer_lr_scales[int(match.group(1))]
  return rate, decay


def make_optimizer(config: ml_collections.ConfigDict, params: Any, total_steps: int,
                   steps_per_epoch: int
                   ) -> tuple[optax.GradientTransformation, dict[str, Callable]]:
  """Builds the partitioned optimizer for `params`.

  Args:
    config: the experiment config (`config.optim`, `config.loss.predictor`).
    params: the parameters (or their shapes) to label.
    total_steps: length of the run, for decaying schedules.
    steps_per_epoch: converts warm-up epochs to steps.

  Returns:
    `(tx, schedules)`: the transform and the learning-rate schedule of each group.
  """
  labels = param_labels(config, params)
  groups = sorted(set(jax.tree.leaves(labels)))
  transforms, schedules = {}, {}
  for group in groups:
    if group == 'frozen':
      transforms[group] = optax.set_to_zero()
      continue
    rate, decay = group_hyperparameters(config, group)
    schedules[group] = learning_rate_schedule(config.optim, rate, total_steps,
                                              steps_per_epoch)
    transforms[group] = _group_transform(config.optim, schedules[group], decay)
  tx = optax.partition(transforms, labels)
  if config.optim.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.optim.grad_clip_norm), tx)
  return tx, schedules
