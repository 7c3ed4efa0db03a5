"""How close each local rule's update is to backprop, layer by layer, on a real CNN.

For a checkpoint (or the initialisation), on a few pretraining batches: the cosine between
a layer's local update (gradient of the local loss(es) of that layer, stop-gradients in
place) and the BP update of the top-layer loss (the same top loss, differentiated through
every block with all stop-gradients between blocks removed). PAPER.md §6, last paragraph.
The rules compared are those whose B matrices the run holds: a CLAPP++both run gives
lateral, DFB and both; a lateral run gives lateral; a DFB run gives DFB.
"""

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from localssl import checkpointing
from localssl import input_pipeline
from localssl import objectives
from localssl import train
from localssl import validation

_RULES = {'lateral': ('lateral',), 'dfb': ('dfb',), 'both': ('lateral', 'dfb', 'both')}


def comparable_rules(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The local rules whose updates can be computed from this run's parameters.

  Raises:
    ValueError: for a global (BP) baseline, which has no local update.
  """
  if not objectives.is_local(config):
    raise ValueError(f'Gradient alignment compares local rules with BP; loss.method = '
                     f'{config.loss.method!r} is already BP. Use a local config (clapp).')
  return _RULES[config.loss.context]


def _rule_config(config: ml_collections.ConfigDict, rule: str) -> ml_collections.ConfigDict:
  """The config of a local rule, or of 'bp': the lateral top-layer loss alone."""
  rule_config = ml_collections.ConfigDict(config.to_dict())
  if rule == 'bp':
    rule_config.loss.method = 'bp_clapp'  # Needs only the top layer's lateral B.
  else:
    rule_config.loss.context = rule
  return rule_config


def _block_vectors(encoder_grads: Any, num_layers: int) -> list[jax.Array]:
  """Each block's parameters (all its convs' kernels and biases) as one flat vector."""
  vectors = []
  for layer in range(num_layers):
    parts = [jnp.ravel(leaf) for name, sub in sorted(encoder_grads.items())
             if name.startswith(f'block{layer}_') for leaf in jax.tree.leaves(sub)]
    vectors.append(jnp.concatenate(parts))
  return vectors


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """Cosine similarity of two vectors (0 when either is zero)."""
  norms = jnp.linalg.norm(a) * jnp.linalg.norm(b)
  return jnp.where(norms > 0, jnp.dot(a, b) / jnp.where(norms > 0, norms, 1.0), 0.0)


def make_alignment_fn(config: ml_collections.ConfigDict
                      ) -> Callable[[Any, dict], dict[str, jax.Array]]:
  """`fn(params, batch) -> {'<rule>/layer<l>': cosine}` for every comparable rule."""
  rules = comparable_rules(config)
  num_layers = len(objectives.block_output_shapes(config))

  def encoder_grad(rule_config, params, batch, local):
    def loss(encoder_params):
      full = {'encoder': encoder_params, 'predictor': params['predictor']}
      losses, _ = objectives.losses_and_metrics(rule_config, full, batch, local=local)
      # Local: the sum (stop-gradients keep each term in its own block); BP: the top loss.
      return sum(losses)
    return _block_vectors(jax.grad(loss)(params['encoder']), num_layers)

  def alignment(params, batch):
    bp = encoder_grad(_rule_config(config, 'bp'), params, batch, local=False)
    result = {}
    for rule in rules:
      local = encoder_grad(_rule_config(config, rule), params, batch, local=True)
      for layer in range(num_layers):
        result[f'{rule}/layer{layer}'] = cosine(local[layer], bp[layer])
    return result

  return alignment


def summarize(per_batch: list[dict[str, float]]) -> dict[str, dict[str, dict[str, float]]]:
  """Mean and standard error over batches, as {rule: {layer: {mean, sem}}}."""
  summary = {}
  for key in per_batch[0]:
    rule, layer = key.split('/')
    values = np.array([batch[key] for batch in per_batch])
    sem = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    summary.setdefault(rule, {})[layer] = {'mean': float(values.mean()), 'sem': sem}
  return summary


def plot(result: dict, path: str) -> None:
  """Cosine with the BP update per layer, one line per local rule."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for rule, layers in result['cosine'].items():
    names = sorted(layers, key=lambda name: int(name[len('layer'):]))
    means = [layers[n]['mean'] for n in names]
    sems = [layers[n]['sem'] for n in names]
    ax.errorbar(range(len(names)), means, yerr=sems, marker='o', capsize=3,
                label={'lateral': 'CLAPP++ (lateral)', 'dfb': 'CLAPP++DFB',
                       'both': 'CLAPP++both'}[rule])
  ax.set_xticks(range(len(names)), [f'block {n[len("layer"):]}' for n in names])
  ax.set_ylabel('cosine(local update, BP update)')
  ax.set_ylim(min(-0.05, ax.get_ylim()[0]), 1.05)
  ax.axhline(0, color='gray', lw=0.5)
  where = ('initialisation' if result['checkpoint_step'] is None else
           f'step {result["checkpoint_step"]}')
  ax.set_title(f'Alignment of local updates with backprop of the top loss\n'
               f'{result["dataset"]}, {where}, {result["num_batches"]} batches of '
               f'{result["batch_size"]} images (mean ± s.e.)')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Writes `workdir/grad_align.json` and `grad_align.png` for the newest checkpoint.

  With `config.eval.random_init` (or no checkpoint in `workdir`) the initialisation is used.
  """
  validation.validate(config)
  rules = comparable_rules(config)
  params = train.initial_params(config)
  step = None
  has_checkpoints = os.path.isdir(checkpointing.checkpoint_dir(
      config.eval.checkpoint_dir or workdir))
  if not config.eval.random_init and has_checkpoints:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            params)
    wanted = config.eval.checkpoint_step if config.eval.checkpoint_step >= 0 else None
    params, step = checkpointing.restore_params(config.eval.checkpoint_dir or workdir,
                                                abstract, wanted)
  data = input_pipeline.load_split(config, config.data.pretrain_split)
  batches = input_pipeline.pretrain_batches(config, data, local_batch_size=config.batch_size)
  alignment = jax.jit(make_alignment_fn(config))
  per_batch = []
  for _ in range(config.alignment_batches):
    batch = next(batches)
    per_batch.append({k: float(v) for k, v in alignment(params, batch).items()})
  result = {'checkpoint_step': step, 'rules': list(rules), 'dataset': config.data.name,
            'num_batches': config.alignment_batches, 'batch_size': config.batch_size,
            'cosine': summarize(per_batch)}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'grad_align.json'), 'w') as f:
    json.dump(result, f, indent=2)
  plot(result, os.path.join(workdir, 'grad_align.png'))
  print(json.dumps(result, indent=2))
  return result
