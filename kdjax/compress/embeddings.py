"""Low-rank compression of embedding tables (and, alike, of any 2-D weight matrix).

All functions are pure: numpy (or jax) arrays in, new numpy arrays out. Decompositions run
in float64 whatever the input dtype, because a 30k x 384 float32 table loses several digits
in the Gram/SVD arithmetic and the results are small enough to afford it; returned tables
and factors are float32, the dtype parameters are stored in.

  * `pca_reduce`: centred PCA, the table to `width` principal coordinates (a student's
    narrower embedding table).
  * `svd_factorise`: uncentred best rank-r factors `a @ b` (a factorised embedding
    [V, r] @ [r, D], or a Dense kernel split into two thinner ones).
  * `rank_for_energy`: the rank that keeps a given share of the squared singular values.
  * `nearest_neighbours` / `neighbour_overlap`: how much of the cosine-similarity
    neighbourhood of each word a compression keeps.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

SPLITS = ('sqrt', 'left')


def _as_matrix(x, name: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 2 or 0 in x.shape:
    raise ValueError(f'{name}: need a non-empty 2-D array, got shape {x.shape}')
  if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
    raise ValueError(f'{name}: need a real-valued array, got dtype {x.dtype}')
  x = x.astype(np.float64)
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{name}: holds NaN or inf values')
  return x


def _check_rank(value, limit: int, name: str, shape: tuple[int, ...]) -> int:
  # bool is an int subclass; `True` as a rank is always a bug.
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f'{name} must be an integer, got {value!r}')
  if not 1 <= value <= limit:
    raise ValueError(f'{name}={value} must be in [1, {limit}] (min of the shape {shape})')
  return int(value)


def _fix_signs(u: np.ndarray, vt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """SVD factors with each right singular vector's largest-|value| entry positive.

  An SVD is unique only up to the sign of each (u_i, v_i) pair, and which sign LAPACK returns
  can change with the library build or thread count; fixing it makes reduced tables
  reproducible across machines. The first such entry wins ties, so the rule is total.
  """
  signs = np.sign(vt[np.arange(vt.shape[0]), np.argmax(np.abs(vt), axis=1)])
  signs[signs == 0] = 1.0  # an all-zero vector (rank-deficient input): leave it
  return u * signs, vt * signs[:, None]


def _svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  u, s, vt = np.linalg.svd(x, full_matrices=False)
  u, vt = _fix_signs(u, vt)
  return u, s, vt


def pca_reduce(table: np.ndarray, width: int) -> tuple[np.ndarray, dict]:
  """Centred PCA of the rows of `table` [V, D] to `width` dimensions.

  Returns the reduced table [V, width] (float32: the principal coordinates,
  `(table - mean) @ components.T`) and info:
    components [width, D] float32, orthonormal rows, in decreasing variance order;
    mean [D] float32;
    explained_variance_ratio: float, the share of the total variance the `width`
      components keep (1.0 at full width);
    singular_values: [min(V, D)] float64, ALL singular values of the centred table (not
      only the kept ones), so a caller can pick another width with `rank_for_energy`
      without a second decomposition.
  `reduced @ components + mean` is the best rank-`width` affine approximation of `table`.
  Component signs follow `_fix_signs`, so the result is the same on every machine.
  """
  x = _as_matrix(table, 'table')
  width = _check_rank(width, min(x.shape), 'width', x.shape)
  mean = x.mean(axis=0)
  centred = x - mean
  u, s, vt = _svd(centred)
  total = float(np.sum(s**2))
  # A constant table has no variance to explain: every width keeps "all" of nothing.
  ratio = float(np.sum(s[:width] ** 2) / total) if total > 0 else 1.0
  reduced = u[:, :width] * s[:width]  # == centred @ vt[:width].T, without the extra matmul
  info = {
    'components': vt[:width].astype(np.float32),
    'mean': mean.astype(np.float32),
    'explained_variance_ratio': ratio,
    'singular_values': s,
  }
  return reduced.astype(np.float32), info


def svd_factorise(
  matrix: np.ndarray, rank: int, split: str = 'sqrt'
) -> tuple[np.ndarray, np.ndarray]:
  """Factors a [V, rank], b [rank, D] with `a @ b` the best rank-`rank` approximation of
  `matrix` (Eckart–Young: Frobenius error sqrt(sum of the dropped squared singular values)).

  No centring: the product approximates `matrix` itself, so it can replace a weight directly.
  `split` says where the singular values S go:
    'sqrt' (default): a = U sqrt(S), b = sqrt(S) Vt. Both factors get the same scale,
      which suits training both (an embedding table and its projection, or two Dense
      kernels) with one learning rate.
    'left': a = U S, b = Vt. b has orthonormal rows, so `a = matrix @ b.T` and the rows of a
      have the same inner products and cosine similarities as the rows of `a @ b`.
  Signs follow `_fix_signs` (reproducible). Both factors are float32.
  """
  x = _as_matrix(matrix, 'matrix')
  rank = _check_rank(rank, min(x.shape), 'rank', x.shape)
  if split not in SPLITS:
    raise ValueError(f'split={split!r} must be one of {SPLITS}')
  u, s, vt = _svd(x)
  u, s, vt = u[:, :rank], s[:rank], vt[:rank]
  if split == 'sqrt':
    root = np.sqrt(s)
    a, b = u * root, vt * root[:, None]
  else:
    a, b = u * s, vt
  return a.astype(np.float32), b.astype(np.float32)


def rank_for_energy(singular_values: Sequence[float] | np.ndarray, threshold: float) -> int:
  """The smallest r whose r largest singular values keep >= `threshold` of the energy
  sum(s**2). `singular_values` need not be sorted (they are sorted here, largest first)."""
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)):
    raise ValueError(f'threshold must be a number in (0, 1], got {threshold!r}')
  if not 0 < threshold <= 1:
    raise ValueError(f'threshold={threshold} must be in (0, 1]')
  s = np.asarray(singular_values, dtype=np.float64)
  if s.ndim != 1 or s.size == 0:
    raise ValueError(f'singular_values: need a non-empty 1-D array, got shape {s.shape}')
  if not np.all(np.isfinite(s)) or np.any(s < 0):
    raise ValueError('singular_values must be finite and non-negative')
  energy = np.cumsum(np.sort(s)[::-1] ** 2)
  if energy[-1] == 0:
    raise ValueError('singular_values are all zero: no energy to keep')
  # energy[-1] is the total itself, so the last share is exactly 1.0 and threshold=1 is
  # always reachable despite rounding in the cumulative sum.
  share = energy / energy[-1]
  return int(np.searchsorted(share, threshold, side='left')) + 1


def _check_ids(ids, vocab: int, name: str) -> np.ndarray:
  ids = np.asarray(ids)
  if ids.size == 0:
    return np.zeros((0,), np.int64)
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f'{name}: need a 1-D sequence of integer ids, got {ids!r}')
  if ids.min() < 0 or ids.max() >= vocab:
    raise ValueError(f'{name}: ids must be in [0, {vocab}), got min {ids.min()} max {ids.max()}')
  return ids.astype(np.int64)


def nearest_neighbours(
  table: np.ndarray,
  query_ids: Sequence[int] | np.ndarray,
  k: int,
  exclude_ids: Sequence[int] | np.ndarray = (),
  batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
  """The k rows of `table` most cosine-similar to each query row.

  Returns (ids [Q, k] int64, similarities [Q, k] float64), best first; equal similarities
  are ordered by id, so the result is deterministic. Never returned: the query itself and
  `exclude_ids` (e.g. [PAD], [CLS], [unused*]). An all-zero row has similarity 0 to
  everything. Queries are processed `batch_size` at a time, so memory is
  batch_size x V floats, not Q x V (all 30k words as queries of a 30k table fit).
  """
  x = _as_matrix(table, 'table')
  vocab = x.shape[0]
  queries = _check_ids(query_ids, vocab, 'query_ids')
  exclude = np.unique(_check_ids(exclude_ids, vocab, 'exclude_ids'))
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f'k must be a positive integer, got {k!r}')
  # A query may itself be in exclude_ids; the worst case is a query outside it.
  available = vocab - exclude.size - 1
  if k > available:
    raise ValueError(
      f'k={k} exceeds the {available} candidates left after excluding the query and '
      f'{exclude.size} exclude_ids'
    )
  if (
    isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1
  ):
    raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}')
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  unit = x / np.where(norms > 0, norms, 1.0)
  out_ids = np.zeros((queries.size, k), np.int64)
  out_sims = np.zeros((queries.size, k), np.float64)
  for start in range(0, queries.size, batch_size):
    q = queries[start : start + batch_size]
    sims = unit[q] @ unit.T
    sims[:, exclude] = -np.inf
    sims[np.arange(q.size), q] = -np.inf
    # argpartition finds a top-k set in O(V); ties at the k-th value could make that set
    # arbitrary, so every row with a tie there is re-ranked over all its tied candidates.
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(sims, part, axis=1).min(axis=1)
    for row in range(q.size):
      cand = part[row]
      if np.count_nonzero(sims[row] >= kth[row]) > k:
        cand = np.flatnonzero(sims[row] >= kth[row])
      # lexsort: last key is primary -> similarity descending, then id ascending.
      order = np.lexsort((cand, -sims[row, cand]))[:k]
      out_ids[start + row] = cand[order]
      out_sims[start + row] = sims[row, cand[order]]
  return out_ids, out_sims


def neighbour_overlap(before: np.ndarray, after: np.ndarray) -> float:
  """Mean over queries of |top-k before ∩ top-k after| / k, for neighbour id arrays [Q, k]
  (e.g. from `nearest_neighbours` on the original and the compressed table). 1.0: every
  neighbour kept (order ignored); 0.0: none."""
  before, after = np.asarray(before), np.asarray(after)
  if before.ndim != 2 or before.shape != after.shape or 0 in before.shape:
    raise ValueError(
      f'before/after: need two non-empty [Q, k] id arrays of one shape, got {before.shape} '
      f'and {after.shape}'
    )
  kept = [len(set(b.tolist()) & set(a.tolist())) for b, a in zip(before, after)]
  return float(np.mean(kept) / before.shape[1])
