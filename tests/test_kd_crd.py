"""Contrastive representation distillation: NumPy references, padding and memory-bank properties.

The functions under test are jitted once per shape here (which also checks that they trace), and
inputs are built with NumPy: eager op-by-op dispatch would dominate the run time on a CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.kd import crd

info_nce = jax.jit(crd.info_nce, static_argnames='symmetric')
bank_nce = jax.jit(crd.bank_nce, static_argnames='fresh_positives')
update_bank = jax.jit(crd.update_bank)
sample_negatives = jax.jit(crd.sample_negatives, static_argnums=(2, 3))

WEIGHTS = np.array([1, 1, 0, 1, 0.5, 1, 0, 1], np.float32)
PAD = (WEIGHTS == 0)[:, None]


def _unit(seed, shape):
  x = np.random.default_rng(seed).normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _np_nll(anchor, candidates, positive_col, tau):
  """−log softmax(candidates · anchor / τ)[positive_col], in float64."""
  logits = candidates.astype(np.float64) @ anchor.astype(np.float64) / tau
  logits = logits - logits.max()
  return -(logits[positive_col] - np.log(np.exp(logits).sum()))


def _np_info_nce(s, t, w, tau, symmetric):
  valid = np.nonzero(w > 0)[0]
  total = 0.0
  for col, i in enumerate(valid):
    loss = _np_nll(s[i], t[valid], col, tau)
    if symmetric:
      loss = 0.5 * (loss + _np_nll(t[i], s[valid], col, tau))
    total += w[i] * loss
  return total, w.sum()


@pytest.mark.parametrize('symmetric', [False, True])
def test_info_nce_matches_numpy_reference_with_padding(symmetric):
  s, t = _unit(0, (8, 16)), _unit(1, (8, 16))
  for tau in (0.07, 0.5):
    got = info_nce(s, t, WEIGHTS, tau, symmetric=symmetric)
    want = _np_info_nce(s, t, WEIGHTS, tau, symmetric)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('symmetric', [False, True])
def test_padded_examples_do_not_change_info_nce(symmetric):
  s, t = _unit(2, (8, 16)), _unit(3, (8, 16))
  valid = WEIGHTS > 0
  compact = info_nce(s[valid], t[valid], WEIGHTS[valid], 0.2, symmetric=symmetric)
  for value in (0.0, 1e4, np.nan):
    got = info_nce(np.where(PAD, value, s), np.where(PAD, -value, t), WEIGHTS, 0.2, symmetric)
    np.testing.assert_allclose(np.asarray(got), np.asarray(compact), rtol=1e-6)


def test_info_nce_gradient_ignores_padding():
  s, t = _unit(2, (8, 16)), _unit(3, (8, 16))
  loss = lambda a, b: crd.info_nce(a, b, WEIGHTS, 0.2, symmetric=True)[0]
  gs, gt = jax.jit(jax.grad(loss, argnums=(0, 1)))(np.where(PAD, np.nan, s), np.where(PAD, 1e4, t))
  for g in (np.asarray(gs), np.asarray(gt)):
    assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0
    np.testing.assert_array_equal(g[WEIGHTS == 0], 0.0)


def test_aligned_orthogonal_embeddings_give_near_zero_loss_and_shuffling_hurts():
  emb = np.eye(8, 16, dtype=np.float32)
  w = np.ones(8, np.float32)
  mean = lambda metric: float(metric[0]) / float(metric[1])
  aligned = mean(info_nce(emb, emb, w, 0.05, symmetric=True))
  assert aligned < 1e-6  # log(1 + 7·e^{−20})
  shuffled = mean(info_nce(emb, np.roll(emb, 1, axis=0), w, 0.05, symmetric=True))
  assert shuffled > 10.0
  warm = mean(info_nce(emb, emb, w, 1.0, symmetric=True))  # larger τ: softer, still aligned
  np.testing.assert_allclose(warm, np.log(1 + 7 * np.exp(-1.0)), rtol=1e-5)
  assert aligned < warm < shuffled


def test_init_bank_gives_unit_vectors():
  bank = jax.jit(crd.init_bank, static_argnums=(1, 2))(jax.random.PRNGKey(0), 20, 8)
  assert bank.shape == (20, 8) and bank.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(np.asarray(bank), axis=-1), 1.0, rtol=1e-6)
  assert np.abs(np.asarray(bank)).std() > 0.1  # random directions, not a constant


def test_sample_negatives_never_returns_own_index_and_stays_in_range():
  bank_size, k = 7, 256
  indices = np.array([0, 6, 3, 3, -1, 100], np.int32)  # edges, a duplicate, padded garbage
  draws = np.stack(
    [np.asarray(sample_negatives(jax.random.PRNGKey(i), indices, bank_size, k)) for i in range(20)]
  )  # [20, B, K]
  assert draws.shape == (20, 6, k) and draws.dtype == np.int32
  assert draws.min() >= 0 and draws.max() < bank_size
  assert not np.any(draws == indices[None, :, None])
  for row in range(4):  # every other row is drawn, roughly uniformly
    counts = np.bincount(draws[:, row].ravel(), minlength=bank_size)
    others = np.delete(counts, indices[row])
    assert counts[indices[row]] == 0 and others.min() > 0.8 * others.mean()


def test_sample_negatives_needs_two_rows():
  with pytest.raises(ValueError, match='bank_size=1'):
    crd.sample_negatives(jax.random.PRNGKey(0), np.zeros(2, np.int32), 1, 4)


def test_update_bank():
  bank, emb = _unit(4, (10, 16)), _unit(5, (8, 16))
  # Rows 2 and 6 are padded; row 2 shares index 4 with valid row 0, row 6 has index −1.
  indices = np.array([4, 5, 4, 7, 1, 0, -1, 8], np.int32)
  new = np.asarray(update_bank(bank, indices, np.where(PAD, np.nan, emb), WEIGHTS, 0.5))
  for i in np.nonzero(WEIGHTS > 0)[0]:
    want = 0.5 * bank[indices[i]].astype(np.float64) + 0.5 * emb[i]
    np.testing.assert_allclose(new[indices[i]], want / np.linalg.norm(want), rtol=1e-5, atol=1e-6)
  untouched = [2, 3, 6, 9]  # includes row 9, which index −1 would wrap to
  np.testing.assert_array_equal(new[untouched], bank[untouched])
  np.testing.assert_allclose(np.linalg.norm(new, axis=-1), 1.0, rtol=1e-6)
  same = update_bank(bank, indices, emb, np.zeros(8, np.float32), 0.5)
  np.testing.assert_array_equal(np.asarray(same), bank)


def _np_bank_nce(s, t, bank_t, bank_s, idx, neg, w, tau, fresh):
  total = 0.0
  for i in np.nonzero(w > 0)[0]:
    pos_t, pos_s = (t[i], s[i]) if fresh else (bank_t[idx[i]], bank_s[idx[i]])
    cand_t = np.concatenate([pos_t[None], bank_t[neg[i]]])
    cand_s = np.concatenate([pos_s[None], bank_s[neg[i]]])
    total += w[i] * 0.5 * (_np_nll(s[i], cand_t, 0, tau) + _np_nll(t[i], cand_s, 0, tau))
  return total, w.sum()


def _bank_inputs():
  s, t = _unit(5, (8, 16)), _unit(6, (8, 16))
  bank_t, bank_s = _unit(7, (30, 16)), _unit(8, (30, 16))
  idx = np.array([3, 17, 0, 29, 8, 12, 3, 21], np.int32)
  neg = np.asarray(sample_negatives(jax.random.PRNGKey(9), idx, 30, 5))
  return s, t, bank_t, bank_s, idx, neg


@pytest.mark.parametrize('fresh', [False, True])
def test_bank_nce_matches_numpy_reference(fresh):
  s, t, bank_t, bank_s, idx, neg = _bank_inputs()
  for tau in (0.07, 0.5):
    got = bank_nce(s, t, bank_t, bank_s, idx, neg, WEIGHTS, tau, fresh_positives=fresh)
    want = _np_bank_nce(s, t, bank_t, bank_s, idx, neg, WEIGHTS, tau, fresh)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_bank_nce_padding_and_gradients():
  s, t, bank_t, bank_s, idx, neg = _bank_inputs()
  base = bank_nce(s, t, bank_t, bank_s, idx, neg, WEIGHTS, 0.1)
  s_bad, t_bad = np.where(PAD, np.nan, s), np.where(PAD, np.inf, t)
  loss = lambda a, b, m: crd.bank_nce(a, b, m, bank_s, idx, neg, WEIGHTS, 0.1)
  value, grads = jax.jit(jax.value_and_grad(lambda *a: loss(*a)[0], argnums=(0, 1, 2)))(
    s_bad, t_bad, bank_t
  )
  np.testing.assert_allclose(float(value), float(base[0]), rtol=1e-6)
  gs, gt, gbank = (np.asarray(g) for g in grads)
  assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gt)) and np.abs(gs).sum() > 0
  np.testing.assert_array_equal(gs[WEIGHTS == 0], 0.0)
  np.testing.assert_array_equal(gt[WEIGHTS == 0], 0.0)
  np.testing.assert_array_equal(gbank, 0.0)  # banks are state, not parameters


def test_bank_nce_with_in_batch_negatives_equals_symmetric_info_nce():
  s, t = _unit(10, (8, 16)), _unit(11, (8, 16))
  w = np.ones(8, np.float32)
  idx = np.arange(8, dtype=np.int32)
  neg = np.array([[j for j in range(8) if j != i] for i in range(8)], np.int32)
  want = info_nce(s, t, w, 0.2, symmetric=True)
  fresh = bank_nce(s, t, t, s, idx, neg, w, 0.2, fresh_positives=True)
  np.testing.assert_allclose(np.asarray(fresh), np.asarray(want), rtol=1e-5)
  from_bank = bank_nce(s, t, t, s, idx, neg, w, 0.2)  # bank rows = this batch: same positives
  np.testing.assert_allclose(np.asarray(from_bank), np.asarray(want), rtol=1e-5)
