"""Building blocks of the config files, and their validation.

Every file in `configs/` calls `base_config(dataset)` and then `apply_presets`; `validate` is
run once, before anything else, by every entry point. Dataset facts (image size, statistics,
splits, the paper's pool sizes) live in `DATASETS`, one row per dataset.
"""

import dataclasses

import ml_collections


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the pipeline and the configs need to know about one dataset."""
  image_size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  pretrain_split: str
  probe_split: str
  test_split: str
  num_classes: int
  pool_sizes: tuple[int, ...]
  crop_scale: tuple[float, float]
  weight_decay: float


DATASETS = {
    'cifar10': DatasetSpec(
        image_size=32,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        pretrain_split='train',
        probe_split='train',
        test_split='test',
        num_classes=10,
        pool_sizes=(4, 4, 4, 2, 2, 1),
        crop_scale=(0.25, 1.0),
        weight_decay=0.0),
    'stl10': DatasetSpec(
        image_size=96,
        mean=(0.4313, 0.4156, 0.3663),
        std=(0.2683, 0.2610, 0.2687),
        pretrain_split='unlabelled',
        probe_split='train',
        test_split='test',
        num_classes=10,
        pool_sizes=(12, 12, 12, 6, 6, 3),
        crop_scale=(0.08, 1.0),
        weight_decay=0.0),
    'tiny_imagenet': DatasetSpec(
        image_size=64,
        mean=(0.4802, 0.4481, 0.3975),
        std=(0.2302, 0.2265, 0.2262),
        pretrain_split='train',
        probe_split='train',
        test_split='validation',
        num_classes=200,
        pool_sizes=(8, 8, 8, 4, 4, 2),
        crop_scale=(0.08, 1.0),
        weight_decay=1e-5),
}

LOSS_METHODS = ('clapp', 'bp_clapp', 'bp_infonce')
CONTEXTS = ('lateral', 'dfb', 'both')
SCORE_FUNCTIONS = ('hinge', 'softhinge', 'linear', 'phyll')
PREDICTOR_MODES = ('trainable', 'fixed', 'identity')
ARCHS = ('vgg6', 'vgg8')
COMPUTE_DTYPES = ('float32', 'bfloat16')
INITS = ('torch', 'lecun')
CONV_IMPLS = ('auto', 'xla', 'patches')
OPTIMIZERS = ('adamw', 'lars')
SCHEDULES = ('constant', 'cosine')
EVAL_PROTOCOLS = ('cached', 'paper')


def base_config(dataset: str = 'cifar10') -> ml_collections.ConfigDict:
  """Returns the full config of CLAPP++both on `dataset`, the paper's defaults."""
  spec = DATASETS[dataset]
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameters, data order and augmentations.
  config.batch_size = 32  # Images per step over all devices (each gives two views).
  config.num_epochs = 300  # Pretraining length, in passes over the pretraining split.
  config.num_train_steps = -1  # When > 0, overrides num_epochs.
  config.log_every_steps = 100  # Progress line and TensorBoard scalars.
  config.checkpoint_every_steps = 1000  # Also saved at the end and on preemption.
  config.keep_checkpoints = 3  # Newest checkpoints kept in workdir/checkpoints.
  config.alignment_every_steps = 0  # > 0 logs local-vs-BP gradient alignment.
  config.alignment_batches = 4  # Batches averaged by --mode=grad_align.
  config.multihost = False  # Call jax.distributed.initialize() (also if the env asks).

  config.data = ml_collections.ConfigDict()
  config.data.name = dataset  # A key of localssl.config_lib.DATASETS.
  config.data.data_dir = ''  # TFDS data dir; empty: $TFDS_DATA_DIR or TFDS's default.
  config.data.download = False  # Let TFDS download a missing dataset (needs internet).
  config.data.pretrain_split = spec.pretrain_split  # TFDS split for SSL pretraining.
  config.data.image_size = spec.image_size  # Side of the square network input.
  config.data.mean = spec.mean  # Per-channel normalisation, in [0, 1] pixel units.
  config.data.std = spec.std
  config.data.prefetch = 2  # Batches prepared ahead of the train step.
  config.data.num_parallel_calls = -1  # tf.data parallelism; -1 is AUTOTUNE.
  config.data.aug = ml_collections.ConfigDict()  # Per-view augmentation (PAPER.md §4).
  config.data.aug.crop_scale = spec.crop_scale  # Random resized crop area range.
  config.data.aug.crop_ratio = (3 / 4, 4 / 3)  # Random resized crop aspect range.
  config.data.aug.flip_prob = 0.5
  config.data.aug.jitter_prob = 0.8  # Colour jitter applied with this probability.
  config.data.aug.brightness = 0.8
  config.data.aug.contrast = 0.8
  config.data.aug.saturation = 0.8
  config.data.aug.hue = 0.2
  config.data.aug.grayscale_prob = 0.2
  config.data.aug.blur_prob = 0.5
  config.data.aug.blur_sigma = (0.1, 2.0)

  config.model = ml_collections.ConfigDict()
  config.model.arch = 'vgg6'  # 'vgg6' (CIFAR/STL/Tiny ImageNet) or 'vgg8' (ImageNet).
  config.model.width_multiplier = 1.0  # Scales every channel count (1/8 for CPU runs).
  config.model.compute_dtype = 'float32'  # 'bfloat16' on accelerators; params stay fp32.
  config.model.init = 'torch'  # 'torch': U(+-1/sqrt(fan_in)) as PyTorch; 'lecun'.
  config.model.conv_impl = 'auto'  # 'patches': weight grad as a patch matmul (fast on CPU).

  config.loss = ml_collections.ConfigDict()
  config.loss.method = 'clapp'  # 'clapp' (local), 'bp_clapp' or 'bp_infonce' (global).
  config.loss.context = 'both'  # Local context: 'lateral', 'dfb' (top layer) or 'both'.
  config.loss.pool_sizes = spec.pool_sizes  # Per-layer avg-pool k_l before the loss.
  config.loss.global_pool = False  # True: k_l = map size (no 2D spatial dependence).
  config.loss.score_fn = 'hinge'  # f: 'hinge', 'softhinge', 'linear' or 'phyll'.
  config.loss.predictor = 'trainable'  # B: 'trainable', 'fixed' (random) or 'identity'.
  config.loss.layer_weights = ()  # Per-layer loss weights; empty means all 1.
  config.loss.temperature = 0.1  # BP-InfoNCE temperature.
  config.loss.symmetric = False  # BP-InfoNCE: symmetric 2N NT-Xent instead of a->b.
  config.loss.projection_dim = 0  # BP-InfoNCE projection width; 0: top channel count.

  config.optim = ml_collections.ConfigDict()
  config.optim.name = 'adamw'  # 'adamw' or 'lars' (ImageNet recipe).
  config.optim.learning_rate = 2e-4  # Encoder learning rate (peak, if scheduled).
  config.optim.weight_decay = spec.weight_decay  # Encoder decoupled weight decay.
  config.optim.predictor_learning_rate = -1.0  # B / projection; < 0: same as encoder.
  config.optim.predictor_weight_decay = -1.0  # < 0: same as encoder.
  config.optim.schedule = 'constant'  # 'constant' or 'cosine'.
  config.optim.warmup_epochs = 0.0  # Linear warm-up, for 'cosine'.
  config.optim.momentum = 0.9  # LARS momentum.
  config.optim.eps = 1e-8  # Adam's epsilon (PyTorch's default).
  config.optim.grad_clip_norm = 0.0  # > 0 clips the global gradient norm.
  config.optim.per_layer = False  # One optimizer group per layer (encoder and predictor).
  config.optim.layer_lr_scales = ()  # With per_layer: learning-rate factor of each layer.

  config.eval = ml_collections.ConfigDict()
  config.eval.protocol = 'paper'  # 'paper' (augmented, PAPER.md §4) or 'cached' (fast).
  config.eval.random_init = False  # Probe a random-initialised encoder (baseline).
  config.eval.checkpoint_step = -1  # -1: latest checkpoint.
  config.eval.checkpoint_dir = ''  # Another workdir to restore from; empty: --workdir.
  config.eval.layers = ()  # Layers (0-based) whose features are concatenated; (): all.
  config.eval.per_layer = False  # Also train one probe per layer.
  config.eval.probe_split = spec.probe_split
  config.eval.test_split = spec.test_split
  config.eval.num_classes = spec.num_classes
  config.eval.val_size = 5000  # Held out from probe_split to select the epoch.
  config.eval.num_epochs = 300
  config.eval.batch_size = 32
  config.eval.learning_rate = 1e-3  # Adam.
  config.eval.max_train_examples = -1  # > 0 caps the probe's train part (CPU runs).
  return config


