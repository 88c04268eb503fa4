"""optax optimizers and learning-rate schedules built from a config's optimizer block."""

from typing import Mapping

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ('adamw', 'adam', 'sgd')
SCHEDULES = ('constant', 'linear', 'cosine')


def learning_rate_schedule(cfg: Mapping, total_steps: int) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then constant, linear or cosine decay to 0."""
  peak = cfg['learning_rate']
  warmup = min(cfg['warmup_steps'], max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup, 1)
  if cfg['schedule'] == 'constant':
    after = optax.constant_schedule(peak)
  elif cfg['schedule'] == 'linear':
    after = optax.linear_schedule(peak, 0.0, decay_steps)
  else:
    after = optax.cosine_decay_schedule(peak, decay_steps)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _decay_mask(params):
  # Biases and normalisation scales are vectors; decaying them hurts and is not standard.
  return jax.tree_util.tree_map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(cfg: Mapping, total_steps: int) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(cfg, total_steps)
  if cfg['name'] == 'adamw':
    tx = optax.adamw(schedule, weight_decay=cfg['weight_decay'], mask=_decay_mask)
  elif cfg['name'] == 'adam':
    tx = optax.adam(schedule)
  else:
    tx = optax.sgd(schedule, momentum=0.9)
  if cfg['grad_clip_norm'] > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg['grad_clip_norm']), tx)
  return tx


def make_joint_optimizer(optims: Mapping[str, optax.GradientTransformation]):
  """One optimizer over {'teacher': ..., 'student': ...}, each role with its own settings."""
  return optax.multi_transform(dict(optims), lambda params: {k: k for k in params})


def with_pruning(
  tx: optax.GradientTransformation, prune_cfg: Mapping, total_steps: int, with_heads: bool
) -> optax.GradientTransformation:
  """`tx` wrapped so the student is pruned gradually as `prune_cfg` says (config.prune).

  Rules are searched anywhere in a path, so they also find the student's weights under
  'student/' when distillation heads train beside it; the heads themselves stay dense."""
  from kdjax.compress import pruning  # compression is only imported by runs that prune

  begin = int(prune_cfg['begin_fraction'] * total_steps)
  end = max(int(prune_cfg['end_fraction'] * total_steps), begin + 1)
  if prune_cfg['method'] == 'nm':  # one sparsity, n/m, from the begin step on
    n, m = prune_cfg['nm']
    schedule = pruning.one_shot_schedule(n / m, at_step=begin)
  else:
    schedule = pruning.cubic_schedule(
      0.0, prune_cfg['sparsity'], begin, end, prune_cfg['update_every']
    )
  return pruning.masked_pruning(
    tx,
    tuple(prune_cfg['rules']),
    schedule,
    method=prune_cfg['method'],
    scope=prune_cfg['scope'],
    update_every=prune_cfg['update_every'],
    exclude=tuple(prune_cfg['exclude']) + ((r'^kd_heads/',) if with_heads else ()),
    nm=tuple(prune_cfg['nm']),
  )
