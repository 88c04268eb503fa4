"""MiniLM / MiniLMv2 relation terms against an independent NumPy reference and real BERT outputs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.kd import relations
from kdjax.models.bert import BertClassifier

# Jitted once per shape: eager op-by-op dispatch would dominate the run time of these tests.
relation_kl = jax.jit(relations.relation_kl, static_argnums=2)
relation_matrix = jax.jit(relations.relation_matrix, static_argnums=1)

MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], np.float32)


def _np_relation_kl(student, teacher, num_heads, mask):
  """Explicit loops: per example, relation head and real query, a masked softmax over keys."""
  total, count = 0.0, 0.0
  batch, seq_len, _ = student.shape

  def softmax_rows(x, head, keys):
    width = x.shape[-1] // num_heads
    xh = x[:, head * width : (head + 1) * width].astype(np.float64)
    scores = xh @ xh.T / math.sqrt(width)
    out = np.zeros_like(scores)
    for q in range(seq_len):
      row = scores[q, keys]
      e = np.exp(row - row.max())
      out[q, keys] = e / e.sum()
    return out

  for b in range(batch):
    keys = np.nonzero(mask[b] > 0)[0]
    per_query = np.zeros(seq_len)
    for head in range(num_heads):
      p_s = softmax_rows(student[b], head, keys)
      p_t = softmax_rows(teacher[b], head, keys)
      for q in range(seq_len):
        pt, ps = p_t[q, keys], p_s[q, keys]
        per_query[q] += np.sum(pt * (np.log(pt) - np.log(ps))) / num_heads
    total += float(np.sum(per_query * mask[b]))
    count += float(mask[b].sum())
  return total, count


def _with_garbage(x, mask, value):
  return np.where(mask[..., None] > 0, x, np.float32(value))


def _inputs(width_s, width_t, seed=0):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(3, 6, width_s)) * 2.0
  t = rng.normal(size=(3, 6, width_t)) * 2.0
  return s.astype(np.float32), t.astype(np.float32)


@pytest.mark.parametrize('width_s,width_t,heads', [(16, 16, 2), (32, 48, 4)])
def test_relation_kl_matches_numpy_reference_with_padding(width_s, width_t, heads):
  s, t = _inputs(width_s, width_t)
  s, t = _with_garbage(s, MASK, 37.0), _with_garbage(t, MASK, -55.0)  # garbage on padding
  got = relation_kl(s, t, heads, MASK)
  want = _np_relation_kl(s, t, heads, MASK)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_fractional_example_weights_weight_queries():
  s, t = _inputs(32, 48, seed=1)
  mask = MASK * np.array([[0.5], [1.0], [2.0]], np.float32)
  got = relation_kl(s, t, 4, mask)
  want = _np_relation_kl(s, t, 4, mask)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_identical_inputs_give_zero():
  s, _ = _inputs(32, 32)
  total, count = relation_kl(s, s, 4, MASK)
  assert abs(float(total)) < 1e-6 and float(count) == MASK.sum()


def test_invariant_to_padded_values():
  s, t = _inputs(32, 48, seed=2)
  base = relation_kl(s, t, 4, MASK)
  for value in (1e4, -1e4, np.inf, np.nan):
    got = relation_kl(_with_garbage(s, MASK, value), _with_garbage(t, MASK, value), 4, MASK)
    np.testing.assert_allclose(np.asarray(got), np.asarray(base), rtol=1e-6)


def test_relation_matrix_masks_padded_keys():
  s, _ = _inputs(32, 32)
  log_p = relation_matrix(_with_garbage(s, MASK, 1e4), 4, MASK)
  assert log_p.shape == (3, 4, 6, 6) and bool(jnp.all(jnp.isfinite(log_p)))
  p = np.exp(np.asarray(log_p))
  np.testing.assert_array_equal(p[1, :, :, 3:], 0.0)
  np.testing.assert_array_equal(p[2, :, :, 5], 0.0)
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)


def test_width_not_divisible_raises():
  s, _ = _inputs(30, 30)
  with pytest.raises(ValueError, match='D=30.*num_heads=4'):
    relation_kl(s, s, 4, MASK)


def test_gradient_finite_with_masked_entries():
  s, t = _inputs(32, 48, seed=3)
  s, t = _with_garbage(s, MASK, np.nan), _with_garbage(t, MASK, np.inf)
  loss = lambda x: relation_kl(x, t, 4, MASK)[0]
  grad = jax.jit(jax.grad(loss))(s)
  assert bool(jnp.all(jnp.isfinite(grad)))
  np.testing.assert_array_equal(np.asarray(grad)[MASK == 0], 0.0)  # padding gets no gradient
  assert float(jnp.abs(grad).sum()) > 0


def _bert_params(model, ids, mask, seed):
  """BERT-like random params from NumPy: compiling model.init's RNG costs seconds on a CPU."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids, mask)['params']

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return jnp.ones(leaf.shape, jnp.float32)
    std = 0.0 if name.endswith("['bias']") else 0.2  # larger than BERT's 0.02: peakier relations
    return jnp.asarray(rng.normal(size=leaf.shape) * std, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope='module')
