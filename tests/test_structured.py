"""Structured pruning: the smaller model computes exactly what the full model computes with
the dropped units' outgoing weights zeroed, the best-scoring units are the ones kept (checked
against a NumPy ranking), and the parameter count shrinks as the spec says."""

import copy

import jax
import numpy as np
import pytest

from kdjax.compress import structured
from kdjax.models import registry

VOCAB = 50


def _batch(seed=0, batch=6, length=9):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, length + 1, batch)
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  return rng.integers(4, VOCAB, (batch, length)).astype(np.int32) * mask, mask


SPECS = {
  'bilstm': {
    'model': 'bilstm',
    'vocab_size': VOCAB,
    'num_classes': 2,
    'kwargs': dict(embed_dim=8, hidden_size=10, mlp_dim=7, num_layers=2, dropout_rate=0.0),
  },
  'cnn': {
    'model': 'cnn',
    'vocab_size': VOCAB,
    'num_classes': 2,
    'kwargs': dict(embed_dim=8, num_filters=10, kernel_sizes=(2, 3), mlp_dim=7, dropout_rate=0.0),
  },
  'bert': {
    'model': 'bert',
    'vocab_size': VOCAB,
    'num_classes': 2,
    'kwargs': dict(
      hidden_size=16,
      num_layers=2,
      num_heads=2,
      intermediate_size=12,
      max_len=16,
      dropout_rate=0.0,
      attention_dropout_rate=0.0,
    ),
  },
}


SPECS['bert_4_heads'] = {
  **SPECS['bert'],
  'kwargs': dict(SPECS['bert']['kwargs'], num_heads=4),  # 4 heads of width 4: keep 2
}


def _model(spec):
  return registry.build_model(
    spec['model'], vocab_size=spec['vocab_size'], num_classes=2, **spec['kwargs']
  )


def _logits(spec, params):
  ids, mask = _batch()
  logits, _ = _model(spec).apply({'params': params}, ids, mask, deterministic=True)
  return np.asarray(logits)


def _zeroed_reference(name, params, spec, kept):
  """The full model with every weight that carries a dropped unit's output set to zero."""
  p = copy.deepcopy(jax.device_get(params))
  if name == 'bilstm':
    hidden = spec['kwargs']['hidden_size']
    for i in range(spec['kwargs']['num_layers']):
      drop = np.setdiff1d(np.arange(hidden), kept[f'lstm_{i}'])
      for d in ('forward', 'backward'):
        for gate in structured.LSTM_GATES:
          p[f'lstm_{i}_{d}']['cell'][f'h{gate}']['kernel'][drop, :] = 0.0
      rows = np.concatenate([drop, hidden + drop])
      consumers = (
        [p[f'lstm_{i + 1}_{d}']['cell'][f'i{g}'] for d in ('forward', 'backward') for g in 'ifgo']
        if i + 1 < spec['kwargs']['num_layers']
        else [p['mlp']]
      )
      for consumer in consumers:
        consumer['kernel'][rows, :] = 0.0
  elif name == 'cnn':
    filters = spec['kwargs']['num_filters']
    for i in range(len(spec['kwargs']['kernel_sizes'])):
      drop = np.setdiff1d(np.arange(filters), kept[f'conv_{i}'])
      p['mlp']['kernel'][i * filters + drop, :] = 0.0
  elif name == 'bert_heads':
    heads = spec['kwargs']['num_heads']
    head_dim = spec['kwargs']['hidden_size'] // heads
    for i in range(spec['kwargs']['num_layers']):
      for head in np.setdiff1d(np.arange(heads), kept[f'layer_{i}']):
        rows = slice(head * head_dim, (head + 1) * head_dim)
        p[f'layer_{i}']['attention']['output']['kernel'][rows, :] = 0.0
  else:
    for i in range(spec['kwargs']['num_layers']):
      size = spec['kwargs']['intermediate_size']
      drop = np.setdiff1d(np.arange(size), kept[f'layer_{i}'])
      p[f'layer_{i}']['output']['kernel'][drop, :] = 0.0
  return p


@pytest.mark.parametrize('name', ['bilstm', 'cnn', 'bert', 'bert_heads'])
@pytest.mark.parametrize('keep_fraction', [0.6])
def test_pruned_model_equals_full_model_with_dropped_units_zeroed(name, keep_fraction):
  spec = SPECS['bert_4_heads' if name == 'bert_heads' else name]
  params = jax.device_get(registry.init_params(_model(spec), jax.random.PRNGKey(3)))
  part = 'heads' if name == 'bert_heads' else ''
  pruned, new_spec, kept = structured.prune(params, spec, keep_fraction, part)
  reference = _zeroed_reference(name, params, spec, kept)
  np.testing.assert_allclose(_logits(new_spec, pruned), _logits(spec, reference), atol=2e-6)
  # Smaller for real: the rebuilt model's parameter count is the pruned tree's.
  count = lambda tree: sum(np.size(x) for x in jax.tree_util.tree_leaves(tree))
  assert count(pruned) < count(params)
  fresh = registry.init_params(_model(new_spec), jax.random.PRNGKey(0))
  assert jax.tree.map(np.shape, fresh) == jax.tree.map(np.shape, pruned)


