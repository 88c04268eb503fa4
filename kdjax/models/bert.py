"""Post-LN BERT (Hugging Face layout) as an encoder and as a sequence classifier.

Parameter paths mirror HF `BertModel` one-to-one so a checkpoint loader only has to
rename and transpose:
  embeddings/{word_embeddings,position_embeddings,token_type_embeddings,layer_norm}
  layer_{i}/attention/{query,key,value,output}, layer_{i}/attention_layer_norm,
  layer_{i}/intermediate, layer_{i}/output, layer_{i}/output_layer_norm,
  pooler, classifier
`layer_{i}` is 0-based like HF; its output is `hidden_{i+1}`, its attention probabilities
`attn_{i+1}` [B, H, L, L] and its query/key/value projections `query_{i+1}`, `key_{i+1}`,
`value_{i+1}` [B, L, D] (before the head split, so relation losses choose their own head count).
Unused outputs cost nothing under jit: XLA drops what the loss does not read.
With attention_impl='fused' there are no `attn_{i+1}` entries (see _BertBase.attention_impl).
With scan_layers=True the layers run as one `lax.scan` over their stacked parameters (one
compiled layer body instead of num_layers copies); parameters and outputs are unchanged.
"""

import math
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.compress import lowrank

Array = Any
# Added to the scores of padded keys; exp() of it underflows to exactly 0 in float32.
MASK_BIAS = -1e9
ATTENTION_IMPLS = ('explicit', 'fused')
_init = nn.initializers.normal(stddev=0.02)  # HF BERT `initializer_range`


