"""Checks a config once, before anything runs, with errors that name the field and the fix."""

import ml_collections

from localssl import config_lib
from localssl import models
from localssl import objectives


def _choice(config: ml_collections.ConfigDict, field: str, choices: tuple[str, ...]) -> None:
  value = config
  for part in field.split('.'):
    value = value[part]
  if value not in choices:
    raise ValueError(f'config.{field} = {value!r} is not valid: use one of '
                     f'{", ".join(repr(c) for c in choices)}.')


def _positive(config: ml_collections.ConfigDict, field: str, allow_zero: bool = False) -> None:
  value = config
  for part in field.split('.'):
    value = value[part]
  if value < 0 or (value == 0 and not allow_zero):
    raise ValueError(f'config.{field} = {value!r} must be {">= 0" if allow_zero else "> 0"}.')


def _probability(config: ml_collections.ConfigDict, field: str) -> None:
  value = config.data.aug[field]
  if not 0.0 <= value <= 1.0:
    raise ValueError(f'config.data.aug.{field} = {value} must be a probability in [0, 1].')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field of `config`, and how to fix it."""
  if config.data.name not in config_lib.DATASETS:
    raise ValueError(f'config.data.name = {config.data.name!r} is not a known dataset: use '
                     f'one of {", ".join(config_lib.DATASETS)}.')
  for field, choices in (('model.arch', config_lib.ARCHS),
                         ('model.compute_dtype', config_lib.COMPUTE_DTYPES),
                         ('model.init', config_lib.INITS),
                         ('model.conv_impl', config_lib.CONV_IMPLS),
                         ('loss.method', config_lib.LOSS_METHODS),
                         ('loss.context', config_lib.CONTEXTS),
                         ('loss.score_fn', config_lib.SCORE_FUNCTIONS),
                         ('loss.predictor', config_lib.PREDICTOR_MODES),
                         ('optim.name', config_lib.OPTIMIZERS),
                         ('optim.schedule', config_lib.SCHEDULES),
                         ('eval.protocol', config_lib.EVAL_PROTOCOLS)):
    _choice(config, field, choices)
  for field in ('batch_size', 'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
                'data.image_size', 'model.width_multiplier', 'optim.learning_rate',
                'eval.batch_size', 'eval.num_epochs', 'eval.learning_rate',
                'loss.temperature'):
    _positive(config, field)
  for field in ('optim.weight_decay', 'optim.grad_clip_norm', 'optim.warmup_epochs',
                'alignment_every_steps', 'eval.val_size'):
    _positive(config, field, allow_zero=True)
  if config.alignment_every_steps > 0 and not objectives.is_local(config):
    raise ValueError('config.alignment_every_steps > 0 compares local rules with BP, but '
                     f'loss.method = {config.loss.method!r} is global: set it to 0.')
  _positive(config, 'alignment_batches')
  if config.batch_size < 2:
    raise ValueError(f'config.batch_size = {config.batch_size}: the negative of a row is '
                     'another image, so at least 2 images per step are needed.')
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ValueError('Set config.num_epochs > 0 or config.num_train_steps > 0.')
  for field in ('flip_prob', 'jitter_prob', 'grayscale_prob', 'blur_prob'):
    _probability(config, field)
  low, high = config.data.aug.crop_scale
  if not 0 < low <= high <= 1:
    raise ValueError(f'config.data.aug.crop_scale = {(low, high)} must satisfy '
                     '0 < low <= high <= 1.')
  models.parse_blocks(models.ARCH_BLOCKS[config.model.arch], config.model.width_multiplier)
  objectives.loss_pool_sizes(config)  # Raises for a pool that does not fit its map.
  eval_shapes = objectives.block_output_shapes(config)
  for layer in config.eval.layers:
    if not 0 <= layer < len(eval_shapes):
      raise ValueError(f'config.eval.layers contains {layer}, but the encoder has layers '
                       f'0..{len(eval_shapes) - 1}.')
  num_losses = len(eval_shapes) if objectives.is_local(config) else 1
  if config.loss.layer_weights and len(config.loss.layer_weights) != num_losses:
    raise ValueError(f'config.loss.layer_weights has {len(config.loss.layer_weights)} '
                     f'entries; this rule has {num_losses} losses (or use () for all 1).')
  if config.optim.layer_lr_scales and (
      not config.optim.per_layer or len(config.optim.layer_lr_scales) != len(eval_shapes)):
    raise ValueError('config.optim.layer_lr_scales needs config.optim.per_layer = True and '
                     f'one factor per layer ({len(eval_shapes)}).')
  if config.loss.predictor == 'identity' and config.loss.method == 'clapp':
    for group, layers in objectives.predictor_shapes(config).items():
      for layer, (d_context, d_layer) in layers.items():
        if d_context != d_layer:
          raise ValueError(
              f'config.loss.predictor = "identity" needs equal context and layer sizes, '
              f'but {group} {layer} maps {d_context} -> {d_layer}: use context "lateral" '
              'or a trainable/fixed predictor.')
  if config.loss.predictor == 'identity' and config.loss.method != 'clapp':
    raise ValueError('config.loss.predictor = "identity" is for the local rule '
                     '(loss.method = "clapp") only.')
