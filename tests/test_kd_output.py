"""Output-level distillation terms: independent NumPy references and properties."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import losses
from kdjax.kd import output

C = 5


# ---------------------------------------------------------------------------------------------
# Independent float64 NumPy references: one item (a [C] row) at a time, explicit formulas.


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def _log_softmax(x):
  x = x - x.max()
  return x - np.log(np.exp(x).sum())


def _kl(p, log_p, log_q):
  """Σ p (log p − log q), with 0·log 0 = 0 (as torch's F.kl_div)."""
  return sum(p[c] * (log_p[c] - log_q[c]) for c in range(len(p)) if p[c] > 0)


def _ref_forward_kl(s, t, y, temp):
  p, q = _softmax(t / temp), _softmax(s / temp)
  return temp**2 * sum(p[c] * math.log(p[c] / q[c]) for c in range(len(p)))


def _ref_reverse_kl(s, t, y, temp):
  p, q = _softmax(t / temp), _softmax(s / temp)
  return temp**2 * sum(q[c] * math.log(q[c] / p[c]) for c in range(len(p)))


def _ref_generalized_jsd(s, t, temp, beta):
  p, q = _softmax(t / temp), _softmax(s / temp)
  m = beta * p + (1 - beta) * q
  kl_pm = sum(p[c] * math.log(p[c] / m[c]) for c in range(len(p)))
  kl_qm = sum(q[c] * math.log(q[c] / m[c]) for c in range(len(p)))
  return temp**2 * (beta * kl_pm + (1 - beta) * kl_qm)


def _ref_soft_ce(s, t, y, temp):
  p, q = _softmax(t / temp), _softmax(s / temp)
  return -(temp**2) * sum(p[c] * math.log(q[c]) for c in range(len(p)))


def _ref_logit_mse(s, t, y, temp):
  return float(np.mean((s - t) ** 2))


def _ref_dkd(s, t, y, temp):
  """mdistiller's dkd_loss (mdistiller/distillers/DKD.py) for one row, returns (tckd, nckd)."""
  gt_mask = np.zeros_like(s)
  gt_mask[y] = 1.0
  other_mask = 1.0 - gt_mask
  pred_s, pred_t = _softmax(s / temp), _softmax(t / temp)
  bin_s = np.array([(pred_s * gt_mask).sum(), (pred_s * other_mask).sum()])  # cat_mask
  bin_t = np.array([(pred_t * gt_mask).sum(), (pred_t * other_mask).sum()])
  tckd = _kl(bin_t, np.log(bin_t), np.log(bin_s)) * temp**2
  pred_t2 = _softmax(t / temp - 1000.0 * gt_mask)
  log_pred_s2 = _log_softmax(s / temp - 1000.0 * gt_mask)
  with np.errstate(divide='ignore'):
    nckd = _kl(pred_t2, np.log(pred_t2), log_pred_s2) * temp**2
  return tckd, nckd


def _ref_label_smoothed_ce(z, y, eps):
  log_q = _log_softmax(z)
  return (1 - eps) * -log_q[y] + eps * sum(-log_q[c] for c in range(len(z))) / len(z)


def _ref_sum(per_item, weights, *arrays):
  """(Σ w·f(item), Σ w) over the items with nonzero weight (padding is never evaluated)."""
  arrays = [a.astype(np.float64) if a.dtype.kind == 'f' else a for a in arrays]
  total = 0.0
  for idx in np.ndindex(weights.shape):
    if weights[idx] != 0:
      total += weights[idx] * per_item(*(a[idx] for a in arrays))
  return np.array([total, weights.sum()])


# ---------------------------------------------------------------------------------------------
# Inputs: real items ~ N(0, 3²); padded items carry garbage logits (up to 1e4) and label -100.


def _batch(layout, seed=0):
  rng = np.random.RandomState(seed)
  if layout == 'examples':  # [B, C] with two padded examples
    shape = (6,)
    weights = np.array([1, 1, 1, 1, 0, 0], np.float32)
  else:  # token-level [B, L, C] with a [B, L] mask
    shape = (3, 4)
    weights = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], np.float32)
  s = (rng.randn(*shape, C) * 3).astype(np.float32)
  t = (rng.randn(*shape, C) * 3).astype(np.float32)
  y = rng.randint(0, C, size=shape).astype(np.int32)
  pad = weights == 0
  s[pad] = (rng.randn(int(pad.sum()), C) * 1e4).astype(np.float32)
  t[pad] = (rng.randn(int(pad.sum()), C) * 1e4).astype(np.float32)
  y[pad] = -100
  return s, t, y, weights


