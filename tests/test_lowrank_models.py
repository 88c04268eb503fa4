"""Low-rank factorisation that changes the model: the `low_rank` keyword builds LowRankDense
layers, and `lowrank.factorise_model` returns params and the spec of the model that runs them.

conftest.py sets jax_numpy_rank_promotion='raise' for the whole suite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import checkpoint, train
from kdjax.compress import lowrank
from kdjax.models import count_params, registry
from kdjax.models.mlp import MLPClassifier

VOCAB, CLASSES, SEQ_LEN = 50, 3, 16
# Lists where JSON would give lists (kernel_sizes): build_model must make them tuples.
SPECS = {
  'bert': dict(
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    max_len=SEQ_LEN,
    embedding_size=16,  # so embeddings/word_projection exists
  ),
  'bilstm': dict(embed_dim=8, hidden_size=8, mlp_dim=12),
  'cnn': dict(embed_dim=8, num_filters=6, mlp_dim=12, kernel_sizes=[2, 3]),
}
NAMES = sorted(SPECS)
# Full rank per layer group (rank = min(in, out)), as successive factorise_model calls, so the
# later calls also merge into the low_rank the spec already has.
FULL_RANK_STEPS = {
  'bert': [
    (['word_projection/kernel'], 16),
    (['layer_', 'pooler/kernel'], 32),
    (['classifier'], 3),
  ],
  'bilstm': [(['mlp/kernel'], 12), (['classifier/kernel'], CLASSES)],
  'cnn': [(['mlp/kernel'], 12), (['classifier/kernel'], CLASSES)],
}
# A small rank that does shrink every selected layer.
SMALL_RANK = {
  'bert': (['layer_', 'pooler', 'word_projection'], 4),
  'bilstm': (['mlp/kernel'], 2),
  'cnn': (['mlp/kernel'], 2),
}


def spec_of(name, **extra):
  return {
    'model': name,
    'vocab_size': VOCAB,
    'num_classes': CLASSES,
    'kwargs': {**SPECS[name], **extra},
  }


def make_batch(seed=0):
  """Right-padded ids: [CLS]=2 at position 0, random words, pad id 0 after the length."""
  rng = np.random.RandomState(seed)
  lengths = np.array([SEQ_LEN, 5, 9, 1])
  ids = rng.randint(3, VOCAB, size=(len(lengths), SEQ_LEN))
  ids[:, 0] = 2
  mask = (np.arange(SEQ_LEN)[None, :] < lengths[:, None]).astype(np.int32)
  return jnp.asarray(ids * mask, jnp.int32), jnp.asarray(mask)


def logits_of(model, params, batch):
  ids, mask = batch
  apply = jax.jit(lambda p, i, m: model.apply({'params': p}, i, m, deterministic=True)[0])
  return np.asarray(apply(params, ids, mask))


@pytest.fixture(scope='module')
def originals():
  """name -> (spec, params) of the unfactorised model."""
  out = {}
  for i, name in enumerate(NAMES):
    spec = spec_of(name)
    out[name] = (spec, registry.init_params(train.build(spec), jax.random.PRNGKey(i)))
  return out


@pytest.mark.parametrize('name', NAMES)
def test_full_rank_factorisation_keeps_logits(originals, name):
  spec, params = originals[name]
  batch = make_batch()
  reference = logits_of(train.build(spec), params, batch)
  expected_low_rank = {}
  for rules, rank in FULL_RANK_STEPS[name]:
    params, spec, report = lowrank.factorise_model(params, spec, rules, rank=rank, force=True)
    expected_low_rank.update({p: rank for p, e in report.items() if e['status'] == 'factorised'})
    assert spec['kwargs']['low_rank'] == tuple(sorted(expected_low_rank.items()))
    np.testing.assert_allclose(logits_of(train.build(spec), params, batch), reference, atol=1e-5)
  # Every Dense layer is now a LowRankDense.
  model = train.build(spec)
  assert sorted(expected_low_rank) == registry.dense_paths(model)
  assert all('kernel' not in layer for layer in _dense_subtrees(params, expected_low_rank))


def _dense_subtrees(params, paths):
  for path in paths:
    node = params
    for part in path.split('/'):
      node = node[part]
    yield node


@pytest.mark.parametrize('name', NAMES)
def test_small_rank_shrinks_model_and_trains(originals, name):
  spec, params = originals[name]
  rules, rank = SMALL_RANK[name]
  new_params, new_spec, report = lowrank.factorise_model(params, spec, rules, rank=rank)
  assert spec['kwargs'] == SPECS[name]  # the input spec is not modified
  shapes = [e['shape'] for e in report.values() if e['status'] == 'factorised']
  assert len(shapes) == len(report) > 0
  expected = (
    count_params(params)
    - sum(n_in * n_out for n_in, n_out in shapes)
    + sum(rank * (n_in + n_out) for n_in, n_out in shapes)
  )
  model = train.build(new_spec)
  assert count_params(registry.init_params(model, jax.random.PRNGKey(1))) == expected
  assert count_params(new_params) == expected

  batch = make_batch(seed=1)
  assert np.all(np.isfinite(logits_of(model, new_params, batch)))
  labels = jnp.asarray([0, 1, 2, 1])

  def loss(p, ids, mask):
    logits, _ = model.apply({'params': p}, ids, mask, deterministic=True)
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)
    return -jnp.mean(picked)

  grads = jax.jit(jax.grad(loss))(new_params, *batch)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(new_params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
  first = next(iter(report))
  factors = next(_dense_subtrees(grads, [first]))
  assert set(factors) >= {'kernel_a', 'kernel_b'}
  assert float(jnp.abs(factors['kernel_a']).sum()) > 0  # gradient reaches the factors


@pytest.mark.parametrize('name', ['bert', 'cnn'])
def test_export_round_trip(originals, tmp_path, name):
  spec, params = originals[name]
  rules, rank = SMALL_RANK[name]
  new_params, new_spec, _ = lowrank.factorise_model(params, spec, rules, rank=rank)
  checkpoint.export_model(tmp_path / 'export', new_params, new_spec)
  model, loaded, loaded_spec = train.load_exported_model(tmp_path / 'export')
  # JSON turned the pairs into lists; the built model has them as tuples again.
  assert isinstance(loaded_spec['kwargs']['low_rank'][0], list)
  assert model.low_rank == new_spec['kwargs']['low_rank']
  batch = make_batch(seed=2)
  np.testing.assert_allclose(
    logits_of(model, loaded, batch), logits_of(train.build(new_spec), new_params, batch), atol=1e-6
  )


def test_default_models_build_plain_dense(originals):
  """low_rank=() leaves every model as it was: Dense kernels, no factors."""
  spec, params = originals['bert']
  assert params['layer_0']['attention']['query']['kernel'].shape == (32, 32)
  assert registry.dense_paths(train.build(spec)) == sorted(
    ['classifier', 'pooler', 'embeddings/word_projection']
    + [f'layer_{i}/attention/{n}' for i in range(2) for n in ('query', 'key', 'value', 'output')]
    + [f'layer_{i}/{n}' for i in range(2) for n in ('intermediate', 'output')]
  )


def test_bf16_model_keeps_float32_factors():
  spec = spec_of('bert', dtype=jnp.bfloat16, low_rank=[['layer_1/intermediate', 8]])
  model = train.build(spec)
  params = registry.init_params(model, jax.random.PRNGKey(0))
  layer = params['layer_1']['intermediate']
  assert layer['kernel_a'].dtype == layer['kernel_b'].dtype == jnp.float32
  ids, mask = make_batch()
  _, out = model.apply({'params': params}, ids, mask, deterministic=True)
  assert out['hidden_2'].dtype == jnp.bfloat16


def test_mlp_low_rank_matches_dense():
  images = jnp.asarray(np.random.RandomState(0).normal(size=(4, 7, 7)), jnp.float32)
  plain = MLPClassifier(hidden_sizes=(16,), num_classes=CLASSES)
  params = plain.init(jax.random.PRNGKey(0), images)['params']
  new_params, report = lowrank.factorise_dense(params, ['dense_0/kernel'], rank=16, force=True)
  assert report['dense_0']['status'] == 'factorised'
  factored = MLPClassifier(hidden_sizes=(16,), num_classes=CLASSES, low_rank=(('dense_0', 16),))
  assert lowrank.dense_paths(factored, images) == ['classifier', 'dense_0']
  np.testing.assert_allclose(
    factored.apply({'params': new_params}, images)[0],
    plain.apply({'params': params}, images)[0],
    atol=1e-5,
  )


def test_unknown_low_rank_path_is_an_error():
  with pytest.raises(ValueError, match=r'layer_2/attention/query.*valid Dense paths.*pooler'):
    train.build(spec_of('bert', low_rank=[['layer_2/attention/query', 4]]))
  with pytest.raises(ValueError, match=r"\['lstm_0_forward/cell/ii'\].*valid Dense paths"):
    train.build(spec_of('bilstm', low_rank=[['lstm_0_forward/cell/ii', 2]]))


@pytest.mark.parametrize('rank', [0, -1, 2.0, True])
def test_bad_rank_is_an_error(rank):
  with pytest.raises(ValueError, match=r"rank of 'mlp' must be a positive integer"):
    train.build(spec_of('cnn', low_rank=[['mlp', rank]]))
  with pytest.raises(ValueError, match='rank must be a positive integer'):
    lowrank.LowRankDense(4, rank).init(jax.random.PRNGKey(0), jnp.ones((2, 3)))


@pytest.mark.parametrize(
  'low_rank, match',
  [
    ('mlp', 'sequence of'),
    ([['mlp']], 'not a .layer path, rank. pair'),
    ([['mlp', 2], ['mlp', 3]], 'listed twice'),
  ],
)
def test_malformed_low_rank_is_an_error(low_rank, match):
  with pytest.raises(ValueError, match=match):
    train.build(spec_of('cnn', low_rank=low_rank))


def test_factorise_model_errors(originals):
  spec, params = originals['bilstm']
  with pytest.raises(ValueError, match=r"model 'mlp' does not support low_rank.*\['bert'"):
    lowrank.factorise_model(params, {**spec, 'model': 'mlp'}, ['mlp/kernel'], rank=2)
  with pytest.raises(
    ValueError, match=r'every selected layer was skipped \(force=True.*classifier'
  ):
    lowrank.factorise_model(params, spec, ['classifier/kernel'], rank=3)
  with pytest.raises(ValueError, match=r'lstm_0_forward/cell/hi.*not build as Dense'):
    lowrank.factorise_model(params, spec, ['cell/hi/kernel'], rank=2)
  # Params that are not this spec's model.
  other = dict(spec, kwargs={**spec['kwargs'], 'mlp_dim': 10})
  with pytest.raises(ValueError, match='do not match model'):
    lowrank.factorise_model(params, other, ['mlp/kernel'], rank=2)
