"""Sentence embeddings from a BERT encoder: pooling, the distillation loss, STS evaluation.

A sentence embedding is the attention-masked mean of the encoder's last hidden states (as
all-MiniLM-L6-v2 computes it), optionally mapped by a learned linear projection to another
width (a narrower student matching a wider teacher). Similarity is the cosine, so the final
L2 normalisation of sentence-transformers changes no score and is left to the consumer.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.data import pipeline
from kdjax.models.bert import BertEncoder, mean_pool

Array = Any
_EPS = 1e-12


def l2_normalize(x: Array) -> Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _EPS)


class SentenceEncoder(nn.Module):
  """`encoder` + masked mean pooling (+ a linear map to `projection_size` if it is > 0)."""

  encoder: BertEncoder
  projection_size: int = 0

  @nn.compact
  def __call__(self, input_ids, attention_mask, deterministic: bool = True):
    hidden, _ = self.encoder(input_ids, attention_mask, deterministic=deterministic)
    pooled = mean_pool(hidden.astype(jnp.float32), attention_mask)
    if self.projection_size:
      pooled = nn.Dense(self.projection_size, name='projection')(pooled)
    return pooled


def embedding_loss(
  student: Array,
  teacher: Array,
  weights: Array,
  mse_weight: float,
  cosine_weight: float,
  normalize: bool,
) -> tuple[Array, dict]:
  """mse_weight·MSE + cosine_weight·(1 − cos) between [B, D] embeddings, averaged over rows
  with weight > 0 (filler rows of a padded batch weigh 0).

  MSE is the mean over dimensions of the squared difference, after L2-normalising both sides
  if `normalize`. Metrics are (sum, count) pairs so they add up exactly over steps; 'accuracy'
  is in-batch retrieval: how often a student embedding's nearest (cosine) teacher embedding
  in the batch is its own sentence's.
  """
  student = student.astype(jnp.float32)
  teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
  s_unit, t_unit = l2_normalize(student), l2_normalize(teacher)
  if normalize:
    student, teacher = s_unit, t_unit
  mse = jnp.mean(jnp.square(student - teacher), axis=-1)
  cosine = jnp.sum(s_unit * t_unit, axis=-1)
  per_example = mse_weight * mse + cosine_weight * (1.0 - cosine)
  count = jnp.sum(weights)
  total = jnp.sum(weights * per_example)
  loss = total / jnp.maximum(count, 1.0)
  similarity = s_unit @ t_unit.T
  # Filler rows copy a real row; mask them as candidates so they cannot steal a match.
  candidates = jnp.where(weights[None, :] > 0, similarity, -jnp.inf)
  hit = (jnp.argmax(candidates, axis=-1) == jnp.arange(student.shape[0])).astype(jnp.float32)
  metrics = {
    'loss': (total, count),
    'mse': (jnp.sum(weights * mse), count),
    'cosine': (jnp.sum(weights * cosine), count),
    'accuracy': (jnp.sum(weights * hit), count),
  }
  return loss, metrics


# -- evaluation ------------------------------------------------------------------------


def average_ranks(values: Sequence[float]) -> np.ndarray:
  """1-based ranks; tied values share the mean of the ranks they span (as scipy's rankdata)."""
  values = np.asarray(values, np.float64)
  order = np.argsort(values, kind='stable')
  ordered = values[order]
  starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
  sizes = np.diff(np.r_[starts, len(values)])
  group_rank = starts + (sizes + 1) / 2.0  # mean of ranks starts+1 .. starts+size
  ranks = np.empty(len(values), np.float64)
  ranks[order] = np.repeat(group_rank, sizes)
  return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman's rho: Pearson correlation of the average ranks (NaN if either is constant)."""
  if len(x) != len(y) or len(x) < 2:
    raise ValueError(
      f'spearman needs two equally long sequences of >= 2 values, got {len(x)}, {len(y)}'
    )
  rx, ry = average_ranks(x), average_ranks(y)
  rx, ry = rx - rx.mean(), ry - ry.mean()
  denominator = np.sqrt((rx * rx).sum() * (ry * ry).sum())
  return float((rx * ry).sum() / denominator) if denominator > 0 else float('nan')


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), _EPS)
  b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), _EPS)
  return np.sum(a * b, axis=-1)


def make_embed_fn(model: SentenceEncoder) -> Callable:
  """Jitted inference-mode embeddings (one compile per padded batch shape)."""

  @jax.jit
  def embed(params, input_ids, attention_mask):
    return model.apply({'params': params}, input_ids, attention_mask, deterministic=True)

  return embed


def embed_all(
  embed_fn: Callable,
  params,
  token_ids: list[np.ndarray],
  batch_size: int,
  buckets: tuple[int, ...],
  label: str = '',
  progress_every: int = 0,
) -> np.ndarray:
  """[N, D] float32 embeddings of every sequence, in input order.

  Batches run in length order so each is padded to the smallest bucket that fits (little
  padding, few shapes); the last one is filled to full size with copies, whose outputs are
  dropped.
  """
  n = len(token_ids)
  batcher = pipeline.BatchIterator(
    token_ids, np.zeros(n, np.int32), batch_size, buckets, 0, shuffle=False, drop_remainder=False
  )
  lengths = np.array([min(len(t), buckets[-1]) for t in token_ids])
  order = np.argsort(lengths, kind='stable')
  out, done, start = None, 0, time.perf_counter()
  for i, first in enumerate(range(0, n, batch_size)):
    indices = order[first : first + batch_size]
    batch = batcher.make_batch(indices)
    values = np.asarray(embed_fn(params, batch['input_ids'], batch['attention_mask']))
    if out is None:
      out = np.zeros((n, values.shape[-1]), np.float32)
    out[indices] = values[: len(indices)]
    done += len(indices)
    if progress_every and ((i + 1) % progress_every == 0 or done == n):
      rate = done / max(time.perf_counter() - start, 1e-9)
      print(
        f'[{label}] embedded {done}/{n} sentences, {rate:.0f}/s, eta {(n - done) / rate:.0f}s',
        flush=True,
      )
  return out


def sts_spearman(
  embed_fn: Callable, params, tokenizer, pairs, max_len: int, buckets, batch_size: int
) -> float:
  """Spearman correlation between cos(emb(s1), emb(s2)) and the gold scores of `pairs`."""
  ids = pipeline.encode(pairs.sentences1 + pairs.sentences2, tokenizer, max_len)
  embeddings = embed_all(embed_fn, params, ids, batch_size, tuple(buckets))
  n = len(pairs)
  return spearman(cosine_rows(embeddings[:n], embeddings[n:]), pairs.scores)
