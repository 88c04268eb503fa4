"""Loss properties, and agreement with an independent NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_kl_teacher_student(student, teacher, t, weights):
  p = np.exp(_np_log_softmax(teacher / t))
  kl = (p * (_np_log_softmax(teacher / t) - _np_log_softmax(student / t))).sum(-1) * t * t
  return (kl * weights).sum(), weights.sum()


def _logits(seed, shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape) * 3.0


@pytest.mark.parametrize('t', [0.5, 1.0, 2.0, 20.0])
def test_self_distillation_gives_zero_kl_at_any_temperature(t):
  logits = _logits(0, (8, 5))
  total, count = losses.kl_teacher_student(logits, logits, t, jnp.ones(8))
  assert abs(float(total)) < 1e-5 and float(count) == 8


def test_kl_matches_numpy_reference_with_padding():
  s, t_ = np.asarray(_logits(1, (4, 6, 7))), np.asarray(_logits(2, (4, 6, 7)))
  weights = np.array([[1, 1, 1, 0, 0, 0]] * 3 + [[1] * 6], np.float32)
  for temp in (1.0, 3.0):
    got = losses.kl_teacher_student(jnp.asarray(s), jnp.asarray(t_), temp, jnp.asarray(weights))
    want = _np_kl_teacher_student(s, t_, temp, weights)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_padded_positions_do_not_change_the_loss():
  s, t_ = _logits(3, (2, 5, 4)), _logits(4, (2, 5, 4))
  weights = jnp.array([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], jnp.float32)
  garbage = jnp.where(weights[..., None] > 0, s, 1e4)  # huge logits on padding only
  for fn in (
    lambda a: losses.kl_teacher_student(a, t_, 2.0, weights),
    lambda a: losses.logit_mse(a, t_, weights),
    lambda a: losses.soft_cross_entropy(a, t_, 2.0, weights),
  ):
    np.testing.assert_allclose(np.asarray(fn(s)), np.asarray(fn(garbage)), rtol=1e-6)


def test_kl_direction():
  """KL(teacher ‖ student) is the forward KL; swapping arguments gives the reverse one."""
  teacher = jnp.array([[4.0, 0.0, 0.0]])
  student = jnp.array([[1.0, 1.0, -2.0]])
  w = jnp.ones(1)
  p = np.exp(_np_log_softmax(np.asarray(teacher)))
  q = np.exp(_np_log_softmax(np.asarray(student)))
  forward = float(np.sum(p * np.log(p / q)))
  reverse = float(np.sum(q * np.log(q / p)))
  assert abs(forward - reverse) > 0.1  # the two directions really differ here
  np.testing.assert_allclose(
    float(losses.kl_teacher_student(student, teacher, 1.0, w)[0]), forward, rtol=1e-5
  )
  np.testing.assert_allclose(
    float(losses.kl_student_teacher(student, teacher, 1.0, w)[0]), reverse, rtol=1e-5
  )


def test_soft_cross_entropy_equals_kl_plus_teacher_entropy():
  s, t_ = _logits(5, (6, 4)), _logits(6, (6, 4))
  w, temp = jnp.ones(6), 2.5
  p = np.exp(_np_log_softmax(np.asarray(t_) / temp))
  entropy = -(p * np.log(p)).sum() * temp**2
  ce = float(losses.soft_cross_entropy(s, t_, temp, w)[0])
  kl = float(losses.kl_teacher_student(s, t_, temp, w)[0])
  np.testing.assert_allclose(ce, kl + entropy, rtol=1e-5)


def test_t_squared_keeps_gradient_scale_roughly_constant():
  """Without T² the soft-target gradient shrinks ~1/T²; with it, it stays within a small band."""
  s, t_ = _logits(7, (64, 10)) * 0.3, _logits(8, (64, 10)) * 0.3
  w = jnp.ones(64)

  def grad_norm(temp, scaled):
    def f(x):
      total, count = losses.kl_teacher_student(x, t_, temp, w)
      return total / count / (1.0 if scaled else temp**2)

    return float(jnp.linalg.norm(jax.grad(f)(s)))

  scaled = [grad_norm(t, True) for t in (2.0, 5.0, 10.0, 20.0)]
  unscaled = [grad_norm(t, False) for t in (2.0, 5.0, 10.0, 20.0)]
  assert max(scaled) / min(scaled) < 1.5
  assert max(unscaled) / min(unscaled) > 50


def test_cross_entropy_and_accuracy_against_numpy():
  logits = np.asarray(_logits(9, (10, 3)))
  labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0], np.int32)
  w = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0, 0], np.float32)
  nll = -_np_log_softmax(logits)[np.arange(10), labels]
  got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(w))
  np.testing.assert_allclose(np.asarray(got), [(nll * w).sum(), 7.0], rtol=1e-5)
  acc = losses.accuracy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(w))
  np.testing.assert_allclose(np.asarray(acc), [((logits.argmax(-1) == labels) * w).sum(), 7.0])


def test_distillation_loss_mixes_terms_by_weight():
  s, t_ = _logits(10, (8, 2)), _logits(11, (8, 2))
  labels, w = jnp.array([0, 1] * 4), jnp.ones(8)
  cfg = {'temperature': 3.0, 'hard_weight': 0.25, 'kd_weight': 0.75, 'logit_mse_weight': 0.1}
  loss, metrics = losses.distillation_loss(s, t_, labels, w, cfg)
  want = (
    0.25 * losses.mean(losses.cross_entropy(s, labels, w))
    + 0.75 * losses.mean(losses.kl_teacher_student(s, t_, 3.0, w))
    + 0.1 * losses.mean(losses.logit_mse(s, t_, w))
  )
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
  assert set(metrics) >= {'ce', 'kl_T', 'kl_T1', 'logit_mse', 'agreement', 'loss'}
  np.testing.assert_allclose(float(losses.mean(metrics['loss'])), float(loss), rtol=1e-6)
