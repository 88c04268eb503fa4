"""Several models at once: a mixture of teachers as one soft target, and deep mutual learning.

`mixture_logits` turns K teachers into one target the single-teacher objective can use:
pseudo-logits whose tempered softmax is the weighted mixture of the teachers' tempered
softmaxes. `mutual_learning` is the loss of Zhang et al. (2018), "Deep Mutual Learning":
every student fits the labels and, with its peers' outputs held fixed, their predictions.
"""

from typing import Sequence

import jax
import jax.numpy as jnp

from kdjax import losses
from kdjax.kd import output

Scalar = float | jax.Array


def mixture_logits(logits: jax.Array, weights: Sequence[float], temperature: Scalar) -> jax.Array:
  """T·log Σ_k w_k softmax(z_k / T) for logits [B, K, C] and weights summing to 1 -> [B, C].

  softmax(result / T) is exactly the mixture Σ_k w_k softmax(z_k / T), so every term that
  only reads the teacher's tempered distribution (KL, JSD, soft CE, DKD) sees the mixture.
  The result depends on T: it must be recomputed at the temperature the objective uses.
  """
  t = jnp.asarray(temperature, jnp.float32)
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32) / t, axis=-1)
  w = jnp.broadcast_to(jnp.asarray(weights, jnp.float32).reshape(1, -1, 1), log_p.shape)
  # b= scales inside the log-sum-exp, so a zero weight drops a teacher without log(0).
  return t * jax.nn.logsumexp(log_p, axis=1, b=w)


def mutual_kd(logits: Sequence[jax.Array], i: int, temperature: Scalar, weights) -> losses.Metric:
  """mean_{j≠i} T²·KL(p_j^T ‖ p_i^T) as (sum, count), each peer p_j stop-gradiented so the
  term only moves student i (its peers learn from it through their own terms)."""
  parts = [
    output.forward_kl(logits[i], jax.lax.stop_gradient(logits[j]), temperature, weights)
    for j in range(len(logits))
    if j != i
  ]
  return sum(p[0] for p in parts) / len(parts), parts[0][1]


def mutual_learning(
  logits: Sequence[jax.Array],
  labels: jax.Array,
  weights: jax.Array,
  temperature: Scalar,
  kd_weight: float,
) -> tuple[jax.Array, dict[str, losses.Metric]]:
  """Σ_i [CE_i + kd_weight · mutual_kd_i] over n >= 2 students' logits [B, C] each.

  The sum (not the mean) is differentiated: each student's parameters only receive the
  gradient of its own loss, as if it were trained alone against its peers. CE is plain, as
  in the student_alone baseline the students are compared with. Metrics are per
  student (`student_<i>/...`) plus their means under the usual names.
  """
  n = len(logits)
  metrics: dict[str, losses.Metric] = {}
  total = jnp.zeros((), jnp.float32)
  for i, z in enumerate(logits):
    ce = losses.cross_entropy(z, labels, weights)
    kd = mutual_kd(logits, i, temperature, weights)
    loss = losses.mean(ce) + kd_weight * losses.mean(kd)
    total = total + loss
    count = ce[1]
    metrics[f'student_{i}/ce'] = ce
    metrics[f'student_{i}/kl_T'] = kd
    metrics[f'student_{i}/accuracy'] = losses.accuracy(z, labels, weights)
    metrics[f'student_{i}/loss'] = (loss * count, count)
  for name in ('ce', 'kl_T', 'accuracy'):
    parts = [metrics[f'student_{i}/{name}'] for i in range(n)]
    metrics[name] = (sum(p[0] for p in parts) / n, parts[0][1])
  count = metrics['ce'][1]
  metrics['loss'] = (total * count, count)
  return total, metrics
