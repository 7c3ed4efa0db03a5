"""Inputs for the theory experiments: positive pairs = two nearby crops of the same image.

Images are CIFAR-10 (TFDS, read from --data_dir) converted to grayscale (ITU-R 601 luma,
0.299 R + 0.587 G + 0.114 B, in [0, 1]) and standardised with the scalar mean and standard
deviation of the loaded images, so pixels have mean 0 and variance 1. No whitening.

A view is a crop x crop window; the two views of an image are crops at two positions that
differ by a random shift of at most `jitter` pixels in each direction (nearby patches, so
the positive pair shares most pixels, as two mild augmentations would). The MLP experiments
flatten the crop (e.g. 12 x 12 -> 144 inputs); the CNN experiment keeps it as an image
(16 x 16 x 1). Rows of a batch are [a_1..a_N, b_1..b_N] (PAPER.md §2).

`synthetic_images` gives spatially smooth random images of the same size, for tests and for
runs without the dataset.
"""

import numpy as np

IMAGE_SIZE = 32


def to_gray(images: np.ndarray) -> np.ndarray:
  """(n, H, W, 3) uint8 RGB -> (n, H, W) float64 luma in [0, 1]."""
  rgb = images.astype(np.float64) / 255.0
  return rgb @ np.array([0.299, 0.587, 0.114])


def standardise(images: np.ndarray) -> np.ndarray:
  """Subtracts the scalar mean and divides by the scalar standard deviation."""
  return (images - images.mean()) / images.std()


def load_cifar10_gray(data_dir: str | None, split: str, num_images: int) -> np.ndarray:
  """The first `num_images` CIFAR-10 images of a split, grayscale and standardised.

  Args:
    data_dir: TFDS data dir holding cifar10/3.0.2 (None: TFDS's default).
    split: 'train' or 'test'.
    num_images: how many images to read.

  Returns:
    (num_images, 32, 32) float64 array.
  """
  # Imported here so that the synthetic path (tests) needs no TensorFlow.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  data = tfds.load('cifar10', split=f'{split}[:{num_images}]', data_dir=data_dir,
                   batch_size=-1, download=False)
  images = tfds.as_numpy(data)['image']
  return standardise(to_gray(images))


def synthetic_images(num_images: int, seed: int, size: int = IMAGE_SIZE,
                     smoothness: float = 2.0) -> np.ndarray:
  """Smooth Gaussian random images (white noise blurred by a Gaussian), standardised.

  Args:
    num_images: number of images.
    seed: RNG seed.
    size: image side.
    smoothness: standard deviation (pixels) of the Gaussian blur.

  Returns:
    (num_images, size, size) float64 array.
  """
  rng = np.random.default_rng(seed)
  noise = rng.normal(size=(num_images, size, size))
  freq = np.fft.fftfreq(size)
  gain = np.exp(-2 * (np.pi * smoothness) ** 2 * (freq[:, None] ** 2 + freq[None, :] ** 2))
  smooth = np.real(np.fft.ifft2(np.fft.fft2(noise) * gain))
  return standardise(smooth)


def sample_batch(images: np.ndarray, rng: np.random.Generator, num_images: int, crop: int,
                 jitter: int, flatten: bool) -> np.ndarray:
  """One batch of view pairs, rows [a_1..a_N, b_1..b_N].

  Args:
    images: (n, S, S) standardised images.
    rng: numpy Generator (the batch is a function of its state).
    num_images: N, distinct images in the batch.
    crop: side of every view.
    jitter: maximal shift between the two views of an image, per axis.
    flatten: if True, rows are crop*crop vectors; else (crop, crop, 1) images.

  Returns:
    (2N, crop*crop) or (2N, crop, crop, 1) float64 array.

  Raises:
    ValueError: if the crop and jitter do not fit in the image.
  """
  size = images.shape[1]
  if crop + 2 * jitter > size:
    raise ValueError(f'crop {crop} + 2 * jitter {jitter} does not fit in {size} pixels.')
  if num_images > images.shape[0]:
    raise ValueError(f'Need {num_images} images per batch, have {images.shape[0]}.')
  index = rng.choice(images.shape[0], size=num_images, replace=False)
  anchor = rng.integers(jitter, size - crop - jitter + 1, size=(num_images, 2))
  views = []
  for _ in range(2):
    corner = anchor + rng.integers(-jitter, jitter + 1, size=(num_images, 2))
    views.append(np.stack([images[i, y:y + crop, x:x + crop]
                           for i, (y, x) in zip(index, corner)]))
  batch = np.concatenate(views)
  return batch.reshape(2 * num_images, -1) if flatten else batch[..., None]
