"""Kim (2014) convolutional sentence classifier."""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from kdjax.compress import lowrank


class CNNClassifier(nn.Module):
  """embedding -> parallel 1-D convs (SAME, relu) -> masked max-pool each -> concat
  -> dropout -> Dense relu -> logits."""

  vocab_size: int
  embed_dim: int
  num_filters: int
  mlp_dim: int
  kernel_sizes: Sequence[int] = (3, 4, 5)
  num_classes: int = 2
  dropout_rate: float = 0.1
  # ((layer path, rank), ...): these Dense layers ('mlp', 'classifier') built as LowRankDense.
  low_rank: lowrank.LowRank = ()

  @nn.compact
  def __call__(self, input_ids, attention_mask, deterministic: bool = True):
    keep = (attention_mask > 0)[:, :, None]
    x = nn.Embed(self.vocab_size, self.embed_dim, name='embedding')(input_ids)
    out = {'embeddings': x}
    # Zeroing padded embeddings makes trailing padding look exactly like the convs'
    # own SAME zero-padding, so real positions see the same inputs however much
    # padding follows.
    x = jnp.where(keep, x, 0.0)
    pooled_per_conv = []
    for i, width in enumerate(self.kernel_sizes):
      h = nn.relu(
        nn.Conv(self.num_filters, kernel_size=(width,), padding='SAME', name=f'conv_{i}')(x)
      )
      # relu output is >= 0, so zeroing padded steps cannot raise the max-pool.
      h = jnp.where(keep, h, 0.0)
      out[f'hidden_{i + 1}'] = h
      pooled_per_conv.append(jnp.max(h, axis=1))
    pooled = jnp.concatenate(pooled_per_conv, axis=-1)
    out['pooled'] = pooled
    h = nn.Dropout(self.dropout_rate)(pooled, deterministic=deterministic)
    h = nn.relu(lowrank.dense(self.mlp_dim, 'mlp', self.low_rank)(h))
    logits = lowrank.dense(self.num_classes, 'classifier', self.low_rank)(h)
    return logits, out