def _check(got, want):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)


def _terms(s, t, y, w, temp, mix=0.3, alpha=1.0, beta=8.0, eps=0.1):
  """Every term, from one compiled function: temperature and coefficients are traced (passed
  positionally, as float32), so each input shape compiles once whatever values tests pass."""
  coeffs = (np.float32(c) for c in (temp, mix, alpha, beta, eps))
  return _terms_jit(s, t, y, w, *coeffs)


@jax.jit
def _terms_jit(s, t, y, w, temp, mix, alpha, beta, eps):
  return {
    'forward_kl': output.forward_kl(s, t, temp, w),
    'reverse_kl': output.reverse_kl(s, t, temp, w),
    'generalized_jsd': output.generalized_jsd(s, t, temp, w, mix),
    'jsd': output.jsd(s, t, temp, w),
    'soft_cross_entropy': output.soft_cross_entropy(s, t, temp, w),
    'logit_mse': output.logit_mse(s, t, w),
    **output.dkd_terms(s, t, y, temp, w),
    'dkd': output.dkd(s, t, y, temp, w, alpha, beta),
    'label_smoothed_cross_entropy': output.label_smoothed_cross_entropy(s, y, w, eps),
  }


# The divergences (0 when student = teacher): every term but the two cross-entropies.
DIVERGENCES = (
  'forward_kl',
  'reverse_kl',
  'generalized_jsd',
  'jsd',
  'logit_mse',
  'tckd',
  'nckd',
  'dkd',
)
LAYOUTS = ['examples', 'tokens']
TEMPS = [1.0, 2.5]


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize(
  'name, ref',
  [
    pytest.param('forward_kl', _ref_forward_kl, id='forward_kl'),
    pytest.param('reverse_kl', _ref_reverse_kl, id='reverse_kl'),
    pytest.param('soft_cross_entropy', _ref_soft_ce, id='soft_cross_entropy'),
    pytest.param('logit_mse', _ref_logit_mse, id='logit_mse'),
  ],
)
def test_kl_soft_ce_and_mse_match_numpy(name, ref, layout):
  s, t, y, w = _batch(layout)
  for temp in TEMPS:
    got = _terms(s, t, y, w, temp)[name]
    _check(got, _ref_sum(lambda a, b, c: ref(a, b, c, temp), w, s, t, y))


@pytest.mark.parametrize('layout', LAYOUTS)
def test_generalized_jsd_and_jsd_match_numpy(layout):
  s, t, y, w = _batch(layout)
  for temp in TEMPS:
    for mix in (0.1, 0.5, 0.8):
      got = _terms(s, t, y, w, temp, mix=mix)
      _check(
        got['generalized_jsd'],
        _ref_sum(lambda a, b: _ref_generalized_jsd(a, b, temp, mix), w, s, t),
      )
    _check(got['jsd'], _ref_sum(lambda a, b: _ref_generalized_jsd(a, b, temp, 0.5), w, s, t))


@pytest.mark.parametrize('layout', LAYOUTS)
def test_dkd_matches_mdistiller_formula(layout):
  s, t, y, w = _batch(layout)
  for temp in (1.0, 4.0):
    for alpha, beta in ((1.0, 8.0), (0.5, 2.0)):
      got = _terms(s, t, y, w, temp, alpha=alpha, beta=beta)
      _check(got['tckd'], _ref_sum(lambda *a: _ref_dkd(*a, temp)[0], w, s, t, y))
      _check(got['nckd'], _ref_sum(lambda *a: _ref_dkd(*a, temp)[1], w, s, t, y))
      want = _ref_sum(lambda *a: np.dot([alpha, beta], _ref_dkd(*a, temp)), w, s, t, y)
      _check(got['dkd'], want)


