"""Distillation strategies: several teachers, deep mutual learning, born-again generations and
teacher-assistant chains, as loss math against NumPy and as tiny end-to-end runs."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default, models
from kdjax import checkpoint, strategies, train
from kdjax import config as config_lib
from kdjax import step as step_lib
from kdjax.kd import ensemble
from kdjax.kd import objective as kd_objective
from kdjax.sweep import apply_overrides

C = 3  # classes in the loss-level tests (the runs are binary)


def _softmax(z, axis=-1):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _kl_rows(p, q):
  return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


# -- several teachers ------------------------------------------------------------------


def test_mixture_logits_soften_to_the_weighted_mixture():
  logits = np.random.default_rng(0).normal(scale=3.0, size=(5, 3, C)).astype(np.float32)
  weights, t = (0.2, 0.5, 0.3), 2.5
  pseudo = np.asarray(ensemble.mixture_logits(jnp.asarray(logits), weights, t))
  want = sum(w * _softmax(logits[:, k] / t) for k, w in enumerate(weights))
  np.testing.assert_allclose(_softmax(pseudo / t), want, atol=1e-6)
  # A zero weight drops that teacher (no log(0) inside).
  pseudo = np.asarray(ensemble.mixture_logits(jnp.asarray(logits), (0.0, 1.0, 0.0), t))
  np.testing.assert_allclose(_softmax(pseudo / t), _softmax(logits[:, 1] / t), atol=1e-6)


def _loss_cfg(**weights):
  cfg = default.get_config().loss
  for name in cfg.weights:
    cfg.weights[name] = weights.get(name, 0.0)
  cfg.temperature = 2.0
  return cfg


class _TableStudent(nn.Module):
  """Logits looked up from the first token: a trainable student with no dropout, so the
  NumPy references can recompute its logits, and nothing slow to compile."""

  @nn.compact
  def __call__(self, input_ids, attention_mask, deterministic=True):
    del attention_mask, deterministic
    table = self.param('table', nn.initializers.normal(2.0), (20, C))
    return table[input_ids[:, 0]], {}


def _student():
  model = _TableStudent()
  return model, model.init(jax.random.PRNGKey(0), jnp.full((2, 4), 3), jnp.ones((2, 4)))['params']


def _batch(num_teachers=2, seed=1):
  rng = np.random.default_rng(seed)
  batch = {
    'input_ids': jnp.asarray(rng.integers(3, 20, size=(6, 8)), jnp.int32),
    'attention_mask': jnp.ones((6, 8), jnp.int32),
    'labels': jnp.asarray(rng.integers(0, C, size=6), jnp.int32),
    'weights': jnp.asarray([1, 1, 1, 1, 1, 0], jnp.float32),  # the last row is padding
  }
  teachers = jnp.asarray(rng.normal(scale=2.0, size=(6, num_teachers, C)), jnp.float32)
  return batch, teachers


def _single(student, objective, batch, teacher_logits, params):
  fn = step_lib.distill_loss_fn(student, None, objective)
  return fn(params, None, {**batch, 'teacher_logits': teacher_logits}, jax.random.PRNGKey(3), 0)


def _multi(student, objectives, mode, weights, batch, stacked, params):
  fn = step_lib.multi_teacher_loss_fn(student, None, objectives, mode, weights)
  return fn(params, None, {**batch, 'teacher_logits': stacked}, jax.random.PRNGKey(3), 0)


@pytest.mark.parametrize('mode', config_lib.MULTI_TEACHER)
def test_one_teacher_is_exactly_the_single_teacher_loss(mode):
  student, params = _student()
  objective = kd_objective.logits_only(_loss_cfg(ce=0.5, kl=0.5, logit_mse=0.1), 10)
  batch, teachers = _batch(num_teachers=1)
  want, want_m = _single(student, objective, batch, teachers[:, 0], params)
  got, got_m = _multi(student, [objective], mode, (1.0,), batch, teachers, params)
  assert float(got) == float(want)
  for name, value in want_m.items():
    assert float(got_m[name][0]) == float(value[0]), name


def test_two_identical_teachers_average_to_one():
  student, params = _student()
  objective = kd_objective.logits_only(_loss_cfg(ce=0.3, kl=0.7, dkd=0.2), 10)
  batch, teachers = _batch(num_teachers=1)
  want, want_m = _single(student, objective, batch, teachers[:, 0], params)
  twice = jnp.concatenate([teachers, teachers], axis=1)
  got, got_m = _multi(student, [objective], 'average_probs', (0.5, 0.5), batch, twice, params)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  np.testing.assert_allclose(float(got_m['kl_T1'][0]), float(want_m['kl_T1'][0]), rtol=1e-5)


def test_average_probs_is_kl_to_the_mixture():
  student, params = _student()
  objective = kd_objective.logits_only(_loss_cfg(kl=1.0), 10)
  batch, teachers = _batch(num_teachers=2)
  loss, _ = _multi(student, [objective], 'average_probs', (0.25, 0.75), batch, teachers, params)
  s_logits, _ = student.apply({'params': params}, batch['input_ids'], batch['attention_mask'])
  t, z = 2.0, np.asarray(teachers)
  mixture = 0.25 * _softmax(z[:, 0] / t) + 0.75 * _softmax(z[:, 1] / t)
  rows = t * t * _kl_rows(mixture, _softmax(np.asarray(s_logits) / t))
  w = np.asarray(batch['weights'])
  np.testing.assert_allclose(float(loss), np.sum(rows * w) / w.sum(), rtol=1e-5)


def test_sum_losses_weights_each_teacher_and_counts_ce_once():
  student, params = _student()
  objective = kd_objective.logits_only(_loss_cfg(ce=0.5, kl=1.0), 10)
  batch, teachers = _batch(num_teachers=2)
  weights = (0.25, 0.75)
  loss, m = _multi(student, [objective] * 2, 'sum_losses', weights, batch, teachers, params)
  single = [_single(student, objective, batch, teachers[:, k], params) for k in range(2)]
  np.testing.assert_allclose(float(loss), sum(w * float(s[0]) for w, s in zip(weights, single)))
  # CE does not depend on the teacher: with normalised weights it enters once.
  np.testing.assert_allclose(float(m['ce'][0]), float(single[0][1]['ce'][0]), rtol=1e-6)
  kl = sum(w * float(s[1]['kl_T'][0]) for w, s in zip(weights, single))
  np.testing.assert_allclose(float(m['kl_T'][0]), kl, rtol=1e-6)
  assert {'teacher_0/kl_T', 'teacher_1/agreement'} <= set(m)
  ce_only = kd_objective.logits_only(_loss_cfg(ce=1.0), 10)
  loss, _ = _multi(student, [ce_only] * 2, 'sum_losses', weights, batch, teachers, params)
  ce_sum, count = single[0][1]['ce']
  np.testing.assert_allclose(float(loss), float(ce_sum / count), rtol=1e-6)


# -- deep mutual learning ------------------------------------------------------------------


def _mutual_reference(logits, labels, weights, t, kd_weight):
  w = np.asarray(weights, np.float64)
  losses = []
  for i, z in enumerate(logits):
    ce = -np.log(_softmax(z)[np.arange(len(labels)), labels])
    kl = [
      t * t * _kl_rows(_softmax(logits[j] / t), _softmax(z / t))
      for j in range(len(logits))
      if j != i
    ]
    per_row = ce + kd_weight * np.mean(kl, axis=0)
    losses.append(np.sum(per_row * w) / w.sum())
  return losses


@pytest.mark.parametrize('n', [2, 3])
def test_mutual_learning_matches_numpy(n):
  rng = np.random.default_rng(n)
  logits = [rng.normal(scale=2.0, size=(7, C)).astype(np.float32) for _ in range(n)]
  labels = rng.integers(0, C, size=7)
  weights = np.asarray([1, 1, 1, 1, 1, 1, 0], np.float32)
  total, m = ensemble.mutual_learning(
    [jnp.asarray(z) for z in logits], jnp.asarray(labels), jnp.asarray(weights), 3.0, 0.7
  )
  want = _mutual_reference(logits, labels, weights, 3.0, 0.7)
  np.testing.assert_allclose(float(total), sum(want), rtol=1e-5)
  for i in range(n):
    loss, count = m[f'student_{i}/loss']
    np.testing.assert_allclose(float(loss / count), want[i], rtol=1e-5)


def test_mutual_kd_moves_only_its_own_student():
  rng = np.random.default_rng(0)
  logits = [jnp.asarray(rng.normal(size=(4, C)), jnp.float32) for _ in range(3)]
  weights = jnp.ones((4,), jnp.float32)
  grads = jax.grad(lambda zs: ensemble.mutual_kd(zs, 1, 2.0, weights)[0])(logits)
  assert np.all(np.asarray(grads[0]) == 0) and np.all(np.asarray(grads[2]) == 0)
  assert np.any(np.asarray(grads[1]) != 0)
  # So the joint loss gives each student the gradient of its own loss alone.
  labels = jnp.asarray([0, 1, 2, 0])

  def own(z1):
    zs = [logits[0], z1, logits[2]]
    _, m = ensemble.mutual_learning(zs, labels, weights, 2.0, 1.0)
    return m['student_1/loss'][0] / m['student_1/loss'][1]

  joint = jax.grad(lambda zs: ensemble.mutual_learning(zs, labels, weights, 2.0, 1.0)[0])(logits)
  np.testing.assert_allclose(joint[1], jax.grad(own)(logits[1]), rtol=1e-6)


# -- config errors ------------------------------------------------------------------


@pytest.fixture
def fake_export(tmp_path):
  """Enough of an export for validation, which only checks that model.json exists."""
  (tmp_path / 'other' / 'model.json').parent.mkdir()
  (tmp_path / 'other' / 'model.json').write_text('{}')
  return str(tmp_path / 'other')


@pytest.mark.parametrize(
  'overrides, fragment',
  [
    ({'distill.multi_teacher': 'vote'}, "config.distill.multi_teacher='vote' is invalid"),
    ({'distill.teacher_weights': (1.0, 2.0, 3.0)}, 'config.distill.teacher_weights=(1.0, 2.0'),
    ({'distill.teacher_weights': (0.0, 0.0)}, 'with a sum > 0'),
    ({'mutual.num_students': 1}, 'config.mutual.num_students=1 is invalid'),
    ({'distill.generations': 0}, 'config.distill.generations=0 is invalid'),
    (
      {'stages': ('student_alone', 'distill'), 'distill.generations': 2},
      "config.stages=('student_alone', 'distill') is invalid: 'distill' needs a teacher",
    ),
    ({'stages': ('assistant',)}, "'assistant' needs a teacher"),
    ({'stages': ('teacher',)}, "config.distill.extra_teachers=('"),
    (
      {'stages': ('teacher',), 'distill.generations': 2, 'distill.extra_teachers': ()},
      "config.distill.generations=2 is invalid: repeats the 'distill' stage",
    ),
    (
      {'loss.weights.hidden_mse': 1.0, 'distill.teacher_cache': 'off'},
      "config.distill.multi_teacher='average_probs' is invalid: loss.weights.hidden_mse",
    ),
    ({'loss.weights.logit_mse': 1.0}, 'loss.weights.logit_mse cannot use a mixture'),
    ({'distill.extra_teachers': ('/nonexistent',)}, 'config.distill.extra_teachers[0]'),
    (
      {'loss.weights.pooled_mse': 1.0, 'distill.multi_teacher': 'sum_losses'},
      "is invalid: the pooled terms read one teacher's cached pooled vectors",
    ),
  ],
)
def test_bad_strategy_values_are_named(overrides, fragment, fake_export):
  config = default.get_config()
  config.stages = ('teacher', 'distill')
  config.distill.extra_teachers = (fake_export,)
  config = apply_overrides(config, overrides)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert fragment in str(e.value)
  assert '\n' not in str(e.value)


def test_sum_losses_accepts_feature_terms(fake_export):
  config = default.get_config()
  config.stages = ('teacher', 'distill')
  config.distill.extra_teachers = (fake_export,)
  config.distill.multi_teacher = 'sum_losses'
  config.distill.teacher_cache = 'off'
  config.loss.weights.hidden_mse = 1.0
  config_lib.validate(config)


# -- tiny end-to-end runs ------------------------------------------------------------


def _cnn(filters, kernels):
  spec = models.cnn_small()
  spec.kwargs.update(embed_dim=16, num_filters=filters, kernel_sizes=kernels, mlp_dim=16)
  return spec


def _tiny_config(tfds_dir, stages):
  # CNNs of three widths: the fastest models to compile, told apart by their sizes.
  config = default.get_config()
  config.stages = stages
  config.data.tfds_data_dir = str(tfds_dir)
  config.data.train_limit = 200
  config.data.max_len = 16
  config.data.buckets = (16,)  # one input shape: one compile per function
  config.teacher = _cnn(16, (3, 5))
  config.assistant = _cnn(12, (3,))
  config.student = _cnn(8, (3,))
  config.train.batch_size = 16
  config.train.teacher_steps = 4
  config.train.student_steps = 4
  config.train.log_every = 2
  config.train.checkpoint_every = 4
  config.train.eval_every = 0
  config.train.eval_batch_size = 512
  return config


@pytest.fixture(scope='module')
def chain_run(tmp_path_factory, tfds_dir):
  """Every strategy stage in one run: teacher → assistant → distill → distill_gen2 (a TA
  chain with a born-again generation), then three students by deep mutual learning."""
  workdir = tmp_path_factory.mktemp('chain')
  config = _tiny_config(tfds_dir, ('teacher', 'assistant', 'distill', 'mutual'))
  config.distill.generations = 2
  config.mutual.num_students = 3
  return workdir, config, train.run(config, workdir)


def _params(results, stage, role):
  return results['stages'][stage]['models'][role]['params']


def test_assistant_chain_distills_the_student_from_the_assistant(chain_run):
  workdir, _, results = chain_run
  stages = results['stages']
  assert list(stages) == ['teacher', 'assistant', 'distill', 'distill_gen2', 'mutual']
  assert stages['assistant']['frozen_teacher']['params'] == _params(results, 'teacher', 'teacher')
  frozen = stages['distill']['frozen_teacher']
  assistant = stages['assistant']['models']['assistant']
  assert frozen['params'] == assistant['params'] != _params(results, 'teacher', 'teacher')
  assert frozen['eval_accuracy'] == assistant['eval_accuracy']
  assert frozen['export'] == str(workdir / 'assistant' / 'export' / 'assistant')
  assert results['summary']['assistant_accuracy'] == assistant['eval_accuracy']
  assert 0 <= stages['assistant']['agreement'] <= 1


def test_generation_two_learns_from_generation_one(chain_run):
  workdir, _, results = chain_run
  stages = results['stages']
  gen1, gen2 = stages['distill'], stages['distill_gen2']
  assert gen2['frozen_teacher']['export'] == str(workdir / 'distill' / 'export' / 'student')
  assert gen2['frozen_teacher']['params'] == _params(results, 'distill', 'student')
  assert gen2['frozen_teacher']['eval_accuracy'] == gen1['models']['student']['eval_accuracy']
  report = gen2['generations']
  assert report['stages'] == ['distill', 'distill_gen2']
  assert report['eval_accuracy'] == [
    gen1['models']['student']['eval_accuracy'],
    gen2['models']['student']['eval_accuracy'],
  ]
  assert 0 <= report['ensemble_eval_accuracy'] <= 1
  assert results['summary']['generation_ensemble_accuracy'] == report['ensemble_eval_accuracy']
  assert results['final_student'] == 'distill_gen2/export/student'
  a, b = (
    checkpoint.load_export_params(workdir / s / 'export' / 'student')
    for s in ('distill', 'distill_gen2')
  )
  assert not np.array_equal(a['embedding']['embedding'], b['embedding']['embedding'])
  assert 'Born-again generations' in (workdir / 'report.md').read_text()


def test_mutual_stage_trains_exports_and_ensembles_three_students(chain_run):
  workdir, _, results = chain_run
  stage = results['stages']['mutual']
  names = ['student_0', 'student_1', 'student_2']
  assert sorted(stage['models']) == names
  exports = [checkpoint.load_export_params(workdir / 'mutual' / 'export' / n) for n in names]
  # Each student starts from its own weights.
  tables = [np.asarray(p['embedding']['embedding']) for p in exports]
  assert not np.array_equal(tables[0], tables[1]) and not np.array_equal(tables[1], tables[2])
  report = stage['mutual']
  accuracies = [stage['models'][n]['eval_accuracy'] for n in names]
  assert report['eval_accuracy'] == accuracies
  assert report['mean_eval_accuracy'] == pytest.approx(np.mean(accuracies))
  assert 0 <= report['ensemble_eval_accuracy'] <= 1
  assert results['summary']['mutual_ensemble_accuracy'] == report['ensemble_eval_accuracy']
  records = [json.loads(r) for r in (workdir / 'metrics.jsonl').read_text().splitlines()]
  last = [r for r in records if r['stage'] == 'mutual' and 'loss' in r][-1]
  assert {'student_0/kl_T', 'student_2/ce', 'accuracy'} <= set(last)
  assert 'their ensemble' in (workdir / 'report.md').read_text()


def test_chain_stages_are_read_back_when_run_again(chain_run, capsys):
  workdir, config, results = chain_run
  again = train.run(config, workdir)
  out = capsys.readouterr().out
  for stage in ('assistant', 'distill', 'distill_gen2', 'mutual'):
    assert f'[{stage}] already complete' in out
  assert again['summary'] == results['summary']


def test_two_teachers_cached_or_live_give_the_same_first_step(chain_run, tfds_dir, tmp_path):
  teacher_run, _, chain = chain_run
  first = {}
  for cache in ('logits', 'off'):
    config = _tiny_config(tfds_dir, ('distill',))
    config.teacher.path = str(teacher_run)  # the run's teacher, plus its assistant
    config.distill.extra_teachers = (str(teacher_run / 'assistant' / 'export' / 'assistant'),)
    config.distill.teacher_weights = (1.0, 3.0)
    config.distill.teacher_cache = cache
    config.train.student_steps = 1
    config.train.log_every = config.train.checkpoint_every = 1
    workdir = tmp_path / cache
    result = train.run(config, workdir)['stages']['distill']
    records = [json.loads(r) for r in (workdir / 'metrics.jsonl').read_text().splitlines()]
    first[cache] = next(r for r in records if r.get('step') == 1 and 'loss' in r)
  for name in ('loss', 'kl_T', 'teacher_0/kl_T', 'teacher_1/kl_T'):
    assert first['logits'][name] == pytest.approx(first['off'][name], rel=1e-5), name
  teachers = result['teachers']
  assert [t['params'] for t in teachers] == [
    _params(chain, 'teacher', 'teacher'),
    _params(chain, 'assistant', 'assistant'),
  ]
  assert [t['weight'] for t in teachers] == [0.25, 0.75]
  assert [t['eval_accuracy'] for t in teachers] == [
    chain['stages']['teacher']['models']['teacher']['eval_accuracy'],
    chain['stages']['assistant']['models']['assistant']['eval_accuracy'],
  ]
  assert result['teacher_ensemble']['mode'] == 'average_probs'
  assert 0 <= result['teacher_ensemble']['eval_accuracy'] <= 1


def test_first_generation_and_student_zero_start_like_the_student_alone():
  key = jax.random.PRNGKey(0)
  assert strategies.init_key(key, 'mutual', 'student_0') is key
  assert strategies.init_key(key, 'distill', 'student') is key
  for name, member in (('distill_gen2', 'student'), ('mutual', 'student_1')):
    assert not np.array_equal(strategies.init_key(key, name, member), key)
