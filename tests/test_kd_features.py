"""Feature-level KD terms: agreement with independent NumPy loops, properties, layer maps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.kd import features
from kdjax.models.from_teacher import uniform_layer_map

B, H, L, D = 4, 2, 6, 8
LENGTHS = np.array([6, 3, 1, 4])
EXAMPLE_WEIGHTS = np.array([1.0, 0.5, 1.0, 0.0], np.float32)  # the last example is padding


def _attention_mask():
  return (np.arange(L)[None, :] < LENGTHS[:, None]).astype(np.int32)


def _mask():
  return _attention_mask().astype(np.float32) * EXAMPLE_WEIGHTS[:, None]


def _hidden(seed, garbage=1e3):
  """[B, L, D] hidden states with large garbage in padded positions."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, L, D)).astype(np.float32)
  pad = _attention_mask() == 0
  x[pad] = rng.uniform(-garbage, garbage, size=(int(pad.sum()), D))
  return x


def _attention(seed, scale=2.0):
  """[B, H, L, L] masked-softmax rows: padded keys exactly 0, every row (padded queries too)
  a distribution over the real keys, as the model produces them."""
  rng = np.random.default_rng(seed)
  scores = rng.normal(size=(B, H, L, L)).astype(np.float32) * scale
  keys = _attention_mask()[:, None, None, :] > 0
  scores = np.where(keys, scores, -1e9)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  return (probs / probs.sum(-1, keepdims=True)).astype(np.float32)


# Independent references: float64 loops over examples, positions, heads and keys.


def _ref_hidden_mse(s, t, mask):
  total = 0.0
  for b in range(s.shape[0]):
    for i in range(s.shape[1]):
      if mask[b, i] == 0:
        continue
      sq = 0.0
      for d in range(s.shape[2]):
        sq += (float(s[b, i, d]) - float(t[b, i, d])) ** 2
      total += mask[b, i] * sq / s.shape[2]
  return total, float(mask.sum())


def _ref_cos(u, v):
  u, v = u.astype(np.float64), v.astype(np.float64)
  return float(np.dot(u, v) / (np.sqrt(np.dot(u, u)) * np.sqrt(np.dot(v, v))))


def _ref_cosine(s, t, mask):
  total = 0.0
  for b in range(s.shape[0]):
    for i in range(s.shape[1]):
      if mask[b, i] != 0:
        total += mask[b, i] * (1.0 - _ref_cos(s[b, i], t[b, i]))
  return total, float(mask.sum())


def _ref_pkd(s, t, weights):
  total = 0.0
  for b in range(s.shape[0]):
    if weights[b] == 0:
      continue
    su = s[b].astype(np.float64) / np.sqrt(np.sum(s[b].astype(np.float64) ** 2))
    tu = t[b].astype(np.float64) / np.sqrt(np.sum(t[b].astype(np.float64) ** 2))
    total += weights[b] * sum((su[d] - tu[d]) ** 2 for d in range(s.shape[1]))
  return total, float(weights.sum())


def _ref_attention_kl(s, t, mask):
  total = 0.0
  for b in range(s.shape[0]):
    real = [k for k in range(s.shape[3]) if mask[b, k] > 0]
    for q in range(s.shape[2]):
      if mask[b, q] == 0:
        continue
      heads = 0.0
      for h in range(s.shape[1]):
        for k in real:
          p, r = float(t[b, h, q, k]), float(s[b, h, q, k])
          if p > 0:
            heads += p * np.log(p / r)
      total += mask[b, q] * heads / s.shape[1]
  return total, float(mask.sum())


def _ref_attention_mse(s, t, mask):
  total = 0.0
  for b in range(s.shape[0]):
    real = [k for k in range(s.shape[3]) if mask[b, k] > 0]
    for q in range(s.shape[2]):
      if mask[b, q] == 0:
        continue
      heads = 0.0
      for h in range(s.shape[1]):
        sq = sum((float(s[b, h, q, k]) - float(t[b, h, q, k])) ** 2 for k in real)
        heads += sq / len(real)
      total += mask[b, q] * heads / s.shape[1]
  return total, float(mask.sum())


def _close(got, want):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)