def _tiny(config: ml_collections.ConfigDict) -> None:
  """A CPU-sized run: 1/8 width, a few minutes of pretraining, a short cached probe."""
  config.model.width_multiplier = 0.125
  config.num_train_steps = 600
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  config.eval.protocol = 'cached'
  config.eval.num_epochs = 30
  config.eval.batch_size = 256
  config.eval.max_train_examples = 10000


PRESETS = {
    'both': lambda c: c.loss.update(method='clapp', context='both'),
    'dfb': lambda c: c.loss.update(method='clapp', context='dfb'),
    'lateral': lambda c: c.loss.update(method='clapp', context='lateral'),
    'nospatial': lambda c: c.loss.update(method='clapp', context='lateral', global_pool=True),
    'bp': lambda c: c.loss.update(method='bp_clapp', context='lateral', global_pool=True),
    'infonce': lambda c: c.loss.update(method='bp_infonce', global_pool=True),
    'ff': lambda c: c.loss.update(method='clapp', context='lateral', predictor='identity'),
    'fixedb': lambda c: c.loss.update(predictor='fixed'),
    'symmetric': lambda c: c.loss.update(symmetric=True),
    'bf16': lambda c: c.model.update(compute_dtype='bfloat16'),
    'tiny': _tiny,
}


def _with_train_split(config: ml_collections.ConfigDict) -> None:
  """STL-10: pretrain on the labelled train images too (train+unlabelled)."""
  if config.data.name != 'stl10':
    raise ValueError('The preset "with_train" is for STL-10 only.')
  config.data.pretrain_split = 'train+unlabelled'


