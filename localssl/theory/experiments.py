"""The four theory experiments of PAPER.md §6 (Fig. 2, 3a, 3b, 4b) as functions.

Every experiment builds a few "curves" (a network, a context, a loss f, and how B^l is set),
runs the measurement protocol of alignment.py on `num_batches` batches, and reports, per curve
and per layer, the mean and standard error over batches of the cosine between the local and
the BP weight updates (and errors dL/dz^l). `run_experiment` writes `<out>/<name>.json` and
`<out>/<name>.png`.

What each experiment uses and shows (defaults; see README.md in this folder):
  fig2:  6 x 128 MLP on flattened 12 x 12 grayscale CIFAR-10 patches, softplus f, lateral
         context. Linear + orthogonal W (Theorem 3.1's assumptions): cosine 1 in every layer.
         Default (non-orthogonal) init, or ReLU, lowers the early layers; a random fixed B
         is far from BP.
  fig3a: linear MLP 128-64-32-16-8-4 (semi-orthogonal W), lateral vs DFB context, linear f
         vs softplus f (Theorem 3.3: DFB is closer to BP).
  fig3b: a ReLU MLP 512 x 6, first trained briefly with the global BP loss; then lateral,
         DFB, random fixed B and an oracle B (trained to reproduce the BP errors).
  fig4b: linear CNN, 4 conv layers x 32 channels (kernel 2, stride 2, no bias, orthogonal),
         16 x 16 grayscale crops; pools 8-4-2-1 (no spatial dependence) vs 2-1-1-1 (spatial)
         vs spatial + DFB, plus 1-1-1-1 (no pooling at all).
"""

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from localssl.theory import alignment
from localssl.theory import data
from localssl.theory import losses
from localssl.theory import networks
from localssl.theory import optimal_b

