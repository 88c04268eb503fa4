"""Bidirectional-LSTM classifier (Tang et al. 2019 style student)."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kdjax.compress import lowrank

Array = Any


def masked_max_pool(x: Array, attention_mask: Array) -> Array:
  """Max over time of [B, L, D] ignoring padded steps; an all-padding row pools to 0."""
  keep = attention_mask[:, :, None] > 0
  pooled = jnp.max(jnp.where(keep, x, -jnp.inf), axis=1)
  return jnp.where(jnp.any(keep, axis=1), pooled, 0.0)


class BiLSTMClassifier(nn.Module):
  """embedding -> num_layers x BiLSTM -> masked max-pool -> dropout -> Dense relu -> logits.

  Assumes right padding (real tokens form a prefix), so the per-row sequence length
  is `attention_mask.sum(-1)`; the LSTMs stop / start there, so padding never reaches
  real positions, and padded hidden steps are zeroed in `out`.
  """

  vocab_size: int
  embed_dim: int
  hidden_size: int
  mlp_dim: int
  num_layers: int = 1
  num_classes: int = 2
  dropout_rate: float = 0.1
  # ((layer path, rank), ...): these Dense layers ('mlp', 'classifier') built as LowRankDense.
  low_rank: lowrank.LowRank = ()

  @nn.compact
  def __call__(self, input_ids, attention_mask, deterministic: bool = True):
    seq_lengths = attention_mask.sum(axis=-1).astype(jnp.int32)
    keep = (attention_mask > 0)[:, :, None]
    x = nn.Embed(self.vocab_size, self.embed_dim, name='embedding')(input_ids)
    out = {'embeddings': x}
    for i in range(self.num_layers):
      # parent=None lets each RNN adopt its cell, so params nest as lstm_{i}_*/cell/...
      cell = lambda: nn.OptimizedLSTMCell(self.hidden_size, parent=None)
      forward = nn.RNN(cell(), name=f'lstm_{i}_forward')
      # keep_order=True returns outputs aligned with the input positions; with
      # seq_lengths the reversal is per row, so it starts at each row's last real token.
      backward = nn.RNN(cell(), reverse=True, keep_order=True, name=f'lstm_{i}_backward')
      x = jnp.concatenate(
        [forward(x, seq_lengths=seq_lengths), backward(x, seq_lengths=seq_lengths)], axis=-1
      )
      x = jnp.where(keep, x, 0.0)  # steps past the length hold stale carries
      out[f'hidden_{i + 1}'] = x
    pooled = masked_max_pool(x, attention_mask)
    out['pooled'] = pooled
    h = nn.Dropout(self.dropout_rate)(pooled, deterministic=deterministic)
    h = nn.relu(lowrank.dense(self.mlp_dim, 'mlp', self.low_rank)(h))
    logits = lowrank.dense(self.num_classes, 'classifier', self.low_rank)(h)
    return logits, out
