"""Intermediate-representation distillation terms and the layer maps that pair them up.

Hidden states are indexed as the BERT model outputs them: index 0 is the embedding output
(`out['hidden_0']`) and index i the output of layer i (`out['hidden_i']`, `out['attn_i']`).
Token-level terms take `mask`, the [B, L] attention mask (1 real token, 0 padding) already
multiplied by the example weights (see `token_weights`), and weight each position by it;
sentence-level terms take per-example `weights` [B]. Every term returns a (sum, count)
`kdjax.losses.Metric`, is computed in float32, and is pure and jit-compatible: shapes are
checked at trace time, values never branch in Python.

Terms that compare hidden states need equal widths: a narrower student is projected to the
teacher width by the caller (a learned linear map, FitNets' regressor) before calling them.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp

from kdjax.losses import Metric, weighted
from kdjax.models.from_teacher import uniform_layer_map

LAYER_MAP_KINDS = ('uniform', 'last_k', 'explicit')

# Smallest normal float32: a floor for log() that leaves every representable probability as is.
_TINY = float(jnp.finfo(jnp.float32).tiny)
_EPS = 1e-8


def layer_map(
  kind: str,
  student_layers: int,
  teacher_layers: int,
  last_k: int = 0,
  pairs: Iterable[tuple[int, int]] = (),
  include_embeddings: bool = False,
) -> tuple[tuple[int, int], ...]:
  """(student_index, teacher_index) pairs of hidden states to match, 0 = embedding output.

  kind:
    'uniform'   TinyBERT (Jiao et al. 2020): student layer m ↔ teacher layer g(m) = m·N/M for
                m = 1..M (M student, N teacher layers), rounded as in
                `kdjax.models.from_teacher.uniform_layer_map` so the targets are the layers a
                student initialised from the teacher copied; e.g. 6 → 2: ((1, 3), (2, 6)).
    'last_k'    the student's last `last_k` layers ↔ the teacher's last `last_k`, in order
                (e.g. 4 → 12 with k = 2: ((3, 11), (4, 12))).
    'explicit'  `pairs` as given, each checked to lie in 0..M (student) and 0..N (teacher).
  `include_embeddings` prepends (0, 0), the embedding outputs (TinyBERT's embedding-layer
  loss), unless the map already has it. Raises ValueError for an unknown kind or a map that
  cannot be built.
  """
  for name, value in (('student_layers', student_layers), ('teacher_layers', teacher_layers)):
    if int(value) != value or value < 1:
      raise ValueError(f'{name} must be a positive integer, got {value!r}')
  m, n = int(student_layers), int(teacher_layers)
  if kind == 'uniform':
    if m > n:
      raise ValueError(
        f"layer_map 'uniform' needs student_layers <= teacher_layers, got {m} > {n}; "
        "use 'explicit' pairs to map a deeper student"
      )
    out = tuple((i + 1, t + 1) for i, t in enumerate(uniform_layer_map(n, m)))
  elif kind == 'last_k':
    if int(last_k) != last_k or not 1 <= last_k <= min(m, n):
      raise ValueError(
        f"layer_map 'last_k' needs 1 <= last_k <= min(student_layers={m}, teacher_layers={n}),"
        f' got last_k={last_k!r}'
      )
    k = int(last_k)
    out = tuple((m - k + 1 + i, n - k + 1 + i) for i in range(k))
  elif kind == 'explicit':
    out = tuple(_checked_pair(pair, m, n) for pair in pairs)
    if not out:
      raise ValueError("layer_map 'explicit' needs at least one (student, teacher) pair")
  else:
    raise ValueError(f'unknown layer_map kind {kind!r}; valid kinds: {", ".join(LAYER_MAP_KINDS)}')
  if include_embeddings and (0, 0) not in out:
    out = ((0, 0),) + out
  return out


def _checked_pair(pair, m: int, n: int) -> tuple[int, int]:
  valid = f'valid: student 0..{m}, teacher 0..{n} (0 = embeddings)'
  try:
    s, t = pair
    ok = int(s) == s and int(t) == t and not isinstance(s, bool) and not isinstance(t, bool)
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f'layer pair {pair!r} is not a (student, teacher) pair of integers; {valid}')
  if not (0 <= s <= m and 0 <= t <= n):
    raise ValueError(f'layer pair ({s}, {t}) is out of range; {valid}')
  return int(s), int(t)


def token_weights(attention_mask: jax.Array, weights: jax.Array) -> jax.Array:
  """mask[b, l] = attention_mask[b, l] · weights[b], float32 [B, L].

  The `mask` every token-level term here takes: a padded position (attention 0) or a padded
  example (weight 0) gets weight 0, and a real token carries its example's weight.
  """
  return attention_mask.astype(jnp.float32) * weights.astype(jnp.float32)[:, None]


def _check_widths(student: jax.Array, teacher: jax.Array, what: str) -> None:
  if student.shape[-1] != teacher.shape[-1]:
    raise ValueError(
      f'{what}: student width {student.shape[-1]} differs from teacher width '
      f'{teacher.shape[-1]}; a projection is needed: {_PROJECT_HINT}'
    )


def _check_same_shape(student: jax.Array, teacher: jax.Array, what: str, hint: str) -> None:
  if student.shape != teacher.shape:
    raise ValueError(
      f'{what}: student shape {student.shape} differs from teacher shape {teacher.shape}; {hint}'
    )


def _check_mask(mask: jax.Array, leading: tuple[int, ...], what: str) -> None:
  if mask.shape != leading:
    raise ValueError(f'{what}: mask shape {mask.shape} must be {leading}')


def _masked(per_item: jax.Array, mask: jax.Array) -> Metric:
  """weighted(per_item, mask), with padded items zeroed first so no garbage (inf) leaks in."""
  mask = mask.astype(jnp.float32)
  return weighted(jnp.where(mask > 0, per_item, 0.0), mask)


def _safe_norm(x: jax.Array) -> jax.Array:
  """‖x‖₂ over the last axis, floored at eps so zero vectors have a finite value and gradient."""
  return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), _EPS**2))


_PROJECT_HINT = (
  'project the student hidden states to the teacher width first (a learned linear map, '
  'kdjax.kd.heads)'
)


def hidden_mse(student_hidden: jax.Array, teacher_hidden: jax.Array, mask: jax.Array) -> Metric:
  """Hidden-state MSE: per position (1/D)·Σ_d (s_d − t_d)², weighted by `mask`.

  FitNets (Romero et al. 2015) hint loss / TinyBERT (Jiao et al. 2020) hidden-state loss.
  Inputs [..., D] (usually [B, L, D]) with `mask` of the leading shape; the student must
  already be projected to the teacher width D (ValueError otherwise).
  """
  _check_widths(student_hidden, teacher_hidden, 'hidden_mse')
  _check_same_shape(student_hidden, teacher_hidden, 'hidden_mse', 'shapes must match')
  _check_mask(mask, student_hidden.shape[:-1], 'hidden_mse')
  diff = student_hidden.astype(jnp.float32) - teacher_hidden.astype(jnp.float32)
  return _masked(jnp.mean(diff * diff, axis=-1), mask)


def cosine_embedding(
  student_hidden: jax.Array, teacher_hidden: jax.Array, mask: jax.Array
) -> Metric:
  """Per position 1 − cos(s, t) = 1 − s·t / (‖s‖ ‖t‖), weighted by `mask`.

  DistilBERT (Sanh et al. 2019) aligns student and teacher hidden states with PyTorch's
  CosineEmbeddingLoss at target +1, which is this. Norms are floored at 1e-8, so a zero
  vector gives cos = 0 (loss 1) with finite gradients. Invariant to positive scaling of
  either input. Inputs [..., D] with `mask` of the leading shape; widths must match.
  """
  _check_widths(student_hidden, teacher_hidden, 'cosine_embedding')
  _check_same_shape(student_hidden, teacher_hidden, 'cosine_embedding', 'shapes must match')
  _check_mask(mask, student_hidden.shape[:-1], 'cosine_embedding')
  s = student_hidden.astype(jnp.float32)
  t = teacher_hidden.astype(jnp.float32)
  cos = jnp.sum((s / _safe_norm(s)) * (t / _safe_norm(t)), axis=-1)
  return _masked(1.0 - cos, mask)


def pkd_cls(student_cls: jax.Array, teacher_cls: jax.Array, weights: jax.Array) -> Metric:
  """Patient KD (Sun et al. 2019): per example ‖s/‖s‖₂ − t/‖t‖₂‖²₂, weighted by `weights`.

  `student_cls`, `teacher_cls` are the [B, D] [CLS] vectors of one mapped layer pair (the
  caller takes hidden[:, 0] and sums the terms over its layer map); widths must match (the
  caller projects). Norms are floored at 1e-8. Invariant to positive scaling of either input;
  ranges over [0, 4].
  """
  _check_widths(student_cls, teacher_cls, 'pkd_cls')
  _check_same_shape(student_cls, teacher_cls, 'pkd_cls', 'pass [B, D] [CLS] vectors')
  _check_mask(weights, student_cls.shape[:-1], 'pkd_cls')
  s = student_cls.astype(jnp.float32)
  t = teacher_cls.astype(jnp.float32)
  diff = s / _safe_norm(s) - t / _safe_norm(t)
  return _masked(jnp.sum(diff * diff, axis=-1), weights)


def _check_attention(student_attn: jax.Array, teacher_attn: jax.Array, mask: jax.Array, what):
  if student_attn.ndim != 4 or teacher_attn.ndim != 4:
    raise ValueError(
      f'{what}: attention maps must be [B, H, L, L], got {student_attn.shape} and '
      f'{teacher_attn.shape}'
    )
  if student_attn.shape[1] != teacher_attn.shape[1]:
    raise ValueError(
      f'{what}: student has {student_attn.shape[1]} heads, teacher {teacher_attn.shape[1]}; '
      'attention maps can only be matched head by head, use the self-attention relation '
      'losses (kdjax.kd.relations, MiniLM) for different head counts'
    )
  _check_same_shape(student_attn, teacher_attn, what, 'batch and sequence lengths must match')
  b, _, lq, lk = student_attn.shape
  _check_mask(mask, (b, lq), what)
  if lq != lk:
    raise ValueError(f'{what}: self-attention maps must be square, got {student_attn.shape}')


def attention_kl(student_attn: jax.Array, teacher_attn: jax.Array, mask: jax.Array) -> Metric:
  """Attention transfer: per query (1/H)·Σ_h KL(A^T_{h,q} ‖ A^S_{h,q}), weighted by `mask`.

  KL(a^T ‖ a^S) = Σ_k a^T_k (log a^T_k − log a^S_k) over the real keys of each (head, query)
  row, as in MiniLM (Wang et al. 2020) and TinyBERT's attention transfer (Jiao et al. 2020,
  which uses MSE; see `attention_mse`). Inputs are softmax probabilities [B, H, L, L]; padded
  keys (mask 0) and keys the teacher gives probability exactly 0 contribute 0 (0·log 0 = 0)
  to the value and its gradient, never NaN. A student probability that underflowed to 0 at a
  key the teacher uses is floored at the smallest normal float32. Heads must match.
  """
  _check_attention(student_attn, teacher_attn, mask, 'attention_kl')
  s = student_attn.astype(jnp.float32)
  t = teacher_attn.astype(jnp.float32)
  keys = (mask > 0)[:, None, None, :]
  used = (t > 0) & keys
  log_t = jnp.log(jnp.where(used, t, 1.0))
  log_s = jnp.log(jnp.where(used, jnp.maximum(s, _TINY), 1.0))
  terms = jnp.where(used, t * (log_t - log_s), 0.0)
  per_query = jnp.mean(jnp.sum(terms, axis=-1), axis=1)  # [B, L]
  return _masked(per_query, mask)


def attention_mse(student_attn: jax.Array, teacher_attn: jax.Array, mask: jax.Array) -> Metric:
  """TinyBERT (Jiao et al. 2020) attention loss: per query (1/(H·K))·Σ_h Σ_k (A^S − A^T)²,

  over the K real keys of the example (padded keys excluded from the sum and from K),
  weighted by the query `mask`. Inputs [B, H, L, L]; heads must match.
  """
  _check_attention(student_attn, teacher_attn, mask, 'attention_mse')
  keys = (mask > 0).astype(jnp.float32)  # [B, L]
  diff = student_attn.astype(jnp.float32) - teacher_attn.astype(jnp.float32)
  sq = jnp.where(keys[:, None, None, :] > 0, diff * diff, 0.0)
  per_query = jnp.mean(jnp.sum(sq, axis=-1), axis=1)  # [B, L]
  n_keys = jnp.maximum(jnp.sum(keys, axis=-1, keepdims=True), 1.0)  # [B, 1]
  return _masked(per_query / n_keys, mask)