def _cls_pair():
  rng = np.random.default_rng(7)
  return rng.normal(size=(B, D)).astype(np.float32), rng.normal(size=(B, D)).astype(np.float32)


TOKEN_LOSSES = {
  'hidden_mse': (features.hidden_mse, _ref_hidden_mse),
  'cosine_embedding': (features.cosine_embedding, _ref_cosine),
}
ATTENTION_LOSSES = {
  'attention_kl': (features.attention_kl, _ref_attention_kl),
  'attention_mse': (features.attention_mse, _ref_attention_mse),
}


@pytest.mark.parametrize('name', sorted(TOKEN_LOSSES))
def test_token_losses_match_numpy_reference(name):
  fn, ref = TOKEN_LOSSES[name]
  s, t, mask = _hidden(1), _hidden(2), _mask()
  _close(fn(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask)), ref(s, t, mask))


def test_pkd_cls_matches_numpy_reference():
  s, t = _cls_pair()
  _close(
    features.pkd_cls(jnp.asarray(s), jnp.asarray(t), EXAMPLE_WEIGHTS),
    _ref_pkd(s, t, EXAMPLE_WEIGHTS),
  )


@pytest.mark.parametrize('name', sorted(ATTENTION_LOSSES))
def test_attention_losses_match_numpy_reference(name):
  fn, ref = ATTENTION_LOSSES[name]
  s, t, mask = _attention(3), _attention(4), _mask()
  _close(fn(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask)), ref(s, t, mask))


def test_identical_student_and_teacher_give_zero():
  mask = jnp.asarray(_mask())
  h, a = jnp.asarray(_hidden(5)), jnp.asarray(_attention(6))
  cls = jnp.asarray(_cls_pair()[0])
  results = {
    'hidden_mse': features.hidden_mse(h, h, mask),
    'cosine_embedding': features.cosine_embedding(h, h, mask),
    'pkd_cls': features.pkd_cls(cls, cls, jnp.asarray(EXAMPLE_WEIGHTS)),
    'attention_kl': features.attention_kl(a, a, mask),
    'attention_mse': features.attention_mse(a, a, mask),
  }
  for name, (total, count) in results.items():
    assert abs(float(total)) < 1e-5, name
    assert float(count) > 0, name


def test_padded_positions_and_examples_do_not_change_the_value():
  mask = _mask()
  pad = mask == 0
  s, t = _hidden(1), _hidden(2)
  s2, t2 = s.copy(), t.copy()
  s2[pad], t2[pad] = -7.0 * s2[pad] + 3.0, 0.0  # zero vectors too: the cosine must not NaN
  for fn, _ in TOKEN_LOSSES.values():
    np.testing.assert_allclose(np.asarray(fn(s, t, mask)), np.asarray(fn(s2, t2, mask)), rtol=1e-6)
  cs, ct = _cls_pair()
  cs2, ct2 = cs.copy(), ct.copy()
  cs2[3], ct2[3] = 100.0, 0.0  # the padded example
  got = features.pkd_cls(cs2, ct2, EXAMPLE_WEIGHTS)
  np.testing.assert_allclose(np.asarray(got), np.asarray(features.pkd_cls(cs, ct, EXAMPLE_WEIGHTS)))
  # Attention: other distributions in padded query rows and in the padded example.
  sa, ta = _attention(3), _attention(4)
  rows = np.broadcast_to(pad[:, None, :, None], sa.shape)
  sa2 = np.where(rows, _attention(8), sa)
  ta2 = np.where(rows, _attention(9), ta)
  sa2[3], ta2[3] = _attention(10)[3], _attention(11)[3]
  for fn, _ in ATTENTION_LOSSES.values():
    np.testing.assert_allclose(
      np.asarray(fn(sa, ta, mask)), np.asarray(fn(sa2, ta2, mask)), rtol=1e-6
    )


