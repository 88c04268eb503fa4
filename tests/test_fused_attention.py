"""BERT's attention_impl='fused' (jax.nn.dot_product_attention) against the explicit path: the
same logits, hidden states and gradients on a padded batch; clear errors where it cannot serve
(unknown value, attention dropout in training, attention-KD terms that read the maps)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from kdjax import losses
from kdjax.kd import objective
from kdjax.models import registry
from kdjax.models.bert import BertClassifier
from tests import tiny_bert


def _model(impl, **overrides):
  return BertClassifier(**{**tiny_bert.TINY, 'attention_impl': impl, **overrides})


@pytest.fixture(scope='module')
def params():
  return registry.init_params(_model('explicit'), jax.random.PRNGKey(0))


def test_fused_matches_explicit_outputs(params):
  batch = tiny_bert.padded_batch()
  run = lambda impl: _model(impl).apply(
    {'params': params}, batch['input_ids'], batch['attention_mask']
  )
  (e_logits, e_out), (f_logits, f_out) = run('explicit'), run('fused')
  np.testing.assert_allclose(f_logits, e_logits, atol=1e-5, rtol=1e-5)
  for i in range(tiny_bert.TINY['num_layers'] + 1):
    np.testing.assert_allclose(f_out[f'hidden_{i}'], e_out[f'hidden_{i}'], atol=1e-5, rtol=1e-5)
  assert 'attn_1' in e_out and not any(k.startswith('attn_') for k in f_out)
  assert set(e_out) - set(f_out) == {f'attn_{i + 1}' for i in range(tiny_bert.TINY['num_layers'])}


def test_fused_matches_explicit_gradients(params):
  batch = tiny_bert.padded_batch()

  def grads(impl):
    # Dropout in the rest of the model, none in attention (fused has none), same key.
    model = _model(impl, attention_dropout_rate=0.0)

    def loss(p):
      logits, _ = model.apply(
        {'params': p},
        batch['input_ids'],
        batch['attention_mask'],
        deterministic=False,
        rngs={'dropout': jax.random.PRNGKey(7)},
      )
      return losses.supervised_loss(logits, batch['labels'], batch['weights'])[0]

    return jax.jit(jax.value_and_grad(loss))(params)

  (e_loss, e_grads), (f_loss, f_grads) = grads('explicit'), grads('fused')
  np.testing.assert_allclose(f_loss, e_loss, atol=1e-5, rtol=1e-5)
  for path, e in jax.tree_util.tree_leaves_with_path(e_grads):
    f = f_grads
    for k in path:
      f = f[k.key]
    np.testing.assert_allclose(f, e, atol=1e-4, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_unknown_attention_impl_is_one_clear_error(params):
  batch = tiny_bert.padded_batch()
  with pytest.raises(ValueError, match=r"attention_impl='flash' is unknown; valid: \('explicit'"):
    _model('flash').apply({'params': params}, batch['input_ids'], batch['attention_mask'])


def test_fused_refuses_attention_dropout_in_training_only(params):
  batch = tiny_bert.padded_batch()
  model = _model('fused', attention_dropout_rate=0.1)
  # Inference (a frozen teacher) has no dropout to apply: fine.
  model.apply({'params': params}, batch['input_ids'], batch['attention_mask'])
  with pytest.raises(ValueError, match='set attention_dropout_rate=0'):
    model.apply(
      {'params': params},
      batch['input_ids'],
      batch['attention_mask'],
      deterministic=False,
      rngs={'dropout': jax.random.PRNGKey(0)},
    )


def _loss_cfg(**weights):
  cfg = default.get_config().loss
  for name in objective.TERMS:
    cfg.weights[name] = weights.get(name, 0.0)
  return cfg


@pytest.mark.parametrize('term', ['attention_kl', 'attention_mse', 'minilm'])
@pytest.mark.parametrize('fused_side', ['student', 'teacher'])
def test_attention_objective_refuses_fused_model(term, fused_side):
  shapes = {
    side: registry.output_shapes(_model('fused' if side == fused_side else 'explicit'))
    for side in ('student', 'teacher')
  }
  match = f"the {fused_side} model returns no attention maps.*attention_impl='explicit'"
  with pytest.raises(objective.ObjectiveError, match=match):
    objective.build(_loss_cfg(**{term: 1.0}), 10, shapes['student'], shapes['teacher'])


def test_objective_built_for_explicit_refuses_fused_outputs_clearly(params):
  # Built from the explicit model's shapes, then run on a fused one: not a bare KeyError.
  explicit = registry.output_shapes(_model('explicit'))
  obj = objective.build(_loss_cfg(attention_kl=1.0), 10, explicit, explicit)
  batch = tiny_bert.padded_batch()
  run = lambda impl: _model(impl).apply(
    {'params': params}, batch['input_ids'], batch['attention_mask']
  )
  with pytest.raises(objective.ObjectiveError, match='student model returned no attention maps'):
    obj(jnp.asarray(0), run('fused'), run('explicit'), batch, {})


def test_fused_model_trains_logit_and_hidden_objectives(params):
  # Terms that do not read attention maps keep working with a fused student and teacher.
  shapes = registry.output_shapes(_model('fused'))
  obj = objective.build(_loss_cfg(ce=1.0, kl=1.0, hidden_mse=1.0), 10, shapes, shapes)
  batch = tiny_bert.padded_batch()
  out = _model('fused').apply({'params': params}, batch['input_ids'], batch['attention_mask'])
  loss, _ = obj(jnp.asarray(0), out, out, batch, {})
  assert np.isfinite(float(loss))