def test_full_keep_is_the_identity():
  spec = SPECS['bilstm']
  params = jax.device_get(registry.init_params(_model(spec), jax.random.PRNGKey(1)))
  pruned, new_spec, _ = structured.prune(params, spec, 1.0)
  assert new_spec == spec
  jax.tree_util.tree_map(np.testing.assert_array_equal, pruned, params)


def test_the_best_scoring_units_are_kept():
  """CNN filters ranked by |conv kernel| · |MLP rows| in NumPy, independently."""
  spec = SPECS['cnn']
  params = jax.device_get(registry.init_params(_model(spec), jax.random.PRNGKey(2)))
  _, _, kept = structured.prune(params, spec, 0.3)
  filters = spec['kwargs']['num_filters']
  for i in range(2):
    kernel = np.asarray(params[f'conv_{i}']['kernel'], np.float64)
    rows = np.asarray(params['mlp']['kernel'][i * filters : (i + 1) * filters], np.float64)
    score = np.sqrt((kernel**2).sum(axis=(0, 1))) * np.sqrt((rows**2).sum(axis=1))
    np.testing.assert_array_equal(kept[f'conv_{i}'], np.sort(np.argsort(-score)[:3]))


def test_bad_requests_are_refused():
  spec = SPECS['cnn']
  params = jax.device_get(registry.init_params(_model(spec), jax.random.PRNGKey(2)))
  with pytest.raises(ValueError, match=r'keep_fraction=0.0: must be in \(0, 1\]'):
    structured.prune(params, spec, 0.0)
  with pytest.raises(ValueError, match="'mlp' model is not supported; supported: bilstm"):
    structured.prune(params, {**spec, 'model': 'mlp'}, 0.5)
  with pytest.raises(ValueError, match=r"'cnn' model \(heads\) is not supported.*bert \(heads\)"):
    structured.prune(params, spec, 0.5, 'heads')


def test_head_pruning_keeps_the_head_width_and_the_best_heads():
  spec = SPECS['bert_4_heads']
  params = jax.device_get(registry.init_params(_model(spec), jax.random.PRNGKey(4)))
  _, new_spec, kept = structured.prune(params, spec, 0.5, 'heads')
  assert new_spec['kwargs']['num_heads'] == 2 and new_spec['kwargs']['head_dim'] == 4
  for i in range(2):  # NumPy ranking, head by head
    a = params[f'layer_{i}']['attention']
    score = [
      np.sqrt(
        sum(
          np.sum(np.asarray(a[n]['kernel'][:, h * 4 : h * 4 + 4], np.float64) ** 2)
          for n in ('query', 'key', 'value')
        )
      )
      * np.sqrt(np.sum(np.asarray(a['output']['kernel'][h * 4 : h * 4 + 4], np.float64) ** 2))
      for h in range(4)
    ]
    np.testing.assert_array_equal(kept[f'layer_{i}'], np.sort(np.argsort(-np.array(score))[:2]))


def test_structured_prune_writes_a_smaller_export_that_loads_and_scores_as_reported(
  tmp_path, tfds_dir
):
  from experiments import sst2_from_scratch
  from kdjax import evaluate, ptq, structured_prune, train
  from kdjax import step as step_lib
  from kdjax.data import pipeline

  config = sst2_from_scratch.get_config('runlocal,student=cnn')
  config.data.tfds_data_dir = str(tfds_dir)
  config.data.train_limit = 1000
  config.stages = ('student_alone',)
  train.run(config, tmp_path / 'run')
  report = structured_prune.run(tmp_path / 'run', tmp_path / 'half', keep_fraction=0.5, repeats=1)
  assert report['kwargs_after']['num_filters'] == report['kwargs_before']['num_filters'] // 2
  model, params, spec = train.load_exported_model(tmp_path / 'half')
  assert spec['kwargs'] == report['kwargs_after']
  ids, labels, buckets = ptq.eval_data(
    tmp_path / 'run', train.text.load_tokenizer(tmp_path / 'half')
  )
  logits = evaluate.predict_logits(
    step_lib.make_logits_fn(model), params, pipeline.ordered_pass(ids, labels, 64, buckets)
  )
  assert evaluate.accuracy(logits, labels) == report['models']['pruned']['eval_accuracy']
  assert report['models']['pruned']['params'] < report['models']['full']['params']