@pytest.mark.parametrize('layout', LAYOUTS)
def test_label_smoothed_cross_entropy_matches_numpy_and_optax(layout):
  s, t, y, w = _batch(layout)
  real = w > 0
  clean_s = np.where(real[..., None], s, 0.0)  # optax sees no garbage (its items are ×0)
  for eps in (0.0, 0.1, 0.3):
    got = _terms(s, t, y, w, 1.0, eps=eps)['label_smoothed_cross_entropy']
    _check(got, _ref_sum(lambda z, label: _ref_label_smoothed_ce(z, label, eps), w, s, y))
    # optax on the real items only (optax has no notion of an invalid label).
    per_item = _optax_smoothed_ce(clean_s, np.where(real, y, 0), np.float32(eps))
    _check(got, [float(jnp.sum(per_item * w)), w.sum()])


@jax.jit
def _optax_smoothed_ce(logits, labels, eps):
  targets = optax.smooth_labels(jax.nn.one_hot(labels, C), eps)
  return optax.softmax_cross_entropy(logits, targets)


# ---------------------------------------------------------------------------------------------
# Properties.


@pytest.mark.parametrize('temp', [0.5, 1.0, 4.0, 20.0])
def test_self_distillation_gives_zero_for_every_divergence(temp):
  s, _, y, w = _batch('tokens')
  for mix in (0.2, 0.9):
    got = _terms(s, s, y, w, temp, mix=mix)
    for name in DIVERGENCES:
      total, count = got[name]
      assert abs(float(total)) < 1e-5, (name, mix)
      assert float(count) == w.sum(), name


def test_kl_direction():
  """forward_kl is KL(teacher ‖ student), reverse_kl the other way; they differ here."""
  student, teacher, y, _ = _batch('examples')  # row 0 (the only one weighted) is replaced
  teacher[0] = [4.0, 0.0, 0.0, -1.0, -1.0]
  student[0] = [1.0, 1.0, -2.0, 0.5, 0.0]
  w = np.eye(len(y), dtype=np.float32)[0]
  for temp in (1.0, 2.0):
    s0, t0 = student[0].astype(np.float64), teacher[0].astype(np.float64)
    forward = _ref_forward_kl(s0, t0, None, temp)
    reverse = _ref_reverse_kl(s0, t0, None, temp)
    assert abs(forward - reverse) > 0.05 * forward  # the directions really differ here
    got = _terms(student, teacher, y, w, temp)
    _check(got['forward_kl'][0], forward)
    _check(got['reverse_kl'][0], reverse)


def test_t_squared_keeps_gradient_scale_roughly_constant():
  """Without T² the soft-target gradient shrinks ~1/T²; with it, it stays within a small band."""
  rng = np.random.RandomState(7)
  s = jnp.asarray(rng.randn(32, 10).astype(np.float32))
  t = jnp.asarray(rng.randn(32, 10).astype(np.float32))
  w = jnp.ones(32)
  names = ('forward_kl', 'reverse_kl', 'jsd')

  @jax.jit
  def grad_norms(temp):
    return {
      name: jnp.linalg.norm(
        jax.grad(lambda x: losses.mean(getattr(output, name)(x, t, temp, w)))(s)
      )
      for name in names
    }

  temps = (2.0, 5.0, 10.0, 20.0)
  norms = [grad_norms(temp) for temp in temps]
  for name in names:
    scaled = [float(n[name]) for n in norms]
    unscaled = [g / temp**2 for g, temp in zip(scaled, temps)]  # the same loss without T²
    assert max(scaled) / min(scaled) < 1.5, name
    assert max(unscaled) / min(unscaled) > 50, name


def test_generalized_jsd_symmetric_under_swap_with_mix_flipped():
  s, t, y, w = _batch('tokens', seed=1)
  for temp in (1.0, 3.0):
    for mix in (0.1, 0.3, 0.5, 0.9):
      a = _terms(s, t, y, w, temp, mix=mix)['generalized_jsd']
      b = _terms(t, s, y, w, temp, mix=1.0 - mix)['generalized_jsd']
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_jsd_bounded_by_t_squared_log_2():
  s, t, y, _ = _batch('examples', seed=2)
  w = np.eye(len(y), dtype=np.float32)  # w[i] picks item i alone
  # Rows 0-2: near-disjoint supports push the JSD to its bound. Rows 3-5: random pairs,
  # N(0, 5²) and (rows 4, 5, the padding garbage) of magnitude ~1e4, stay below it.
  s, t = s * 5 / 3, t * 5 / 3
  t[:3] = [30.0, -30.0, -30.0, -30.0, -30.0]
  s[:3] = [-30.0, 30.0, -30.0, -30.0, -30.0]
  for temp in (1.0, 2.0):
    values = [float(_terms(s, t, y, w[i], temp)['jsd'][0]) for i in range(len(y))]
    bound = temp**2 * math.log(2)
    assert all(0.0 <= v <= bound * (1 + 1e-6) for v in values)
    assert values[0] > 0.999 * bound  # the bound is tight


