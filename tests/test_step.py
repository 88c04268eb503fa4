"""Train steps: the student moves, a frozen teacher never does, online moves both."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from configs import models as presets
from kdjax import optim
from kdjax import step as step_lib
from kdjax.kd import objective as kd_objective
from kdjax.models import registry

VOCAB = 50


def _batch(seed=0, batch=8, length=12):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, length + 1, batch)
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(4, VOCAB, (batch, length)).astype(np.int32) * mask
  ids[:, 0] = 2
  return {
    'input_ids': ids,
    'attention_mask': mask,
    'labels': rng.integers(0, 2, batch).astype(np.int32),
    'weights': np.ones(batch, np.float32),
  }


def _model(preset):
  p = presets.PRESETS[preset]()
  return registry.build_model(p.model, vocab_size=VOCAB, num_classes=2, **p.kwargs.to_dict())


def _tree_equal(a, b):
  return all(
    jax.tree_util.tree_leaves(
      jax.tree_util.tree_map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)
    )
  )


def _copy(tree):
  return jax.tree_util.tree_map(lambda x: np.array(x), tree)


@pytest.fixture(scope='module')
def objective():
  # The logit-level objective of the default config (CE + KL).
  return kd_objective.logits_only(default.get_config().loss, 10)


def test_distill_step_changes_student_and_never_the_teacher(objective):
  student, teacher = _model('bilstm_small'), _model('bert_tiny')
  s_params = registry.init_params(student, jax.random.PRNGKey(0))
  t_params = registry.init_params(teacher, jax.random.PRNGKey(1))
  t_before, s_before = _copy(t_params), _copy(s_params)
  tx = optim.make_optimizer(default.get_config().student_optim, 10)
  state = step_lib.create_state(s_params, tx, jax.random.PRNGKey(2))
  train_step = step_lib.make_train_step(step_lib.distill_loss_fn(student, teacher, objective), tx)
  for i in range(3):
    state, metrics = train_step(state, t_params, _batch(i))
  assert int(state.step) == 3
  assert _tree_equal(t_params, t_before)  # untouched, and still alive (not donated)
  assert not _tree_equal(state.params, s_before)
  assert np.isfinite(float(metrics['loss'][0]))
  # Teacher parameters are not part of what the optimizer holds.
  assert jax.tree_util.tree_structure(state.params) == jax.tree_util.tree_structure(s_before)


def test_frozen_teacher_gets_no_gradient(objective):
  student, teacher = _model('cnn_small'), _model('bert_tiny')
  s_params = registry.init_params(student, jax.random.PRNGKey(0))
  t_params = registry.init_params(teacher, jax.random.PRNGKey(1))
  loss_fn = step_lib.distill_loss_fn(student, teacher, objective)
  t_grads = jax.grad(
    lambda tp: loss_fn(s_params, tp, _batch(), jax.random.PRNGKey(0), jnp.zeros((), jnp.int32))[0]
  )(t_params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(t_grads))


def test_online_step_trains_teacher_and_student(objective):
  student, teacher = _model('cnn_small'), _model('bert_tiny')
  params = {
    'teacher': registry.init_params(teacher, jax.random.PRNGKey(1)),
    'student': registry.init_params(student, jax.random.PRNGKey(0)),
  }
  before = _copy(params)
  cfg = default.get_config()
  tx = optim.make_joint_optimizer(
    {
      'teacher': optim.make_optimizer(cfg.teacher_optim, 10),
      'student': optim.make_optimizer(cfg.student_optim, 10),
    }
  )
  state = step_lib.create_state(params, tx, jax.random.PRNGKey(2))
  train_step = step_lib.make_train_step(
    step_lib.online_loss_fn(student, teacher, objective, 0.5), tx
  )
  for i in range(2):
    state, metrics = train_step(state, None, _batch(i))
  assert not _tree_equal(state.params['teacher'], before['teacher'])
  assert not _tree_equal(state.params['student'], before['student'])
  assert 'teacher_ce' in metrics


def test_supervised_training_fits_a_tiny_batch():
  model = _model('cnn_small')
  cfg = default.get_config().student_optim
  cfg.warmup_steps, cfg.schedule = 0, 'constant'
  tx = optim.make_optimizer(cfg, 100)
  state = step_lib.create_state(
    registry.init_params(model, jax.random.PRNGKey(0)), tx, jax.random.PRNGKey(1)
  )
  train_step = step_lib.make_train_step(step_lib.supervised_loss_fn(model), tx)
  batch = _batch(3)
  first = None
  for _ in range(40):
    state, metrics = train_step(state, None, batch)
    first = first if first is not None else float(metrics['loss'][0] / metrics['loss'][1])
  last = float(metrics['loss'][0] / metrics['loss'][1])
  assert last < 0.2 * first


def test_dropout_differs_per_step_but_replays_identically():
  """fold_in(step) gives fresh dropout each step, and the same masks on a re-run."""
  model = _model('bilstm_small')
  tx = optax.sgd(0.0)  # no update: only the dropout noise changes the loss
  params = registry.init_params(model, jax.random.PRNGKey(0))
  train_step = step_lib.make_train_step(step_lib.supervised_loss_fn(model), tx)

  def losses_of_run():
    # The step donates its state, so every run starts from its own copy of the params.
    state = step_lib.create_state(
      jax.tree_util.tree_map(jnp.array, params), tx, jax.random.PRNGKey(5)
    )
    out = []
    for _ in range(3):
      state, metrics = train_step(state, None, _batch(0))
      out.append(float(metrics['loss'][0]))
    return out

  first, second = losses_of_run(), losses_of_run()
  assert first == second
  assert len(set(first)) == 3


def test_unrolled_cpu_threefry_lowers_without_a_loop_and_gives_the_same_bits():
  """kdjax.step switches dropout's PRNG on CPU to jax's straight-line lowering (for speed,
  benchmarks/speedups.py): the masks must be bit for bit those of jax's default loop."""
  assert step_lib.CPU_THREEFRY_UNROLLED
  key = jax.random.PRNGKey(3)

  def masks(unrolled: bool):
    step_lib.unroll_cpu_threefry(unrolled)
    # A fresh function each time, so jit lowers it again under the current rule.
    fn = jax.jit(lambda k: jax.random.bernoulli(k, 0.9, (64, 128)))
    return fn.lower(key).as_text(), np.asarray(fn(key))

  try:
    rolled_text, rolled = masks(False)
    unrolled_text, unrolled = masks(True)
  finally:
    step_lib.unroll_cpu_threefry(True)
  assert 'while' in rolled_text and 'while' not in unrolled_text
  np.testing.assert_array_equal(rolled, unrolled)
