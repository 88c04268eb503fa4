"""Low-rank factorisation of Dense kernels, as a pytree transform, and the layer that runs it.

`factorise_dense` replaces each selected Dense subtree {'kernel' [in, out], 'bias'} by
{'kernel_a' [in, r], 'kernel_b' [r, out], 'bias'} with kernel_a @ kernel_b the best rank-r
approximation of the kernel (`embeddings.svd_factorise`); `LowRankDense` is a Flax module with
exactly those parameter names, so the factorised subtree loads into it in place of nn.Dense.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict, freeze, unfreeze

from kdjax.compress import embeddings
from kdjax.compress import rules as rules_lib


class LowRankDense(nn.Module):
  """x @ kernel_a @ kernel_b + bias over the last axis of x: a Dense layer whose kernel is
  stored as two factors [in, rank] and [rank, features]."""

  features: int
  rank: int
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    a = self.param('kernel_a', self.kernel_init, (x.shape[-1], self.rank))
    b = self.param('kernel_b', self.kernel_init, (self.rank, self.features))
    # (x @ a) @ b costs rank * (in + features) per row, the point of factorising; x @ (a @ b)
    # would cost in * features again.
    y = (x @ a) @ b
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,))
      # Explicit leading ones: the bias broadcasts without rank promotion.
      y = y + bias.reshape((1,) * (y.ndim - 1) + (self.features,))
    return y


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
