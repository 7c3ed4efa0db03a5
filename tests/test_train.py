"""The training system: resume, devices, processes, preemption, non-finite losses, checkpoints."""

import glob
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import clapp_cifar
from localssl import checkpointing
from localssl import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_TFDS = os.path.join(ROOT, '..', 'shared', 'tensorflow_datasets')


def tiny_config(preset: str = 'both', steps: int = 4):
  config = clapp_cifar.get_config(f'{preset},tiny')
  config.model.width_multiplier = 1 / 16
  config.batch_size = 8
  config.num_train_steps = steps
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  return config


def leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def run(config, workdir, devices=None, data=None):
  local_batch = config.batch_size // jax.process_count()
  data = data or train.synthetic_data(config, local_batch)
  return train.train_and_evaluate(config, str(workdir), devices=devices, data=data)


def cifar_data(config):
  """The real TFDS pipeline on 64 images of the shared CIFAR-10."""
  config.data.data_dir = SHARED_TFDS
  config.data.pretrain_split = 'train[:64]'
  return train.pipeline_data(config, config.batch_size)


@pytest.mark.parametrize('source', ['synthetic', 'cifar10'])
def test_resume_after_a_restart_is_bitwise_identical(tmp_path, source):
  if source == 'cifar10' and not os.path.isdir(SHARED_TFDS):
    pytest.skip('needs ../shared CIFAR-10')

  def pretrain(steps, workdir):
    config = tiny_config(steps=steps)
    data = cifar_data(config) if source == 'cifar10' else None
    return run(config, workdir, data=data)

  straight = pretrain(4, tmp_path / 'straight')
  pretrain(2, tmp_path / 'restarted')
  resumed = pretrain(4, tmp_path / 'restarted')
  assert int(resumed.step) == 4
  for a, b in zip(leaves(straight), leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  steps = sorted(int(os.path.basename(p)) for p in
                 glob.glob(str(tmp_path / 'restarted' / 'checkpoints' / '[0-9]*')))
  assert steps == [2, 4]


def sharding_test_config(preset: str = 'both'):
  """Adam with a large epsilon: float32 summation order cannot flip tiny gradients' signs."""
  config = tiny_config(preset, steps=3)
  config.optim.learning_rate = 1e-2
  config.optim.eps = 1e-3
  return config


@pytest.mark.parametrize('preset', ['both', 'bp'])
def test_one_device_and_four_devices_agree(tmp_path, preset):
  assert jax.device_count() == 4, 'tests/conftest.py simulates 4 CPU devices'
  one = run(sharding_test_config(preset), tmp_path / 'one', devices=jax.devices()[:1])
  four = run(sharding_test_config(preset), tmp_path / 'four', devices=jax.devices())
  initial = [np.asarray(x) for x in jax.tree.leaves(
      train.initial_params(sharding_test_config(preset)))]
  moved = max(np.abs(a - b).max() for a, b in zip(leaves(one), initial))
  assert moved > 1e-4, 'the steps must move the parameters well beyond the tolerance'
  for a, b in zip(leaves(one), leaves(four)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_nonfinite_loss_stops_the_run_and_keeps_the_good_checkpoint(tmp_path):
  config = tiny_config(steps=6)
  clean = train.synthetic_data(config, config.batch_size)

  def batches(start):
    for step, batch in enumerate(clean.batches(start), start):
      if step == 2:  # The third step sees a NaN image.
        batch = dict(batch, view_a=np.full_like(batch['view_a'], np.nan))
      yield batch

  data = train.PretrainData(batches=batches, steps_per_epoch=10)
  with pytest.raises(train.NonFiniteLossError, match=r'layer \d became non-finite at step 3'
                     r'.*last good checkpoint \(step 2\)'):
    run(config, tmp_path, data=data)
  checkpoints = glob.glob(str(tmp_path / 'checkpoints' / '[0-9]*'))
  assert [os.path.basename(p) for p in checkpoints] == ['2']


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
  config = tiny_config(steps=10)
  config.checkpoint_every_steps = 100
  clean = train.synthetic_data(config, config.batch_size)

  def batches(start):
    for step, batch in enumerate(clean.batches(start), start):
      if step == 3:
        signal.raise_signal(signal.SIGTERM)
      yield batch

  with pytest.raises(train.PreemptedError, match='Preempted at step 4'):
    run(config, tmp_path, data=train.PretrainData(batches, 10))
  assert os.path.isdir(tmp_path / 'checkpoints' / '4')
  resumed = run(config, tmp_path)
  assert int(resumed.step) == 10


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
  run(tiny_config(steps=4), tmp_path)
  for path in glob.glob(str(tmp_path / 'checkpoints' / '4' / 'params' / '**'), recursive=True):
    if os.path.isfile(path):
      with open(path, 'wb') as f:
        f.write(b'garbage')
  manager = checkpointing.make_manager(str(tmp_path), keep=3)
  template = run(tiny_config(steps=1), tmp_path / 'other')
  restored = checkpointing.restore_state(manager, template)
  manager.close()
  assert int(restored.step) == 2
  assert not os.path.exists(tmp_path / 'checkpoints' / '4')
  kept = os.listdir(tmp_path / 'broken_checkpoints')
  assert len(kept) == 1 and kept[0].startswith('4.'), 'the broken checkpoint is kept aside'
  resumed = run(tiny_config(steps=4), tmp_path)  # Saves step 4 again and finishes.
  assert int(resumed.step) == 4
  assert sorted(n for n in os.listdir(tmp_path / 'checkpoints') if n.isdigit()) == ['2', '4']


def test_bad_batch_layout_names_the_field(tmp_path):
  config = tiny_config()
  config.batch_size = 6
  with pytest.raises(ValueError, match='config.batch_size = 6 must be a multiple of the 4'):
    run(config, tmp_path)


@pytest.mark.skipif(not os.path.isdir(SHARED_TFDS), reason='needs ../shared CIFAR-10')
def test_main_runs_end_to_end_on_cifar10_and_resumes(tmp_path):
  workdir = tmp_path / 'run'
  command = [sys.executable, os.path.join(ROOT, 'main.py'),
             '--config=' + os.path.join(ROOT, 'configs', 'clapp_cifar.py') + ':dfb,tiny',
             f'--workdir={workdir}', '--config.num_train_steps=3',
             '--config.checkpoint_every_steps=2', '--config.log_every_steps=1',
             '--config.batch_size=8', '--config.model.width_multiplier=0.0625',
             '--config.data.pretrain_split=train[:64]']
  env = dict(os.environ, TFDS_DATA_DIR=SHARED_TFDS, JAX_NUM_CPU_DEVICES='1')
  result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'step 3/3' in result.stderr
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '3']
  assert glob.glob(str(workdir / 'tensorboard' / 'events.out.tfevents.*'))
  again = subprocess.run(command[:-4] + ['--config.num_train_steps=4'] + command[-3:],
                         env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'Resumed from the checkpoint of step 3' in again.stderr


def test_a_bad_config_value_fails_before_anything_runs(tmp_path):
  command = [sys.executable, os.path.join(ROOT, 'main.py'),
             '--config=' + os.path.join(ROOT, 'configs', 'clapp_cifar.py') + ':tiny',
             f'--workdir={tmp_path}', '--config.loss.context=sideways']
  result = subprocess.run(command, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "config.loss.context = 'sideways' is not valid" in result.stderr
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_two_processes_match_one_process(tmp_path):
  """The multi-host path: 2 processes x 2 CPU devices vs 1 process x 4 devices."""
  reference = run(sharding_test_config(), tmp_path / 'single')
  port = 20000 + os.getpid() % 20000
  worker = os.path.join(ROOT, 'tests', 'multihost_worker.py')
  env = dict(os.environ, PYTHONPATH=ROOT)
  processes = [subprocess.Popen(
      [sys.executable, worker, str(index), str(port), str(tmp_path / 'multi')],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for index in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output[-3000:]
  for index in range(2):
    saved = np.load(tmp_path / 'multi' / f'params_{index}.npz')
    got = [saved[f'arr_{i}'] for i in range(len(saved.files))]
    for a, b in zip(leaves(reference), got):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # As 1 vs 4 devices.


@pytest.mark.skipif(not os.path.isdir(SHARED_TFDS), reason='needs ../shared CIFAR-10')
def test_sigkill_then_restart_continues_from_the_last_checkpoint(tmp_path):
  command = [sys.executable, os.path.join(ROOT, 'main.py'),
             '--config=' + os.path.join(ROOT, 'configs', 'clapp_cifar.py') + ':tiny',
             f'--workdir={tmp_path}', '--config.num_train_steps=400',
             '--config.checkpoint_every_steps=5', '--config.batch_size=8',
             '--config.model.width_multiplier=0.0625', '--config.data.pretrain_split=train[:64]']
  env = dict(os.environ, TFDS_DATA_DIR=SHARED_TFDS, JAX_NUM_CPU_DEVICES='1')
  process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while not glob.glob(str(tmp_path / 'checkpoints' / '1[0-9]')) and time.time() < deadline:
      assert process.poll() is None, 'the run ended before it could be killed'
      time.sleep(0.2)
  finally:
    process.kill()  # SIGKILL: no handler runs, an async save may be cut in the middle.
    process.wait()
  # Orbax writes into '<step>.orbax-checkpoint-tmp-*' and renames when complete.
  saved = sorted(int(name) for name in os.listdir(tmp_path / 'checkpoints') if name.isdigit())
  assert saved and saved[-1] < 400
  command[5] = '--config.num_train_steps=30'
  again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  resumed = int(again.stderr.split('Resumed from the checkpoint of step ')[1].split('.')[0])
  assert resumed == saved[-1]
  assert 'step 30/30' in again.stderr
