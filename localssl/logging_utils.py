"""One writer for metrics (TensorBoard events + log lines), active on process 0 only."""

import time
from typing import Mapping

from absl import logging
import jax
import numpy as np
import tensorflow as tf


class MetricWriter:
  """Writes scalars to TensorBoard event files in `logdir` from process 0."""

  def __init__(self, logdir: str):
    self._writer = None
    if jax.process_index() == 0:
      self._writer = tf.summary.create_file_writer(logdir)

  def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    with self._writer.as_default():
      for name, value in scalars.items():
        tf.summary.scalar(name, float(value), step=step)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def is_time(step: int, every: int, last_step: int) -> bool:
  """The one predicate for periodic work: every `every` steps, and at the last step."""
  return step == last_step or (every > 0 and step % every == 0)


class Progress:
  """Images/s and ETA between two calls to `report`."""

  def __init__(self, start_step: int, total_steps: int, images_per_step: int):
    self._total = total_steps
    self._images_per_step = images_per_step
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def report(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    seconds_per_step = (now - self._last_time) / steps
    self._last_step, self._last_time = step, now
    return {'images_per_second': self._images_per_step / max(seconds_per_step, 1e-9),
            'eta_seconds': seconds_per_step * (self._total - step)}


def format_line(step: int, total: int, metrics: Mapping[str, float],
                progress: Mapping[str, float]) -> str:
  """A progress line: step/total, losses per layer, images/s and ETA."""
  layer_losses = [f'{float(v):.4f}' for k, v in sorted(metrics.items())
                  if k.endswith('/loss') and k.count('/') == 1]
  eta = int(progress['eta_seconds'])
  return (f'step {step}/{total} loss {float(metrics["total_loss"]):.4f} '
          f'layers [{" ".join(layer_losses)}] '
          f'{progress["images_per_second"]:.0f} img/s ETA {eta // 3600}:{eta // 60 % 60:02d}:'
          f'{eta % 60:02d}')


def to_floats(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
  """Fetches device scalars to host floats."""
  return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}


def log_line(line: str) -> None:
  if jax.process_index() == 0:
    logging.info('%s', line)
