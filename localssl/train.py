"""Pretraining: one jitted, donated step over a 1-D 'data' mesh, restartable by construction.

Data flows one way: TFDS -> two augmented views (per process) -> global sharded batch ->
encoder -> per-layer losses -> grads -> optax -> state -> Orbax checkpoint. Parameters are
replicated and the batch is sharded over every device, so negatives come from the global
batch. The batch of a step is a pure function of (seed, step), and the state is restored
from the newest checkpoint, so a restarted run continues exactly where the last save was.
"""

import dataclasses
import os
import signal
from typing import Callable, Iterator, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from localssl import checkpointing
from localssl import grad_align
from localssl import input_pipeline
from localssl import logging_utils
from localssl import objectives
from localssl import optim
from localssl import train_step as train_step_lib
from localssl import validation

LocalBatch = dict[str, np.ndarray]


class NonFiniteLossError(FloatingPointError):
  """A loss became NaN or Inf; nothing after the last good checkpoint was saved."""


class PreemptedError(RuntimeError):
  """The run was preempted and saved its state; start it again to continue."""


@dataclasses.dataclass(frozen=True)
class PretrainData:
  """This process's pretraining batches, from any start step, and the epoch length."""
  batches: Callable[[int], Iterator[LocalBatch]]
  steps_per_epoch: int


def pipeline_data(config: ml_collections.ConfigDict, local_batch_size: int) -> PretrainData:
  """The TFDS pipeline: this process's part of the pretraining split, two views per image."""
  data = input_pipeline.load_split(config, config.data.pretrain_split,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count())
  steps = input_pipeline.steps_per_epoch(len(data['images']), local_batch_size)
  if steps < 1:
    raise ValueError(f'config.batch_size = {config.batch_size} is larger than the '
                     f'{len(data["images"])} images this process holds: lower it.')
  batches = lambda start: input_pipeline.pretrain_batches(
      config, data, local_batch_size=local_batch_size, start_step=start,
      process_index=jax.process_index())
  return PretrainData(batches=batches, steps_per_epoch=steps)


def synthetic_data(config: ml_collections.ConfigDict, local_batch_size: int,
                   steps_per_epoch: int = 100) -> PretrainData:
  """Gaussian images that depend only on (seed, step, global row): for tests and benchmarks.

  The global batch is the same whatever the number of processes, which lets tests compare
  multi-process runs with a single process.
  """
  size = config.data.image_size
  first_row = jax.process_index() * local_batch_size

  def batch(step: int) -> LocalBatch:
    views = {'view_a': [], 'view_b': []}
    for row in range(first_row, first_row + local_batch_size):
      rng = np.random.default_rng([config.seed, step, row])
      for name in views:
        views[name].append(rng.standard_normal((size, size, 3), dtype=np.float32))
    return {name: np.stack(rows) for name, rows in views.items()}

  def batches(start: int) -> Iterator[LocalBatch]:
    step = start
    while True:
      yield batch(step)
      step += 1

  return PretrainData(batches=batches, steps_per_epoch=steps_per_epoch)


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """The one place that turns epochs into steps."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return int(config.num_epochs * steps_per_epoch)


def initial_params(config: ml_collections.ConfigDict) -> dict:
  """The parameters a run starts from (a pure function of config.seed)."""
  init_rng, _ = jax.random.split(jax.random.key(config.seed))
  return objectives.init_params(config, init_rng)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D 'data' mesh with Auto axes (NamedShardings are passed explicitly to jit)."""
  if devices is None:
    return jax.make_mesh((jax.device_count(),), ('data',),
                         axis_types=(jax.sharding.AxisType.Auto,))
  return jax.sharding.Mesh(np.asarray(devices), ('data',),
                           axis_types=(jax.sharding.AxisType.Auto,))


