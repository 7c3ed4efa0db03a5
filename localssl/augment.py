"""Per-view image augmentations of PAPER.md §4, built from stateless TF random ops.

Every random function takes an explicit `seed` (an int32/int64 tensor of shape [2]) and is
a pure function of its inputs: the same (image, seed, config) gives the same view on any
machine and under any tf.data parallelism. Seeds are derived with
`tf.random.experimental.stateless_split` / `stateless_fold_in`, never from global state.

Pretraining view (torchvision / SimCLR order): random resized crop -> horizontal flip ->
colour jitter (brightness, contrast, saturation, hue in a random order per view, as
torchvision's `ColorJitter`) -> grayscale -> Gaussian blur -> per-channel normalisation.
Pixels stay float in [0, 1] between the ops (torchvision on PIL rounds to uint8 after each
op; we do not). An op whose probability is 0 is left out of the graph, so it is an exact
no-op; probability 1 applies it unconditionally.

Functions take `data_config`, i.e. `config.data` of `localssl.config_lib.base_config`:
`image_size`, `mean`, `std` and the `aug.*` fields.
"""

import functools
import math
from typing import Callable, Sequence

import ml_collections
import tensorflow as tf

# One view splits its seed into this many op seeds. The count is fixed so that switching one
# op off (probability 0) leaves the random draws of every other op unchanged.
_NUM_OP_SEEDS = 8
(_CROP, _FLIP, _JITTER_APPLY, _JITTER, _GRAY_APPLY, _BLUR_APPLY, _BLUR_SIGMA,
 _UNUSED) = range(_NUM_OP_SEEDS)

# torchvision's RandomResizedCrop tries this many (area, aspect) draws before falling back.
_CROP_ATTEMPTS = 10


def _uniform(seed: tf.Tensor,
             shape: Sequence[int] = (),
             minval: float = 0.0,
             maxval: float = 1.0) -> tf.Tensor:
  return tf.random.stateless_uniform(
      shape, seed, minval=minval, maxval=maxval, dtype=tf.float32)


def _maybe_apply(fn: Callable[[tf.Tensor], tf.Tensor], image: tf.Tensor,
                 seed: tf.Tensor, prob: float) -> tf.Tensor:
  """Returns `fn(image)` with probability `prob`, else `image`.

  Probabilities 0 and 1 are resolved when tracing, so they add no control flow and
  probability 0 is an exact identity.
  """
  prob = float(prob)
  if prob <= 0.0:
    return image
  if prob >= 1.0:
    return fn(image)
  return tf.cond(_uniform(seed) < prob, lambda: fn(image), lambda: image)