def test_generalized_jsd_limits_relate_to_forward_and_reverse_kl():
  """teacher_mix → 0: ≈ teacher_mix · forward KL; → 1: ≈ (1 − teacher_mix) · reverse KL."""
  s, t, y, w = _batch('examples', seed=3)

  def at(mix):
    return {k: float(losses.mean(v)) for k, v in _terms(s, t, y, w, temp, mix=mix).items()}

  for temp in (1.0, 2.0):
    small, near_one = at(1e-4), at(1.0 - 1e-4)
    assert abs(at(0.0)['generalized_jsd']) < 1e-6 and abs(at(1.0)['generalized_jsd']) < 1e-6
    np.testing.assert_allclose(small['generalized_jsd'] / 1e-4, small['forward_kl'], rtol=2e-2)
    np.testing.assert_allclose(
      near_one['generalized_jsd'] / 1e-4, near_one['reverse_kl'], rtol=2e-2
    )
  # A traced mix at the ends keeps finite gradients (w.r.t. the mix and the logits).
  grads = jax.jit(jax.grad(lambda x, b: output.generalized_jsd(x, t, 2.0, w, b)[0], (0, 1)))
  for mix in (0.0, 1.0):
    g_s, g_mix = grads(jnp.asarray(s), jnp.float32(mix))
    assert np.isfinite(float(g_mix)) and np.all(np.isfinite(np.asarray(g_s)))