def test_attention_gradients_are_finite_with_exact_zeros():
  mask = jnp.asarray(_mask())
  keys = jnp.asarray(_attention_mask())[:, None, None, :] > 0
  scores = jnp.asarray(np.random.default_rng(0).normal(size=(B, H, L, L)) * 3.0, jnp.float32)
  teacher = jnp.asarray(_attention(4))
  assert float(jnp.min(teacher)) == 0.0  # padded keys are exactly zero

  for fn in (features.attention_kl, features.attention_mse):

    def loss(student_scores, teacher_attn, fn=fn):
      student = jax.nn.softmax(jnp.where(keys, student_scores, -1e9), axis=-1)
      total, count = fn(student, teacher_attn, mask)
      return total / count

    value, (g_s, g_t) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(scores, teacher)
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(np.asarray(g_s))) and np.all(np.isfinite(np.asarray(g_t)))
    assert float(jnp.max(jnp.abs(g_s))) > 0


def test_attention_kl_survives_student_underflow():
  """A student probability of exactly 0 where the teacher has mass: finite value and grads."""
  mask = jnp.asarray(_mask())
  teacher = jnp.asarray(_attention(4))
  student = jnp.asarray(_attention(3)).at[0, 0, 0, 1].set(0.0)
  value, grad = jax.jit(jax.value_and_grad(lambda s: features.attention_kl(s, teacher, mask)[0]))(
    student
  )
  base = features.attention_kl(jnp.asarray(_attention(3)), teacher, mask)[0]
  assert np.isfinite(float(value)) and float(value) > float(base)  # the floor: -log(tiny) ≈ 87
  assert np.all(np.isfinite(np.asarray(grad)))


def test_cosine_is_invariant_to_positive_scaling_and_safe_for_zero_vectors():
  s, t, mask = _hidden(1), _hidden(2), _mask()
  base = np.asarray(features.cosine_embedding(s, t, mask))
  np.testing.assert_allclose(
    np.asarray(features.cosine_embedding(37.0 * s, t, mask)), base, rtol=1e-5
  )
  np.testing.assert_allclose(
    np.asarray(features.cosine_embedding(s, 0.01 * t, mask)), base, rtol=1e-5
  )
  zeros = jnp.zeros((B, L, D))
  total, count = features.cosine_embedding(zeros, jnp.asarray(t), jnp.asarray(mask))
  np.testing.assert_allclose(float(total), float(count), rtol=1e-6)  # cos 0 -> loss 1 each
  grad = jax.jit(jax.grad(lambda x: features.cosine_embedding(x, x, jnp.asarray(mask))[0]))(zeros)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_pkd_is_invariant_to_scaling_and_bounded():
  s, t = _cls_pair()
  base = np.asarray(features.pkd_cls(s, t, EXAMPLE_WEIGHTS))
  np.testing.assert_allclose(
    np.asarray(features.pkd_cls(5.0 * s, 0.2 * t, EXAMPLE_WEIGHTS)), base, rtol=1e-5
  )
  total, count = features.pkd_cls(s, -s, np.ones(B, np.float32))  # opposite: distance 2² each
  np.testing.assert_allclose(float(total), 4.0 * float(count), rtol=1e-5)


def test_token_weights():
  got = features.token_weights(jnp.asarray(_attention_mask()), jnp.asarray(EXAMPLE_WEIGHTS))
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got), _mask())


def test_losses_are_jit_compatible():
  mask = jnp.asarray(_mask())
  h1, h2 = jnp.asarray(_hidden(1)), jnp.asarray(_hidden(2))
  a1, a2 = jnp.asarray(_attention(3)), jnp.asarray(_attention(4))
  cls1, cls2 = (jnp.asarray(x) for x in _cls_pair())
  cases = [
    (features.hidden_mse, (h1, h2, mask)),
    (features.cosine_embedding, (h1, h2, mask)),
    (features.pkd_cls, (cls1, cls2, jnp.asarray(EXAMPLE_WEIGHTS))),
    (features.attention_kl, (a1, a2, mask)),
    (features.attention_mse, (a1, a2, mask)),
  ]
  for fn, args in cases:
    np.testing.assert_allclose(
      np.asarray(jax.jit(fn)(*args)), np.asarray(fn(*args)), rtol=1e-6, atol=1e-6
    )


def test_bf16_inputs_are_computed_in_float32():
  h1, h2 = jnp.asarray(_hidden(1)), jnp.asarray(_hidden(2))
  total, count = features.hidden_mse(h1.astype(jnp.bfloat16), h2, jnp.asarray(_mask()))
  assert total.dtype == jnp.float32 and count.dtype == jnp.float32