def check_attention_impl(impl: str, attention_dropout_rate: float, deterministic: bool) -> None:
  """Raises unless `impl` is known and can honour the attention dropout this call asks for."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f'BERT attention_impl={impl!r} is unknown; valid: {ATTENTION_IMPLS}')
  # jax.nn.dot_product_attention has no dropout: refusing beats silently training without it.
  if impl == 'fused' and attention_dropout_rate > 0 and not deterministic:
    raise ValueError(
      f"BERT attention_impl='fused' cannot apply attention_dropout_rate="
      f'{attention_dropout_rate} in training; set attention_dropout_rate=0 or '
      "attention_impl='explicit'"
    )


def attention_bias(attention_mask: Array) -> Array:
  """[B, L] 0/1 mask -> [B, 1, 1, L] float32 additive bias over keys."""
  keep = attention_mask[:, None, None, :] > 0
  return jnp.where(keep, 0.0, MASK_BIAS).astype(jnp.float32)


class BertEmbeddings(nn.Module):
  vocab_size: int
  hidden_size: int
  max_len: int
  type_vocab_size: int
  dropout_rate: float
  layer_norm_eps: float
  dtype: Any = jnp.float32
  # ALBERT-style factorised word embeddings: a [V, embedding_size] table and a
  # [embedding_size, hidden] projection (0 = a full [V, hidden] table). With a 30k WordPiece
  # vocabulary the table dominates a small model's size.
  embedding_size: int = 0
  # (path, rank) pairs relative to this module: Dense layers built as LowRankDense.
  low_rank: lowrank.LowRank = ()

  @nn.compact
  def __call__(self, input_ids, token_type_ids, deterministic: bool):
    seq_len = input_ids.shape[1]
    if seq_len > self.max_len:
      raise ValueError(f'sequence length {seq_len} exceeds max_len={self.max_len}')
    embed = lambda n, name: nn.Embed(
      n, self.hidden_size, embedding_init=_init, dtype=self.dtype, name=name
    )
    if self.embedding_size and self.embedding_size != self.hidden_size:
      words = nn.Embed(
        self.vocab_size,
        self.embedding_size,
        embedding_init=_init,
        dtype=self.dtype,
        name='word_embeddings',
      )(input_ids)
      words = lowrank.dense(
        self.hidden_size,
        'word_projection',
        self.low_rank,
        use_bias=False,
        kernel_init=_init,
        dtype=self.dtype,
      )(words)
    else:
      words = embed(self.vocab_size, 'word_embeddings')(input_ids)
    # [1, L, D]: keeps ranks equal so it adds under jax_numpy_rank_promotion='raise'.
    positions = embed(self.max_len, 'position_embeddings')(jnp.arange(seq_len)[None, :])
    types = embed(self.type_vocab_size, 'token_type_embeddings')(token_type_ids)
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name='layer_norm')(
      words + positions + types
    )
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
  """Multi-head attention, written out so the probabilities can be returned ('explicit'), or
  through `jax.nn.dot_product_attention` ('fused'; probabilities come back as None)."""

  hidden_size: int
  num_heads: int
  attention_dropout_rate: float
  dtype: Any = jnp.float32
  head_dim: int = 0  # 0: hidden_size // num_heads; set when heads were pruned away
  low_rank: lowrank.LowRank = ()  # relative to this module, as in BertEmbeddings
  attention_impl: str = 'explicit'  # see _BertBase.attention_impl

  @nn.compact
  def __call__(
    self, x, bias, deterministic: bool
  ) -> Tuple[Array, Optional[Array], Dict[str, Array]]:
    check_attention_impl(self.attention_impl, self.attention_dropout_rate, deterministic)
    batch, seq_len, _ = x.shape
    head_dim = self.head_dim or self.hidden_size // self.num_heads
    dense = lambda name, width: lowrank.dense(
      width, name, self.low_rank, kernel_init=_init, dtype=self.dtype
    )
    inner = self.num_heads * head_dim
    projections = {n: dense(n, inner)(x) for n in ('query', 'key', 'value')}
    split = lambda t: t.reshape(batch, seq_len, self.num_heads, head_dim)
    q, k, v = (split(projections[n]) for n in ('query', 'key', 'value'))
    if self.attention_impl == 'fused':
      # The same float32 scores + bias and float32 softmax as below (jax computes the scores
      # with a float32 accumulator and the softmax in float32 for bf16 inputs too).
      probs = None
      context = jax.nn.dot_product_attention(
        q, k, v, bias=bias.astype(jnp.float32), implementation='xla'
      ).astype(self.dtype)
    else:
      # Heads moved ahead of positions before the two batched matmuls, so each [len, head_dim]
      # block is contiguous: the attention forward runs 3.2x faster at 128 tokens on CPU (a
      # frozen teacher's distillation step 1.16x); the backward is unchanged (README,
      # Performance, "Heads first in attention").
      q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
      # Scores and softmax in float32 so bf16 runs keep masked keys at exactly 0.
      scores = jnp.einsum('bhqd,bhkd->bhqk', q.astype(jnp.float32), k.astype(jnp.float32))
      probs = nn.softmax(scores / math.sqrt(head_dim) + bias, axis=-1)
      dropped = nn.Dropout(self.attention_dropout_rate)(probs, deterministic=deterministic)
      context = jnp.einsum('bhqk,bhkd->bhqd', dropped.astype(self.dtype), v)
      context = context.transpose(0, 2, 1, 3)
    context = context.reshape(batch, seq_len, inner)
    return dense('output', self.hidden_size)(context), probs, projections


class BertLayer(nn.Module):
  hidden_size: int
  num_heads: int
  intermediate_size: int
  dropout_rate: float
  attention_dropout_rate: float
  layer_norm_eps: float
  dtype: Any = jnp.float32
  head_dim: int = 0
  low_rank: lowrank.LowRank = ()  # relative to this module, as in BertEmbeddings
  attention_impl: str = 'explicit'  # see _BertBase.attention_impl

  @nn.compact
  def __call__(
    self, x, bias, deterministic: bool
  ) -> Tuple[Array, Optional[Array], Dict[str, Array]]:
    norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=name)
    dropout = lambda t: nn.Dropout(self.dropout_rate)(t, deterministic=deterministic)
    dense = lambda name, width: lowrank.dense(
      width, name, self.low_rank, kernel_init=_init, dtype=self.dtype
    )
    attended, probs, projections = BertSelfAttention(
      self.hidden_size,
      self.num_heads,
      self.attention_dropout_rate,
      self.dtype,
      self.head_dim,
      lowrank.low_rank_under(self.low_rank, 'attention'),
      self.attention_impl,
      name='attention',
    )(x, bias, deterministic)
    x = norm('attention_layer_norm')(x + dropout(attended))
    h = dense('intermediate', self.intermediate_size)(x)
    h = nn.gelu(h, approximate=False)  # HF 'gelu' is the exact erf form
    h = dense('output', self.hidden_size)(h)
    return norm('output_layer_norm')(x + dropout(h)), probs, projections


class _BertBase(nn.Module):
  """Shared fields and encoder body; subclasses build it inside their own scope so
  the classifier's parameters stay flat (no extra `encoder/` level for the loader)."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_len: int = 512
  type_vocab_size: int = 2
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-12
  embedding_size: int = 0  # < hidden_size: factorised word embeddings (see BertEmbeddings)
  dtype: Any = jnp.float32
  # Width of one attention head; 0: hidden_size // num_heads. Set by structured head pruning
  # (compress/structured.py), which keeps num_heads < hidden_size // head_dim heads.
  head_dim: int = 0
  # ((layer path, rank), ...): the Dense layers at these paths (relative to this model's params,
  # e.g. 'layer_0/attention/query', as `lowrank.factorise_dense` reports them) are built as
  # LowRankDense(features, rank), so `lowrank.factorise_model`'s params load. () is plain BERT.
  low_rank: lowrank.LowRank = ()
  # 'explicit': scores, softmax and dropout written out; `out` holds the probabilities
  # `attn_{i}` the attention-KD losses read. 'fused': jax.nn.dot_product_attention (XLA's
  # implementation), which never materialises the probabilities for the caller, so `out` has
  # no `attn_{i}` entries (objective.build refuses attention terms for such a model). It has
  # no attention dropout: training with attention_dropout_rate > 0 raises (a frozen teacher
  # runs deterministic, so any rate works there).
  attention_impl: str = 'explicit'
  # True: apply the layers as one jax.lax.scan over their parameters stacked on a leading axis,
  # so XLA compiles one layer body rather than num_layers copies (a 24-layer training step
  # compiles 1.9x faster, each step runs ~17 % slower on CPU: benchmarks/scan_layers.py).
  # The parameter tree keeps its per-layer `layer_{i}` layout, so checkpoints, loaders, pruning
  # and exports do not change: the stack is built inside the step (a copy of the layer weights,
  # and its transpose for the gradient). Needs identically shaped layers, so per-layer
  # low-rank ranks must agree.
  scan_layers: bool = False

  @nn.nowrap
  def _layer(self, low_rank: lowrank.LowRank, **kwargs) -> 'BertLayer':
    return BertLayer(
      self.hidden_size,
      self.num_heads,
      self.intermediate_size,
      self.dropout_rate,
      self.attention_dropout_rate,
      self.layer_norm_eps,
      self.dtype,
      self.head_dim,
      low_rank,
      self.attention_impl,
      **kwargs,
    )

  @nn.nowrap
  def _scanned_layers(self, x, bias, deterministic: bool):
    """The layers as one scan over their stacked `layer_{i}` parameters; returns the last
    hidden state and per-layer (hidden, probs, projections), each stacked on axis 0."""
    low_ranks = {
      lowrank.low_rank_under(self.low_rank, f'layer_{i}') for i in range(self.num_layers)
    }
    if len(low_ranks) > 1:
      raise ValueError(
        'BERT scan_layers=True needs the same low_rank entries in every layer; got '
        f'{sorted(low_ranks)}; use scan_layers=False or one rank per path for all layers'
      )
    params = self.variables['params']
    stacked = jax.tree.map(
      lambda *leaves: jnp.stack(leaves), *(params[f'layer_{i}'] for i in range(self.num_layers))
    )
    # An unbound copy of one layer, applied as a pure function to each slice of the stack.
    template = self._layer(low_ranks.pop(), parent=None)
    keys = None if deterministic else jax.random.split(self.make_rng('dropout'), self.num_layers)

    def body(h, layer_inputs):
      layer_params, key = layer_inputs
      rngs = {} if key is None else {'dropout': key}
      h, probs, projections = template.apply(
        {'params': layer_params}, h, bias, deterministic, rngs=rngs
      )
      return h, (h, probs, projections)

    return jax.lax.scan(body, x, (stacked, keys))

  @nn.nowrap
  def _encode(
    self, input_ids, attention_mask, token_type_ids: Optional[Array], deterministic: bool
  ) -> Tuple[Array, Dict[str, Array]]:
    if not self.head_dim and self.hidden_size % self.num_heads:
      raise ValueError(
        f'hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}'
      )
    check_attention_impl(self.attention_impl, self.attention_dropout_rate, deterministic)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = BertEmbeddings(
      self.vocab_size,
      self.hidden_size,
      self.max_len,
      self.type_vocab_size,
      self.dropout_rate,
      self.layer_norm_eps,
      self.dtype,
      self.embedding_size,
      lowrank.low_rank_under(self.low_rank, 'embeddings'),
      name='embeddings',
    )(input_ids, token_type_ids, deterministic)
    out = {'embeddings': x, 'hidden_0': x}
    bias = attention_bias(attention_mask)
    # init always runs the loop: it creates the `layer_{i}` parameters the scan then stacks.
    if self.scan_layers and not self.is_initializing():
      x, (hiddens, all_probs, all_projections) = self._scanned_layers(x, bias, deterministic)
      per_layer = [
        jax.tree.map(lambda t: t[i], (hiddens, all_probs, all_projections))
        for i in range(self.num_layers)
      ]
    else:
      per_layer = []
      for i in range(self.num_layers):
        layer = self._layer(lowrank.low_rank_under(self.low_rank, f'layer_{i}'), name=f'layer_{i}')
        x, probs, projections = layer(x, bias, deterministic)
        per_layer.append((x, probs, projections))
    for i, (hidden, probs, projections) in enumerate(per_layer):
      out[f'hidden_{i + 1}'] = hidden
      if probs is not None:
        out[f'attn_{i + 1}'] = probs
      for name, value in projections.items():
        out[f'{name}_{i + 1}'] = value
    return x, out


