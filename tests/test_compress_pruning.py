"""Pruning masks, schedules and the optax wrapper against NumPy references on tiny pytrees."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax.compress import pruning
from kdjax.compress.rules import RuleError


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
    'dense_0': {
      'kernel': jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
      'bias': jnp.asarray(rng.normal(size=(3,)), jnp.float32),
    },
    'dense_1': {
      'kernel': jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
      'bias': jnp.asarray(rng.normal(size=(5,)), jnp.float32),
    },
  }


KERNELS = ['kernel']


def _np_keep(scores, sparsity):
  """Reference: prune the round(s * size) lowest scores, ties to the lower flat index."""
  flat = np.asarray(scores, np.float32).ravel()
  k = int(round(sparsity * flat.size))
  keep = np.ones(flat.size, bool)
  keep[np.argsort(flat, kind='stable')[:k]] = False
  return keep.reshape(np.shape(scores))


def test_magnitude_layer_exact_counts_and_unselected_untouched():
  params = _params()
  masks = pruning.magnitude_masks(params, 0.4, KERNELS)
  for layer in ('dense_0', 'dense_1'):
    w = np.asarray(params[layer]['kernel'])
    got = np.asarray(masks[layer]['kernel'])
    assert got.dtype == bool
    np.testing.assert_array_equal(got, _np_keep(np.abs(w), 0.4))
    assert (~got).sum() == round(0.4 * w.size)
    # Biases are not selected: all-True mask, and apply_masks leaves them bit-identical.
    assert np.asarray(masks[layer]['bias']).all()
  pruned = pruning.apply_masks(params, masks)
  for layer in ('dense_0', 'dense_1'):
    np.testing.assert_array_equal(pruned[layer]['bias'], params[layer]['bias'])
    np.testing.assert_array_equal(
      pruned[layer]['kernel'], np.where(masks[layer]['kernel'], params[layer]['kernel'], 0.0)
    )


def test_magnitude_global_matches_numpy_threshold():
  params = _params(1)
  masks = pruning.magnitude_masks(params, 0.6, KERNELS, scope='global')
  w0 = np.abs(np.asarray(params['dense_0']['kernel'])).ravel()
  w1 = np.abs(np.asarray(params['dense_1']['kernel'])).ravel()
  allw = np.concatenate([w0, w1])
  k = round(0.6 * allw.size)
  threshold = np.sort(allw)[k]  # smallest kept magnitude
  keep = _np_keep(allw, 0.6)
  got = np.concatenate(
    [np.asarray(masks['dense_0']['kernel']).ravel(), np.asarray(masks['dense_1']['kernel']).ravel()]
  )
  np.testing.assert_array_equal(got, keep)
  assert (~got).sum() == k
  assert allw[got].min() == threshold
  assert allw[~got].max() < threshold
  # One global threshold usually gives unequal per-layer sparsities, unlike scope='layer'.
  report = pruning.sparsity_report(masks, KERNELS)
  assert report['zeros'] == k and report['size'] == allw.size


def test_ties_are_broken_deterministically_with_exact_counts():
  params = {'w': jnp.ones((10,), jnp.float32)}
  masks = pruning.magnitude_masks(params, 0.3, ['w'])
  np.testing.assert_array_equal(masks['w'], np.arange(10) >= 3)


def test_random_masks_exact_count_and_key_dependence():
  params = _params()
  a = pruning.random_masks(params, 0.5, KERNELS, jax.random.PRNGKey(0))
  b = pruning.random_masks(params, 0.5, KERNELS, jax.random.PRNGKey(1))
  for layer in ('dense_0', 'dense_1'):
    size = params[layer]['kernel'].size
    assert (~np.asarray(a[layer]['kernel'])).sum() == round(0.5 * size)
    assert np.asarray(a[layer]['bias']).all()
  assert not np.array_equal(a['dense_0']['kernel'], b['dense_0']['kernel'])


def test_saliency_masks_use_abs_w_times_g():
  params = _params()
  grads = _params(7)
  masks = pruning.saliency_masks(params, grads, 0.5, KERNELS)
  for layer in ('dense_0', 'dense_1'):
    score = np.abs(np.asarray(params[layer]['kernel']) * np.asarray(grads[layer]['kernel']))
    np.testing.assert_array_equal(masks[layer]['kernel'], _np_keep(score, 0.5))
  glob = pruning.saliency_masks(params, grads, 0.5, KERNELS, scope='global')
  score = np.concatenate(
    [
      np.abs(np.asarray(params[n]['kernel']) * np.asarray(grads[n]['kernel'])).ravel()
      for n in ('dense_0', 'dense_1')
    ]
  )
  got = np.concatenate([np.asarray(glob[n]['kernel']).ravel() for n in ('dense_0', 'dense_1')])
  np.testing.assert_array_equal(got, _np_keep(score, 0.5))


def test_movement_scores_accumulate_like_numpy_and_masks_keep_top():
  params = [_params(s) for s in range(3)]
  grads = [_params(10 + s) for s in range(3)]
  scores = pruning.init_movement_scores(params[0])
  ref = {
    n: np.zeros((8, 3) if n == 'dense_0' else (4, 5), np.float32) for n in ('dense_0', 'dense_1')
  }
  for p, g in zip(params, grads):
    scores = pruning.movement_scores(scores, p, g)
    for n in ref:
      ref[n] = ref[n] - np.asarray(p[n]['kernel']) * np.asarray(g[n]['kernel'])
  for n in ref:
    np.testing.assert_allclose(scores[n]['kernel'], ref[n], rtol=1e-6, atol=1e-6)
  masks = pruning.movement_masks(scores, 0.25, KERNELS)
  for n in ref:
    # Signed scores: the most negative (moving towards zero) are pruned, not the smallest |S|.
    np.testing.assert_array_equal(
      masks[n]['kernel'], _np_keep(np.asarray(scores[n]['kernel']), 0.25)
    )


def test_nm_masks_two_of_four():
  params = _params(3)
  masks = pruning.nm_masks(params, 2, 4, KERNELS)
  for n in ('dense_0', 'dense_1'):
    w = np.abs(np.asarray(params[n]['kernel']))
    k = np.asarray(masks[n]['kernel'])
    groups_w = w.reshape(w.shape[0] // 4, 4, w.shape[1])
    groups_k = k.reshape(groups_w.shape)
    assert (groups_k.sum(axis=1) == 2).all()
    # The two kept entries of every group are its two largest magnitudes.
    top2 = np.argsort(-groups_w, axis=1, kind='stable')[:, :2, :]
    expect = np.zeros_like(groups_k)
    np.put_along_axis(expect, top2, True, axis=1)
    np.testing.assert_array_equal(groups_k, expect)
    assert np.asarray(masks[n]['bias']).all()


def test_nm_masks_errors():
  params = {'a': {'kernel': jnp.ones((6, 4))}, 'b': {'kernel': jnp.ones((8, 4))}}
  with pytest.raises(ValueError, match=r"'a/kernel'.*not a multiple of m=4") as e:
    pruning.nm_masks(params, 2, 4, KERNELS)
  assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match='n must be'):
    pruning.nm_masks(params, 5, 4, ['b/kernel'])
  # axis=1 groups along the output axis instead, where both kernels have length 4.
  masks = pruning.nm_masks(params, 1, 4, KERNELS, axis=1)
  assert (np.asarray(masks['a']['kernel']).sum(axis=1) == 1).all()


def test_bad_sparsity_and_dead_rule():
  params = _params()
  for bad in (1.0, -0.1, 1.5):
    with pytest.raises(ValueError, match=r'sparsity must be in \[0, 1\)') as e:
      pruning.magnitude_masks(params, bad, KERNELS)
    assert '\n' not in str(e.value)
  with pytest.raises(RuleError, match='no_such_layer'):
    pruning.magnitude_masks(params, 0.5, ['no_such_layer'])
  with pytest.raises(ValueError, match='scope'):
    pruning.magnitude_masks(params, 0.5, KERNELS, scope='per_layer')
  with pytest.raises(ValueError, match='final must be'):
    pruning.cubic_sparsity(0, 0.0, 1.0, 0, 10, 1)
  with pytest.raises(RuleError):
    pruning.masked_pruning(optax.sgd(0.1), ['nope'], 0.5).init(params)


def test_sparsity_report_counts_zeros_of_selected_params():
  params = {'a': {'kernel': jnp.asarray([0.0, 1.0, 0.0, 2.0])}, 'a2': {'bias': jnp.zeros((3,))}}
  rep = pruning.sparsity_report(params, KERNELS)
  assert rep['per_path'] == {'a/kernel': 0.5}
  assert rep['zeros'] == 2 and rep['size'] == 4 and rep['total'] == 0.5
  assert pruning.sparsity_report(params)['zeros'] == 5


def _np_cubic(t, si, sf, t0, n_dt):
  return sf + (si - sf) * (1 - (t - t0) / n_dt) ** 3


def test_cubic_schedule_values():
  si, sf, begin, end, freq = 0.1, 0.8, 10, 50, 10
  f = jax.jit(lambda s: pruning.cubic_sparsity(s, si, sf, begin, end, freq))
  np.testing.assert_allclose(f(begin), _np_cubic(begin, si, sf, begin, end - begin), rtol=1e-6)
  np.testing.assert_allclose(f(begin), si, rtol=1e-6)
  # Updated only every `frequency` steps: 25 and 29 both use t = 20.
  mid = _np_cubic(20, si, sf, begin, end - begin)
  np.testing.assert_allclose(f(25), mid, rtol=1e-6)
  np.testing.assert_allclose(f(29), mid, rtol=1e-6)
  np.testing.assert_allclose(f(30), _np_cubic(30, si, sf, begin, end - begin), rtol=1e-6)
  np.testing.assert_allclose(f(end), sf, rtol=1e-6)
  for before in (0, 5, 9):
    np.testing.assert_allclose(f(before), si, rtol=1e-6)
  for after in (50, 51, 1000):
    np.testing.assert_allclose(f(after), sf, rtol=1e-6)


def test_one_shot_and_iterative_schedules():
  one = pruning.one_shot_schedule(0.7)
  assert float(one(0)) == pytest.approx(0.7) and float(one(100)) == pytest.approx(0.7)
  it = jax.jit(pruning.iterative_schedule([5, 10], [0.3, 0.6]))
  got = [float(it(s)) for s in (0, 4, 5, 9, 10, 99)]
  np.testing.assert_allclose(got, [0.0, 0.0, 0.3, 0.3, 0.6, 0.6], rtol=1e-6)


def _recorder():
  """An optax transform that keeps the gradients it receives in its state (for inspection)."""
  return optax.GradientTransformation(
    lambda p: jax.tree_util.tree_map(jnp.zeros_like, p), lambda u, s, p=None: (u, u)
  )


def _run_wrapper(method, scope, steps=20):
  params = _params(4)
  target = _params(5)
  schedule = pruning.cubic_schedule(0.0, 0.75, 2, 12, 2)
  tx = pruning.masked_pruning(
    optax.chain(_recorder(), optax.adam(0.05)),
    KERNELS,
    schedule,
    method=method,
    scope=scope,
    update_every=2,
  )
  state = tx.init(params)

  def loss(p):
    return sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target)))

  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p)
    u, s2 = tx.update(g, s, p)
    return optax.apply_updates(p, u), s2, s.masks

  history = []
  for _ in range(steps):
    params, state, old_masks = step(params, state)
    recorded = state.inner_state[0]
    history.append((params, state.masks, old_masks, recorded))
  return params, state, history, target


@pytest.mark.parametrize('method,scope', [('magnitude', 'layer'), ('movement', 'global')])
def test_masked_pruning_wrapper_keeps_pruned_weights_zero(method, scope):
  params, state, history, _ = _run_wrapper(method, scope)
  for p, masks, old_masks, recorded in history:
    for n in ('dense_0', 'dense_1'):
      k = np.asarray(masks[n]['kernel'])
      w = np.asarray(p[n]['kernel'])
      assert (w[~k] == 0.0).all()  # exact zeros despite Adam momentum
      # The inner transform saw zero gradients for weights pruned before this step.
      assert (np.asarray(recorded[n]['kernel'])[~np.asarray(old_masks[n]['kernel'])] == 0.0).all()
  # Reaches the scheduled final sparsity exactly.
  sizes = [params[n]['kernel'].size for n in ('dense_0', 'dense_1')]
  pruned = [(~np.asarray(state.masks[n]['kernel'])).sum() for n in ('dense_0', 'dense_1')]
  if scope == 'layer':
    assert pruned == [round(0.75 * s) for s in sizes]
  else:
    assert sum(pruned) == round(0.75 * sum(sizes))
  rep = pruning.sparsity_report(params, KERNELS)
  assert rep['zeros'] == sum(pruned)
  assert int(state.count) == 20


def test_masked_pruning_leaves_unselected_params_like_plain_adam():
  params, _, _, target = _run_wrapper('magnitude', 'layer')
  # The quadratic is separable, so the biases follow exactly the plain-Adam trajectory.
  p = _params(4)
  tx = optax.adam(0.05)
  s = tx.init(p)
  for _ in range(20):
    g = jax.tree_util.tree_map(lambda a, b: 2 * (a - b), p, target)
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
  for n in ('dense_0', 'dense_1'):
    np.testing.assert_allclose(params[n]['bias'], p[n]['bias'], rtol=1e-6, atol=1e-7)


def test_masked_pruning_masks_survive_when_not_recomputing():
  # One-shot at step 0 with recomputation never again (update_every huge): masks fixed, weights
  # stay zero while Adam keeps pushing kept weights.
  params = _params(6)
  tx = pruning.masked_pruning(optax.adam(0.1), KERNELS, 0.5, update_every=10**6)
  state = tx.init(params)
  update = jax.jit(tx.update)
  first = None
  for _ in range(5):
    g = jax.tree_util.tree_map(jnp.ones_like, params)
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    first = state.masks if first is None else first
    np.testing.assert_array_equal(state.masks['dense_0']['kernel'], first['dense_0']['kernel'])
    w = np.asarray(params['dense_0']['kernel'])
    assert (w[~np.asarray(first['dense_0']['kernel'])] == 0.0).all()


def test_wrapper_nm_keeps_a_valid_2_4_pattern_from_its_start_step():
  rng = np.random.default_rng(3)
  params = {'a': {'kernel': jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)}}
  target = jax.tree_util.tree_map(lambda p: p + 1.0, params)
  schedule = pruning.one_shot_schedule(0.5, at_step=3)
  tx = pruning.masked_pruning(optax.adam(0.05), ('kernel$',), schedule, method='nm')
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(
      lambda p: sum(
        jnp.sum((x - t) ** 2) for x, t in zip(jax.tree.leaves(p), jax.tree.leaves(target))
      )
    )(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(10):
    params, state = step(params, state)
    kernel = np.asarray(params['a']['kernel'])
    nonzero_per_group = (kernel.reshape(2, 4, 3) != 0).sum(axis=1)
    if i < 3:
      assert np.all(kernel != 0)
    else:
      assert np.all(nonzero_per_group == 2), (i, nonzero_per_group)


def test_wrapper_nm_refuses_an_axis_that_does_not_split():
  params = {'a': {'kernel': jnp.ones((6, 2))}}
  tx = pruning.masked_pruning(optax.sgd(0.1), ('kernel$',), 0.5, method='nm')
  with pytest.raises(ValueError, match='a/kernel'):
    tx.init(params)