def test_width_and_head_mismatches_raise():
  mask = jnp.asarray(_mask())
  with pytest.raises(ValueError, match='projection is needed'):
    features.hidden_mse(jnp.zeros((B, L, 4)), jnp.zeros((B, L, D)), mask)
  with pytest.raises(ValueError, match='width'):
    features.cosine_embedding(jnp.zeros((B, L, 4)), jnp.zeros((B, L, D)), mask)
  with pytest.raises(ValueError, match='width'):
    features.pkd_cls(jnp.zeros((B, 4)), jnp.zeros((B, D)), jnp.ones(B))
  for fn in (features.attention_kl, features.attention_mse):
    with pytest.raises(ValueError, match='relation'):
      fn(jnp.zeros((B, 2, L, L)), jnp.zeros((B, 4, L, L)), mask)
  with pytest.raises(ValueError, match='mask shape'):
    features.hidden_mse(jnp.zeros((B, L, D)), jnp.zeros((B, L, D)), jnp.ones((B, L + 1)))


@pytest.mark.parametrize(
  'student,teacher,want',
  [
    (2, 6, ((1, 3), (2, 6))),
    (4, 12, ((1, 3), (2, 6), (3, 9), (4, 12))),
    (6, 12, ((1, 2), (2, 4), (3, 6), (4, 8), (5, 10), (6, 12))),
    (3, 3, ((1, 1), (2, 2), (3, 3))),
    (1, 12, ((1, 12),)),
  ],
)
def test_uniform_layer_map(student, teacher, want):
  assert features.layer_map('uniform', student, teacher) == want
  # Feature targets line up with the layers a student initialised from the teacher copies.
  assert tuple(t - 1 for _, t in want) == uniform_layer_map(teacher, student)
  with_emb = features.layer_map('uniform', student, teacher, include_embeddings=True)
  assert with_emb == ((0, 0),) + want


def test_last_k_layer_map():
  assert features.layer_map('last_k', 4, 12, last_k=2) == ((3, 11), (4, 12))
  assert features.layer_map('last_k', 6, 6, last_k=6) == tuple((i, i) for i in range(1, 7))
  assert features.layer_map('last_k', 3, 12, last_k=1, include_embeddings=True) == (
    (0, 0),
    (3, 12),
  )
  for k in (0, 5, 13):
    with pytest.raises(ValueError, match='last_k'):
      features.layer_map('last_k', 4, 12, last_k=k)


def test_explicit_layer_map_and_validation():
  assert features.layer_map('explicit', 4, 12, pairs=[(0, 0), (2, 7), (4, 12)]) == (
    (0, 0),
    (2, 7),
    (4, 12),
  )
  with pytest.raises(ValueError, match=r'\(5, 3\).*student 0\.\.4, teacher 0\.\.12'):
    features.layer_map('explicit', 4, 12, pairs=[(1, 1), (5, 3)])
  with pytest.raises(ValueError, match=r'\(2, 13\)'):
    features.layer_map('explicit', 4, 12, pairs=[(2, 13)])
  with pytest.raises(ValueError, match=r'\(-1, 2\)'):
    features.layer_map('explicit', 4, 12, pairs=[(-1, 2)])
  with pytest.raises(ValueError, match='pair of integers'):
    features.layer_map('explicit', 4, 12, pairs=[(1, 2, 3)])
  with pytest.raises(ValueError, match='at least one'):
    features.layer_map('explicit', 4, 12)


def test_bad_layer_map_kinds_and_depths():
  with pytest.raises(ValueError, match='uniform, last_k, explicit'):
    features.layer_map('every_other', 4, 12)
  with pytest.raises(ValueError, match='student_layers <= teacher_layers'):
    features.layer_map('uniform', 12, 4)
  with pytest.raises(ValueError, match='positive integer'):
    features.layer_map('uniform', 0, 4)
  for msg in (
    _error(lambda: features.layer_map('explicit', 4, 12, pairs=[(9, 9)])),
    _error(lambda: features.layer_map('bogus', 4, 12)),
  ):
    assert '\n' not in msg


def _error(fn):
  with pytest.raises(ValueError) as info:
    fn()
  return str(info.value)
