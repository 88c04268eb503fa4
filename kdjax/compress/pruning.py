"""Unstructured and N:M pruning as pure pytree transforms, sparsity schedules, and an optax wrapper.

Masks are pytrees of bool arrays with the structure and shapes of `params`: True keeps a weight,
False prunes it. Leaves the rules do not select get an all-True mask, so a mask tree can always
be applied leaf by leaf without consulting the rules again.

Exact counts: a selected tensor of `size` entries pruned at `sparsity` loses exactly
k = round(sparsity * size) entries (k computed in float32 so the eager and jitted paths agree;
round-half-to-even). Entries are ranked by score with a stable argsort, so among equal scores
the one with the lower flat index is pruned first and the count never depends on ties. With
scope='global' one ranking runs over all selected tensors together and exactly
round(sparsity * total_size) entries are pruned in total.

Every mask function accepts a traced `sparsity`, so schedules can drive it inside jit.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax.compress import rules as rules_lib

_SCOPES = ('layer', 'global')


# ------------------------------------------------------------------------------------------------
# Validation


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_fraction(value, name: str, what: str):
  """Static check of a sparsity-like argument; traced values (schedules in jit) pass through."""
  if _is_concrete(value):
    v = float(np.asarray(value))
    if not 0.0 <= v < 1.0:
      raise ValueError(f'{what}: {name} must be in [0, 1), got {v}')


def _check_scope(scope: str, what: str):
  if scope not in _SCOPES:
    raise ValueError(f'{what}: scope must be one of {_SCOPES}, got {scope!r}')


# ------------------------------------------------------------------------------------------------
# Ranking core


def _num_pruned(sparsity, size: int):
  # float32 on purpose: the same arithmetic eagerly and under jit, so a wrapper step and an
  # eager call at the same sparsity prune the same count.
  s = jnp.asarray(sparsity, jnp.float32)
  return jnp.round(s * jnp.float32(size)).astype(jnp.int32)


def _keep_top(scores_flat, sparsity):
  """Bool keep-mask over a 1-D score vector: drops exactly k lowest (stable on ties)."""
  size = scores_flat.shape[0]
  order = jnp.argsort(scores_flat, stable=True)
  ranks = jnp.zeros((size,), jnp.int32).at[order].set(jnp.arange(size, dtype=jnp.int32))
  return ranks >= _num_pruned(sparsity, size)


def _masks_from_scores(params, scores, sparsity, rules, scope, what, exclude=()):
  """Masks keeping the highest `scores` among the leaves `rules` select."""
  _check_fraction(sparsity, 'sparsity', what)
  _check_scope(scope, what)
  selected = jax.tree_util.tree_leaves(rules_lib.match(params, rules, what, exclude))
  p_leaves, treedef = jax.tree_util.tree_flatten(params)
  s_leaves = treedef.flatten_up_to(scores)
  masks = [jnp.ones(jnp.shape(p), bool) for p in p_leaves]
  idx = [i for i, sel in enumerate(selected) if sel]
  flat = [jnp.ravel(s_leaves[i]).astype(jnp.float32) for i in idx]
  if scope == 'layer':
    for i, f in zip(idx, flat):
      masks[i] = _keep_top(f, sparsity).reshape(jnp.shape(p_leaves[i]))
  elif idx:
    keep = _keep_top(jnp.concatenate(flat), sparsity)
    offset = 0
    for i, f in zip(idx, flat):
      masks[i] = keep[offset : offset + f.shape[0]].reshape(jnp.shape(p_leaves[i]))
      offset += f.shape[0]
  return jax.tree_util.tree_unflatten(treedef, masks)


# ------------------------------------------------------------------------------------------------
# Mask computation


def magnitude_masks(params, sparsity, rules: Sequence[str], scope: str = 'layer', exclude=()):
  """Keep the largest |w| among selected leaves (per tensor, or one global threshold)."""
  scores = jax.tree_util.tree_map(jnp.abs, params)
  return _masks_from_scores(params, scores, sparsity, rules, scope, 'magnitude_masks', exclude)


def random_masks(params, sparsity, rules: Sequence[str], key, exclude=()):
  """Baseline: a uniformly random set of exactly round(sparsity * size) entries per tensor."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, max(len(leaves), 1))
  # One key per leaf (by tree position), so a tensor's mask does not depend on the sizes of
  # the other tensors.
  scores = treedef.unflatten([jax.random.uniform(k, jnp.shape(p)) for k, p in zip(keys, leaves)])
  return _masks_from_scores(params, scores, sparsity, rules, 'layer', 'random_masks', exclude)


