"""Pre-LN Transformer encoder-decoder (Vaswani et al. 2017 with pre-LayerNorm blocks).

Positions are sinusoidal (no parameters), so `max_len` only bounds the sequence lengths that
`encode`/`decode` accept; embeddings are scaled by sqrt(d_model) before positions are added.

Parameters: `src_embed` (also the target table when `share_embeddings`), `tgt_embed` (only
without sharing), `encoder_layers_{i}`, `encoder_norm`, `decoder_layers_{i}`, `decoder_norm`,
`output` (only without `tie_output`; tied logits are the target table transposed). Layer
indices in parameter names are 0-based.

`__call__` / `decode` return `(logits [B, T, V] float32, out)`; `out` holds (layer index l is
1-based, l=0 is the scaled embedding plus positions after dropout):
  encoder_hidden_{l}  [B, S, D]  residual stream after encoder layer l (no final LN)
  encoder_output      [B, S, D]  encoder_hidden_{enc_layers} after the final LN (= memory)
  encoder_attn_{l}    [B, H, S, S]
  decoder_hidden_{l}  [B, T, D]  residual stream after decoder layer l (no final LN)
  decoder_output      [B, T, D]  decoder_hidden_{dec_layers} after the final LN
  self_attn_{l}       [B, H, T, T]  causal decoder self-attention
  cross_attn_{l}      [B, H, T, S]
Pre-LN residual streams grow with depth, so feature distillation usually normalises them (or
uses the *_output keys). `decode` only fills the decoder keys.

Incremental decoding: `init_cache(memory, src_mask, max_decode_len)` returns a flat dict with
batch as the leading axis of every leaf, for decoder layer l (1-based):
  self_k_{l}, self_v_{l}    [B, max_decode_len, H, D/H]  (zeros; row p is written at step p)
  cross_k_{l}, cross_v_{l}  [B, S, H, D/H]              (projected memory, computed once)
`decode_step(cache, src_mask, token_ids [B], position)` feeds the token at `position` and
returns (next-token logits [B, V] float32, new cache); it matches `decode` on the same prefix.
"""

import math
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.bert import MASK_BIAS, attention_bias

Array = Any
_dense_init = nn.initializers.xavier_uniform()


def sinusoid_positions(positions: Array, d_model: int) -> Array:
  """Integer positions [...] -> float32 [..., d_model] (sin half then cos half, as tensor2tensor).

  Computed from the positions themselves, so a traced decode position needs no table lookup."""
  half = d_model // 2
  inv_freq = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq.reshape(
    (1,) * positions.ndim + (-1,)
  )
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def causal_bias(tgt_mask: Array) -> Array:
  """[B, T] 0/1 mask -> [B, 1, T, T] additive bias: key k visible to query q iff k <= q and
  key k is not padding."""
  seq_len = tgt_mask.shape[1]
  causal = jnp.tril(jnp.ones((seq_len, seq_len), bool))[None, None, :, :]
  keep = causal & (tgt_mask[:, None, None, :] > 0)
  return jnp.where(keep, 0.0, MASK_BIAS).astype(jnp.float32)