def berts():
  """A 32-wide student and a 48-wide teacher (4 heads each) on a padded batch: their outputs,
  and MiniLMv2's relation terms (student layer 2, teacher layer 1, 8 relation heads) with their
  gradient w.r.t. the student's params, all from one compilation per model."""
  common = dict(vocab_size=50, num_layers=2, num_heads=4, intermediate_size=64, max_len=16)
  student = BertClassifier(hidden_size=32, **common)
  teacher = BertClassifier(hidden_size=48, **common)
  mask = np.array([[1] * 8, [1] * 5 + [0] * 3, [1] * 2 + [0] * 6], np.int32)
  ids = np.random.default_rng(0).integers(1, 50, (3, 8)).astype(np.int32) * mask
  s_params = _bert_params(student, ids, mask, 1)
  _, t_out = jax.jit(teacher.apply)({'params': _bert_params(teacher, ids, mask, 2)}, ids, mask)
  t_out = jax.lax.stop_gradient(t_out)  # a frozen teacher

  def loss(params):
    _, s_out = student.apply({'params': params}, ids, mask)
    terms = relations.minilmv2_relations(s_out, t_out, 2, 1, 8, mask)
    return sum(total / count for total, count in terms.values()), (terms, s_out)

  (value, (terms, s_out)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(s_params)
  return dict(s_out=s_out, t_out=t_out, mask=mask, value=value, terms=terms, grads=grads)


def test_value_relation_equals_per_attention_head_softmax(berts):
  s_out, t_out = berts['s_out'], berts['t_out']
  m = np.array([[1.0], [1.0], [0.5]], np.float32) * berts['mask']  # mask × example weights

  def by_hand(v, heads=4):  # BERT's own head split, masked softmax written out in NumPy
    v = np.asarray(v, np.float64)
    b, length, width = v.shape
    d = width // heads
    vh = v.reshape(b, length, heads, d).transpose(0, 2, 1, 3)
    scores = np.einsum('bhqd,bhkd->bhqk', vh, vh) / math.sqrt(d)
    scores = np.where(m[:, None, None, :] > 0, scores, -np.inf)
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  for out in (s_out, t_out):
    got = np.exp(np.asarray(relation_matrix(out['value_2'], 4, m)))
    real = (m > 0)[:, None, :, None] & np.ones(got.shape, bool)  # padded query rows: unused
    np.testing.assert_allclose(got[real], by_hand(out['value_2'])[real], rtol=1e-5, atol=1e-6)

  p_s, p_t = by_hand(s_out['value_2']), by_hand(t_out['value_2'])
  with np.errstate(divide='ignore', invalid='ignore'):
    kl = np.where(p_t > 0, p_t * (np.log(p_t) - np.log(p_s)), 0.0).sum(-1).mean(1)
  want = ((kl * m).sum(), m.sum())
  fn = jax.jit(relations.minilm_value_relation, static_argnums=(2, 3, 4))
  got = fn(s_out, t_out, 2, 2, 4, m)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_minilmv2_on_bert_outputs_of_different_widths(berts):
  terms, grads = berts['terms'], berts['grads']
  assert set(terms) == {'query', 'key', 'value'}
  assert np.isfinite(float(berts['value'])) and float(berts['value']) > 0
  for total, count in terms.values():
    assert float(count) == float(berts['mask'].sum()) and float(total) > 0
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))
  for layer in ('layer_0', 'layer_1'):  # the student's Q, K and V projections all get gradient
    for name in ('query', 'key', 'value'):
      assert np.abs(np.asarray(grads[layer]['attention'][name]['kernel'])).sum() > 0
