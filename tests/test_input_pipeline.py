"""Tests of localssl.augment and localssl.input_pipeline (CPU, well under a minute)."""

import os
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from localssl import augment
from localssl import config_lib
from localssl import input_pipeline

SHARED_TFDS = os.path.join(os.path.dirname(__file__), '..', '..', 'shared',
                           'tensorflow_datasets')


def _config(dataset='cifar10'):
  config = config_lib.base_config(dataset)
  config.data.num_parallel_calls = 2
  return config


def _identity_aug_config(dataset='cifar10'):
  """A config whose pretraining view is exactly the evaluation view."""
  config = _config(dataset)
  aug = config.data.aug
  aug.crop_scale = (1.0, 1.0)
  aug.crop_ratio = (1.0, 1.0)
  aug.flip_prob = aug.jitter_prob = aug.grayscale_prob = aug.blur_prob = 0.0
  return config


def _image(seed=0, size=32):
  return tf.constant(np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8))


def _data(num, size=32, seed=0):
  rng = np.random.default_rng(seed)
  return dict(images=rng.integers(0, 256, (num, size, size, 3), np.uint8),
              labels=rng.integers(0, 10, num).astype(np.int64))


def _seed(i):
  return tf.constant([i, 7], tf.int64)


def test_two_views_differ():
  config = _config()
  view_a, view_b = augment.two_views(_image(), _seed(0), config.data)
  assert view_a.shape == view_b.shape == (32, 32, 3)
  assert view_a.dtype == view_b.dtype == tf.float32
  assert not np.allclose(view_a, view_b)


@pytest.mark.parametrize('field, on_value', [
    ('crop_scale', (0.1, 0.5)),
    ('flip_prob', 1.0),
    ('jitter_prob', 1.0),
    ('grayscale_prob', 1.0),
    ('blur_prob', 1.0),
])
def test_each_op_changes_the_image_only_when_enabled(field, on_value):
  config = _identity_aug_config()
  image = _image()
  plain = augment.eval_view(image, config.data).numpy()
  for i in range(3):  # Disabled: an exact identity, whatever the seed.
    np.testing.assert_array_equal(augment.augment_view(image, _seed(i), config.data), plain)
  setattr(config.data.aug, field, on_value)
  for i in range(3):
    view = augment.augment_view(image, _seed(i), config.data).numpy()
    assert not np.allclose(view, plain), (field, i)
    if field == 'flip_prob':
      np.testing.assert_array_equal(view, plain[:, ::-1])
    if field == 'grayscale_prob':
      pixels = view * np.array(config.data.std) + np.array(config.data.mean)
      np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-5)


def test_views_are_deterministic_in_the_seed():
  config = _config()
  image = _image()
  np.testing.assert_array_equal(augment.augment_view(image, _seed(3), config.data),
                                augment.augment_view(image, _seed(3), config.data))
  assert not np.allclose(augment.augment_view(image, _seed(3), config.data),
                         augment.augment_view(image, _seed(4), config.data))


def test_views_of_non_square_images_have_the_network_size():
  config = _config()
  image = _image(size=48)[:40]
  assert augment.augment_view(image, _seed(0), config.data).shape == (32, 32, 3)
  assert augment.probe_train_view(image, _seed(0), config.data).shape == (32, 32, 3)
  assert augment.eval_view(image, config.data).shape == (32, 32, 3)


def test_crop_window_falls_back_to_a_centre_crop():
  # No aspect ratio in [3, 4] fits a square at full area: centred crop of ratio 3.
  oy, ox, h, w = augment.crop_window(
      tf.constant(30), tf.constant(30), _seed(0), scale=(1.0, 1.0), ratio=(3.0, 4.0))
  assert (int(oy), int(ox), int(h), int(w)) == (10, 0, 10, 30)


def test_blur_kernel_is_odd_and_about_a_tenth_of_the_image():
  assert [augment.blur_kernel_size(s) for s in (32, 64, 96, 224)] == [3, 7, 9, 23]


def test_pretrain_batches_shapes_and_determinism():
  config = _config()
  data = _data(64)
  make = lambda **kw: input_pipeline.pretrain_batches(
      config, data, local_batch_size=16, **kw)
  # 4 steps per epoch: steps 0..5 cross an epoch boundary.
  batches = make()
  first = [next(batches) for _ in range(6)]
  assert set(first[0]) == {'view_a', 'view_b'}
  for name in ('view_a', 'view_b'):
    assert first[0][name].shape == (16, 32, 32, 3)
    assert first[0][name].dtype == np.float32
  # A second iterator, restarted at step 4, gives the same batches 4 and 5.
  resumed = make(start_step=4)
  for step in (4, 5):
    batch = next(resumed)
    for name in ('view_a', 'view_b'):
      np.testing.assert_array_equal(batch[name], first[step][name])
  other_process = next(make(process_index=1))
  assert not np.allclose(other_process['view_a'], first[0]['view_a'])
  config.seed = 1
  other_seed = next(make())
  assert not np.allclose(other_seed['view_a'], first[0]['view_a'])