class Attention(nn.Module):
  """Multi-head attention with the key/value projection split out so a cache can hold it."""

  d_model: int
  num_heads: int
  attention_dropout_rate: float
  dtype: Any = jnp.float32

  def setup(self):
    dense = lambda: nn.Dense(self.d_model, kernel_init=_dense_init, dtype=self.dtype)
    self.query, self.key, self.value, self.out = dense(), dense(), dense(), dense()
    self.dropout = nn.Dropout(self.attention_dropout_rate)

  def _split(self, x: Array) -> Array:
    batch, length, _ = x.shape
    return x.reshape(batch, length, self.num_heads, self.d_model // self.num_heads)

  def project_kv(self, x: Array) -> Tuple[Array, Array]:
    """[B, L, D] -> keys and values [B, L, H, D/H]."""
    return self._split(self.key(x)), self._split(self.value(x))

  def attend(self, x: Array, k: Array, v: Array, bias: Array, deterministic: bool):
    """Queries from x [B, Q, D] over k/v [B, K, H, D/H]; returns (out [B, Q, D], probs)."""
    q = self._split(self.query(x))
    scale = 1.0 / math.sqrt(self.d_model // self.num_heads)
    # Scores and softmax in float32 so bf16 runs keep masked keys at exactly 0.
    scores = jnp.einsum('bqhd,bkhd->bhqk', q.astype(jnp.float32), k.astype(jnp.float32))
    probs = nn.softmax(scores * scale + bias, axis=-1)
    dropped = self.dropout(probs, deterministic=deterministic)
    context = jnp.einsum('bhqk,bkhd->bqhd', dropped.astype(self.dtype), v.astype(self.dtype))
    batch, length = x.shape[:2]
    return self.out(context.reshape(batch, length, self.d_model)), probs

  def __call__(self, x: Array, kv_input: Array, bias: Array, deterministic: bool):
    k, v = self.project_kv(kv_input)
    return self.attend(x, k, v, bias, deterministic)


class FeedForward(nn.Module):
  d_model: int
  d_ff: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = nn.Dense(self.d_ff, kernel_init=_dense_init, dtype=self.dtype, name='wi')(x)
    h = nn.relu(h)
    return nn.Dense(self.d_model, kernel_init=_dense_init, dtype=self.dtype, name='wo')(h)


class EncoderLayer(nn.Module):
  d_model: int
  num_heads: int
  d_ff: int
  dropout_rate: float
  attention_dropout_rate: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, bias: Array, deterministic: bool) -> Tuple[Array, Array]:
    dropout = lambda t: nn.Dropout(self.dropout_rate)(t, deterministic=deterministic)
    h = nn.LayerNorm(dtype=self.dtype, name='attention_norm')(x)
    attended, probs = Attention(
      self.d_model, self.num_heads, self.attention_dropout_rate, self.dtype, name='attention'
    )(h, h, bias, deterministic)
    x = x + dropout(attended)
    h = nn.LayerNorm(dtype=self.dtype, name='ffn_norm')(x)
    x = x + dropout(FeedForward(self.d_model, self.d_ff, self.dtype, name='ffn')(h))
    return x, probs


class DecoderLayer(nn.Module):
  """Self-attention, cross-attention, feed-forward; `step` is the cached one-token version."""

  d_model: int
  num_heads: int
  d_ff: int
  dropout_rate: float
  attention_dropout_rate: float
  dtype: Any = jnp.float32

  def setup(self):
    attention = lambda: Attention(
      self.d_model, self.num_heads, self.attention_dropout_rate, self.dtype
    )
    self.self_attention, self.cross_attention = attention(), attention()
    self.self_norm = nn.LayerNorm(dtype=self.dtype)
    self.cross_norm = nn.LayerNorm(dtype=self.dtype)
    self.ffn_norm = nn.LayerNorm(dtype=self.dtype)
    self.ffn = FeedForward(self.d_model, self.d_ff, self.dtype)
    self.dropout = nn.Dropout(self.dropout_rate)

  def __call__(self, x, memory, self_bias, cross_bias, deterministic: bool):
    drop = lambda t: self.dropout(t, deterministic=deterministic)
    h = self.self_norm(x)
    attended, self_probs = self.self_attention(h, h, self_bias, deterministic)
    x = x + drop(attended)
    attended, cross_probs = self.cross_attention(
      self.cross_norm(x), memory, cross_bias, deterministic
    )
    x = x + drop(attended)
    x = x + drop(self.ffn(self.ffn_norm(x)))
    return x, self_probs, cross_probs

  def cross_kv(self, memory: Array) -> Tuple[Array, Array]:
    return self.cross_attention.project_kv(memory)

  def step(self, x, layer_cache: Dict[str, Array], position, cross_bias):
    """One position x [B, 1, D]: writes its key/value at `position`, attends to rows <= it."""
    h = self.self_norm(x)
    k, v = self.self_attention.project_kv(h)
    start = (0, position, 0, 0)
    self_k = jax.lax.dynamic_update_slice(layer_cache['self_k'], k.astype(self.dtype), start)
    self_v = jax.lax.dynamic_update_slice(layer_cache['self_v'], v.astype(self.dtype), start)
    # Rows after `position` are stale or zero; rows before it were written by earlier steps.
    visible = jnp.arange(self_k.shape[1]) <= position
    self_bias = jnp.where(visible, 0.0, MASK_BIAS).astype(jnp.float32)[None, None, None, :]
    attended, _ = self.self_attention.attend(h, self_k, self_v, self_bias, True)
    x = x + attended
    attended, _ = self.cross_attention.attend(
      self.cross_norm(x), layer_cache['cross_k'], layer_cache['cross_v'], cross_bias, True
    )
    x = x + attended
    x = x + self.ffn(self.ffn_norm(x))
    return x, {'self_k': self_k, 'self_v': self_v}


class Seq2SeqTransformer(nn.Module):
  """Encoder-decoder; see the module docstring for outputs, parameters and the cache layout."""

  vocab_size: int
  tgt_vocab_size: int = 0  # 0: same as vocab_size
  d_model: int = 256
  num_heads: int = 4
  enc_layers: int = 3
  dec_layers: int = 3
  d_ff: int = 1024
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.0
  max_len: int = 128  # longest source/target accepted; positions are sinusoidal (no params)
  share_embeddings: bool = True  # one table for source and target
  tie_output: bool = True  # output projection = target embedding transposed
  dtype: Any = jnp.float32  # compute dtype; logits are returned in float32

  @property
  def target_vocab_size(self) -> int:
    return self.tgt_vocab_size or self.vocab_size

  def setup(self):
    if self.share_embeddings and self.target_vocab_size != self.vocab_size:
      raise ValueError(
        f'share_embeddings needs equal vocabularies, got {self.vocab_size} and '
        f'{self.target_vocab_size}'
      )
    if self.d_model % self.num_heads or self.d_model % 2:
      raise ValueError(f'd_model={self.d_model} must be even and divisible by num_heads')
    # std d^-1/2: the sqrt(d)-scaled input embeddings have unit scale and tied logits stay O(1).
    embed = lambda n: nn.Embed(
      n, self.d_model, embedding_init=nn.initializers.normal(self.d_model**-0.5), dtype=self.dtype
    )
    self.src_embed = embed(self.vocab_size)
    if not self.share_embeddings:
      self.tgt_embed = embed(self.target_vocab_size)
    layer_args = (
      self.d_model,
      self.num_heads,
      self.d_ff,
      self.dropout_rate,
      self.attention_dropout_rate,
      self.dtype,
    )
    self.encoder_layers = [EncoderLayer(*layer_args) for _ in range(self.enc_layers)]
    self.decoder_layers = [DecoderLayer(*layer_args) for _ in range(self.dec_layers)]
    self.encoder_norm = nn.LayerNorm(dtype=self.dtype)
    self.decoder_norm = nn.LayerNorm(dtype=self.dtype)
    if not self.tie_output:
      self.output = nn.Dense(self.target_vocab_size, kernel_init=_dense_init, dtype=self.dtype)
    self.embed_dropout = nn.Dropout(self.dropout_rate)

  def _target_table(self) -> nn.Embed:
    return self.src_embed if self.share_embeddings else self.tgt_embed

  def _check_len(self, length: int, what: str) -> None:
    if length > self.max_len:
      raise ValueError(f'{what} length {length} exceeds max_len={self.max_len}')

  def _embed(self, table: nn.Embed, ids: Array, positions: Array) -> Array:
    """ids [B, L], positions [1, L] -> scaled embedding plus sinusoid, in the compute dtype."""
    x = table(ids) * math.sqrt(self.d_model)
    return (x + sinusoid_positions(positions, self.d_model)).astype(self.dtype)

  def _logits(self, x: Array) -> Array:
    logits = self._target_table().attend(x) if self.tie_output else self.output(x)
    return logits.astype(jnp.float32)

  def _encode(self, src_ids, src_mask, deterministic: bool) -> Dict[str, Array]:
    self._check_len(src_ids.shape[1], 'source')
    positions = jnp.arange(src_ids.shape[1])[None, :]
    x = self.embed_dropout(
      self._embed(self.src_embed, src_ids, positions), deterministic=deterministic
    )
    out = {'encoder_hidden_0': x}
    bias = attention_bias(src_mask)
    for i, layer in enumerate(self.encoder_layers):
      x, probs = layer(x, bias, deterministic)
      out[f'encoder_hidden_{i + 1}'] = x
      out[f'encoder_attn_{i + 1}'] = probs
    out['encoder_output'] = self.encoder_norm(x)
    return out

  def encode(self, src_ids, src_mask, *, deterministic: bool = True) -> Array:
    """Source ids/mask [B, S] -> memory [B, S, D] (final-LN encoder output)."""
    return self._encode(src_ids, src_mask, deterministic)['encoder_output']

  def decode(self, memory, src_mask, tgt_ids, tgt_mask, *, deterministic: bool):
    """Teacher-forced decoder: tgt_ids [B, T] (BOS first) -> (logits [B, T, V] float32, out)."""
    self._check_len(tgt_ids.shape[1], 'target')
    positions = jnp.arange(tgt_ids.shape[1])[None, :]
    x = self.embed_dropout(
      self._embed(self._target_table(), tgt_ids, positions), deterministic=deterministic
    )
    out = {'decoder_hidden_0': x}
    self_bias, cross_bias = causal_bias(tgt_mask), attention_bias(src_mask)
    for i, layer in enumerate(self.decoder_layers):
      x, self_probs, cross_probs = layer(x, memory, self_bias, cross_bias, deterministic)
      out[f'decoder_hidden_{i + 1}'] = x
      out[f'self_attn_{i + 1}'] = self_probs
      out[f'cross_attn_{i + 1}'] = cross_probs
    x = self.decoder_norm(x)
    out['decoder_output'] = x
    return self._logits(x), out

  def __call__(self, src_ids, src_mask, tgt_ids, tgt_mask, *, deterministic: bool):
    """(logits [B, T, V] float32, out with encoder and decoder keys)."""
    out = self._encode(src_ids, src_mask, deterministic)
    logits, dec_out = self.decode(
      out['encoder_output'], src_mask, tgt_ids, tgt_mask, deterministic=deterministic
    )
    return logits, {**out, **dec_out}

  def init_cache(self, memory, src_mask, max_decode_len: int) -> Dict[str, Array]:
    """Zeroed self-attention K/V plus the cross-attention K/V of `memory` (see module doc).

    src_mask is not stored: decode_step takes it again, so beam search reorders less."""
    del src_mask
    self._check_len(max_decode_len, 'decode')
    batch = memory.shape[0]
    shape = (batch, max_decode_len, self.num_heads, self.d_model // self.num_heads)
    cache = {}
    for i, layer in enumerate(self.decoder_layers):
      k, v = layer.cross_kv(memory)
      cache[f'cross_k_{i + 1}'] = k.astype(self.dtype)
      cache[f'cross_v_{i + 1}'] = v.astype(self.dtype)
      cache[f'self_k_{i + 1}'] = jnp.zeros(shape, self.dtype)
      cache[f'self_v_{i + 1}'] = jnp.zeros(shape, self.dtype)
    return cache

  def decode_step(self, cache, src_mask, token_ids, position):
    """token_ids [B] at scalar `position` -> (next-token logits [B, V] float32, new cache)."""
    position = jnp.asarray(position, jnp.int32)
    x = self._embed(self._target_table(), token_ids[:, None], position[None, None])
    cross_bias = attention_bias(src_mask)
    new_cache = dict(cache)
    for i, layer in enumerate(self.decoder_layers):
      names = {n: f'{n}_{i + 1}' for n in ('self_k', 'self_v', 'cross_k', 'cross_v')}
      x, updated = layer.step(x, {n: cache[k] for n, k in names.items()}, position, cross_bias)
      new_cache[names['self_k']] = updated['self_k']
      new_cache[names['self_v']] = updated['self_v']
    return self._logits(self.decoder_norm(x))[:, 0], new_cache