def saliency_masks(params, grads, sparsity, rules: Sequence[str], scope: str = 'layer', exclude=()):
  """Keep the largest first-order Taylor saliency |w * g| (the loss change from zeroing w)."""
  scores = jax.tree_util.tree_map(lambda p, g: jnp.abs(p * g), params, grads)
  return _masks_from_scores(params, scores, sparsity, rules, scope, 'saliency_masks', exclude)


def init_movement_scores(params):
  """Zero float32 movement scores shaped like `params`."""
  return jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)


def movement_scores(scores, params, grads):
  """One accumulation step of movement pruning (Sanh et al. 2020): S <- S - w * g.

  A weight moving away from zero (w and -g of the same sign) gains score; the learning rate is
  left out because only the ranking of scores matters."""
  return jax.tree_util.tree_map(
    lambda s, p, g: s - (p * g).astype(jnp.float32), scores, params, grads
  )


def movement_masks(scores, sparsity, rules: Sequence[str], scope: str = 'layer', exclude=()):
  """Keep the top-scoring weights (signed scores, not magnitudes); `scores` is shaped like params."""
  return _masks_from_scores(scores, scores, sparsity, rules, scope, 'movement_masks', exclude)


def nm_masks(params, n: int, m: int, rules: Sequence[str], axis: int = 0, exclude=()):
  """N:M structured sparsity: in each group of m consecutive entries along `axis` (the input
  axis of a Dense kernel [in, out] by default) keep the n largest |w|, ties to the lower index."""
  what = 'nm_masks'
  if int(m) < 1:
    raise ValueError(f'{what}: m must be >= 1, got {m}')
  if not 1 <= int(n) <= int(m):
    raise ValueError(f'{what}: n must be in [1, m={m}], got {n}')
  selected = jax.tree_util.tree_leaves(rules_lib.match(params, rules, what, exclude))
  paths = rules_lib.param_paths(params)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  masks = []
  for path, p, sel in zip(paths, leaves, selected):
    shape = jnp.shape(p)
    if not sel:
      masks.append(jnp.ones(shape, bool))
      continue
    if not -len(shape) <= axis < len(shape):
      raise ValueError(f'{what}: axis {axis} is out of range for {path!r} of shape {shape}')
    length = shape[axis]
    if length % m:
      raise ValueError(
        f'{what}: axis {axis} of {path!r} (shape {shape}) has length {length}, not a multiple '
        f'of m={m}'
      )
    moved = jnp.moveaxis(jnp.abs(p).astype(jnp.float32), axis, -1)
    groups = moved.reshape(moved.shape[:-1] + (length // m, m))
    # Rank inside each group; the m - n lowest ranks are pruned.
    order = jnp.argsort(groups, axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1, stable=True)
    keep = (ranks >= m - n).reshape(moved.shape)
    masks.append(jnp.moveaxis(keep, -1, axis))
  return jax.tree_util.tree_unflatten(treedef, masks)


# ------------------------------------------------------------------------------------------------
# Applying and reporting


def apply_masks(params, masks):
  """Params with masked entries set to exactly zero (dtype preserved)."""
  return jax.tree_util.tree_map(
    lambda p, k: jnp.where(k, p, jnp.zeros((), jnp.result_type(p))), params, masks
  )


def sparsity_report(tree, rules: Sequence[str] | None = None, exclude=()) -> dict[str, Any]:
  """Fraction of zeros (or False, for a mask tree) per selected path and in total.

  `tree` is params (zeros counted) or masks (False counted); rules=None selects every leaf.
  Returns {'per_path': {path: fraction}, 'zeros': int, 'size': int, 'total': fraction}, all
  host Python numbers (call it outside jit)."""
  if rules is None:
    flags = [True] * len(jax.tree_util.tree_leaves(tree))
  else:
    flags = jax.tree_util.tree_leaves(rules_lib.match(tree, rules, 'sparsity_report', exclude))
  per_path, zeros, size = {}, 0, 0
  for path, leaf, sel in zip(rules_lib.param_paths(tree), jax.tree_util.tree_leaves(tree), flags):
    if not sel:
      continue
    arr = np.asarray(leaf)
    z = int(arr.size - np.count_nonzero(arr))
    per_path[path] = z / arr.size if arr.size else 0.0
    zeros += z
    size += arr.size
  return {
    'per_path': per_path,
    'zeros': zeros,
    'size': size,
    'total': zeros / size if size else 0.0,
  }


# ------------------------------------------------------------------------------------------------
# Schedules (jnp, usable with traced steps)


def cubic_sparsity(
  step, initial: float, final: float, begin_step: int, end_step: int, frequency: int
):
  """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))^3.

  t moves in increments of `frequency` (= dt) from begin_step (= t0); the value is `initial`
  before begin_step and `final` from end_step on (n dt = end_step - begin_step, which need not
  be a multiple of dt)."""
  _check_fraction(initial, 'initial', 'cubic_sparsity')
  _check_fraction(final, 'final', 'cubic_sparsity')
  if int(end_step) <= int(begin_step):
    raise ValueError(
      f'cubic_sparsity: end_step must be > begin_step, got {end_step} <= {begin_step}'
    )
  if int(frequency) < 1:
    raise ValueError(f'cubic_sparsity: frequency must be >= 1, got {frequency}')
  step = jnp.asarray(step, jnp.int32)
  t = jnp.clip(step, begin_step, end_step)
  t = begin_step + ((t - begin_step) // frequency) * frequency
  progress = (t - begin_step).astype(jnp.float32) / jnp.float32(end_step - begin_step)
  progress = jnp.where(step >= end_step, jnp.float32(1.0), progress)
  return jnp.float32(final) + jnp.float32(initial - final) * (1.0 - progress) ** 3


def one_shot_sparsity(step, sparsity: float, at_step: int = 0):
  """0 before `at_step`, `sparsity` from it on."""
  _check_fraction(sparsity, 'sparsity', 'one_shot_sparsity')
  step = jnp.asarray(step, jnp.int32)
  return jnp.where(step >= at_step, jnp.float32(sparsity), jnp.float32(0.0))


def iterative_sparsity(step, steps: Sequence[int], sparsities: Sequence[float]):
  """Piecewise constant: sparsities[i] from steps[i] on (steps strictly increasing), 0 before."""
  if len(steps) != len(sparsities) or not steps:
    raise ValueError(
      f'iterative_sparsity: steps and sparsities must be non-empty and of equal length, got '
      f'{len(steps)} and {len(sparsities)}'
    )
  if any(b <= a for a, b in zip(steps, steps[1:])):
    raise ValueError(f'iterative_sparsity: steps must be strictly increasing, got {list(steps)}')
  for s in sparsities:
    _check_fraction(s, 'sparsities', 'iterative_sparsity')
  step = jnp.asarray(step, jnp.int32)
  idx = jnp.searchsorted(jnp.asarray(steps, jnp.int32), step, side='right') - 1
  vals = jnp.asarray(sparsities, jnp.float32)
  return jnp.where(idx < 0, jnp.float32(0.0), vals[jnp.maximum(idx, 0)])


def cubic_schedule(initial, final, begin_step, end_step, frequency) -> Callable:
  """`cubic_sparsity` as a step -> sparsity callable (arguments validated now)."""
  cubic_sparsity(0, initial, final, begin_step, end_step, frequency)
  return lambda step: cubic_sparsity(step, initial, final, begin_step, end_step, frequency)


def one_shot_schedule(sparsity, at_step: int = 0) -> Callable:
  one_shot_sparsity(0, sparsity, at_step)
  return lambda step: one_shot_sparsity(step, sparsity, at_step)


def iterative_schedule(steps, sparsities) -> Callable:
  iterative_sparsity(0, steps, sparsities)
  return lambda step: iterative_sparsity(step, steps, sparsities)


# ------------------------------------------------------------------------------------------------
# Optax wrapper


class MaskedPruningState(NamedTuple):
  count: jax.Array  # updates done so far; the schedule is evaluated at it
  masks: Any  # bool pytree like params (all True until the first scheduled recompute)
  scores: Any  # movement scores (float32 pytree like params), or None for magnitude
  inner_state: Any


_METHODS = ('magnitude', 'movement', 'nm')


def masked_pruning(
  inner: optax.GradientTransformation,
  rules: Sequence[str],
  schedule: Callable | float,
  method: str = 'magnitude',
  scope: str = 'layer',
  update_every: int = 1,
  exclude: Sequence[str] = (),
  nm: tuple[int, int] = (2, 4),
) -> optax.GradientTransformation:
  """Wrap `inner` so the selected parameters are pruned on `schedule` (step -> sparsity, or a
  constant) and stay pruned.

  Each update: gradients of currently pruned weights are zeroed before `inner`; movement
  scores accumulate -w * g (raw gradients); when count % update_every == 0 the masks are
  recomputed at schedule(count) from the params after this update (magnitude; weights pruned
  before score 0 there, so a non-decreasing schedule never revives them) or from the scores
  (movement); finally masked entries get the update -params, so params + updates is exactly 0
  there whatever the inner state (Adam momentum) proposes. Requires `params` in update()."""
  if method not in _METHODS:
    raise ValueError(f'masked_pruning: method must be one of {_METHODS}, got {method!r}')
  _check_scope(scope, 'masked_pruning')
  if int(update_every) < 1:
    raise ValueError(f'masked_pruning: update_every must be >= 1, got {update_every}')
  sched = schedule if callable(schedule) else (lambda step: jnp.float32(schedule))
  if not callable(schedule):
    _check_fraction(schedule, 'schedule', 'masked_pruning')

  def init_fn(params):
    rules_lib.match(params, rules, 'masked_pruning', exclude)  # fail early on a dead rule
    if method == 'nm':  # fail early on a tensor whose input axis does not split into groups
      nm_masks(params, nm[0], nm[1], rules, 0, exclude)
    masks = jax.tree_util.tree_map(lambda p: jnp.ones(jnp.shape(p), bool), params)
    scores = init_movement_scores(params) if method == 'movement' else None
    return MaskedPruningState(jnp.zeros((), jnp.int32), masks, scores, inner.init(params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('masked_pruning: update() needs params (masks follow the weights)')
    grads = apply_masks(updates, state.masks)
    inner_updates, inner_state = inner.update(grads, state.inner_state, params)
    scores = state.scores
    if method == 'movement':
      scores = movement_scores(scores, params, updates)

    def recompute(_):
      sparsity = sched(state.count)
      if method == 'magnitude':
        candidate = apply_masks(optax.apply_updates(params, inner_updates), state.masks)
        return magnitude_masks(candidate, sparsity, rules, scope, exclude)
      if method == 'nm':
        # N:M has one sparsity, n/m: the schedule only says when it starts (> 0). Masks are
        # re-chosen by magnitude at each update; pruned weights are 0, so they stay out.
        candidate = apply_masks(optax.apply_updates(params, inner_updates), state.masks)
        chosen = nm_masks(candidate, nm[0], nm[1], rules, 0, exclude)
        return jax.tree_util.tree_map(lambda k: k | (sparsity <= 0), chosen)
      return movement_masks(scores, sparsity, rules, scope, exclude)

    masks = jax.lax.cond(
      state.count % update_every == 0, recompute, lambda _: state.masks, operand=None
    )
    # -p makes p + update exactly 0 (x + -x == 0 in IEEE arithmetic for finite x).
    out = jax.tree_util.tree_map(
      lambda u, p, k: jnp.where(k, u, (-p).astype(jnp.result_type(u))),
      inner_updates,
      params,
      masks,
    )
    return out, MaskedPruningState(state.count + 1, masks, scores, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)