def test_dkd_with_unit_weights_decomposes_kl():
  """KL(p ‖ q) = TCKD + (1 − p_y)·NCKD per item (Zhao et al. 2022, Eq. 1); T² on every term."""
  s, t, y, w_all = _batch('examples', seed=4)
  n = s.shape[0]
  for temp in (1.0, 3.0):
    for i in np.flatnonzero(w_all):
      p_target = _softmax(t[i].astype(np.float64) / temp)[y[i]]
      got = _terms(s, t, y, np.eye(n, dtype=np.float32)[i], temp, alpha=1.0, beta=1.0)
      kl, tckd, nckd = (float(got[k][0]) for k in ('forward_kl', 'tckd', 'nckd'))
      np.testing.assert_allclose(kl, tckd + (1 - p_target) * nckd, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(float(got['dkd'][0]), tckd + nckd, rtol=1e-6, atol=1e-6)


def test_label_smoothing_zero_equals_cross_entropy():
  s, t, y, w = _batch('tokens', seed=5)
  got = _terms(s, t, y, w, 1.0, eps=0.0)['label_smoothed_cross_entropy']
  real = w > 0
  want = losses.cross_entropy(s[real], y[real], w[real])
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


@jax.jit
def _student_grad(s, t, y, w, temp):
  """Gradient w.r.t. the student logits of the sum of every term's total."""

  def total(x):
    return sum(v[0] for v in _terms_jit(x, t, y, w, temp, 0.3, 1.0, 8.0, 0.1).values())

  return jax.grad(total)(s)


def test_stable_for_huge_logits():
  s, t, y, w = _batch('tokens', seed=6)
  s, t = s * 1e4 / 3, t * 1e4 / 3  # real items now have logits of magnitude ~1e4 too
  for temp in (0.5, 1.0, 4.0):
    got = _terms(s, t, y, w, temp)
    for name, metric in got.items():
      assert np.all(np.isfinite(np.asarray(metric))), (name, temp)
    # Gradients too (a non-finite one in any term makes the sum's gradient non-finite).
    assert np.all(np.isfinite(np.asarray(_student_grad(s, t, y, w, temp)))), temp
    # The jsd bound still holds where the distributions are one-hot.
    assert float(losses.mean(got['jsd'])) <= temp**2 * math.log(2) * (1 + 1e-6)


def test_padding_does_not_change_any_term():
  s, t, y, w = _batch('tokens', seed=8)
  clean_s, clean_t, clean_y = s.copy(), t.copy(), y.copy()
  pad = w == 0
  clean_s[pad], clean_t[pad], clean_y[pad] = 0.0, 0.0, 0
  for temp in (1.0, 2.0):
    a = _terms(s, t, y, w, temp)
    b = _terms(clean_s, clean_t, clean_y, w, temp)
    for name in a:
      np.testing.assert_allclose(np.asarray(a[name]), np.asarray(b[name]), rtol=1e-6, err_msg=name)


def test_jit_with_traced_temperature_and_coefficients():
  """Coefficients arrive as traced scalars from per-step schedules: one trace, right values."""
  s, t, y, w = _batch('tokens', seed=9)

  def all_terms(s, t, y, w, temp, mix, alpha, beta, eps):
    return {
      'forward_kl': output.forward_kl(s, t, temp, w),
      'reverse_kl': output.reverse_kl(s, t, temp, w),
      'gjsd': output.generalized_jsd(s, t, temp, w, mix),
      'jsd': output.jsd(s, t, temp, w),
      'soft_ce': output.soft_cross_entropy(s, t, temp, w),
      'dkd': output.dkd(s, t, y, temp, w, alpha, beta),
      'smoothed_ce': output.label_smoothed_cross_entropy(s, y, w, eps),
    }

  jitted = jax.jit(all_terms)
  for temp, mix in ((1.5, 0.3), (4.0, 0.7)):
    coeffs = (jnp.float32(temp), jnp.float32(mix), jnp.float32(0.5), jnp.float32(2.0))
    got = jitted(s, t, y, w, *coeffs, jnp.float32(0.1))
    want = {
      'forward_kl': _ref_sum(lambda *a: _ref_forward_kl(*a, temp), w, s, t, y),
      'reverse_kl': _ref_sum(lambda *a: _ref_reverse_kl(*a, temp), w, s, t, y),
      'gjsd': _ref_sum(lambda a, b: _ref_generalized_jsd(a, b, temp, mix), w, s, t),
      'jsd': _ref_sum(lambda a, b: _ref_generalized_jsd(a, b, temp, 0.5), w, s, t),
      'soft_ce': _ref_sum(lambda *a: _ref_soft_ce(*a, temp), w, s, t, y),
      'dkd': _ref_sum(lambda *a: np.dot([0.5, 2.0], _ref_dkd(*a, temp)), w, s, t, y),
      'smoothed_ce': _ref_sum(lambda z, label: _ref_label_smoothed_ce(z, label, 0.1), w, s, y),
    }
    for name in want:
      np.testing.assert_allclose(
        np.asarray(got[name]), want[name], rtol=1e-5, atol=1e-5, err_msg=name
      )
  assert jitted._cache_size() == 1  # one trace serves every temperature


def test_bfloat16_inputs_are_computed_in_float32():
  s, t, y, w = _batch('tokens', seed=10)
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  want = _terms(s16.astype(jnp.float32), t16.astype(jnp.float32), y, w, 2.0)
  for name, (total, count) in _terms(s16, t16, y, w, 2.0).items():
    assert total.dtype == jnp.float32 and count.dtype == jnp.float32, name
    np.testing.assert_allclose(
      np.asarray((total, count)), np.asarray(want[name]), rtol=1e-6, err_msg=name
    )


def test_soft_cross_entropy_equals_kl_plus_teacher_entropy():
  s, t_ = (
    jnp.asarray(np.random.RandomState(5).randn(6, 4) * 3),
    jnp.asarray(np.random.RandomState(6).randn(6, 4) * 3),
  )
  w, temp = jnp.ones(6), 2.5
  p = np.stack([np.exp(_log_softmax(row)) for row in np.asarray(t_, np.float64) / temp])
  entropy = -(p * np.log(p)).sum() * temp**2
  ce = float(output.soft_cross_entropy(s, t_, temp, w)[0])
  kl = float(output.forward_kl(s, t_, temp, w)[0])
  np.testing.assert_allclose(ce, kl + entropy, rtol=1e-5)
