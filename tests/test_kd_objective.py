"""The config-driven objective: composition, projections, schedules, masking and errors,
on real (tiny) BERT students and teachers of different widths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from kdjax import losses
from kdjax.kd import features, objective, output
from kdjax.models import registry
from kdjax.models.bert import BertClassifier
from kdjax.models.bilstm import BiLSTMClassifier

STUDENT = BertClassifier(
  vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_len=16
)
TEACHER = BertClassifier(
  vocab_size=50, hidden_size=48, num_layers=4, num_heads=4, intermediate_size=96, max_len=16
)


def _loss_cfg(**weights):
  cfg = default.get_config().loss
  for name in objective.TERMS:
    cfg.weights[name] = weights.get(name, 0.0)
  return cfg


def _batch(pad_id=0):
  lengths = np.array([16, 9, 4, 12])
  mask = (np.arange(16)[None, :] < lengths[:, None]).astype(np.int32)
  ids = np.random.RandomState(0).randint(1, 50, size=(4, 16))
  ids = np.where(mask > 0, ids, pad_id)
  return {
    'input_ids': jnp.asarray(ids, jnp.int32),
    'attention_mask': jnp.asarray(mask),
    'labels': jnp.asarray([0, 1, -1, 1]),  # -1: an augmented, teacher-labelled example
    'weights': jnp.asarray([1.0, 1.0, 1.0, 0.0]),  # the last example is padding
  }


def _params():
  return (
    registry.init_params(STUDENT, jax.random.PRNGKey(1)),
    registry.init_params(TEACHER, jax.random.PRNGKey(2)),
  )


def _build(cfg, steps=100, student=STUDENT):
  return objective.build(
    cfg, steps, registry.output_shapes(student), registry.output_shapes(TEACHER)
  )


def _run(obj, s_params, t_params, head_params, batch, step=0):
  s = STUDENT.apply({'params': s_params}, batch['input_ids'], batch['attention_mask'])
  t = jax.lax.stop_gradient(
    TEACHER.apply({'params': t_params}, batch['input_ids'], batch['attention_mask'])
  )
  return obj(jnp.asarray(step), s, t, batch, head_params)


ALL = {name: 1.0 for name in objective.TERMS if name != 'minilm'}


def test_every_term_composes_into_one_differentiable_loss():
  obj = _build(_loss_cfg(**ALL))
  # Uniform 2 -> 4 layers; widths 32 vs 48 need projections for the hidden terms and the
  # pooled hint; CRD heads.
  assert obj.layer_pairs == ((1, 2), (2, 4))
  assert dict(obj.head_shapes) == {
    'hidden_1_to_2': (32, 48),
    'hidden_2_to_4': (32, 48),
    'pooled_projection': (32, 48),
    'crd_student': (32, 128),
    'crd_teacher': (48, 128),
  }
  s_params, t_params = _params()
  heads = obj.init_heads(jax.random.PRNGKey(3))
  batch = _batch()
  run = jax.jit(lambda sp, hp: _run(obj, sp, t_params, hp, batch))  # eager dispatch is slow
  loss, metrics = run(s_params, heads)
  expected = sum(float(losses.mean(metrics[objective.metric_name(n)])) for n in obj.terms)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  for name in obj.terms:
    assert np.isfinite(float(losses.mean(metrics[objective.metric_name(name)]))), name
    assert float(metrics[f'schedule/{name}'][0]) == 1.0
  grads = jax.jit(jax.grad(lambda sp, hp: run(sp, hp)[0], argnums=(0, 1)))(s_params, heads)
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  # The projection and CRD heads receive gradient, so they are trained.
  assert all(float(jnp.abs(g['kernel']).sum()) > 0 for g in grads[1].values())


def test_objective_equals_the_weighted_library_terms():
  cfg = _loss_cfg(ce=0.3, kl=0.7, hidden_mse=2.0)
  cfg.temperature = 3.0
  obj = _build(cfg)
  s_params, t_params = _params()
  heads = obj.init_heads(jax.random.PRNGKey(3))
  batch = _batch()
  loss, _ = _run(obj, s_params, t_params, heads, batch)
  s_logits, s_out = STUDENT.apply({'params': s_params}, batch['input_ids'], batch['attention_mask'])
  t_logits, t_out = TEACHER.apply({'params': t_params}, batch['input_ids'], batch['attention_mask'])
  w, labelled = batch['weights'], batch['weights'] * (batch['labels'] >= 0)
  mask = features.token_weights(batch['attention_mask'], w)
  hidden = sum(
    float(
      losses.mean(
        features.hidden_mse(
          s_out[f'hidden_{s}'] @ heads[f'hidden_{s}_to_{t}']['kernel']
          + heads[f'hidden_{s}_to_{t}']['bias'][None, None, :],
          t_out[f'hidden_{t}'],
          mask,
        )
      )
    )
    for s, t in ((1, 2), (2, 4))
  )
  expected = (
    0.3
    * float(losses.mean(losses.cross_entropy(s_logits, jnp.maximum(batch['labels'], 0), labelled)))
    + 0.7 * float(losses.mean(output.forward_kl(s_logits, t_logits, 3.0, w)))
    + 2.0 * hidden
  )
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_pooled_mse_is_the_projected_hint_on_sentence_vectors():
  """pooled_mse against numpy: mean over the batch's real examples (augmented ones included,
  padding not) of the per-dimension squared gap between the projected student vector and
  the teacher's."""
  obj = _build(_loss_cfg(pooled_mse=1.0))
  assert dict(obj.head_shapes) == {'pooled_projection': (32, 48)}
  s_params, t_params = _params()
  heads = obj.init_heads(jax.random.PRNGKey(3))
  batch = _batch()
  loss, metrics = _run(obj, s_params, t_params, heads, batch)
  inputs = (batch['input_ids'], batch['attention_mask'])
  s_pooled = np.asarray(STUDENT.apply({'params': s_params}, *inputs)[1]['pooled'], np.float64)
  t_pooled = np.asarray(TEACHER.apply({'params': t_params}, *inputs)[1]['pooled'], np.float64)
  head = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), heads['pooled_projection'])
  per_example = ((s_pooled @ head['kernel'] + head['bias'] - t_pooled) ** 2).mean(axis=1)
  w = np.asarray(batch['weights'], np.float64)
  expected = (per_example * w).sum() / w.sum()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(losses.mean(metrics['pooled_mse'])), expected, rtol=1e-5)


