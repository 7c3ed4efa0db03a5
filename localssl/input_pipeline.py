"""Input pipeline: a TFDS split in memory -> tf.data -> numpy batches.

Each process reads its own part of a split into host memory once (`load_split`), then:

* `pretrain_batches` yields the two augmented views of a local batch, forever. The batch at
  step s is a pure function of (config.seed, s, process_index, data): the example order of
  epoch e is a permutation drawn from (seed, e, process_index), and row i of step s is
  augmented with a seed derived from (seed, s, process_index * local_batch_size + i). A run
  resumed at step k therefore sees exactly the batches of an uninterrupted run.
* `eval_batches` yields one pass in order (or permuted and augmented for the 'paper' linear
  probe protocol), padded to a static batch shape with a mask.

Images stay in a numpy array; a `tf.numpy_function` gathers the uint8 rows of each step
(cheap: one fancy-index per batch) and tf.data augments the examples in parallel threads.
Keeping the array out of the TF graph avoids the 2 GB limit on graph constants (STL-10
`unlabelled` is 2.8 GB of uint8).
"""

import functools
import os
import time
from typing import Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from localssl import augment as augment_lib

# Salts keep the random streams of data order and augmentation apart for one seed.
_PRETRAIN_ORDER_SALT = 0
_PRETRAIN_AUG_SALT = 1
_PROBE_ORDER_SALT = 2
_PROBE_AUG_SALT = 3

# Splits that hold no labels, whatever the label feature stores (STL-10 stores -1 there).
_UNLABELLED_SPLITS = ('unlabelled', 'unlabeled')
# Datasets whose TFDS builder lives in this repository (module data.<name>).
_CUSTOM_BUILDERS = ('tiny_imagenet',)
_READ_BATCH = 1024
# Pretraining batches are endless; tf.data ranges need an end.
_LAST_STEP = 2**62

Batch = dict[str, np.ndarray]


class DatasetNotFoundError(FileNotFoundError):
  """The dataset is neither prepared in the data dir nor allowed to be downloaded."""


def data_dir_from_config(config: ml_collections.ConfigDict) -> str | None:
  """The TFDS data dir: config.data.data_dir, else $TFDS_DATA_DIR, else None (default)."""
  return config.data.data_dir or os.environ.get('TFDS_DATA_DIR') or None


def _import_custom_builder(name: str) -> None:
  """Registers the repository's TFDS builder of `name` with TFDS, if it has one."""
  if name not in _CUSTOM_BUILDERS:
    return
  try:
    # Importing the module registers the builder with TFDS.
    import data.tiny_imagenet  # pylint: disable=g-import-not-at-top,unused-import
  except ModuleNotFoundError as e:
    if e.name not in ('data', 'data.tiny_imagenet'):
      raise
    raise ImportError(
        f"The TFDS builder of '{name}' (module data.tiny_imagenet, in data/tiny_imagenet/ "
        'of the repository) could not be imported. Run from the repository root, or put '
        'it on PYTHONPATH.') from e


# Importing the pipeline (as main.py and every entry point do) registers our builders, so
# that tfds.builder / tfds.load find 'tiny_imagenet' by name.
for _name in _CUSTOM_BUILDERS:
  _import_custom_builder(_name)


def _tfds_is_mocked() -> bool:
  # tfds.testing.mock_data swaps DatasetBuilder.as_dataset for a generator of random
  # examples and points the builder at a fake data dir: nothing is read, so there is
  # nothing prepared to check.
  as_dataset = tfds.core.DatasetBuilder.as_dataset
  return 'mock_data' in getattr(as_dataset, '__qualname__', '')


def _how_to_fix(name: str, data_dir: str) -> str:
  if name in _CUSTOM_BUILDERS:
    prepare = (f'build it there from the downloaded files with `python -m data.prepare '
               f'{name} --manual_dir=DIR --data_dir={data_dir}` (from the repository root)')
  else:
    prepare = (f'build it there with `tfds build {name} --data_dir={data_dir}`, or call '
               'pass --config.data.download=True on a machine with internet access')
  return ('Point TFDS at a data dir that holds it (export TFDS_DATA_DIR=/path, or '
          f'--config.data.data_dir=/path), or {prepare}.')