PRESETS['with_train'] = _with_train_split

CLAPP_PRESETS = ('both', 'dfb', 'lateral', 'nospatial', 'bp', 'ff', 'fixedb', 'bf16', 'tiny')
INFONCE_PRESETS = ('symmetric', 'bf16', 'tiny')
# STL-10's labelled train split has 5,000 images: hold out 500 to select the probe's epoch.
_VAL_SIZES = {'cifar10': 5000, 'stl10': 500, 'tiny_imagenet': 5000}


def clapp_config(dataset: str, arg: str | None) -> ml_collections.ConfigDict:
  """CLAPP++ family on `dataset` (default preset: both), then the presets of `arg`."""
  config = base_config(dataset)
  config.eval.val_size = _VAL_SIZES[dataset]
  allowed = CLAPP_PRESETS + (('with_train',) if dataset == 'stl10' else ())
  return apply_presets(config, arg, allowed)


def infonce_config(dataset: str, arg: str | None) -> ml_collections.ConfigDict:
  """BP-InfoNCE on `dataset`, then the presets of `arg`."""
  config = base_config(dataset)
  config.eval.val_size = _VAL_SIZES[dataset]
  PRESETS['infonce'](config)
  allowed = INFONCE_PRESETS + (('with_train',) if dataset == 'stl10' else ())
  return apply_presets(config, arg, allowed)


def apply_presets(config: ml_collections.ConfigDict, arg: str | None,
                  allowed: tuple[str, ...]) -> ml_collections.ConfigDict:
  """Applies comma-separated presets, e.g. 'dfb,tiny', in order.

  Raises:
    ValueError: for a preset that is not in `allowed`.
  """
  for name in filter(None, (arg or '').split(',')):
    name = name.strip()
    if name not in allowed:
      raise ValueError(f'Unknown config preset {name!r}; this config file accepts '
                       f'{", ".join(allowed)} (comma-separated, e.g. "dfb,tiny").')
    PRESETS[name](config)
  return config
