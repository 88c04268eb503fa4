"""Label losses and metrics over logits, as (sum, count) pairs.

The distillation terms (KL both ways, JSD, DKD, features, ...) live in `kdjax.kd`, and
`kdjax.kd.objective` combines them with these label terms.

Every function takes `weights` with the leading shape of the logits without the class axis
([B] for sentence classification, [B, L] for token-level losses); a weight of 0 removes a
padded example or position. Returning (sum, count) instead of a mean lets the train loop add
metrics over steps and devices and divide once on the host, so averages stay exact when
batches hold different numbers of real examples.
"""

import contextlib

import jax
import jax.numpy as jnp

Metric = tuple[jax.Array, jax.Array]


def weighted(per_item: jax.Array, weights: jax.Array) -> Metric:
  weights = weights.astype(jnp.float32)
  return jnp.sum(per_item * weights), jnp.sum(weights)


# The named axis of a data-parallel per-device step (pmap / shard_map) while it is traced.
_data_axis: str | None = None


@contextlib.contextmanager
def data_axis(name: str):
  """Inside, `mean` divides the local sum by the count summed over the devices of `name`:
  each device's loss is its share of the global mean, so summing gradients over devices
  gives the gradient of the global mean exactly, however the examples or tokens are split."""
  global _data_axis
  previous, _data_axis = _data_axis, name
  try:
    yield
  finally:
    _data_axis = previous


def mean(metric: Metric) -> jax.Array:
  total, count = metric
  if _data_axis is not None:
    count = jax.lax.psum(count, _data_axis)
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