def get_builder(config: ml_collections.ConfigDict,
                download: bool = False) -> tfds.core.DatasetBuilder:
  """Returns the TFDS builder of config.data.name, checked to be prepared.

  Args:
    config: The full config (config.data.name, config.data.data_dir).
    download: Download and prepare the dataset when it is not prepared yet.

  Returns:
    The builder, ready for `as_dataset`.

  Raises:
    DatasetNotFoundError: The dataset is unknown to TFDS, or not prepared in the data dir
      and `download` is False.
    ImportError: The repository's builder module of the dataset is missing.
  """
  name = config.data.name
  _import_custom_builder(name)
  data_dir = data_dir_from_config(config)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    raise DatasetNotFoundError(
        f"No TFDS builder named '{name}' (config.data.name).") from None
  if _tfds_is_mocked() or builder.is_prepared():
    return builder
  if download:
    try:
      builder.download_and_prepare()
    except Exception as error:  # pylint: disable=broad-except
      raise DatasetNotFoundError(
          f"Dataset '{name}' is not prepared in {builder.data_dir_root} and TFDS could not "
          f'download and prepare it ({type(error).__name__}: {error}). '
          + _how_to_fix(name, os.fspath(builder.data_dir_root))) from error
    return builder
  source = ('config.data.data_dir' if config.data.data_dir else
            '$TFDS_DATA_DIR' if data_dir else 'the TFDS default; config.data.data_dir and '
            '$TFDS_DATA_DIR are empty')
  raise DatasetNotFoundError(
      f"Dataset '{name}' (version {builder.version}) is not prepared in the TFDS data dir "
      f'{builder.data_dir_root} (from {source}); looked for {builder.data_dir}. '
      + _how_to_fix(name, os.fspath(builder.data_dir_root)))


def _base_split_name(split: str) -> str:
  """'unlabelled[:10%]' -> 'unlabelled'."""
  return split.split('[', 1)[0].strip()


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
  """Grayscale [H, W, 1] images become RGB; RGB images pass through."""
  if image.shape[-1] == 3:
    return image
  rgb = tf.broadcast_to(image, tf.concat([tf.shape(image)[:-1], [3]], axis=0))
  return tf.ensure_shape(rgb, image.shape[:-1].concatenate([3]))


def _dataset_to_numpy(ds: tf.data.Dataset) -> Batch:
  """Reads a dataset of {'image', 'label'} into two numpy arrays."""
  num = int(ds.cardinality())
  batches = ds.batch(_READ_BATCH).prefetch(2).as_numpy_iterator()
  if num < 0:  # Unknown length: collect, then concatenate.
    parts = list(batches)
    if not parts:
      return dict(images=np.zeros((0, 0, 0, 3), np.uint8), labels=np.zeros(0, np.int64))
    return dict(images=np.concatenate([p['image'] for p in parts]),
                labels=np.concatenate([p['label'] for p in parts]))
  # Known length: fill preallocated arrays, so a 3 GB split needs 3 GB, not 6.
  images = labels = None
  pos = 0
  for batch in batches:
    if images is None:
      images = np.empty((num,) + batch['image'].shape[1:], np.uint8)
      labels = np.empty((num,), np.int64)
    k = len(batch['label'])
    images[pos:pos + k] = batch['image']
    labels[pos:pos + k] = batch['label']
    pos += k
  if images is None:
    shape = tuple(d or 0 for d in ds.element_spec['image'].shape)
    return dict(images=np.zeros((0,) + shape, np.uint8), labels=np.zeros(0, np.int64))
  return dict(images=images[:pos], labels=labels[:pos])


