"""Orbax checkpoints of a run, as named items: `params`, `opt_state`, `meta` and `config`.

Linear evaluation restores `params` alone. A checkpoint that fails to restore is reported and
the one before it is tried; a broken newer step is moved to `workdir/broken_checkpoints/`
(nothing is deleted), so that the resumed run can save that step again.
"""

import json
import os
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp

from localssl import train_step as train_step_lib


class CheckpointError(RuntimeError):
  """No usable checkpoint where one was expected."""


def checkpoint_dir(workdir: str) -> str:
  """Where a run keeps its checkpoints."""
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def make_manager(workdir: str, keep: int, create: bool = True) -> ocp.CheckpointManager:
  """A manager of `workdir/checkpoints` keeping the newest `keep` steps."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, state: train_step_lib.TrainState,
         config: ml_collections.ConfigDict) -> None:
  """Saves `state` at its step (asynchronously; call `manager.wait_until_finished()`)."""
  step = int(state.step)
  meta = {'step': step, 'first_nonfinite_step': int(state.first_nonfinite_step),
          'nonfinite_layer': int(state.nonfinite_layer)}
  manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      opt_state=ocp.args.StandardSave(state.opt_state),
      meta=ocp.args.JsonSave(meta),
      config=ocp.args.JsonSave(json.loads(config.to_json()))), force=True)


def _abstract(tree: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _restore_candidates(manager: ocp.CheckpointManager, step: int | None) -> list[int]:
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None and step >= 0:
    if step not in steps:
      raise CheckpointError(f'No checkpoint of step {step} in {manager.directory}; '
                            f'available steps: {steps or "none"}.')
    return [step]
  return steps


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  """Moves unrestorable steps to `workdir/broken_checkpoints/` (kept, never deleted).

  Otherwise the run, resumed from an older step, would meet the broken step again and
  could not save over it.
  """
  directory = str(manager.directory)
  broken = os.path.join(os.path.dirname(directory), 'broken_checkpoints')
  if jax.process_index() == 0:
    os.makedirs(broken, exist_ok=True)
    for step in steps:
      target = os.path.join(broken, f'{step}.{time.strftime("%Y%m%d-%H%M%S")}')
      os.rename(os.path.join(directory, str(step)), target)
      logging.warning('Moved the unrestorable checkpoint of step %d to %s.', step, target)
  multihost_utils.sync_global_devices('localssl_set_aside_broken_checkpoints')
  manager.reload()


def restore_state(manager: ocp.CheckpointManager,
                  template: train_step_lib.TrainState) -> train_step_lib.TrainState | None:
  """The newest restorable state, placed like `template`, or None when there is none.

  Newer steps that fail to restore are moved to `workdir/broken_checkpoints/`.

  Raises:
    CheckpointError: when checkpoints exist but none can be restored.
  """
  steps = _restore_candidates(manager, None)
  errors, broken = [], []
  for step in steps:
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(_abstract(template.params)),
          opt_state=ocp.args.StandardRestore(_abstract(template.opt_state)),
          meta=ocp.args.JsonRestore()))
    except Exception as error:  # pylint: disable=broad-except
      logging.error('Checkpoint of step %d in %s cannot be restored (%s); it is kept on '
                    'disk and the previous one is tried.', step, manager.directory, error)
      errors.append(f'step {step}: {type(error).__name__}: {error}')
      broken.append(step)
      continue
    if broken:
      _set_aside(manager, broken)
    meta = restored.meta
    as_scalar = lambda value, like: jax.device_put(
        jax.numpy.asarray(value, like.dtype), like.sharding)
    return train_step_lib.TrainState(
        step=as_scalar(meta['step'], template.step),
        params=restored.params, opt_state=restored.opt_state,
        first_nonfinite_step=as_scalar(meta['first_nonfinite_step'],
                                       template.first_nonfinite_step),
        nonfinite_layer=as_scalar(meta['nonfinite_layer'], template.nonfinite_layer))
  if errors:
    raise CheckpointError(f'No checkpoint in {manager.directory} could be restored:\n  ' +
                          '\n  '.join(errors) + '\nMove the broken step folders away to '
                          'start again from scratch; they were left untouched.')
  return None


def restore_params(workdir: str, abstract_params: Any,
                   step: int | None = None) -> tuple[Any, int]:
  """Restores only the `params` item of a run's checkpoint.

  Args:
    workdir: the run's workdir (holding `checkpoints/`).
    abstract_params: shapes, dtypes and shardings of the parameters.
    step: the step to restore; None or -1 for the newest restorable one.

  Returns:
    `(params, step)`.

  Raises:
    CheckpointError: when there is no checkpoint or none can be restored.
  """
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise CheckpointError(f'No checkpoints in {directory}: pretrain first with --workdir='
                          f'{workdir}, or set config.eval.checkpoint_dir to a trained run.')
  manager = make_manager(workdir, keep=1_000_000, create=False)
  errors = []
  try:
    candidates = _restore_candidates(manager, step)
    if not candidates:
      raise CheckpointError(f'No checkpoint in {directory}: pretrain first.')
    for candidate in candidates:
      try:
        restored = manager.restore(candidate, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(abstract_params))))
        return restored.params, candidate
      except Exception as error:  # pylint: disable=broad-except
        logging.error('Cannot restore params of step %d in %s: %s', candidate, directory,
                      error)
        errors.append(f'step {candidate}: {type(error).__name__}: {error}')
  finally:
    manager.close()
  raise CheckpointError(f'No params in {directory} could be restored (does the config match '
                        'the pretrained model?):\n  ' + '\n  '.join(errors))