def check_batch_layout(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> int:
  """Returns the per-process batch size after checking it divides evenly."""
  num_devices = mesh.devices.size
  if config.batch_size % num_devices:
    raise ValueError(f'config.batch_size = {config.batch_size} must be a multiple of the '
                     f'{num_devices} devices the batch is sharded over.')
  return config.batch_size // jax.process_count()


def global_batch(local: LocalBatch, sharding: jax.sharding.NamedSharding) -> dict:
  """Assembles the global sharded batch from every process's local rows."""
  return {name: jax.make_array_from_process_local_data(sharding, value)
          for name, value in local.items()}


class _PreemptionFlag:
  """Set by SIGTERM in a single-process run; the loop then saves and stops.

  With several processes the flag of one process would not stop the others (they would
  wait in the next collective), so only Orbax's synchronised `reached_preemption` is used.
  """

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() > 1:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: rely on Orbax's preemption check only.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint and stopping.')
    self.raised = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _raise_if_nonfinite(state: train_step_lib.TrainState, manager, workdir: str) -> None:
  first_bad = int(state.first_nonfinite_step)
  if first_bad >= 0:
    last_good = manager.latest_step()
    kept = (f'the last good checkpoint (step {last_good}) is kept in '
            f'{checkpointing.checkpoint_dir(workdir)}' if last_good is not None else
            'no checkpoint had been saved')
    layer = int(state.nonfinite_layer)
    what = f'The loss of layer {layer}' if layer >= 0 else 'The gradient'
    raise NonFiniteLossError(
        f'{what} became non-finite at step {first_bad + 1}; training stopped and {kept}. '
        'Lower config.optim.learning_rate or set config.optim.grad_clip_norm.')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices: Sequence[jax.Device] | None = None,
                       data: PretrainData | None = None) -> train_step_lib.TrainState:
  """Pretrains with the configured rule, resuming from `workdir` if it holds checkpoints.

  Args:
    config: the experiment config (validated here).
    workdir: checkpoints, TensorBoard events and results go here.
    devices: devices of the data mesh (default: all devices of all processes).
    data: the pretraining batches (default: the TFDS pipeline of `config.data`).

  Returns:
    The final train state.

  Raises:
    NonFiniteLossError: when a loss becomes NaN/Inf (nothing non-finite is saved).
    PreemptedError: after saving the state on SIGTERM or an Orbax preemption notice.
  """
  validation.validate(config)
  mesh = make_mesh(devices)
  local_batch_size = check_batch_layout(config, mesh)
  data = data or pipeline_data(config, local_batch_size)
  num_steps = total_steps(config, data.steps_per_epoch)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))

  step_rng = jax.random.split(jax.random.key(config.seed))[1]
  abstract_params = jax.eval_shape(lambda: initial_params(config))
  tx, schedules = optim.make_optimizer(config, abstract_params, num_steps,
                                       data.steps_per_epoch)
  init_state = jax.jit(
      lambda: train_step_lib.create_train_state(initial_params(config), tx),
      out_shardings=replicated)
  step_fn = jax.jit(train_step_lib.make_train_step(config, tx, schedules),
                    in_shardings=(replicated, batch_sharding, replicated),
                    out_shardings=(replicated, replicated), donate_argnums=(0,))

  os.makedirs(workdir, exist_ok=True)
  manager = checkpointing.make_manager(workdir, config.keep_checkpoints)
  writer = logging_utils.MetricWriter(os.path.join(workdir, 'tensorboard'))
  state = init_state()
  restored = checkpointing.restore_state(manager, state)
  if restored is not None:
    state = restored
    logging_utils.log_line(f'Resumed from the checkpoint of step {int(state.step)}.')
  _raise_if_nonfinite(state, manager, workdir)
  start = int(state.step)
  logging_utils.log_line(
      f'{config.loss.method}/{config.loss.context}: steps {start}..{num_steps} '
      f'({data.steps_per_epoch} per epoch), global batch {config.batch_size} on '
      f'{mesh.devices.size} devices, {jax.process_count()} processes.')
  alignment = None
  if config.alignment_every_steps > 0:
    alignment = jax.jit(grad_align.make_alignment_fn(config),
                        in_shardings=(replicated, batch_sharding), out_shardings=replicated)
  progress = logging_utils.Progress(start, num_steps, config.batch_size)
  batches = data.batches(start)
  try:
    with _PreemptionFlag() as preemption:
      for step in range(start, num_steps):
        batch = global_batch(next(batches), batch_sharding)
        state, metrics = step_fn(state, batch, jax.random.fold_in(step_rng, step))
        done = step + 1
        if logging_utils.is_time(done, config.log_every_steps, num_steps):
          _raise_if_nonfinite(state, manager, workdir)
          scalars = logging_utils.to_floats(metrics)
          rates = progress.report(done)
          writer.scalars(done, {**scalars, **rates})
          logging_utils.log_line(logging_utils.format_line(done, num_steps, scalars, rates))
        if alignment is not None and logging_utils.is_time(
            done, config.alignment_every_steps, num_steps):
          cosines = logging_utils.to_floats(alignment(state.params, batch))
          writer.scalars(done, {f'alignment/{k}': v for k, v in cosines.items()})
        preempted = preemption.raised or manager.reached_preemption(done)
        if logging_utils.is_time(done, config.checkpoint_every_steps, num_steps) or preempted:
          _raise_if_nonfinite(state, manager, workdir)
          checkpointing.save(manager, state, config)
        if preempted:
          raise PreemptedError(f'Preempted at step {done}: the state was saved in '
                               f'{checkpointing.checkpoint_dir(workdir)}; run the same '
                               'command again to continue.')
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()
  return state
