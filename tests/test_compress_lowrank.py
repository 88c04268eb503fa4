"""factorise_dense / LowRankDense / factorisation_report against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import freeze

from kdjax.compress import lowrank
from kdjax.compress.rules import RuleError

RNG = np.random.default_rng(0)
W_BIG = RNG.normal(size=(12, 10)).astype(np.float32)  # rank 4 fits: 4 * 22 < 120
W_SMALL = RNG.normal(size=(4, 3)).astype(np.float32)  # any rank >= 2 would not save values


def _params():
  return {
    'params': {
      'big': {'kernel': W_BIG, 'bias': RNG.normal(size=(10,)).astype(np.float32)},
      'small': {'kernel': W_SMALL, 'bias': np.zeros(3, np.float32)},
      'norm': {'scale': np.ones(10, np.float32)},
    }
  }


def test_full_rank_lowrankdense_equals_dense():
  params = _params()
  out, report = lowrank.factorise_dense(params, ['big/kernel'], rank=10, force=True)
  layer = out['params']['big']
  assert set(layer) == {'kernel_a', 'kernel_b', 'bias'}
  assert layer['kernel_a'].shape == (12, 10) and layer['kernel_b'].shape == (10, 10)
  x = RNG.normal(size=(5, 12)).astype(np.float32)
  module = lowrank.LowRankDense(features=10, rank=10)
  y = module.apply({'params': layer}, jnp.asarray(x))
  ref = x.astype(np.float64) @ W_BIG + params['params']['big']['bias']
  np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)
  # The module's own initialisation has the same parameter names and shapes.
  init = module.init(jax.random.PRNGKey(0), jnp.asarray(x))['params']
  assert jax.tree_util.tree_map(jnp.shape, init) == jax.tree_util.tree_map(jnp.shape, layer)
  assert report['params/big']['rel_error'] < 1e-6
  # Other parameters are the same array objects (in new dicts).
  assert out['params']['small']['kernel'] is params['params']['small']['kernel']
  assert out['params']['norm']['scale'] is params['params']['norm']['scale']
  assert out['params']['big']['bias'] is params['params']['big']['bias']


def test_lowrankdense_batched_input_without_bias():
  a = RNG.normal(size=(6, 2)).astype(np.float32)
  b = RNG.normal(size=(2, 3)).astype(np.float32)
  x = RNG.normal(size=(2, 4, 6)).astype(np.float32)
  module = lowrank.LowRankDense(features=3, rank=2, use_bias=False)
  y = module.apply({'params': {'kernel_a': a, 'kernel_b': b}}, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y), x @ a @ b, atol=1e-5)


def test_error_matches_eckart_young_and_decreases_with_rank():
  s = np.linalg.svd(W_BIG.astype(np.float64), compute_uv=False)
  errors = []
  for r in range(1, 11):
    _, report = lowrank.factorise_dense(_params(), ['big/kernel'], rank=r, force=True)
    entry = report['params/big']
    expected = np.sqrt(np.sum(s[r:] ** 2) / np.sum(s**2))
    np.testing.assert_allclose(entry['rel_error'], expected, atol=1e-5)
    assert entry['rank'] == r
    assert entry['params_after'] == r * (12 + 10) + 10
    errors.append(entry['rel_error'])
  assert all(a > b for a, b in zip(errors, errors[1:]))


def test_energy_picks_numpy_rank():
  s = np.linalg.svd(W_BIG.astype(np.float64), compute_uv=False)
  share = np.cumsum(s**2) / np.sum(s**2)
  for energy in (0.3, 0.5, 0.7):
    expected = int(np.argmax(share >= energy)) + 1
    _, report = lowrank.factorise_dense(_params(), ['big/kernel'], energy=energy, force=True)
    assert report['params/big']['rank'] == expected


def test_skipped_layers_are_reported_and_untouched():
  params = _params()
  out, report = lowrank.factorise_dense(params, ['kernel$'], rank=2)
  assert report['params/big']['status'] == 'factorised'
  small = report['params/small']
  assert small['status'] == 'skipped' and small['rank'] == 2
  assert '14 >= 12' in small['reason']
  assert out['params']['small']['kernel'] is params['params']['small']['kernel']
  assert 'kernel_a' not in out['params']['small']
  # force factorises it anyway.
  out, report = lowrank.factorise_dense(params, ['kernel$'], rank=2, force=True)
  assert report['params/small']['status'] == 'factorised'
  assert out['params']['small']['kernel_a'].shape == (4, 2)
  text = lowrank.factorisation_report(lowrank.factorise_dense(params, ['kernel'], rank=2)[1])
  assert 'params/small' in text and 'skipped' in text and 'total' in text


def test_frozen_dict_and_dtype_kept():
  params = freeze(
    {'d': {'kernel': jnp.asarray(W_BIG, jnp.bfloat16), 'bias': jnp.zeros(10, jnp.bfloat16)}}
  )
  out, _ = lowrank.factorise_dense(params, ['d/'], rank=3)
  assert type(out) is type(params)
  assert out['d']['kernel_a'].dtype == jnp.bfloat16


def test_rule_matching_nothing_raises():
  with pytest.raises(RuleError, match='matches no parameter'):
    lowrank.factorise_dense(_params(), ['dense_9'], rank=2)
  with pytest.raises(ValueError, match='select no Dense kernel'):
    lowrank.factorise_dense(_params(), ['norm'], rank=2)


@pytest.mark.parametrize(
  'kwargs,pattern',
  [
    ({'rank': 0}, 'rank must be a positive integer'),
    ({'rank': 2.5}, 'rank must be a positive integer'),
    ({'rank': True}, 'rank must be a positive integer'),
    ({'rank': 11}, r'rank=11 exceeds min\(12, 10\)=10'),
    ({'energy': 0.0}, r'energy=0.0 must be in \(0, 1\]'),
    ({'energy': 1.5}, r'energy=1.5 must be in \(0, 1\]'),
    ({'energy': '0.9'}, 'energy must be a number'),
    ({}, 'give exactly one of rank and energy'),
    ({'rank': 2, 'energy': 0.9}, 'give exactly one of rank and energy'),
  ],
)
def test_bad_arguments(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern) as info:
    lowrank.factorise_dense(_params(), ['big/kernel'], **kwargs)
  assert '\n' not in str(info.value)
