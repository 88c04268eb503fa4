"""Label losses and metrics over logits, as (sum, count) pairs.

The distillation terms (KL both ways, JSD, DKD, features, ...) live in `kdjax.kd`, and
`kdjax.kd.objective` combines them with these label terms.

Every function takes `weights` with the leading shape of the logits without the class axis
([B] for sentence classification, [B, L] for token-level losses); a weight of 0 removes a
padded example or position. Returning (sum, count) instead of a mean lets the train loop add
metrics over steps and devices and divide once on the host, so averages stay exact when
batches hold different numbers of real examples.
"""

import jax
import jax.numpy as jnp

Metric = tuple[jax.Array, jax.Array]


def weighted(per_item: jax.Array, weights: jax.Array) -> Metric:
  weights = weights.astype(jnp.float32)
  return jnp.sum(per_item * weights), jnp.sum(weights)


def mean(metric: Metric) -> jax.Array:
  total, count = metric
  return total / jnp.maximum(count, 1.0)


def cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> Metric:
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
  return weighted(nll, weights)


def accuracy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> Metric:
  return weighted((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32), weights)


def agreement(student_logits: jax.Array, teacher_logits: jax.Array, weights: jax.Array) -> Metric:
  """Fraction of items where student and teacher predict the same top-1 class."""
  same = jnp.argmax(student_logits, axis=-1) == jnp.argmax(teacher_logits, axis=-1)
  return weighted(same.astype(jnp.float32), weights)


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
