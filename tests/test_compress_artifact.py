"""Tests for kdjax.compress.artifact: round trips, real sizes on disk, and damaged artifacts."""

import json

import jax
import numpy as np
import pytest

from kdjax.compress import artifact, rules
from kdjax.compress import quantize as q

SPEC = {'name': 'mlp', 'kwargs': {'hidden': 8}}


def _rand(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _sparse(shape, frac_zero=0.9, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape).astype(np.float32)
  x[rng.random(shape) < frac_zero] = 0.0
  return x


def _assert_same(a, b):
  """Same nested-dict structure, QTensor static fields and array values/dtypes/shapes."""
  is_q = lambda x: isinstance(x, q.QTensor)  # noqa: E731
  la, ta = jax.tree_util.tree_flatten(a, is_leaf=is_q)
  lb, tb = jax.tree_util.tree_flatten(b, is_leaf=is_q)
  assert ta == tb
  for x, y in zip(la, lb):
    assert is_q(x) == is_q(y)
    if is_q(x):
      assert (x.bits, x.symmetric, x.axis) == (y.bits, y.symmetric, y.axis)
      for f in ('values', 'scale', 'zero_point'):
        u, v = np.asarray(getattr(x, f)), np.asarray(getattr(y, f))
        assert u.dtype == v.dtype and u.shape == v.shape, f
        np.testing.assert_array_equal(u, v)
    else:
      u, v = np.asarray(x), np.asarray(y)
      assert u.dtype == v.dtype and u.shape == v.shape
      np.testing.assert_array_equal(u, v)


def _roundtrip(tmp_path, params, **kwargs):
  artifact.save(tmp_path / 'a', params, SPEC, **kwargs)
  loaded, spec = artifact.load(tmp_path / 'a')
  assert spec == SPEC
  return loaded


def _entry(tmp_path, name):
  doc = json.loads((tmp_path / 'a' / artifact.MANIFEST).read_text())
  return {'/'.join(e['path']): e for e in doc['manifest']}[name]


def test_roundtrip_float_int8_int4(tmp_path):
  params = {
    'dense': {'kernel': q.quantize(_rand((5, 4)), 8, True, axis=-1), 'bias': _rand((4,), 1)},
    'out': {'kernel': q.quantize(_rand((3, 3), 2), 4, False, axis=None)},  # 9 values: odd
    'emb': {'table': _rand((6, 2), 3)},
  }
  loaded = _roundtrip(tmp_path, params)
  _assert_same(params, loaded)
  assert list(loaded) == ['dense', 'out', 'emb']
  mat = artifact.materialize(loaded)
  np.testing.assert_array_equal(mat['dense']['kernel'], q.dequantize(params['dense']['kernel']))
  np.testing.assert_array_equal(mat['out']['kernel'], q.dequantize(params['out']['kernel']))
  np.testing.assert_array_equal(mat['emb']['table'], params['emb']['table'])
  assert mat['out']['kernel'].dtype == np.float32


def test_roundtrip_sparse_float_and_sparse_quantized(tmp_path):
  x = _sparse((64, 32))
  x[0, 0] = -0.0  # bitwise exact, sign of zero included
  params = {
    'a': {'kernel': x},
    'b': {'kernel': q.quantize(_sparse((64, 32), seed=1), 8, True, axis=-1)},
    'c': {'kernel': q.quantize(_sparse((63, 33), seed=2), 4, True, axis=-1)},
    'd': {'kernel': q.quantize(_sparse((64, 32), seed=3), 8, False, axis=-1)},  # zp != 0
    'e': {'bias': _rand((32,))},
  }
  loaded = _roundtrip(tmp_path, params, sparse_rules=('kernel$',))
  _assert_same(params, loaded)
  assert np.signbit(np.asarray(loaded['a']['kernel'])[0, 0])
  for name in ('a', 'b', 'c', 'd'):
    assert _entry(tmp_path, f'{name}/kernel')['storage'] == 'sparse', name
  assert _entry(tmp_path, 'e/bias')['storage'] == 'dense'
  mat = artifact.materialize(loaded)
  np.testing.assert_array_equal(mat['d']['kernel'], q.dequantize(params['d']['kernel']))


def test_int8_and_int4_sizes_on_disk(tmp_path):
  x = _rand((512, 512))
  dense = artifact.dense_float32_bytes({'k': x})
  assert dense == 512 * 512 * 4
  artifact.save(tmp_path / 'f32', {'k': x}, SPEC)
  artifact.save(tmp_path / 'i8', {'k': q.quantize(x, 8, axis=-1)}, SPEC)
  artifact.save(tmp_path / 'i4', {'k': q.quantize(x, 4, axis=-1)}, SPEC)
  assert artifact.size_bytes(tmp_path / 'f32') >= dense
  assert dense / artifact.size_bytes(tmp_path / 'i8') >= 3.9
  assert dense / artifact.size_bytes(tmp_path / 'i4') >= 7.5
  with np.load(tmp_path / 'i4' / artifact.WEIGHTS, allow_pickle=False) as npz:
    assert npz['k:values'].dtype == np.uint8 and npz['k:values'].size == 512 * 512 // 2


def test_sparse_only_when_smaller(tmp_path):
  sparse = {'k': _sparse((256, 256))}
  artifact.save(tmp_path / 'dense', sparse, SPEC)
  artifact.save(tmp_path / 'a', sparse, SPEC, sparse_rules=('k',))
  assert _entry(tmp_path, 'k')['storage'] == 'sparse'
  assert artifact.size_bytes(tmp_path / 'a') < artifact.size_bytes(tmp_path / 'dense') / 3
  _assert_same(sparse, artifact.load(tmp_path / 'a')[0])

  for params in ({'k': _rand((64, 64))}, {'k': q.quantize(_rand((64, 64)), 4)}):
    artifact.save(tmp_path / 'a', params, SPEC, sparse_rules=('k',))
    assert _entry(tmp_path, 'k')['storage'] == 'dense'
    _assert_same(params, artifact.load(tmp_path / 'a')[0])


def test_npz_loads_without_pickle_and_float16(tmp_path):
  params = {'l': {'kernel': q.quantize(_rand((4, 4)), 8), 'bias': _rand((4,))}}
  artifact.save(tmp_path / 'a', params, SPEC, float16=True)
  with np.load(tmp_path / 'a' / artifact.WEIGHTS, allow_pickle=False) as npz:
    assert set(npz.files) == {
      'l/kernel:values',
      'l/kernel:scale',
      'l/kernel:zero_point',
      'l/bias:values',
    }
    assert npz['l/bias:values'].dtype == np.float16
  loaded, _ = artifact.load(tmp_path / 'a')
  assert loaded['l']['bias'].dtype == np.float32
  np.testing.assert_allclose(loaded['l']['bias'], params['l']['bias'], rtol=1e-3)


def test_missing_manifest(tmp_path):
  artifact.save(tmp_path / 'a', {'k': _rand((3,))}, SPEC)
  (tmp_path / 'a' / artifact.MANIFEST).unlink()
  with pytest.raises(artifact.ArtifactError, match=artifact.MANIFEST) as e:
    artifact.load(tmp_path / 'a')
  assert str(tmp_path / 'a') in str(e.value) and '\n' not in str(e.value)


def test_missing_and_truncated_weights(tmp_path):
  artifact.save(tmp_path / 'a', {'k': _rand((64, 64))}, SPEC)
  weights = tmp_path / 'a' / artifact.WEIGHTS
  data = weights.read_bytes()
  weights.write_bytes(data[: len(data) // 2])
  with pytest.raises(artifact.ArtifactError, match='corrupt') as e:
    artifact.load(tmp_path / 'a')
  assert str(weights) in str(e.value) and '\n' not in str(e.value)
  weights.unlink()
  with pytest.raises(artifact.ArtifactError, match='missing') as e:
    artifact.load(tmp_path / 'a')
  assert str(weights) in str(e.value)


def test_manifest_names_missing_array(tmp_path):
  artifact.save(tmp_path / 'a', {'k': _rand((3,)), 'j': _rand((2,))}, SPEC)
  meta = tmp_path / 'a' / artifact.MANIFEST
  doc = json.loads(meta.read_text())
  doc['manifest'][0]['path'] = ['ghost']
  meta.write_text(json.dumps(doc))
  with pytest.raises(artifact.ArtifactError, match="no array 'ghost:values'") as e:
    artifact.load(tmp_path / 'a')
  assert str(tmp_path / 'a' / artifact.WEIGHTS) in str(e.value)


def test_manifest_shape_mismatch(tmp_path):
  artifact.save(tmp_path / 'a', {'k': _rand((3,))}, SPEC)
  meta = tmp_path / 'a' / artifact.MANIFEST
  doc = json.loads(meta.read_text())
  doc['manifest'][0]['shape'] = [4]
  meta.write_text(json.dumps(doc))
  with pytest.raises(artifact.ArtifactError, match='manifest needs'):
    artifact.load(tmp_path / 'a')


def test_sparse_rule_matching_nothing(tmp_path):
  with pytest.raises(rules.RuleError, match='nope'):
    artifact.save(tmp_path / 'a', {'k': _rand((3,))}, SPEC, sparse_rules=('nope',))
  assert not (tmp_path / 'a').exists()