def load_split(config: ml_collections.ConfigDict,
               split: str,
               *,
               process_index: int = 0,
               process_count: int = 1,
               download: bool = False) -> Batch:
  """Reads this process's part of a TFDS split into memory, decoded.

  Args:
    config: The full config (config.data.name, config.data.data_dir).
    split: TFDS split, e.g. 'train', 'unlabelled' or 'train[:512]'.
    process_index: This process's index.
    process_count: Number of processes; the split is divided with `tfds.even_splits`.
    download: Download and prepare the dataset when it is not prepared yet.

  Returns:
    dict(images=uint8 [n, H, W, 3], labels=int64 [n]); labels are -1 for splits without
    labels (STL-10 'unlabelled', or no 'label' feature). Grayscale images become RGB.

  Raises:
    DatasetNotFoundError: The dataset is not prepared and `download` is False.
    ValueError: process_index is not in [0, process_count).
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count}).')
  builder = get_builder(config, download=download or config.data.download)
  read_split = (split if process_count == 1 else
                tfds.even_splits(split, process_count, drop_remainder=True)[process_index])
  ds = builder.as_dataset(split=read_split, shuffle_files=False)
  has_labels = ('label' in builder.info.features and
                _base_split_name(split) not in _UNLABELLED_SPLITS)

  def select(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    label = (tf.cast(example['label'], tf.int64) if has_labels else
             tf.constant(-1, tf.int64))
    return dict(image=_to_rgb(example['image']), label=label)

  return _dataset_to_numpy(ds.map(select, num_parallel_calls=tf.data.AUTOTUNE))


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches in one pass over `num_examples` (the remainder is dropped).

  Args:
    num_examples: Examples in the (local) dataset.
    batch_size: Examples per (local) batch.

  Returns:
    num_examples // batch_size.

  Raises:
    ValueError: batch_size is not positive or larger than num_examples.
  """
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}.')
  if num_examples < batch_size:
    raise ValueError(f'Only {num_examples} examples, fewer than one batch of {batch_size}.')
  return num_examples // batch_size


def example_order(seed: int, epoch: int, process_index: int, num_examples: int,
                  salt: int = _PRETRAIN_ORDER_SALT) -> np.ndarray:
  """The permutation of the local examples used in `epoch` (int64 [num_examples])."""
  key = [salt, int(seed) % 2**63, int(epoch), int(process_index)]
  return np.random.default_rng(key).permutation(num_examples)


def _fold_seed(seed: int, salt: int, *data: tf.Tensor) -> tf.Tensor:
  """A stateless-op seed of shape [2] derived from (seed, salt, *data)."""
  key = tf.constant([seed, salt], tf.int64)
  for value in data:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(value, tf.int64))
  return key


def _tune(value: int) -> int:
  """Config convention: a negative parallelism or prefetch depth means AUTOTUNE."""
  return tf.data.AUTOTUNE if value < 0 else value


def _finish(ds: tf.data.Dataset, config: ml_collections.ConfigDict) -> Iterator[Batch]:
  """Deterministic options, prefetch, and a numpy iterator."""
  options = tf.data.Options()
  # Batches must not depend on thread timing: keep the element order fixed.
  options.deterministic = True
  ds = ds.with_options(options)
  if config.data.prefetch:
    ds = ds.prefetch(_tune(config.data.prefetch))
  return ds.as_numpy_iterator()


