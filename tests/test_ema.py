"""The moving average of the weights (train.ema_decay): the optax wrapper against a NumPy
recursion, a stage that evaluates and returns the average, and resume that carries it."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import default
from kdjax import config as config_lib
from kdjax import loop, optim, report
from kdjax import step as step_lib
from kdjax.models import registry
from tests import tiny_stage


def _reference_decay(decay, n):
  return min(decay, (1 + n) / (10 + n))


def test_wrapper_matches_a_numpy_recursion_and_leaves_the_updates_alone():
  target = np.array([1.0, -2.0, 3.0], np.float32)
  loss = lambda p: jnp.sum((p['w'] - target) ** 2)
  params = {'w': jnp.zeros(3, jnp.float32)}
  plain, averaged = optax.sgd(0.1), optim.with_param_ema(optax.sgd(0.1), 0.8)
  state_plain, state_avg = plain.init(params), averaged.init(params)
  p_plain, p_avg = params, params
  expected = np.zeros(3, np.float32)
  for n in range(1, 41):  # the decay reaches its cap, 0.8, at n = 35
    u_plain, state_plain = plain.update(jax.grad(loss)(p_plain), state_plain, p_plain)
    u_avg, state_avg = averaged.update(jax.grad(loss)(p_avg), state_avg, p_avg)
    p_plain, p_avg = optax.apply_updates(p_plain, u_plain), optax.apply_updates(p_avg, u_avg)
    chex.assert_trees_all_close(p_avg, p_plain)  # the trajectory is the optimizer's own
    d = _reference_decay(0.8, n)
    expected = d * expected + (1 - d) * np.asarray(p_plain['w'])
    np.testing.assert_allclose(optim.ema_params(state_avg)['w'], expected, rtol=1e-6, atol=1e-7)
  assert int(state_avg.count) == 40
  # The params converge to the target; the average lags behind them.
  error = np.abs(np.asarray(p_plain['w']) - target).max()
  assert error < 1e-3 < np.abs(optim.ema_params(state_avg)['w'] - target).max()
  assert optim.ema_params(plain.init(params)) is None


def test_wrapper_needs_the_params():
  tx = optim.with_param_ema(optax.sgd(0.1), 0.9)
  params = {'w': jnp.ones(2)}
  with pytest.raises(ValueError, match='needs the params'):
    tx.update(params, tx.init(params))


@pytest.fixture(scope='module')
def model():
  return tiny_stage.cnn()


def _run(model, tmp_path, steps, ema_decay, seen=None):
  def evaluate(params):  # records what the loop evaluates at each step
    if seen is not None:
      seen.append(params)
    return {'accuracy': 0.0}

  spec = loop.StageSpec(
    name='distill',
    loss_fn=step_lib.supervised_loss_fn(model),  # the tiny CNN has no dropout
    tx=optax.adam(1e-2),
    schedule=optax.constant_schedule(1e-2),
    params=registry.init_params(model, jax.random.PRNGKey(0)),
    rng=jax.random.PRNGKey(1),
    steps=steps,
    evaluate=evaluate,
  )
  cfg = ml_collections.ConfigDict(
    dict(log_every=1, eval_every=1, checkpoint_every=4, keep_checkpoints=2, ema_decay=ema_decay)
  )
  writer = report.MetricsWriter(tmp_path / 'metrics.jsonl')
  return loop.train_stage(spec, tiny_stage.batches(), tmp_path, cfg, writer)


def test_stage_evaluates_and_returns_the_moving_average(model, tmp_path):
  raw_seen, ema_seen = [], []
  raw, _ = _run(model, tmp_path / 'raw', 8, 0.0, raw_seen)  # evaluations see steps 1..7
  averaged, _ = _run(model, tmp_path / 'ema', 8, 0.9, ema_seen)
  trajectory = [*raw_seen, raw]
  expected = jax.tree.map(np.asarray, registry.init_params(model, jax.random.PRNGKey(0)))
  for n, params in enumerate(trajectory, start=1):
    d = _reference_decay(0.9, n)
    expected = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * np.asarray(p), expected, params)
    got = ema_seen[n - 1] if n <= len(ema_seen) else averaged
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)
  # The average differs from the last step's weights (the test would pass vacuously if not).
  diff = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(), averaged, raw)
  assert max(jax.tree.leaves(diff)) > 1e-3


def test_resume_carries_the_average(model, tmp_path):
  straight, _ = _run(model, tmp_path / 'straight', 8, 0.9)
  _run(model, tmp_path / 'split', 4, 0.9)  # checkpoint at step 4, then a new process
  resumed, _ = _run(model, tmp_path / 'split', 8, 0.9)
  chex.assert_trees_all_close(resumed, straight, rtol=1e-6, atol=1e-7)


def test_average_of_pruned_weights_is_refused():
  config = default.get_config()
  config.train.ema_decay = 0.99
  config.prune.method = 'magnitude'
  config.prune.sparsity = 0.5
  with pytest.raises(
    config_lib.ConfigError, match=r'train\.ema_decay=0\.99 is invalid: .*not sparse'
  ):
    config_lib.validate(config)