def crop_window(height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor,
                scale: Sequence[float],
                ratio: Sequence[float]) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
  """Samples a random-resized-crop window the way torchvision does.

  Up to 10 draws of (area fraction in `scale`, log-uniform aspect ratio in `ratio`); the
  first draw that fits in the image is used, with a uniform position. If none fits, the
  largest centred crop whose aspect ratio is clipped to `ratio` is used.

  Args:
    height: Image height, int32 scalar tensor.
    width: Image width, int32 scalar tensor.
    seed: int tensor of shape [2].
    scale: (min, max) fraction of the image area.
    ratio: (min, max) aspect ratio width / height.

  Returns:
    (offset_y, offset_x, crop_height, crop_width), int32 scalar tensors.
  """
  seeds = tf.random.experimental.stateless_split(seed, 4)
  h_img = tf.cast(height, tf.float32)
  w_img = tf.cast(width, tf.float32)
  area = h_img * w_img
  target_area = area * _uniform(seeds[0], [_CROP_ATTEMPTS], scale[0], scale[1])
  log_ratio = _uniform(seeds[1], [_CROP_ATTEMPTS], math.log(ratio[0]),
                       math.log(ratio[1]))
  aspect = tf.exp(log_ratio)
  # tf.round rounds half to even, as Python's round() in torchvision does.
  w = tf.round(tf.sqrt(target_area * aspect))
  h = tf.round(tf.sqrt(target_area / aspect))
  fits = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
  first = tf.argmax(tf.cast(fits, tf.int32))  # Index of the first True (0 if none).

  # Fallback: centred crop with the aspect ratio clipped to `ratio`.
  in_ratio = w_img / h_img
  fb_w = tf.where(in_ratio > ratio[1], tf.round(h_img * ratio[1]), w_img)
  fb_h = tf.where(in_ratio < ratio[0], tf.round(w_img / ratio[0]), h_img)

  found = tf.reduce_any(fits)
  crop_h = tf.cast(tf.where(found, h[first], fb_h), tf.int32)
  crop_w = tf.cast(tf.where(found, w[first], fb_w), tf.int32)
  # Uniform integer offsets in [0, size - crop], as torch.randint(0, size - crop + 1).
  u = _uniform(seeds[2], [2])
  rand_y = tf.cast(tf.floor(u[0] * tf.cast(height - crop_h + 1, tf.float32)), tf.int32)
  rand_x = tf.cast(tf.floor(u[1] * tf.cast(width - crop_w + 1, tf.float32)), tf.int32)
  offset_y = tf.where(found, tf.minimum(rand_y, height - crop_h), (height - crop_h) // 2)
  offset_x = tf.where(found, tf.minimum(rand_x, width - crop_w), (width - crop_w) // 2)
  return offset_y, offset_x, crop_h, crop_w


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Bilinear resize to [size, size] (antialiased when shrinking), float32 output."""
  return tf.image.resize(image, [size, size], method='bilinear', antialias=True)


def random_resized_crop(image: tf.Tensor, seed: tf.Tensor, size: int,
                        scale: Sequence[float], ratio: Sequence[float]) -> tf.Tensor:
  """Random resized crop (torchvision semantics), bilinear resize to `size`.

  Args:
    image: [H, W, C] image, any real dtype.
    seed: int tensor of shape [2].
    size: Output side.
    scale: (min, max) fraction of the image area.
    ratio: (min, max) aspect ratio width / height.

  Returns:
    float32 [size, size, C] in the value range of `image`.
  """
  shape = tf.shape(image)
  oy, ox, h, w = crop_window(shape[0], shape[1], seed, scale, ratio)
  crop = tf.slice(image, tf.stack([oy, ox, 0]), tf.stack([h, w, -1]))
  return _resize(crop, size)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  """ITU-R 601 luma (0.2989, 0.587, 0.114, as torchvision), shape [..., 1]."""
  return tf.image.rgb_to_grayscale(image)


def adjust_brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """torchvision brightness on a float image in [0, 1]."""
  return tf.clip_by_value(image * factor, 0.0, 1.0)


def adjust_contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """torchvision contrast: blend with the mean gray level of the whole image."""
  mean = tf.reduce_mean(_grayscale(image))
  return tf.clip_by_value(factor * image + (1.0 - factor) * mean, 0.0, 1.0)


def adjust_saturation(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """torchvision saturation: blend with the per-pixel gray image."""
  return tf.clip_by_value(factor * image + (1.0 - factor) * _grayscale(image), 0.0, 1.0)


def adjust_hue(image: tf.Tensor, delta: tf.Tensor) -> tf.Tensor:
  """torchvision hue: rotate H in HSV by `delta` (in turns, in [-0.5, 0.5])."""
  return tf.clip_by_value(tf.image.adjust_hue(image, delta), 0.0, 1.0)


def color_jitter(image: tf.Tensor, seed: tf.Tensor, brightness: float, contrast: float,
                 saturation: float, hue: float) -> tf.Tensor:
  """torchvision `ColorJitter`: the enabled adjustments in a random order.

  Factors are uniform in [max(0, 1 - x), 1 + x] for brightness, contrast and saturation,
  and the hue shift is uniform in [-hue, hue]. A strength of 0 leaves that adjustment out.

  Args:
    image: float32 [H, W, 3] in [0, 1].
    seed: int tensor of shape [2].
    brightness: Brightness strength.
    contrast: Contrast strength.
    saturation: Saturation strength.
    hue: Hue strength, at most 0.5.

  Returns:
    float32 [H, W, 3] in [0, 1].
  """
  factor_seed, order_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  u = _uniform(factor_seed, [4])

  def factor(strength, draw):
    low = max(0.0, 1.0 - strength)
    return low + (1.0 + strength - low) * draw

  ops = []
  if brightness > 0:
    ops.append(functools.partial(adjust_brightness, factor=factor(brightness, u[0])))
  if contrast > 0:
    ops.append(functools.partial(adjust_contrast, factor=factor(contrast, u[1])))
  if saturation > 0:
    ops.append(functools.partial(adjust_saturation, factor=factor(saturation, u[2])))
  if hue > 0:
    ops.append(functools.partial(adjust_hue, delta=hue * (2.0 * u[3] - 1.0)))
  if not ops:
    return image
  order = tf.random.experimental.stateless_shuffle(tf.range(len(ops)), order_seed)
  for k in range(len(ops)):
    image = tf.switch_case(order[k], [functools.partial(op, image) for op in ops])
  return image


def to_grayscale(image: tf.Tensor) -> tf.Tensor:
  """Grayscale that keeps 3 channels."""
  return tf.image.grayscale_to_rgb(_grayscale(image))


def blur_kernel_size(image_size: int) -> int:
  """Odd Gaussian-blur kernel side of about 10% of the image (at least 3)."""
  size = max(3, int(0.1 * image_size))
  return size + 1 - size % 2


def gaussian_blur(image: tf.Tensor, sigma: tf.Tensor, kernel_size: int) -> tf.Tensor:
  """Separable Gaussian blur with reflect padding (torchvision `GaussianBlur`).

  Args:
    image: float32 [H, W, C]; H and W larger than kernel_size // 2.
    sigma: Standard deviation in pixels, float32 scalar.
    kernel_size: Odd kernel side.

  Returns:
    float32 [H, W, C].
  """
  radius = kernel_size // 2
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-0.5 * tf.square(x / sigma))
  kernel /= tf.reduce_sum(kernel)
  channels = tf.shape(image)[-1]
  k_y = tf.tile(tf.reshape(kernel, [kernel_size, 1, 1, 1]), [1, 1, channels, 1])
  k_x = tf.reshape(k_y, [1, kernel_size, channels, 1])
  padded = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]],
                  mode='REFLECT')
  out = tf.nn.depthwise_conv2d(padded, k_y, strides=[1, 1, 1, 1], padding='VALID')
  out = tf.nn.depthwise_conv2d(out, k_x, strides=[1, 1, 1, 1], padding='VALID')
  return out[0]


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """Per-channel (x - mean) / std for a float image in [0, 1]."""
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def _crop01(image: tf.Tensor, seed: tf.Tensor,
            data_config: ml_collections.ConfigDict) -> tf.Tensor:
  """Random resized crop of a uint8 image, as float32 in [0, 1]."""
  aug = data_config.aug
  crop = random_resized_crop(
      tf.cast(image, tf.float32), seed, data_config.image_size, aug.crop_scale,
      aug.crop_ratio)
  crop = tf.ensure_shape(crop, [data_config.image_size, data_config.image_size, 3])
  return tf.clip_by_value(crop / 255.0, 0.0, 1.0)


def augment_view(image: tf.Tensor, seed: tf.Tensor,
                 data_config: ml_collections.ConfigDict) -> tf.Tensor:
  """One pretraining view of an image (PAPER.md §4).

  Args:
    image: uint8 [H, W, 3].
    seed: int32/int64 tensor of shape [2].
    data_config: `config.data` (image_size, mean, std, aug.*).

  Returns:
    float32 [S, S, 3], normalised, S = data_config.image_size.
  """
  aug = data_config.aug
  seeds = tf.random.experimental.stateless_split(seed, _NUM_OP_SEEDS)
  x = _crop01(image, seeds[_CROP], data_config)
  x = _maybe_apply(tf.image.flip_left_right, x, seeds[_FLIP], aug.flip_prob)
  jitter = functools.partial(
      color_jitter, seed=seeds[_JITTER], brightness=aug.brightness,
      contrast=aug.contrast, saturation=aug.saturation, hue=aug.hue)
  x = _maybe_apply(jitter, x, seeds[_JITTER_APPLY], aug.jitter_prob)
  x = _maybe_apply(to_grayscale, x, seeds[_GRAY_APPLY], aug.grayscale_prob)
  sigma = _uniform(seeds[_BLUR_SIGMA], (), aug.blur_sigma[0], aug.blur_sigma[1])
  blur = functools.partial(
      gaussian_blur, sigma=sigma, kernel_size=blur_kernel_size(data_config.image_size))
  x = _maybe_apply(blur, x, seeds[_BLUR_APPLY], aug.blur_prob)
  return normalize(x, data_config.mean, data_config.std)


def two_views(image: tf.Tensor, seed: tf.Tensor,
              data_config: ml_collections.ConfigDict) -> tuple[tf.Tensor, tf.Tensor]:
  """Two independent pretraining views of one image.

  Args:
    image: uint8 [H, W, 3].
    seed: int32/int64 tensor of shape [2].
    data_config: `config.data`.

  Returns:
    (view_a, view_b), each float32 [S, S, 3].
  """
  seed_a, seed_b = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  return (augment_view(image, seed_a, data_config),
          augment_view(image, seed_b, data_config))


def probe_train_view(image: tf.Tensor, seed: tf.Tensor,
                     data_config: ml_collections.ConfigDict) -> tf.Tensor:
  """Linear-probe training view ('paper' protocol): random resized crop + flip.

  Uses the same aug.crop_scale, aug.crop_ratio and aug.flip_prob as pretraining.

  Args:
    image: uint8 [H, W, 3].
    seed: int32/int64 tensor of shape [2].
    data_config: `config.data`.

  Returns:
    float32 [S, S, 3], normalised.
  """
  seeds = tf.random.experimental.stateless_split(seed, _NUM_OP_SEEDS)
  x = _crop01(image, seeds[_CROP], data_config)
  x = _maybe_apply(tf.image.flip_left_right, x, seeds[_FLIP], data_config.aug.flip_prob)
  return normalize(x, data_config.mean, data_config.std)


def eval_view(image: tf.Tensor, data_config: ml_collections.ConfigDict) -> tf.Tensor:
  """Deterministic evaluation view: resize to S if needed, then normalise.

  Args:
    image: uint8 [H, W, 3], or a batch [B, H, W, 3].
    data_config: `config.data`.

  Returns:
    float32 [S, S, 3] (or [B, S, S, 3]), normalised.
  """
  size = data_config.image_size
  x = tf.cast(image, tf.float32)
  if tuple(image.shape[-3:-1]) != (size, size):  # Unknown or different spatial size.
    x = tf.clip_by_value(_resize(x, size), 0.0, 255.0)
  return normalize(x / 255.0, data_config.mean, data_config.std)