def test_pretrain_epoch_visits_every_example_once():
  config = _identity_aug_config()
  data = _data(48)
  batches = input_pipeline.pretrain_batches(config, data, local_batch_size=16)
  plain = augment.eval_view(data['images'], config.data).numpy()
  for epoch in range(2):
    views = np.concatenate([next(batches)['view_a'] for _ in range(3)])
    seen = [int(np.argmin(np.abs(plain - v).sum(axis=(1, 2, 3)))) for v in views]
    np.testing.assert_array_equal(views, plain[seen])
    assert sorted(seen) == list(range(48)), epoch


@pytest.mark.skipif(not os.path.isdir(SHARED_TFDS), reason='no shared CIFAR-10')
def test_normalised_cifar10_has_zero_mean_unit_std():
  config = _identity_aug_config()
  config.data.data_dir = SHARED_TFDS
  data = input_pipeline.load_split(config, 'train[:512]')
  assert data['images'].shape == (512, 32, 32, 3) and data['images'].dtype == np.uint8
  assert data['labels'].dtype == np.int64 and set(data['labels']) <= set(range(10))
  batches = input_pipeline.pretrain_batches(config, data, local_batch_size=256)
  views = [next(batches) for _ in range(2)]
  for batch in views:
    np.testing.assert_array_equal(batch['view_a'], batch['view_b'])
  pixels = np.concatenate([b['view_a'] for b in views]).reshape(-1, 3)
  np.testing.assert_allclose(pixels.mean(axis=0), 0.0, atol=0.1)
  np.testing.assert_allclose(pixels.std(axis=0), 1.0, atol=0.1)


def test_load_split_under_mock_data():
  with tfds.testing.mock_data(num_examples=12):
    cifar = input_pipeline.load_split(_config('cifar10'), 'train')
    stl = input_pipeline.load_split(_config('stl10'), 'unlabelled')
    half = input_pipeline.load_split(_config('cifar10'), 'train', process_index=1,
                                     process_count=2)
    mnist_config = _config()
    mnist_config.data.name = 'mnist'  # 1-channel images.
    mnist = input_pipeline.load_split(mnist_config, 'test')
  assert cifar['images'].shape == (12, 32, 32, 3) and cifar['images'].dtype == np.uint8
  assert cifar['labels'].dtype == np.int64 and cifar['labels'].min() >= 0
  assert stl['images'].shape == (12, 96, 96, 3)
  np.testing.assert_array_equal(stl['labels'], -1)
  assert half['images'].shape[1:] == (32, 32, 3)  # mock_data ignores the slicing.
  assert mnist['images'].shape == (12, 28, 28, 3)
  np.testing.assert_array_equal(mnist['images'][..., 0], mnist['images'][..., 2])


def test_load_split_of_tiny_imagenet_under_mock_data():
  pytest.importorskip('data.tiny_imagenet')
  with tfds.testing.mock_data(num_examples=5):
    data = input_pipeline.load_split(_config('tiny_imagenet'), 'validation')
  assert data['images'].shape == (5, 64, 64, 3)
  assert data['labels'].min() >= 0


def test_missing_dataset_fails_fast_with_a_useful_message(tmp_path):
  config = _config()
  config.data.data_dir = str(tmp_path)
  start = time.monotonic()
  with pytest.raises(input_pipeline.DatasetNotFoundError) as error:
    input_pipeline.load_split(config, 'train')
  assert time.monotonic() - start < 10
  assert isinstance(error.value, FileNotFoundError)
  message = str(error.value)
  assert 'cifar10' in message and str(tmp_path) in message
  assert 'TFDS_DATA_DIR' in message and 'tfds build' in message


def test_unknown_dataset_name_fails_fast():
  config = _config()
  config.data.name = 'no_such_dataset'
  with pytest.raises(input_pipeline.DatasetNotFoundError, match='no_such_dataset'):
    input_pipeline.load_split(config, 'train')


@pytest.mark.parametrize('use_augment', [False, True])
def test_eval_batches_pad_the_last_batch(use_augment):
  config = _config()
  data = _data(10)
  batches = list(input_pipeline.eval_batches(
      config, data, batch_size=4, augment=use_augment, seed=1))
  assert len(batches) == 3
  for batch in batches:
    assert batch['image'].shape == (4, 32, 32, 3) and batch['image'].dtype == np.float32
    assert batch['label'].dtype == np.int32 and batch['mask'].dtype == bool
  assert [int(b['mask'].sum()) for b in batches] == [4, 4, 2]
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  if use_augment:
    assert sorted(labels) == sorted(data['labels'])
  else:
    np.testing.assert_array_equal(labels, data['labels'])
    expected = augment.eval_view(data['images'][8:], _config().data).numpy()
    np.testing.assert_array_equal(batches[-1]['image'][:2], expected)


def test_steps_per_epoch_drops_the_remainder():
  assert input_pipeline.steps_per_epoch(50_000, 256) == 195
  with pytest.raises(ValueError):
    input_pipeline.steps_per_epoch(10, 32)
