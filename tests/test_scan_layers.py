"""BERT scan_layers=True (the layers as one lax.scan over their stacked parameters) against the
unrolled loop: the same parameters, logits, every per-layer output and gradient on a padded
batch, the same optimizer step; one compiled layer body whatever the depth; dropout still
applied in training; a clear error for layers of different shapes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import models
from experiments import sst2_from_scratch
from kdjax import checkpoint, train
from kdjax import step as step_lib
from kdjax.models import bert, registry
from kdjax.models.bert import BertClassifier
from tests import tiny_bert

TINY = {**tiny_bert.TINY, 'num_layers': 3}


def _pair(**overrides):
  unrolled = BertClassifier(**{**TINY, **overrides})
  return unrolled, unrolled.clone(scan_layers=True)


def _apply(model, params, batch, **kwargs):
  return model.apply({'params': params}, batch['input_ids'], batch['attention_mask'], **kwargs)


@pytest.mark.parametrize(
  'overrides',
  [
    {},
    {'attention_impl': 'fused', 'attention_dropout_rate': 0.0},
    # the same rank in every layer: the one low-rank layout a scan can stack
    {'low_rank': tuple((f'layer_{i}/intermediate', 8) for i in range(3))},
  ],
  ids=['explicit', 'fused', 'low_rank'],
)
def test_scan_equals_unrolled_outputs_and_gradients(overrides):
  unrolled, scanned = _pair(**overrides)
  batch = tiny_bert.padded_batch()
  params = registry.init_params(unrolled, jax.random.PRNGKey(0))
  # init runs the loop in both, so the parameter trees are the same, leaf for leaf
  scanned_init = registry.init_params(scanned, jax.random.PRNGKey(0))
  assert jax.tree.structure(params) == jax.tree.structure(scanned_init)
  jax.tree.map(np.testing.assert_array_equal, params, scanned_init)

  logits_u, out_u = _apply(unrolled, params, batch)
  logits_s, out_s = _apply(scanned, params, batch)
  assert sorted(out_u) == sorted(out_s)
  assert 'hidden_3' in out_s and 'query_3' in out_s
  np.testing.assert_allclose(logits_s, logits_u, atol=1e-5)
  for name in out_u:
    np.testing.assert_allclose(out_s[name], out_u[name], atol=1e-5, err_msg=name)

  def loss(model):
    return lambda p: jnp.sum(_apply(model, p, batch)[0] ** 2)

  grads_u = jax.grad(loss(unrolled))(params)
  grads_s = jax.jit(jax.grad(loss(scanned)))(params)
  for (path, g_u), g_s in zip(
    jax.tree_util.tree_leaves_with_path(grads_u), jax.tree.leaves(grads_s)
  ):
    np.testing.assert_allclose(g_s, g_u, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_scan_train_step_matches_unrolled():
  """A kdjax train step (AdamW, no dropout so both sides are deterministic): the same loss
  and the same updated per-layer parameters."""
  unrolled, scanned = _pair(dropout_rate=0.0, attention_dropout_rate=0.0)
  batch = tiny_bert.padded_batch()
  params = registry.init_params(unrolled, jax.random.PRNGKey(1))
  tx = optax.adamw(1e-3)
  results = []
  for model in (unrolled, scanned):
    # the step donates its state: each side starts from its own copy of the weights
    state = step_lib.create_state(jax.tree.map(jnp.copy, params), tx, jax.random.PRNGKey(2))
    train_step = step_lib.make_train_step(step_lib.supervised_loss_fn(model), tx)
    for _ in range(2):
      state, metrics = train_step(state, None, batch)
    results.append((state.params, metrics))
  (params_u, metrics_u), (params_s, metrics_s) = results
  np.testing.assert_allclose(metrics_s['loss'], metrics_u['loss'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params_s, params_u)


def _dot_count(jaxpr) -> int:
  """dot_general equations in a jaxpr, counting each sub-jaxpr (a scan body) once."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == 'dot_general'
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, 'jaxpr', None)
        if inner is not None:
          count += _dot_count(inner if hasattr(inner, 'eqns') else inner.jaxpr)
  return count