def pretrain_batches(config: ml_collections.ConfigDict,
                     data: Batch,
                     *,
                     local_batch_size: int,
                     start_step: int = 0,
                     process_index: int = 0) -> Iterator[Batch]:
  """Endless local batches of two augmented views, from step `start_step` on.

  Args:
    config: The full config (config.seed, config.data.*).
    data: This process's examples, as returned by `load_split`.
    local_batch_size: Images per batch on this process.
    start_step: Global step of the first batch.
    process_index: This process's index (selects its order and augmentation seeds).

  Returns:
    An iterator of {"view_a", "view_b"}: float32 [local_batch_size, S, S, 3]; its k-th
    element is the batch of step start_step + k.

  Raises:
    ValueError: Fewer examples than one batch.
  """
  images = data['images']
  num = len(images)
  per_epoch = steps_per_epoch(num, local_batch_size)
  seed = config.seed

  @functools.lru_cache(maxsize=2)
  def epoch_order(epoch: int) -> np.ndarray:
    return example_order(seed, epoch, process_index, num)

  def gather(step: np.int64) -> np.ndarray:
    epoch, pos = divmod(int(step), per_epoch)
    index = epoch_order(epoch)[pos * local_batch_size:(pos + 1) * local_batch_size]
    return images[index]

  def step_examples(step: tf.Tensor) -> dict[str, tf.Tensor]:
    image = tf.numpy_function(gather, [step], tf.uint8, stateful=False)
    image = tf.ensure_shape(image, (local_batch_size,) + images.shape[1:])
    row = process_index * local_batch_size + tf.range(local_batch_size, dtype=tf.int64)
    return dict(step=tf.fill([local_batch_size], step), row=row, image=image)

  def views(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    key = _fold_seed(seed, _PRETRAIN_AUG_SALT, example['step'], example['row'])
    view_a, view_b = augment_lib.two_views(example['image'], key, config.data)
    return dict(view_a=view_a, view_b=view_b)

  parallel = _tune(config.data.num_parallel_calls)
  # Every element is a pure function of its step, so the maps may run in parallel.
  ds = tf.data.Dataset.range(start_step, _LAST_STEP)
  ds = ds.map(step_examples, num_parallel_calls=parallel).unbatch()
  ds = ds.map(views, num_parallel_calls=parallel)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return _finish(ds, config)


def eval_batches(config: ml_collections.ConfigDict,
                 data: Batch,
                 *,
                 batch_size: int,
                 augment: bool = False,
                 seed: int = 0,
                 epoch: int = 0) -> Iterator[Batch]:
  """One pass over `data`, padded to static shapes.

  Args:
    config: The full config (config.data.*).
    data: Examples, as returned by `load_split`.
    batch_size: Rows per batch, padding included.
    augment: Permute the examples by (seed, epoch) and use `augment.probe_train_view`;
      else keep the order and use `augment.eval_view`.
    seed: Seed of the order and augmentations when `augment`.
    epoch: Probe epoch, folded into the order and augmentation seeds.

  Returns:
    An iterator of {"image": float32 [B, S, S, 3], "label": int32 [B], "mask": bool [B]};
    padding rows (only in the last batch) have mask False, label 0 and a black image.
  """
  images, labels = data['images'], data['labels']
  num = len(images)
  order = (example_order(seed, epoch, 0, num, salt=_PROBE_ORDER_SALT) if augment else
           np.arange(num))

  def gather(start: np.int64) -> tuple[np.ndarray, np.ndarray]:
    index = order[int(start):int(start) + batch_size]
    image = np.zeros((batch_size,) + images.shape[1:], np.uint8)
    image[:len(index)] = images[index]
    label = np.zeros(batch_size, np.int32)
    label[:len(index)] = labels[index]
    return image, label

  def batch_examples(start: tf.Tensor) -> dict[str, tf.Tensor]:
    image, label = tf.numpy_function(gather, [start], (tf.uint8, tf.int32), stateful=False)
    pos = start + tf.range(batch_size, dtype=tf.int64)
    return dict(image=tf.ensure_shape(image, (batch_size,) + images.shape[1:]),
                label=tf.ensure_shape(label, [batch_size]), mask=pos < num, pos=pos)

  parallel = _tune(config.data.num_parallel_calls)
  ds = tf.data.Dataset.range(0, num, batch_size)
  ds = ds.map(batch_examples, num_parallel_calls=parallel)
  if augment:
    def probe_view(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
      key = _fold_seed(seed, _PROBE_AUG_SALT, epoch, example['pos'])
      image = augment_lib.probe_train_view(example['image'], key, config.data)
      return dict(image=image, label=example['label'], mask=example['mask'])
    ds = ds.unbatch().map(probe_view, num_parallel_calls=parallel).batch(batch_size)
  else:
    def plain_view(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
      return dict(image=augment_lib.eval_view(batch['image'], config.data),
                  label=batch['label'], mask=batch['mask'])
    ds = ds.map(plain_view, num_parallel_calls=parallel)
  return _finish(ds, config)


def measure_throughput(config: ml_collections.ConfigDict, data: Batch, *,
                       local_batch_size: int, num_batches: int) -> float:
  """Images per second of `pretrain_batches` alone, after one warm-up batch.

  Args:
    config: The full config.
    data: Examples, as returned by `load_split`.
    local_batch_size: Images per batch.
    num_batches: Batches timed after the warm-up batch.

  Returns:
    Images (each giving two views) per second.
  """
  batches = pretrain_batches(config, data, local_batch_size=local_batch_size)
  next(batches)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(batches)
  return num_batches * local_batch_size / (time.perf_counter() - start)
