"""A tiny CNN and a 64-sentence batch stream for tests that drive kdjax.loop.train_stage
directly (reliability under failure, the weight average)."""

import numpy as np

from kdjax.data.pipeline import BatchIterator
from kdjax.models import registry

VOCAB = 40


def batches() -> BatchIterator:
  """8 batches of 8 random sentences (3 to 11 tokens) in one bucket of 16, shuffled."""
  rng = np.random.default_rng(0)
  ids = [rng.integers(4, VOCAB, rng.integers(3, 12)).astype(np.int32) for _ in range(64)]
  labels = rng.integers(0, 2, 64).astype(np.int32)
  return BatchIterator(ids, labels, 8, (16,), seed=0, shuffle=True, drop_remainder=True)


def cnn():
  return registry.build_model(
    'cnn',
    vocab_size=VOCAB,
    num_classes=2,
    embed_dim=16,
    num_filters=8,
    kernel_sizes=(3,),
    mlp_dim=16,
    dropout_rate=0.0,
  )
