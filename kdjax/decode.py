"""Batched, jitted decoding for `Seq2SeqTransformer`: greedy, beam search and sampling.

All decoders run the cached `decode_step` inside `lax.while_loop` and stop as soon as every
row is finished. Outputs use one layout: tokens [B, max_len] int32 exclude BOS, include EOS
and hold `pad_id` after it; lengths [B] count tokens up to and including EOS (max_len when a
row never emitted EOS). The model distribution is used as is (pad/BOS are not masked), so
lengths, not pad ids, say where a row ends.

Each decoder is built once per (model, static arguments) by an `lru_cache`d builder and
wrapped in `jax.jit`, so repeated calls with the same shapes neither rebuild nor retrace.
"""

import functools
from typing import Any, Tuple

import jax
import jax.numpy as jnp

Array = Any
# Log-probability of impossible hypotheses; finite so sums and divisions never make NaNs.
NEG_INF = -1.0e9


def _check_max_len(model, max_len: int) -> None:
  if not 1 <= max_len <= model.max_len:
    raise ValueError(f'max_len={max_len} must be in [1, model.max_len={model.max_len}]')


def gnmt_length_penalty(length: Array, alpha: float) -> Array:
  """GNMT length normaliser ((5 + length) / 6) ** alpha; scores are log-prob / penalty."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _start(model, params, src_ids, src_mask, max_len: int):
  """Encodes the source once and builds the cache for max_len decode positions."""
  variables = {'params': params}
  memory = model.apply(variables, src_ids, src_mask, method='encode')
  return model.apply(variables, memory, src_mask, max_len, method='init_cache')


def _step(model, params, cache, src_mask, tokens, position):
  return model.apply({'params': params}, cache, src_mask, tokens, position, method='decode_step')


def _finish_positions(tokens: Array, finished: Array, eos_id: int, pad_id: int):
  """Pads tokens of rows that already finished; returns (tokens, now_finished)."""
  tokens = jnp.where(finished, pad_id, tokens)
  return tokens, finished | (tokens == eos_id)


@functools.lru_cache(maxsize=64)
def _build_greedy(model, bos_id: int, eos_id: int, pad_id: int, max_len: int):
  def run(params, src_ids, src_mask):
    batch = src_ids.shape[0]

    def cond(state):
      position, _, _, _, finished, _ = state
      return (position < max_len) & ~jnp.all(finished)

    def body(state):
      position, last, cache, tokens, finished, lengths = state
      logits, cache = _step(model, params, cache, src_mask, last, position)
      chosen, now_finished = _finish_positions(
        jnp.argmax(logits, axis=-1).astype(jnp.int32), finished, eos_id, pad_id
      )
      tokens = tokens.at[:, position].set(chosen)
      lengths = jnp.where(finished, lengths, position + 1)
      return position + 1, chosen, cache, tokens, now_finished, lengths

    state = (
      jnp.int32(0),
      jnp.full((batch,), bos_id, jnp.int32),
      _start(model, params, src_ids, src_mask, max_len),
      jnp.full((batch, max_len), pad_id, jnp.int32),
      jnp.zeros((batch,), bool),
      jnp.zeros((batch,), jnp.int32),
    )
    _, _, _, tokens, _, lengths = jax.lax.while_loop(cond, body, state)
    return tokens, lengths

  return jax.jit(run)


def greedy_decode(
  model, params, src_ids, src_mask, *, bos_id=1, eos_id=2, pad_id=0, max_len=64
) -> Tuple[Array, Array]:
  """Argmax decoding -> (tokens [B, max_len] int32, lengths [B] int32)."""
  _check_max_len(model, max_len)
  run = _build_greedy(model, bos_id, eos_id, pad_id, max_len)
  return run(params, src_ids, src_mask)


def _filter_logits(logits: Array, temperature: float, top_k: int, top_p: float) -> Array:
  """Temperature, then top-k, then nucleus (top-p) filtering of [B, V] logits."""
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    # Keep a token while the mass strictly before it is < top_p, so the first one always stays.
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, NEG_INF, logits)
  return logits


@functools.lru_cache(maxsize=64)
def _build_sample(model, bos_id, eos_id, pad_id, max_len, temperature, top_k, top_p):
  def run(params, src_ids, src_mask, rng):
    batch = src_ids.shape[0]

    def cond(state):
      return (state[0] < max_len) & ~jnp.all(state[4])

    def body(state):
      position, last, cache, tokens, finished, lengths, log_probs = state
      logits, cache = _step(model, params, cache, src_mask, last, position)
      filtered = _filter_logits(logits, temperature, top_k, top_p)
      drawn = jax.random.categorical(jax.random.fold_in(rng, position), filtered, axis=-1)
      chosen, now_finished = _finish_positions(drawn.astype(jnp.int32), finished, eos_id, pad_id)
      # Log-prob under the unmodified T=1 model: what on-policy distillation needs.
      picked = jnp.take_along_axis(jax.nn.log_softmax(logits), chosen[:, None], axis=-1)[:, 0]
      log_probs = log_probs.at[:, position].set(jnp.where(finished, 0.0, picked))
      tokens = tokens.at[:, position].set(chosen)
      lengths = jnp.where(finished, lengths, position + 1)
      return position + 1, chosen, cache, tokens, now_finished, lengths, log_probs

    state = (
      jnp.int32(0),
      jnp.full((batch,), bos_id, jnp.int32),
      _start(model, params, src_ids, src_mask, max_len),
      jnp.full((batch, max_len), pad_id, jnp.int32),
      jnp.zeros((batch,), bool),
      jnp.zeros((batch,), jnp.int32),
      jnp.zeros((batch, max_len), jnp.float32),
    )
    _, _, _, tokens, _, lengths, log_probs = jax.lax.while_loop(cond, body, state)
    return tokens, lengths, log_probs

  return jax.jit(run)


def sample(
  model,
  params,
  src_ids,
  src_mask,
  rng,
  *,
  temperature=1.0,
  top_k=0,
  top_p=1.0,
  max_len=64,
  bos_id=1,
  eos_id=2,
  pad_id=0,
) -> Tuple[Array, Array, Array]:
  """Ancestral sampling -> (tokens, lengths, log_probs [B, max_len]).

  log_probs are the sampled tokens' log-probabilities under the unmodified model (T=1, no
  top-k/top-p), 0 at padding; the same rng gives the same samples."""
  _check_max_len(model, max_len)
  if temperature <= 0:
    raise ValueError(f'temperature must be > 0, got {temperature}')
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f'top_p must be in (0, 1], got {top_p}')
  if top_k < 0:
    raise ValueError(f'top_k must be >= 0 (0 = off), got {top_k}')
  top_k = min(int(top_k), model.target_vocab_size)
  run = _build_sample(
    model, bos_id, eos_id, pad_id, max_len, float(temperature), top_k, float(top_p)
  )
  return run(params, src_ids, src_mask, rng)


def _gather_beams(x: Array, indices: Array) -> Array:
  """x [B, N, ...], indices [B, M] -> [B, M, ...]."""
  return jnp.take_along_axis(x, indices.reshape(indices.shape + (1,) * (x.ndim - 2)), axis=1)


def _reorder_cache(cache, beam_indices: Array, beam_size: int):
  """Cache leaves [B*K, ...] follow the surviving beams: beam_indices [B, K] into 0..K-1."""
  batch = beam_indices.shape[0]
  flat = (jnp.arange(batch, dtype=jnp.int32)[:, None] * beam_size + beam_indices).reshape(-1)
  return jax.tree_util.tree_map(lambda leaf: jnp.take(leaf, flat, axis=0), cache)


def _merge_finished(finished, candidates, beam_size: int):
  """Keeps the best beam_size of (seqs, scores, lengths) from both pools, by score."""
  seqs, scores, lengths = (jnp.concatenate([a, b], axis=1) for a, b in zip(finished, candidates))
  scores, keep = jax.lax.top_k(scores, beam_size)
  return _gather_beams(seqs, keep), scores, _gather_beams(lengths, keep)


@functools.lru_cache(maxsize=64)
def _build_beam(model, beam_size, alpha, bos_id, eos_id, pad_id, max_len):
  k = beam_size

  def _last_tokens(alive_seqs, position):
    """The token each beam feeds now: BOS at position 0, else the one chosen before."""
    previous = jnp.take(alive_seqs, jnp.maximum(position - 1, 0), axis=2)
    return jnp.where(position == 0, bos_id, previous)

  def run(params, src_ids, src_mask):
    batch = src_ids.shape[0]
    src_mask_k = jnp.repeat(src_mask, k, axis=0)
    cache = _start(model, params, jnp.repeat(src_ids, k, axis=0), src_mask_k, max_len)

    def cond(state):
      return (state[0] < max_len) & ~jnp.all(state[-1])

    def body(state):
      position, cache, alive_seqs, alive_logp, finished, done = state
      last = _last_tokens(alive_seqs, position)
      logits, cache = _step(model, params, cache, src_mask_k, last.reshape(-1), position)
      vocab = logits.shape[-1]
      log_probs = jax.nn.log_softmax(logits).reshape(batch, k, vocab)
      flat = (alive_logp[:, :, None] + log_probs).reshape(batch, k * vocab)
      cand_logp, cand_index = jax.lax.top_k(flat, 2 * k)
      cand_beam, cand_token = cand_index // vocab, (cand_index % vocab).astype(jnp.int32)
      cand_seqs = _gather_beams(alive_seqs, cand_beam).at[:, :, position].set(cand_token)
      is_eos = cand_token == eos_id

      # Like HF/fairseq, only candidates ranked within the top k may finish: beam_size=1 is
      # then exactly greedy. At the last position every top-k candidate ends (truncated).
      ends = (is_eos | (position == max_len - 1)) & (jnp.arange(2 * k) < k)[None, :]
      ends = ends & (cand_logp > NEG_INF / 2) & ~done[:, None]
      scores = jnp.where(ends, cand_logp / gnmt_length_penalty(position + 1, alpha), NEG_INF)
      lengths = jnp.full((batch, 2 * k), position + 1, jnp.int32)
      finished = _merge_finished(finished, (cand_seqs, scores, lengths), k)
      # A row is done once its pool holds k hypotheses (HF early_stopping=True).
      done = done | jnp.all(finished[1] > NEG_INF / 2, axis=1)

      alive_logp, keep = jax.lax.top_k(jnp.where(is_eos, NEG_INF, cand_logp), k)
      alive_seqs = _gather_beams(cand_seqs, keep)
      cache = _reorder_cache(cache, jnp.take_along_axis(cand_beam, keep, axis=1), k)
      return position + 1, cache, alive_seqs, alive_logp, finished, done

    first = jnp.where(jnp.arange(k) == 0, 0.0, NEG_INF)
    state = (
      jnp.int32(0),
      cache,
      jnp.full((batch, k, max_len), pad_id, jnp.int32),
      jnp.tile(first[None, :], (batch, 1)),
      (
        jnp.full((batch, k, max_len), pad_id, jnp.int32),
        jnp.full((batch, k), NEG_INF, jnp.float32),
        jnp.zeros((batch, k), jnp.int32),
      ),
      jnp.zeros((batch,), bool),
    )
    _, _, _, _, (seqs, scores, lengths), _ = jax.lax.while_loop(cond, body, state)
    # Pools are sorted by score (top_k), so hypothesis 0 is the best.
    return seqs[:, 0], lengths[:, 0], scores[:, 0]

  return jax.jit(run)


def beam_search(
  model,
  params,
  src_ids,
  src_mask,
  *,
  beam_size=4,
  length_penalty=0.6,
  max_len=64,
  bos_id=1,
  eos_id=2,
  pad_id=0,
) -> Tuple[Array, Array, Array]:
  """Beam search -> best hypothesis per row: (tokens, lengths, scores [B]).

  Scores are sum of token log-probs / ((5 + length) / 6) ** length_penalty. Finished
  hypotheses are kept in their own pool of beam_size; a row stops once that pool is full or at
  max_len, where unfinished beams count as (truncated) hypotheses of length max_len."""
  if beam_size < 1:
    raise ValueError(f'beam_size must be >= 1, got {beam_size}')
  _check_max_len(model, max_len)
  run = _build_beam(model, int(beam_size), float(length_penalty), bos_id, eos_id, pad_id, max_len)
  return run(params, src_ids, src_mask)
