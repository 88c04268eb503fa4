"""Label losses and metrics against NumPy; the KD terms are tested in test_kd_output.py."""

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import losses


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _logits(seed, shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape) * 3.0


def test_cross_entropy_and_accuracy_against_numpy():
  logits = np.asarray(_logits(9, (10, 3)))
  labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0], np.int32)
  w = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0, 0], np.float32)
  nll = -_np_log_softmax(logits)[np.arange(10), labels]
  got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(w))
  np.testing.assert_allclose(np.asarray(got), [(nll * w).sum(), 7.0], rtol=1e-5)
  acc = losses.accuracy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(w))
  np.testing.assert_allclose(np.asarray(acc), [((logits.argmax(-1) == labels) * w).sum(), 7.0])