def test_scan_program_does_not_grow_with_depth():
  """The point of the scan: the traced program holds one layer body, so its matmuls do not
  multiply with the number of layers (the unrolled program's do)."""
  batch = tiny_bert.padded_batch()
  counts = {}
  for layers in (2, 4):
    for scan in (False, True):
      model = BertClassifier(**{**TINY, 'num_layers': layers, 'scan_layers': scan})
      params = registry.init_params(model, jax.random.PRNGKey(0))
      jaxpr = jax.make_jaxpr(lambda p, m=model: _apply(m, p, batch)[0])(params)
      counts[layers, scan] = _dot_count(jaxpr.jaxpr)
  assert counts[2, True] == counts[4, True]
  assert counts[4, False] > counts[2, False] > counts[2, True]


def test_scan_applies_dropout_in_training():
  _, scanned = _pair()
  batch = tiny_bert.padded_batch()
  params = registry.init_params(scanned, jax.random.PRNGKey(0))
  eval_logits, _ = _apply(scanned, params, batch)
  train = lambda key: _apply(scanned, params, batch, deterministic=False, rngs={'dropout': key})[0]
  first, again, other = (
    train(jax.random.PRNGKey(3)),
    train(jax.random.PRNGKey(3)),
    train(jax.random.PRNGKey(4)),
  )
  np.testing.assert_array_equal(first, again)  # a key determines the masks
  assert not np.allclose(first, eval_logits, atol=1e-4)
  assert not np.allclose(first, other, atol=1e-4)


def test_scan_refuses_layers_of_different_ranks():
  model = BertClassifier(
    **TINY, scan_layers=True, low_rank=(('layer_0/intermediate', 8), ('layer_1/intermediate', 4))
  )
  params = registry.init_params(model, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match='scan_layers=True needs the same low_rank'):
    _apply(model, params, tiny_bert.padded_batch())


def _run_config(tfds_dir, scan: bool):
  """A teacher stage, then a BERT student distilled with logit, hidden and attention terms;
  no dropout anywhere, so the scanned and the unrolled run must agree to float error."""
  config = sst2_from_scratch.get_config('runlocal')
  config.data.tfds_data_dir = str(tfds_dir)
  config.data.train_limit = 500
  config.stages = ('teacher', 'distill')
  config.train.teacher_steps = config.train.student_steps = 10
  config.student = models.bert_tiny()
  config.distill.teacher_cache = 'off'
  for role in ('teacher', 'student'):
    config[role].kwargs.dropout_rate = config[role].kwargs.attention_dropout_rate = 0.0
  config.loss.weights.hidden_mse = config.loss.weights.attention_kl = 1.0
  config.train.scan_layers = scan
  return config


# slow: two whole runs; the scanned model's equality is checked layer by layer above.
@pytest.mark.slow
def test_run_with_scan_layers_trains_the_same_models(tfds_dir, tmp_path, monkeypatch):
  """config.train.scan_layers reaches the trained teacher, the frozen teacher read back from
  its export and the student: the same losses and exports as the unrolled run, and the
  exported model.json does not record the compute choice."""
  scanned_depths = []  # num_layers of every model traced through the scan
  original = bert._BertBase._scanned_layers

  def spy(self, *args):
    scanned_depths.append(self.num_layers)
    return original(self, *args)

  monkeypatch.setattr(bert._BertBase, '_scanned_layers', spy)
  exports = {}
  for scan in (False, True):
    workdir = tmp_path / f'scan_{scan}'
    results = train.run(_run_config(tfds_dir, scan), workdir)
    # every BERT of the scan run goes through the scan, none of the unrolled run
    assert bool(scanned_depths) == scan
    records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    losses = [r['loss'] for r in records if r.get('stage') == 'distill' and 'loss' in r]
    student = workdir / 'distill' / 'export' / 'student'
    exports[scan] = (
      losses,
      results['stages']['distill']['models']['student']['eval_accuracy'],
      checkpoint.load_export_params(student),
      checkpoint.read_export_spec(student),
    )
  (losses_u, acc_u, params_u, spec_u), (losses_s, acc_s, params_s, spec_s) = exports.values()
  assert losses_u and losses_s == pytest.approx(losses_u, rel=1e-4)
  assert acc_s == acc_u
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), params_s, params_u)
  assert spec_s == spec_u and 'scan_layers' not in spec_s['kwargs']