def test_pooled_mse_needs_no_projection_at_equal_widths():
  obj = objective.build(
    _loss_cfg(pooled_mse=1.0), 10, registry.output_shapes(TEACHER), registry.output_shapes(TEACHER)
  )
  assert dict(obj.head_shapes) == {}
  t_params = registry.init_params(TEACHER, jax.random.PRNGKey(2))
  batch = _batch()
  same = TEACHER.apply({'params': t_params}, batch['input_ids'], batch['attention_mask'])
  loss, _ = obj(jnp.asarray(0), same, same, batch, {})
  assert float(loss) == 0.0


def test_padding_never_reaches_the_loss():
  obj = _build(_loss_cfg(**ALL))
  s_params, t_params = _params()
  heads = obj.init_heads(jax.random.PRNGKey(3))
  run = jax.jit(lambda batch: _run(obj, s_params, t_params, heads, batch)[0])
  loss_a, loss_b = run(_batch(pad_id=0)), run(_batch(pad_id=7))
  np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-6)


def test_schedules_move_weights_and_temperature_by_step():
  cfg = _loss_cfg(ce=1.0, kl=1.0)
  cfg.schedules.kl = 'linear:0'
  cfg.schedules.temperature = 'step:50=1'
  obj = _build(cfg, steps=100)
  s_params, t_params = _params()
  _, start = _run(obj, s_params, t_params, {}, _batch(), step=0)
  loss_end, end = _run(obj, s_params, t_params, {}, _batch(), step=100)
  assert float(start['schedule/kl'][0]) == 1.0 and float(end['schedule/kl'][0]) == 0.0
  assert float(start['schedule/temperature'][0]) == 2.0
  assert float(end['schedule/temperature'][0]) == 1.0
  np.testing.assert_allclose(float(loss_end), float(losses.mean(end['ce'])), rtol=1e-6)
  # At T = 1 the logged KL at T and at T = 1 coincide.
  np.testing.assert_allclose(float(losses.mean(end['kl_T'])), float(losses.mean(end['kl_T1'])))


def test_minilm_v1_needs_equal_heads_and_v2_relation_heads_must_divide():
  obj = _build(_loss_cfg(minilm=1.0))
  assert obj.minilm_layers == (2, 4) and obj.minilm_heads == 4
  s_params, t_params = _params()
  loss, metrics = _run(obj, s_params, t_params, {}, _batch())
  assert np.isfinite(float(loss)) and 'minilm_value' in metrics
  cfg = _loss_cfg(minilmv2=1.0)
  cfg.minilm_relation_heads = 5
  with pytest.raises(objective.ObjectiveError, match='does not divide the student width 32'):
    _build(cfg)


@pytest.mark.parametrize(
  'weights, student, fragment',
  [
    ({'attention_kl': 1.0}, 'bilstm', 'returns no attention maps'),
    ({'minilm': 1.0}, 'bilstm', 'returns no attention maps'),
  ],
)
def test_terms_the_models_cannot_support_are_refused(weights, student, fragment):
  bilstm = BiLSTMClassifier(vocab_size=50, embed_dim=16, hidden_size=8, mlp_dim=8, num_classes=2)
  with pytest.raises(objective.ObjectiveError, match=fragment):
    _build(_loss_cfg(**weights), student=bilstm)


def test_attention_terms_refuse_different_head_counts():
  student = BertClassifier(
    vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_len=16
  )
  with pytest.raises(objective.ObjectiveError, match='use loss.weights.minilmv2'):
    _build(_loss_cfg(attention_kl=1.0), student=student)


def test_logit_objective_refuses_feature_terms():
  with pytest.raises(objective.ObjectiveError, match="teacher_cache='off'"):
    objective.logits_only(_loss_cfg(kl=1.0, hidden_mse=1.0), 10)
