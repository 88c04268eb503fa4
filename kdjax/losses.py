"""Task and distillation losses over logits, as (sum, count) pairs.

Every function takes `weights` with the leading shape of the logits without the class axis
([B] for sentence classification, [B, L] for token-level losses); a weight of 0 removes a
padded example or position. Returning (sum, count) instead of a mean lets the train loop add
metrics over steps and devices and divide once on the host, so averages stay exact when
batches hold different numbers of real examples.
"""

from typing import Mapping

import jax
import jax.numpy as jnp

Metric = tuple[jax.Array, jax.Array]


def _weighted(per_item: jax.Array, weights: jax.Array) -> Metric:
  weights = weights.astype(jnp.float32)
  return jnp.sum(per_item * weights), jnp.sum(weights)


def mean(metric: Metric) -> jax.Array:
  total, count = metric
  return total / jnp.maximum(count, 1.0)


def cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> Metric:
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
  return _weighted(nll, weights)


def soft_cross_entropy(
  student_logits: jax.Array, teacher_logits: jax.Array, temperature: float, weights: jax.Array
) -> Metric:
  """H(teacher_T, student_T) · T²: the KD objective up to the teacher's (constant) entropy."""
  t = jnp.asarray(temperature, jnp.float32)
  teacher_probs = jax.nn.softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
  student_log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
  per_item = -jnp.sum(teacher_probs * student_log_probs, axis=-1) * t**2
  return _weighted(per_item, weights)


def kl_teacher_student(
  student_logits: jax.Array, teacher_logits: jax.Array, temperature: float, weights: jax.Array
) -> Metric:
  """T² · KL(teacher_T ‖ student_T), Hinton et al. 2015 (forward KL, mean-seeking).

  The T² factor keeps the gradient magnitude of the soft term roughly independent of T,
  since d/dz of the tempered softmax scales as 1/T²; without it a change of T silently
  re-weights the soft term against the hard-label term.
  """
  t = jnp.asarray(temperature, jnp.float32)
  teacher_log_probs = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
  student_log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
  per_item = (
    jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1) * t**2
  )
  return _weighted(per_item, weights)


def kl_student_teacher(
  student_logits: jax.Array, teacher_logits: jax.Array, temperature: float, weights: jax.Array
) -> Metric:
  """T² · KL(student_T ‖ teacher_T): reverse (mode-seeking) KL."""
  return kl_teacher_student(teacher_logits, student_logits, temperature, weights)


def logit_mse(student_logits: jax.Array, teacher_logits: jax.Array, weights: jax.Array) -> Metric:
  """Mean over classes of the squared logit difference (Ba & Caruana 2014)."""
  diff = student_logits.astype(jnp.float32) - teacher_logits.astype(jnp.float32)
  return _weighted(jnp.mean(diff**2, axis=-1), weights)


def accuracy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> Metric:
  return _weighted((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32), weights)


def agreement(student_logits: jax.Array, teacher_logits: jax.Array, weights: jax.Array) -> Metric:
  """Fraction of items where student and teacher predict the same top-1 class."""
  same = jnp.argmax(student_logits, axis=-1) == jnp.argmax(teacher_logits, axis=-1)
  return _weighted(same.astype(jnp.float32), weights)


def distillation_loss(
  student_logits: jax.Array,
  teacher_logits: jax.Array,
  labels: jax.Array,
  weights: jax.Array,
  cfg: Mapping,
  label_weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, Metric]]:
  """hard_weight·CE + kd_weight·T²·KL(teacher_T ‖ student_T) + logit_mse_weight·MSE.

  `teacher_logits` are used as given: callers that freeze the teacher pass them through
  `jax.lax.stop_gradient`; the online stage lets gradients reach the teacher on purpose.
  `label_weights` (default: `weights`) restricts the label terms (CE, accuracy) to examples
  that have a gold label, e.g. when augmented, teacher-labelled inputs are mixed in.
  Returns the scalar to differentiate and every term as (sum, count), including KL at T = 1
  so runs with different temperatures can be compared on one scale.
  """
  label_weights = weights if label_weights is None else label_weights
  metrics = {
    'ce': cross_entropy(student_logits, labels, label_weights),
    'kl_T': kl_teacher_student(student_logits, teacher_logits, cfg['temperature'], weights),
    'kl_T1': kl_teacher_student(student_logits, teacher_logits, 1.0, weights),
    'logit_mse': logit_mse(student_logits, teacher_logits, weights),
    'accuracy': accuracy(student_logits, labels, label_weights),
    'agreement': agreement(student_logits, teacher_logits, weights),
  }
  loss = (
    cfg['hard_weight'] * mean(metrics['ce'])
    + cfg['kd_weight'] * mean(metrics['kl_T'])
    + cfg['logit_mse_weight'] * mean(metrics['logit_mse'])
  )
  count = jnp.sum(weights.astype(jnp.float32))
  metrics['loss'] = (loss * count, count)
  return loss, metrics


def supervised_loss(
  logits: jax.Array, labels: jax.Array, weights: jax.Array
) -> tuple[jax.Array, dict[str, Metric]]:
  metrics = {
    'ce': cross_entropy(logits, labels, weights),
    'accuracy': accuracy(logits, labels, weights),
  }
  loss = mean(metrics['ce'])
  metrics['loss'] = metrics['ce']
  return loss, metrics