EXPERIMENTS = ('fig2', 'fig3a', 'fig3b', 'fig4b')


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Settings shared by all experiments (the CLI flags).

  Attributes:
    data_dir: TFDS data dir with cifar10 (ignored if synthetic).
    synthetic: use smooth random images instead of CIFAR-10 (tests, no data).
    num_batches: batches the cosines are averaged over.
    batch_images: N images per batch (2N rows: two views each).
    num_images: images loaded per split.
    seed: seed of weights and batches.
    lam: L2 penalty lambda on every B (0.01 in the paper).
    train_steps: fig3b: Adam steps of global BP training of the ReLU MLP.
    oracle_steps: fig3b: Adam steps fitting the oracle B^l.
    width: fig3b: hidden width of the ReLU MLP (512 in the paper).
  """
  data_dir: str | None = None
  synthetic: bool = False
  num_batches: int = 50
  batch_images: int = 32
  num_images: int = 4096
  seed: int = 0
  lam: float = losses.DEFAULT_LAMBDA
  train_steps: int = 300
  oracle_steps: int = 300
  width: int = 512


@dataclasses.dataclass(frozen=True)
class Curve:
  """One curve of a figure: a network and how its local losses are set up."""
  name: str
  spec: networks.NetSpec
  params: networks.Params
  context: str = 'lateral'
  f: str = 'softplus'
  fixed_bs: Sequence[jax.Array] | None = None
  notes: str = ''

  def settings(self) -> dict[str, Any]:
    return {'network': self.spec.kind, 'widths': list(self.spec.widths),
            'activation': self.spec.activation, 'pools': list(self.spec.pools),
            'context': self.context, 'f': self.f,
            'b': 'fixed' if self.fixed_bs is not None else 'optimal', 'notes': self.notes}


# ----------------------------------------------------------------------------- data


def _images(config: RunConfig, split: str) -> np.ndarray:
  if config.synthetic:
    return data.synthetic_images(config.num_images, seed=config.seed + (split == 'test'))
  if not config.data_dir:
    raise ValueError('No data: pass --data_dir (or set $TFDS_DATA_DIR), or --synthetic.')
  return data.load_cifar10_gray(config.data_dir, split, config.num_images)


def _batches(images: np.ndarray, config: RunConfig, count: int, crop: int, jitter: int,
             flatten: bool, seed_offset: int) -> list[jax.Array]:
  rng = np.random.default_rng(config.seed * 1000 + seed_offset)
  return [jnp.asarray(data.sample_batch(images, rng, config.batch_images, crop, jitter,
                                        flatten)) for _ in range(count)]


def _data_settings(config: RunConfig, crop: int, jitter: int, flatten: bool) -> dict:
  return {
      'data': 'synthetic smooth images' if config.synthetic else 'CIFAR-10 (TFDS)',
      'preprocessing': 'grayscale (0.299R+0.587G+0.114B), standardised (scalar mean/std)',
      'view': f'{crop}x{crop} crop' + (' flattened' if flatten else ' image'),
      'positive_pair': f'two crops of the same image shifted by <= {jitter} px per axis',
      'negative': 'positive target of the next row (PAPER.md §2)',
  }


# ----------------------------------------------------------------------------- measuring


def measure(curves: Sequence[Curve], batches: Sequence[jax.Array], lam: float
            ) -> list[dict[str, Any]]:
  """Runs the protocol for every curve on every batch and summarises per layer.

  Args:
    curves: the curves.
    batches: the batches (the same for every curve).
    lam: L2 penalty on B.

  Returns:
    One dict per curve: name, settings, per-layer mean and standard error (over batches) of
    the weight-update and error cosines, and the worst optimality residual of a fitted B
    (||dL/dB||, and relative to ||dL/dB at B=0||).
  """
  results = []
  for curve in curves:
    weight_cos, error_cos, residual, grad_norm = [], [], 0.0, 0.0
    for x in batches:
      comp = alignment.compare_batch(curve.params, curve.spec, x, context=curve.context,
                                     f=curve.f, lam=lam, fixed_bs=curve.fixed_bs)
      weight_cos.append(comp.weight_cos)
      error_cos.append(comp.error_cos)
      residual = max(residual, float(np.nanmax(comp.residuals)))
      grad_norm = max(grad_norm, float(np.nanmax(comp.b_grad_norms)))
    weight_cos, error_cos = np.array(weight_cos), np.array(error_cos)
    results.append({
        'name': curve.name,
        'settings': curve.settings(),
        'layers': list(range(1, curve.spec.num_layers + 1)),
        'weight_cos_mean': weight_cos.mean(0).tolist(),
        'weight_cos_sem': _sem(weight_cos).tolist(),
        'error_cos_mean': error_cos.mean(0).tolist(),
        'error_cos_sem': _sem(error_cos).tolist(),
        'max_b_relative_residual': residual,
        'max_b_grad_norm': grad_norm,
        'num_batches': len(batches),
    })
  return results


def _sem(values: np.ndarray) -> np.ndarray:
  if values.shape[0] < 2:
    return np.zeros(values.shape[1])
  return values.std(0, ddof=1) / np.sqrt(values.shape[0])


def random_bs(key: jax.Array, reps_dims: Sequence[int], context_dims: Sequence[int]
              ) -> list[jax.Array]:
  """Random fixed B^l (d_l x d_c), PyTorch default init U(+-1/sqrt(d_l)), for l < L."""
  keys = jax.random.split(key, len(reps_dims))
  return [jax.random.uniform(k, (dt, dc), minval=-1.0, maxval=1.0) / np.sqrt(dt)
          for k, dt, dc in zip(keys, reps_dims, context_dims)]


# ----------------------------------------------------------------------------- fig 2


def fig2(config: RunConfig) -> dict[str, Any]:
  """Fig. 2: a 6 x 128 MLP, lateral context; Theorem 3.1 and what breaks it."""
  crop, jitter = 12, 4
  images = _images(config, 'train')
  batches = _batches(images, config, config.num_batches, crop, jitter, True, 2)
  in_dim = crop * crop
  key = jax.random.key(config.seed)
  curves = []
  for activation, init, name in [('linear', 'orthogonal', 'linear, orthogonal W (Thm 3.1)'),
                                 ('linear', 'default', 'linear, default-init W'),
                                 ('relu', 'orthogonal', 'ReLU, orthogonal W'),
                                 ('relu', 'default', 'ReLU, default-init W')]:
    spec = networks.NetSpec('mlp', (128,) * 6, activation)
    curves.append(Curve(name, spec, networks.init_params(key, spec, in_dim, init)))
  spec = curves[0].spec
  curves.append(Curve('linear, orthogonal W, random fixed B', spec, curves[0].params,
                      fixed_bs=random_bs(jax.random.fold_in(key, 1), (128,) * 5,
                                         (128,) * 5)))
  return {
      'title': 'Fig. 2: local vs BP updates in a 6x128 MLP (lateral context, optimal B)',
      'description': ('Cosine between the layer-local weight update (each layer fits its own '
                      'optimal B^l) and the BP update of the top-layer loss. With a linear '
                      'network and orthogonal weights they coincide (Theorem 3.1); default '
                      'init or ReLU lowers the early layers; a random fixed B does not align.'),
      'settings': _data_settings(config, crop, jitter, True),
      'curves': measure(curves, batches, config.lam),
  }


# ----------------------------------------------------------------------------- fig 3a


def fig3a(config: RunConfig) -> dict[str, Any]:
  """Fig. 3a: shrinking widths 128-64-32-16-8-4, lateral vs DFB, linear vs softplus f."""
  crop, jitter = 12, 4
  images = _images(config, 'train')
  batches = _batches(images, config, config.num_batches, crop, jitter, True, 3)
  spec = networks.NetSpec('mlp', (128, 64, 32, 16, 8, 4), 'linear')
  params = networks.init_params(jax.random.key(config.seed), spec, crop * crop, 'orthogonal')
  curves = [Curve(f'{context}, {f} f', spec, params, context=context, f=f)
            for f in ('linear', 'softplus') for context in ('lateral', 'dfb')]
  return {
      'title': 'Fig. 3a: linear MLP 128-64-32-16-8-4 (semi-orthogonal W): lateral vs DFB',
      'description': ('With shrinking widths the local update is no longer exact; taking the '
                      'context from the top layer (DFB) brings it closer to BP (Theorem '
                      '3.3, exact for linear f at the level of the feedback matrix).'),
      'settings': _data_settings(config, crop, jitter, True),
      'curves': measure(curves, batches, config.lam),
  }


# ----------------------------------------------------------------------------- fig 3b


@functools.partial(jax.jit, static_argnames=('spec', 'f', 'optimizer'))
def _train_step(params, b_top, opt_state, x, lam, *, spec, f, optimizer):
  loss, grads = jax.value_and_grad(
      lambda p, b: alignment.global_loss(p, spec, x, b, f, lam), argnums=(0, 1))(
          params, b_top)
  updates, opt_state = optimizer.update(grads, opt_state, (params, b_top))
  params, b_top = optax.apply_updates((params, b_top), updates)
  return params, b_top, opt_state, loss


def train_global(params: networks.Params, spec: networks.NetSpec,
                 batches: Sequence[jax.Array], f: str, lam: float, learning_rate: float
                 ) -> tuple[networks.Params, jax.Array, list[float]]:
  """Trains W and the top B jointly on the global BP loss with Adam (one step per batch).

  Args:
    params: initial weights.
    spec: network.
    batches: training batches.
    f: loss name.
    lam: L2 penalty on B.
    learning_rate: Adam learning rate.

  Returns:
    (trained weights, trained top B, loss per step).
  """
  d_top = spec.widths[-1]
  b_top = jax.random.uniform(jax.random.key(1), (d_top, d_top), minval=-1.0,
                             maxval=1.0) / np.sqrt(d_top)
  optimizer = optax.adam(learning_rate)
  opt_state = optimizer.init((params, b_top))
  history = []
  for x in batches:
    params, b_top, opt_state, loss = _train_step(params, b_top, opt_state, x, lam, spec=spec,
                                                 f=f, optimizer=optimizer)
    history.append(float(loss))
  return params, b_top, history


def _local_errors(bs, params, x, top_b, lam, spec, f, context):
  _, errors = alignment.gradients(params, x, list(bs) + [top_b], [None] * (len(bs) + 1),
                                  lam, spec=spec, model='local', context=context, f=f)
  return errors[:-1]


@functools.partial(jax.jit, static_argnames=('spec', 'f', 'context', 'optimizer'))
def _oracle_step(bs, opt_state, params, x, top_b, bp_errors, lam, *, spec, f, context,
                 optimizer):
  def mismatch(bs):
    errors = _local_errors(bs, params, x, top_b, lam, spec, f, context)
    return sum(jnp.sum((e - t) ** 2) / jnp.sum(t ** 2) for e, t in zip(errors, bp_errors))
  loss, grads = jax.value_and_grad(mismatch)(bs)
  updates, opt_state = optimizer.update(grads, opt_state, bs)
  return optax.apply_updates(bs, updates), opt_state, loss


def train_oracle_bs(params: networks.Params, spec: networks.NetSpec,
                    batches: Sequence[jax.Array], init_bs: Sequence[jax.Array], f: str,
                    lam: float, context: str, learning_rate: float
                    ) -> tuple[list[jax.Array], list[float]]:
  """Fits B^1..B^{L-1} so that the local errors dL^l/dz^l match the BP errors (an oracle).

  Every step takes a batch, fits the top B to its optimum (as in the protocol), computes the
  BP errors, and takes an Adam step on sum_l ||e_local^l - e_BP^l||^2 / ||e_BP^l||^2.

  Args:
    params: frozen weights.
    spec: network.
    batches: training batches (one step each).
    init_bs: initial B^1..B^{L-1}.
    f: loss name.
    lam: L2 penalty (enters the top B optimum).
    context: context of the local losses.
    learning_rate: Adam learning rate.

  Returns:
    (fitted B^1..B^{L-1}, relative error mismatch per step).
  """
  optimizer = optax.adam(learning_rate)
  bs = list(init_bs)
  opt_state = optimizer.init(bs)
  history = []
  for x in batches:
    reps = alignment.representations(params, spec, x)
    top = alignment.solve_global_b(reps, f, lam)
    _, bp_errors = alignment.gradients(params, x, [top.b], [None], lam, spec=spec,
                                       model='global', context='lateral', f=f)
    bs, opt_state, loss = _oracle_step(bs, opt_state, params, x, top.b, bp_errors[:-1], lam,
                                       spec=spec, f=f, context=context, optimizer=optimizer)
    history.append(float(loss) / (spec.num_layers - 1))
  return bs, history


def fig3b(config: RunConfig) -> dict[str, Any]:
  """Fig. 3b: a briefly BP-trained ReLU MLP; lateral, DFB, random and oracle B."""
  crop, jitter, f, width = 12, 4, 'softplus', config.width
  train_images = _images(config, 'train')
  test_images = _images(config, 'test')
  spec = networks.NetSpec('mlp', (width,) * 6, 'relu')
  key = jax.random.key(config.seed)
  params = networks.init_params(key, spec, crop * crop, 'default')
  train_batches = _batches(train_images, config, config.train_steps, crop, jitter, True, 4)
  params, _, train_history = train_global(params, spec, train_batches, f, config.lam, 1e-3)
  dims = (width,) * 5
  rand = random_bs(jax.random.fold_in(key, 1), dims, (width,) * 5)
  oracle_batches = _batches(train_images, config, config.oracle_steps, crop, jitter, True, 5)
  oracle, oracle_history = train_oracle_bs(params, spec, oracle_batches, rand, f, config.lam,
                                           'dfb', 1e-3)
  curves = [
      Curve('lateral (optimal B)', spec, params, 'lateral', f),
      Curve('DFB (optimal B)', spec, params, 'dfb', f),
      Curve('DFB, random fixed B', spec, params, 'dfb', f, fixed_bs=rand),
      Curve('DFB, oracle B (fit to BP errors)', spec, params, 'dfb', f, fixed_bs=oracle,
            notes=f'Adam lr 1e-3, {config.oracle_steps} steps on train batches'),
  ]
  batches = _batches(test_images, config, config.num_batches, crop, jitter, True, 6)
  settings = _data_settings(config, crop, jitter, True)
  settings.update({
      'training': (f'W and top B trained jointly on the global BP loss (softplus f, '
                   f'lambda={config.lam}), Adam lr 1e-3, {config.train_steps} steps of '
                   f'{config.batch_images} images, default (PyTorch) init, no bias'),
      'train_loss_first_last': [train_history[0], float(np.mean(train_history[-10:]))]
                               if train_history else [],
      'oracle_mismatch_first_last': [oracle_history[0], float(np.mean(oracle_history[-10:]))]
                                    if oracle_history else [],
      'evaluation': 'CIFAR-10 test-split batches' if not config.synthetic else
                    'held-out synthetic images',
  })
  return {
      'title': f'Fig. 3b: trained ReLU MLP {width}x6: which feedback B aligns with BP',
      'description': ('After brief BP training of the network, W is frozen and each variant '
                      'sets B^l (l < L): its own optimum (lateral or DFB), a random fixed '
                      'matrix, or an oracle fit to reproduce the BP errors.'),
      'settings': settings,
      'curves': measure(curves, batches, config.lam),
  }


# ----------------------------------------------------------------------------- fig 4b


def fig4b(config: RunConfig) -> dict[str, Any]:
  """Fig. 4b: a linear CNN, pooling before the loss vs 2D spatial dependence (Prop. 3.5)."""
  crop, jitter = 16, 4
  images = _images(config, 'train')
  batches = _batches(images, config, config.num_batches, crop, jitter, False, 7)
  key = jax.random.key(config.seed)
  base = networks.NetSpec('cnn', (32,) * 4, 'linear', pools=(1, 1, 1, 1))
  params = networks.init_params(key, base, 1, 'orthogonal')
  curves = []
  for pools, context, name in [((8, 4, 2, 1), 'lateral', 'pools 8-4-2-1 (no spatial dep.)'),
                               ((2, 1, 1, 1), 'lateral', 'pools 2-1-1-1 (spatial dep.)'),
                               ((2, 1, 1, 1), 'dfb', 'pools 2-1-1-1 + DFB'),
                               ((1, 1, 1, 1), 'lateral', 'no pooling (k=1)')]:
    spec = dataclasses.replace(base, pools=pools)
    curves.append(Curve(name, spec, params, context=context))
  return {
      'title': 'Fig. 4b: linear CNN 4x32 (kernel 2, stride 2): pooling vs spatial dependence',
      'description': ('Average-pooling a layer before the loss forces the same error at every '
                      'position, which BP does not have; keeping positions (B over channel x '
                      'position) brings the local update towards BP (Proposition 3.5).'),
      'settings': _data_settings(config, crop, jitter, False),
      'curves': measure(curves, batches, config.lam),
  }


# ----------------------------------------------------------------------------- output


RUNNERS: dict[str, Callable[[RunConfig], dict[str, Any]]] = {
    'fig2': fig2, 'fig3a': fig3a, 'fig3b': fig3b, 'fig4b': fig4b}


def plot(result: dict[str, Any], path: str) -> None:
  """Draws the per-layer cosines (mean +- standard error) of every curve into a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 2, figsize=(12, 5.4), sharey=True)
  panels = [('weight_cos', 'weight update dL/dW$^l$'), ('error_cos', 'error dL/dz$^l$')]
  for ax, (key, label) in zip(axes, panels):
    for curve in result['curves']:
      ax.errorbar(curve['layers'], curve[f'{key}_mean'], yerr=curve[f'{key}_sem'],
                  marker='o', capsize=3, label=curve['name'])
    ax.set_xlabel('layer l (1 = first hidden layer, last = top)')
    ax.set_title(f'cosine(local, BP) of the {label}', fontsize=10)
    ax.set_xticks(result['curves'][0]['layers'])
    ax.axhline(1.0, color='gray', lw=0.5, ls='--')
    ax.grid(alpha=0.3)
  axes[0].set_ylabel('cosine similarity (mean ± s.e. over batches)')
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='lower center', ncol=min(3, len(labels)), fontsize=9)
  settings = result['settings']
  fig.suptitle(f"{result['title']}\n{settings['data']}, {settings['num_batches']} batches of "
               f"{settings['batch_images']} image pairs, lambda={settings['lambda']}; B at its "
               'exact optimum unless marked; the top B is the global one, so the top layer '
               'is 1 by construction', fontsize=9)
  fig.tight_layout(rect=(0, 0.1, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run_experiment(name: str, out_dir: str, config: RunConfig) -> dict[str, Any]:
  """Runs one experiment in float64 and writes <out_dir>/<name>.json and .png.

  Args:
    name: one of EXPERIMENTS.
    out_dir: output folder (created if needed).
    config: run settings.

  Returns:
    The result dict written to the JSON file.

  Raises:
    ValueError: for an unknown experiment.
  """
  if name not in RUNNERS:
    raise ValueError(f'Unknown experiment {name!r}; expected one of {EXPERIMENTS}.')
  start = time.time()
  with jax.enable_x64(True):
    optimal_b.require_float64()
    result = RUNNERS[name](config)
  result['experiment'] = name
  result['settings'].update({
      'num_batches': config.num_batches, 'batch_images': config.batch_images,
      'rows_per_batch': 2 * config.batch_images, 'lambda': config.lam, 'seed': config.seed,
      'dtype': 'float64', 'jax_version': jax.__version__,
      'protocol': ('W frozen; top B of the global model fit to its exact optimum and copied '
                   'to the local top layer; every other local B^l fit to its own optimum '
                   '(unless fixed); cosines of flattened dL/dW^l and dL/dz^l'),
  })
  result['runtime_s'] = time.time() - start
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f'{name}.json'), 'w') as fh:
    json.dump(result, fh, indent=1)
  plot(result, os.path.join(out_dir, f'{name}.png'))
  return result
