"""Low-rank factorisation of Dense kernels, as a pytree transform, and the layer that runs it.

`factorise_dense` replaces each selected Dense subtree {'kernel' [in, out], 'bias'} by
{'kernel_a' [in, r], 'kernel_b' [r, out], 'bias'} with kernel_a @ kernel_b the best rank-r
approximation of the kernel (`embeddings.svd_factorise`); `LowRankDense` is a Flax module with
exactly those parameter names, so the factorised subtree loads into it in place of nn.Dense.
Models build their Dense layers through `dense`, which picks LowRankDense for the paths their
`low_rank` keyword lists; `factorise_model` factorises a model's params and returns the spec
(with that keyword) of the smaller model that runs them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict, freeze, unfreeze
from flax.linen.dtypes import promote_dtype
from jax import lax

from kdjax.compress import embeddings
from kdjax.compress import rules as rules_lib


class LowRankDense(nn.Module):
  """x @ kernel_a @ kernel_b + bias over the last axis of x: a Dense layer whose kernel is
  stored as two factors [in, rank] and [rank, features].

  `dtype` and `param_dtype` mean what they mean for nn.Dense (computation dtype, None: from the
  inputs; parameters float32), so a bf16 model keeps float32 factors like its Dense kernels.
  """

  features: int
  rank: int
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
      raise ValueError(
        f'LowRankDense {self.name}: rank must be a positive integer, got {self.rank!r}'
      )
    a = self.param('kernel_a', self.kernel_init, (x.shape[-1], self.rank), self.param_dtype)
    b = self.param('kernel_b', self.kernel_init, (self.rank, self.features), self.param_dtype)
    bias = (
      self.param('bias', self.bias_init, (self.features,), self.param_dtype)
      if self.use_bias
      else None
    )
    x, a, b, bias = promote_dtype(x, a, b, bias, dtype=self.dtype)
    # (x @ a) @ b costs rank * (in + features) per row, the point of factorising; x @ (a @ b)
    # would cost in * features again. dot_general over the last axis, as nn.Dense contracts.
    contract = lambda t, k: lax.dot_general(t, k, (((t.ndim - 1,), (0,)), ((), ())))
    y = contract(contract(x, a), b)
    if bias is not None:
      # Explicit leading ones: the bias broadcasts without rank promotion.
      y = y + bias.reshape((1,) * (y.ndim - 1) + (self.features,))
    return y


LowRank = tuple[tuple[str, int], ...]


def normalise_low_rank(low_rank, where: str = 'low_rank') -> LowRank:
  """`low_rank` as a hashable tuple of (layer path, rank) pairs sorted by path, so a JSON list
  of lists (an export's model.json) builds the same module as the tuple it was written from.
  Each path is a Dense layer's '/'-joined path relative to the model's parameter root (the
  names `factorise_dense` reports); each rank a positive integer; no path twice."""
  if isinstance(low_rank, (str, Mapping)) or not isinstance(low_rank, Sequence):
    raise ValueError(
      f'{where}: need a sequence of (layer path, rank) pairs, got {type(low_rank).__name__}'
    )
  pairs = {}
  for entry in low_rank:
    if isinstance(entry, str) or not isinstance(entry, Sequence) or len(entry) != 2:
      raise ValueError(f'{where}: entry {entry!r} is not a (layer path, rank) pair')
    path, rank = entry
    if not isinstance(path, str) or not path:
      raise ValueError(f'{where}: layer path {path!r} must be a non-empty string')
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
      raise ValueError(f'{where}: rank of {path!r} must be a positive integer, got {rank!r}')
    if path in pairs:
      raise ValueError(f'{where}: layer path {path!r} is listed twice')
    pairs[path] = int(rank)
  return tuple(sorted(pairs.items()))


def low_rank_under(low_rank: LowRank, prefix: str) -> LowRank:
  """The entries of `low_rank` below the submodule `prefix`, with 'prefix/' cut off: what that
  submodule gets as its own `low_rank`, so paths stay relative to whichever module holds them
  (a BertEncoder nested in another model still reads 'layer_0/attention/query')."""
  head = prefix + '/'
  return tuple((p[len(head) :], r) for p, r in low_rank if p.startswith(head))


def dense(features: int, name: str, low_rank: LowRank = (), **kwargs) -> nn.Module:
  """nn.Dense(features, name=name, **kwargs), or LowRankDense(features, rank, name=name,
  **kwargs) when `low_rank` (pairs relative to the calling module) gives `name` a rank.

  Models build every Dense layer through this, so a factorised parameter tree (`factorise_model`)
  loads into the model its spec describes; with low_rank=() the model is exactly as before.
  """
  rank = dict(low_rank).get(name)
  if rank is None:
    return nn.Dense(features, name=name, **kwargs)
  return LowRankDense(features, rank, name=name, **kwargs)


def dense_paths(model: nn.Module, *args, **kwargs) -> list[str]:
  """Sorted '/'-joined paths of every Dense and LowRankDense layer `model` builds when
  initialised on `args`/`kwargs` (traced with eval_shape, so nothing is computed): the paths a
  `low_rank` entry may name."""
  found = set()

  def record(next_fun, call_args, call_kwargs, context):
    module = context.module
    if context.method_name == '__call__' and isinstance(module, (nn.Dense, LowRankDense)):
      found.add('/'.join(module.path))
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, **kwargs))
  return sorted(found)


def check_low_rank_paths(low_rank: LowRank, valid: Sequence[str], where: str) -> None:
  """Every path of `low_rank` must be one of the model's Dense paths `valid`: a misspelt path
  would otherwise build the full-size layer and fail later on a parameter mismatch."""
  unknown = [p for p, _ in low_rank if p not in set(valid)]
  if unknown:
    raise ValueError(
      f'{where}: low_rank path(s) {unknown} are not Dense layers of the model; '
      f'valid Dense paths: {list(valid)}'
    )


def _check_target(rank, energy) -> None:
  if (rank is None) == (energy is None):
    raise ValueError(f'give exactly one of rank and energy, got rank={rank!r} energy={energy!r}')
  if rank is not None and (
    isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1
  ):
    raise ValueError(f'rank must be a positive integer, got {rank!r}')
  if energy is not None:
    if isinstance(energy, bool) or not isinstance(energy, (int, float, np.floating)):
      raise ValueError(f'energy must be a number in (0, 1], got {energy!r}')
    if not 0 < energy <= 1:
      raise ValueError(f'energy={energy} must be in (0, 1]')


def _factorise_one(name: str, layer: Mapping, rank, energy, force: bool) -> tuple[dict, dict]:
  """(new subtree or the original one, report entry) for one Dense subtree."""
  kernel = layer['kernel']
  shape = tuple(np.shape(kernel))
  bias_params = int(np.size(layer['bias'])) if 'bias' in layer else 0
  entry = {'shape': shape, 'params_before': int(np.prod(shape)) + bias_params}
  if len(shape) != 2:
    return dict(layer), {**entry, 'status': 'skipped', 'reason': f'kernel is {len(shape)}-D'}
  w = np.asarray(kernel, np.float64)
  n_in, n_out = shape
  limit = min(shape)
  if rank is not None:
    if rank > limit:
      raise ValueError(f'rank={rank} exceeds min{shape}={limit} of the kernel {name}')
    r = int(rank)
  else:
    singular_values = np.linalg.svd(w, compute_uv=False)
    if not np.any(singular_values > 0):
      return dict(layer), {**entry, 'status': 'skipped', 'reason': 'kernel is all zero'}
    r = embeddings.rank_for_energy(singular_values, energy)
  entry['rank'] = r
  if r * (n_in + n_out) >= n_in * n_out and not force:
    reason = f'rank {r} factors hold {r * (n_in + n_out)} >= {n_in * n_out} kernel values'
    return dict(layer), {**entry, 'status': 'skipped', 'reason': reason}
  a, b = embeddings.svd_factorise(w, r)
  norm = np.linalg.norm(w)
  error = float(np.linalg.norm(w - a.astype(np.float64) @ b) / norm) if norm > 0 else 0.0
  dtype = jnp.asarray(kernel).dtype
  new = {k: v for k, v in layer.items() if k != 'kernel'}
  new['kernel_a'] = jnp.asarray(a, dtype)
  new['kernel_b'] = jnp.asarray(b, dtype)
  entry.update(
    status='factorised',
    params_after=r * (n_in + n_out) + bias_params,
    rel_error=error,
  )
  return new, entry


def factorise_dense(
  params,
  rules: Sequence[str],
  rank: int | None = None,
  energy: float | None = None,
  force: bool = False,
  exclude: Sequence[str] = (),
) -> tuple[Any, dict]:
  """Factorise each Dense kernel of `params` whose path ('.../name/kernel') `rules` selects.

  Exactly one of `rank` (the same r for every layer; r > min(in, out) is an error) or
  `energy` (per layer, the smallest r keeping that share of the squared singular values,
  `embeddings.rank_for_energy`). A layer is left as it is, and reported 'skipped', when
  r * (in + out) >= in * out (the factors would not be smaller) unless `force`, when its
  kernel is not 2-D, or when `energy` meets an all-zero kernel. Selected leaves other than
  kernels (e.g. biases matched by the same rule) are ignored.

  Returns (new params, report): the report maps each selected layer's path to status
  ('factorised' or 'skipped'), shape, params_before (kernel + bias), and, where known, rank,
  params_after, rel_error (||W - A B||_F / ||W||_F) and reason (for skipped layers).
  The returned tree is made of new dicts (a FrozenDict in, a FrozenDict out); every array not
  factorised is the same object as in `params`.
  """
  _check_target(rank, energy)
  flags = rules_lib.match(params, rules, 'factorise_dense', exclude)
  frozen = isinstance(params, FrozenDict)
  tree, flag_tree = (unfreeze(params), unfreeze(flags)) if frozen else (params, flags)
  report: dict[str, dict] = {}

  def walk(node, node_flags, prefix):
    if not isinstance(node, Mapping):
      return node
    if 'kernel' in node and not isinstance(node['kernel'], Mapping) and node_flags['kernel']:
      name = '/'.join(prefix)
      new, report[name] = _factorise_one(name, node, rank, energy, force)
      return new
    return {k: walk(v, node_flags[k], prefix + (str(k),)) for k, v in node.items()}

  out = walk(tree, flag_tree, ())
  if not report:
    raise ValueError(f'factorise_dense: rules {list(rules)} select no Dense kernel')
  return (freeze(out) if frozen else out), report


def factorise_model(
  params,
  spec: Mapping,
  rules: Sequence[str],
  rank: int | None = None,
  energy: float | None = None,
  exclude: Sequence[str] = (),
  force: bool = False,
) -> tuple[Any, dict, dict]:
  """`factorise_dense` on a model's params, and the export spec of the model that runs them.

  `params` is the model's parameter tree (what `registry.init_params` returns and an export
  holds). `spec` is an export spec ({'model', 'vocab_size', 'num_classes', 'kwargs'}, as
  `checkpoint.export_model` writes it) of a registry model with a `low_rank` field. Returns
  (new params, new spec, report): the new spec is a deep copy whose kwargs['low_rank'] lists
  every layer factorised now together with those the spec already had, sorted by path, so
  `train.build(new_spec)` builds LowRankDense layers exactly where the params hold factors.
  An already-factorised layer has no 'kernel', so rules never select it again.

  Raises ValueError when the model does not support low_rank, when every selected layer was
  skipped (the report's reasons are in the message), or when a rule factorised a kernel the
  model does not build as a Dense layer (e.g. an LSTM cell's gates).
  """
  # Deferred: the models import this module for `dense`.
  from kdjax.models import registry

  name = spec.get('model') if isinstance(spec, Mapping) else None
  supported = registry.low_rank_models()
  if name not in supported:
    raise ValueError(
      f'factorise_model: model {name!r} does not support low_rank; supported models: {supported}'
    )
  kwargs = dict(spec.get('kwargs') or {})
  old = normalise_low_rank(kwargs.get('low_rank', ()), 'factorise_model: spec low_rank')

  def build(low_rank):
    return registry.build_model(
      name, spec['vocab_size'], spec['num_classes'], **{**kwargs, 'low_rank': low_rank}
    )

  valid = registry.dense_paths(build(old))
  new_params, report = factorise_dense(params, rules, rank, energy, force, exclude)
  done = {path: e['rank'] for path, e in report.items() if e['status'] == 'factorised'}
  if not done:
    reasons = '; '.join(f'{path}: {e["reason"]}' for path, e in report.items())
    hint = '' if force else ' (force=True factorises them anyway)'
    raise ValueError(f'factorise_model: every selected layer was skipped{hint}: {reasons}')
  not_dense = sorted(set(done) - set(valid))
  if not_dense:
    raise ValueError(
      f'factorise_model: rules factorised {not_dense}, which model {name!r} does not build as '
      f'Dense layers; exclude them. Dense paths: {valid}'
    )
  merged = normalise_low_rank(tuple({**dict(old), **done}.items()), 'factorise_model')
  new_spec = copy.deepcopy(dict(spec))
  new_spec['kwargs'] = {**copy.deepcopy(kwargs), 'low_rank': merged}
  # The new spec must describe the new params exactly, or the export would not load.
  model = build(merged)
  expected = jax.eval_shape(lambda: registry.init_params(model, jax.random.PRNGKey(0)))
  got = {rules_lib.path_string(p): np.shape(x) for p, x in _leaves(new_params)}
  want = {rules_lib.path_string(p): tuple(x.shape) for p, x in _leaves(expected)}
  if got != want:
    diff = sorted(set(got.items()) ^ set(want.items()))[:4]
    raise ValueError(
      f'factorise_model: the factorised params do not match model {name!r} built from the new '
      f'spec (spec and params out of step?); first differences (path, shape): {diff}'
    )
  return new_params, new_spec, report


def _leaves(tree):
  return jax.tree_util.tree_flatten_with_path(tree)[0]


def factorisation_report(report: Mapping[str, Mapping]) -> str:
  """A text table of `factorise_dense`'s report, one line per layer, then the totals."""
  lines = [f'{"layer":<40} {"status":<10} {"rank":>5} {"before":>10} {"after":>10} {"rel_err":>8}']
  before = after = 0
  for name, e in report.items():
    kept = e.get('params_after', e['params_before'])
    before, after = before + e['params_before'], after + kept
    rank = e.get('rank', '-')
    err = f'{e["rel_error"]:.4f}' if 'rel_error' in e else '-'
    line = f'{name:<40} {e["status"]:<10} {rank:>5} {e["params_before"]:>10} {kept:>10} {err:>8}'
    if e['status'] == 'skipped':
      line += f'  ({e["reason"]})'
    lines.append(line)
  ratio = after / before if before else 1.0
  lines.append(f'{"total":<40} {"":<10} {"":>5} {before:>10} {after:>10}  ({ratio:.3f} kept)')
  return '\n'.join(lines)
