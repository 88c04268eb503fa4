"""Self-attention relation distillation: MiniLM (Wang et al. 2020) and MiniLMv2 (Wang et al. 2021).

A relation of a projection x [B, L, D] (queries, keys or values of one layer, before the head
split) is computed per relation head: x is cut into R contiguous slices x_r of width d_r = D / R
and

  rel_r = softmax(x_r x_rᵀ / √d_r)      over keys, [B, R, L, L]

with padded keys masked out. The student mimics the teacher's relations with

  KL(rel_teacher ‖ rel_student)         per relation head and query row,

averaged over relation heads and over real query positions. Because only L × L matrices are
compared, the student and the teacher may have different widths, and (MiniLMv2) even different
numbers of attention heads: both are re-split into the same number R of relation heads.

  MiniLM   (Wang et al., "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression
           of Pre-Trained Transformers", NeurIPS 2020): attention distributions (computed
           elsewhere from out['attn_i']) plus the value-relation term, both on the last layer,
           with R = the models' attention-head count (which must match).
  MiniLMv2 (Wang et al., "MiniLMv2: Multi-Head Self-Attention Relation Distillation for
           Compressing Pretrained Transformers", Findings of ACL 2021): Q-Q, K-K and V-V
           relations with a free number of relation heads; for large teachers an upper-middle
           teacher layer works better than the last one (the layer choice is the caller's).

Teacher outputs are used as given: callers that freeze the teacher pass them through
`jax.lax.stop_gradient`. `mask` is the [B, L] attention mask already multiplied by the example
weights: keys with mask > 0 take part in the softmax, and each query row is weighted by its mask
value. Padded positions may hold any finite or non-finite values: they are zeroed before use, so
neither the loss nor its gradient depends on them.
"""

import math
from typing import Mapping

import jax
import jax.numpy as jnp

from kdjax.losses import Metric, weighted

# Added to the scores of padded keys: exp() of it underflows to exactly 0 in float32, and it
# stays finite so no inf - inf = NaN can arise in a later difference of log-probabilities.
MASK_BIAS = -1e9


def _split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """[B, L, D] -> [B, R, L, D / R]: contiguous slices, the same split as multi-head attention."""
  batch, seq_len, width = x.shape
  if width % num_heads:
    raise ValueError(f'width D={width} is not divisible by num_heads={num_heads} (relation heads)')
  return x.reshape(batch, seq_len, num_heads, width // num_heads).transpose(0, 2, 1, 3)


def relation_matrix(x: jax.Array, num_heads: int, attention_mask: jax.Array) -> jax.Array:
  """log softmax(x_r x_rᵀ / √d_r) over keys, [B, R, L, L] float32.

  x [B, L, D] is split into R = `num_heads` relation heads of width d_r = D / R (ValueError if
  D is not divisible). Padded keys (attention_mask == 0) get probability exactly 0: their
  log-probability is about MASK_BIAS (-1e9), large, negative and finite. Rows of padded queries
  are well defined (uniform over the real keys) but meaningless; weight them out.
  """
  keep = attention_mask > 0  # [B, L]
  x = jnp.where(keep[:, :, None], x.astype(jnp.float32), 0.0)
  heads = _split_heads(x, num_heads)
  scores = jnp.einsum('brqd,brkd->brqk', heads, heads) / math.sqrt(heads.shape[-1])
  scores = jnp.where(keep[:, None, None, :], scores, MASK_BIAS)
  return jax.nn.log_softmax(scores, axis=-1)


def relation_kl(
  student_x: jax.Array, teacher_x: jax.Array, num_heads: int, mask: jax.Array
) -> Metric:
  """KL(rel_teacher ‖ rel_student), mean over relation heads, weighted by the query mask.

  per query q:  (1/R) Σ_r Σ_k p_t[r, q, k] · (log p_t[r, q, k] − log p_s[r, q, k]),
  p = softmax(x_r x_rᵀ / √d_r) with padded keys removed. The widths of `student_x` [B, L, Ds]
  and `teacher_x` [B, L, Dt] may differ; each is split into `num_heads` relation heads.
  Returns (Σ_q mask_q · KL_q, Σ_q mask_q).
  """
  keep = (mask > 0)[:, None, None, :]  # [B, 1, 1, L]: padded keys contribute exactly 0
  log_p_s = relation_matrix(student_x, num_heads, mask)
  log_p_t = relation_matrix(teacher_x, num_heads, mask)
  terms = jnp.where(keep, jnp.exp(log_p_t) * (log_p_t - log_p_s), 0.0)
  per_query = jnp.mean(jnp.sum(terms, axis=-1), axis=1)  # [B, L]
  return weighted(per_query, mask)


def minilm_value_relation(
  student_out: Mapping[str, jax.Array],
  teacher_out: Mapping[str, jax.Array],
  student_layer: int,
  teacher_layer: int,
  num_heads: int,
  mask: jax.Array,
) -> Metric:
  """MiniLM's value-relation term: relation_kl on out[f'value_{layer}'] (Wang et al. 2020).

  L_VR = (1/(A·|x|)) Σ_a Σ_q KL(softmax(V_a^T V_a^Tᵀ/√d_k) ‖ softmax(V_a^S V_a^Sᵀ/√d'_k)),
  with A = `num_heads` the attention-head count that MiniLM v1 requires the student and the
  teacher to share (MiniLM uses the last layer of each). The attention-distribution term
  is computed elsewhere from out['attn_i'].
  """
  return relation_kl(
    student_out[f'value_{student_layer}'], teacher_out[f'value_{teacher_layer}'], num_heads, mask
  )


def minilmv2_relations(
  student_out: Mapping[str, jax.Array],
  teacher_out: Mapping[str, jax.Array],
  student_layer: int,
  teacher_layer: int,
  relation_heads: int,
  mask: jax.Array,
) -> dict[str, Metric]:
  """MiniLMv2's Q-Q, K-K and V-V self-attention relations (Wang et al. 2021).

  {'query': relation_kl(Q_s, Q_t), 'key': relation_kl(K_s, K_t), 'value': relation_kl(V_s, V_t)}
  on out[f'{name}_{layer}'], each with `relation_heads` relation heads (MiniLMv2 uses 48 for
  base-size and 64 for large-size teachers). The paper sums the three terms with equal weight.
  """
  return {
    name: relation_kl(
      student_out[f'{name}_{student_layer}'],
      teacher_out[f'{name}_{teacher_layer}'],
      relation_heads,
      mask,
    )
    for name in ('query', 'key', 'value')
  }