class BertEncoder(_BertBase):
  """Embeddings + layers, no pooler: returns (sequence_output [B, L, D], out)."""

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
    return self._encode(input_ids, attention_mask, token_type_ids, deterministic)


POOLINGS = ('cls', 'mean')


def mean_pool(hidden: Array, attention_mask: Array) -> Array:
  """[B, L, D] hidden states, [B, L] 0/1 mask -> [B, D] mean over the unmasked positions."""
  mask = attention_mask.astype(hidden.dtype)[:, :, None]
  # max(., 1): a row with no tokens pools to 0 instead of NaN (batches never hold one).
  return (hidden * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)


class BertClassifier(_BertBase):
  """BERT + tanh pooler + linear classifier: returns (logits [B, C], out).

  `pooling` picks what the pooler reads: 'cls', the [CLS] position (BERT's recipe), or
  'mean', the average over real tokens, the representation a sentence-transformers checkpoint
  such as all-MiniLM-L6-v2 was trained to produce (its [CLS] vector never was)."""

  num_classes: int = 2
  pooling: str = 'cls'

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
    x, out = self._encode(input_ids, attention_mask, token_type_ids, deterministic)
    dense = lambda name, width: lowrank.dense(
      width, name, self.low_rank, kernel_init=_init, dtype=self.dtype
    )
    if self.pooling == 'cls':
      summary = x[:, 0]
    elif self.pooling == 'mean':
      summary = mean_pool(x, attention_mask)
    else:
      raise ValueError(f'BERT pooling={self.pooling!r} is unknown; valid: {POOLINGS}')
    pooled = jnp.tanh(dense('pooler', self.hidden_size)(summary))
    out['pooled'] = pooled
    pooled = nn.Dropout(self.dropout_rate)(pooled, deterministic=deterministic)
    logits = dense('classifier', self.num_classes)(pooled)
    return logits, out
