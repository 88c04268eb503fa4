"""A tiny BERT classifier's kwargs and a padded batch for it, shared by the tests that compare
two ways of computing the same model (fused attention, scanned layers)."""

import jax.numpy as jnp
import numpy as np

TINY = dict(
  vocab_size=50,
  hidden_size=32,
  num_layers=2,
  num_heads=4,
  intermediate_size=64,
  max_len=16,
  num_classes=3,
)


def padded_batch():
  lengths = np.array([16, 9, 4, 12])  # padding in every row but the first
  mask = (np.arange(16)[None, :] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask > 0, np.random.RandomState(0).randint(1, 50, size=(4, 16)), 0)
  return {
    'input_ids': jnp.asarray(ids, jnp.int32),
    'attention_mask': jnp.asarray(mask),
    'labels': jnp.asarray([0, 1, 2, 1]),
    'weights': jnp.ones(4, jnp.float32),
  }
