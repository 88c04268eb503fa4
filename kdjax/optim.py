"""optax optimizers and learning-rate schedules built from a config's optimizer block."""

from typing import Any, Mapping, NamedTuple

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


class ParamEmaState(NamedTuple):
  inner: optax.OptState
  ema: Any  # the moving average of the params, same tree and dtypes
  count: jax.Array  # updates averaged so far


def with_param_ema(tx: optax.GradientTransformation, decay: float) -> optax.GradientTransformation:
  """`tx`, plus an exponential moving average of the params it produces (Polyak averaging).

  After each update, ema <- d·ema + (1 - d)·params_new with d = min(decay, (1 + n) / (10 + n))
  at the n-th update (the warm-up of TensorFlow's ExponentialMovingAverage), so the first
  updates are not averaged with the initial weights for thousands of steps. The average is
  part of the optimizer state, so checkpoints, resume, device placement and the non-finite
  'skip' policy treat it like the rest of the state. The updates `tx` returns are unchanged.
  """

  def init_fn(params):
    # A copy, not the params' own buffers: the step donates the whole state.
    ema = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
    return ParamEmaState(tx.init(params), ema, jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('with_param_ema needs the params in update(updates, state, params)')
    updates, inner = tx.update(updates, state.inner, params)
    new_params = optax.apply_updates(params, updates)
    count = state.count + 1
    d = jnp.minimum(decay, (1.0 + count) / (10.0 + count)).astype(jnp.float32)
    ema = jax.tree.map(
      lambda e, p: (d * e.astype(jnp.float32) + (1 - d) * p.astype(jnp.float32)).astype(e.dtype),
      state.ema,
      new_params,
    )
    return updates, ParamEmaState(inner, ema, count)

  return optax.GradientTransformation(init_fn, update_fn)


def ema_params(opt_state) -> Any | None:
  """The moving average kept by `with_param_ema` (the outermost transform), else None."""
  return opt_state.ema if isinstance(opt_state, ParamEmaState) else None


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
