"""Translation distillation: the sequence losses against a plain numpy reference, and a whole
tiny run of every stage (teacher, student alone, word-, sequence-level and on-policy KD)
with its cache of teacher beams, resume, prediction and config errors."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import multi30k as experiment
from kdjax import config as config_lib
from kdjax import predict, teacher_cache, translate
from kdjax.data.subword import BOS_ID, EOS_ID
from kdjax.kd import sequence


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _reference_word_kd(student, teacher, targets, weights, a, t, eps):
  """Explicit loops over positions: (1-a)·label-smoothed CE + a·T²·KL(p_T ‖ q_T)."""
  total_ce = total_kd = count = 0.0
  for b in range(student.shape[0]):
    for i in range(student.shape[1]):
      w = weights[b, i]
      if w == 0:
        continue
      log_q = _log_softmax(student[b, i].astype(np.float64))
      ce = -(1 - eps) * log_q[targets[b, i]] - eps * log_q.mean()
      log_pt = _log_softmax(teacher[b, i].astype(np.float64) / t)
      log_qt = _log_softmax(student[b, i].astype(np.float64) / t)
      kd = t * t * np.sum(np.exp(log_pt) * (log_pt - log_qt))
      total_ce, total_kd, count = total_ce + w * ce, total_kd + w * kd, count + w
  return (1 - a) * total_ce / count + a * total_kd / count, total_ce, total_kd, count


def test_word_level_kd_matches_a_per_position_reference():
  rng = np.random.default_rng(0)
  student = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
  teacher = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, size=(3, 5)).astype(np.int32)
  # Padding inside rows and a whole filler row (weight 0) must not count.
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.float32)
  weights = mask * np.array([1.0, 1.0, 0.0], np.float32)[:, None]
  targets[0, 3:] = -1  # padded labels are never read
  for a, t, eps in ((0.5, 2.0, 0.1), (1.0, 1.0, 0.0), (0.0, 4.0, 0.2)):
    loss, metrics = sequence.word_kd_terms(
      jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(targets), weights, a, t, eps
    )
    want, ce_sum, kd_sum, count = _reference_word_kd(student, teacher, targets, weights, a, t, eps)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics['ce'][0]), ce_sum, rtol=1e-5)
    assert float(metrics['ce'][1]) == count == 8
    if a:
      np.testing.assert_allclose(float(metrics['kd'][0]), kd_sum, rtol=1e-5)
      np.testing.assert_allclose(float(mean_of(metrics['loss'])), want, rtol=1e-5)


def mean_of(metric):
  total, count = metric
  return total / count


def test_word_kd_against_itself_is_zero_and_pulls_the_student_to_the_teacher():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 4, 7)), jnp.float32)
  targets = jnp.zeros((2, 4), jnp.int32)
  weights = jnp.ones((2, 4))
  _, metrics = sequence.word_kd_terms(logits, logits, targets, weights, 1.0, 2.0, 0.0)
  assert abs(float(metrics['kd'][0])) < 1e-5
  teacher = jnp.asarray(rng.normal(size=(2, 4, 7)), jnp.float32)

  def kd(student):
    return sequence.word_kd_terms(student, teacher, targets, weights, 1.0, 1.0, 0.0)[0]

  student = logits
  before = float(kd(student))
  for _ in range(100):  # the loss is a mean over 8 positions: a step of 8 per position
    student = student - 8.0 * jax.grad(kd)(student)
  assert float(kd(student)) < 0.01 * before


def test_sampled_targets_shift_right_and_mask_through_eos():
  tokens = jnp.asarray([[7, 8, EOS_ID, 0], [5, 6, 9, 4]], jnp.int32)
  lengths = jnp.asarray([3, 4], jnp.int32)
  tgt_in, mask = sequence.sampled_targets(tokens, lengths)
  np.testing.assert_array_equal(tgt_in, [[BOS_ID, 7, 8, EOS_ID], [BOS_ID, 5, 6, 9]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 1, 1, 1]])


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory, tfds_dir):
  workdir = tmp_path_factory.mktemp('translate')
  config = experiment.get_config('runlocal,on_policy')
  config.data.tfds_data_dir = tfds_dir
  results = translate.run(config, workdir)
  return config, workdir, results


def test_every_stage_trains_exports_and_is_scored(tiny_run):
  config, workdir, results = tiny_run
  assert list(results['stages']) == list(config.stages)
  assert results['final_student'] == 'on_policy/export/student'
  for name, stage in results['stages'].items():
    assert stage['steps'] == (20 if name == 'teacher' else 10)
    for key in ('test_bleu_greedy', 'test_bleu_beam', 'val_bleu_greedy'):
      assert 0.0 <= stage[key] <= 100.0
    assert stage['greedy_sentences_per_sec'] > 0 and stage['beam_sentences_per_sec'] > 0
    assert 'tok:13a' in stage['bleu_signature']
    export = workdir / name / 'export' / ('teacher' if name == 'teacher' else 'student')
    assert (export / 'model.json').is_file() and (export / 'subword.json').is_file()
    assert len((workdir / name / 'test_beam.txt').read_text().splitlines()) == 64
  beams = results['stages']['seq_kd']['teacher_beams']
  assert beams['hit'] is False and results['stages']['seq_word_kd']['teacher_beams']['hit']
  records = [json.loads(r) for r in (workdir / 'metrics.jsonl').read_text().splitlines()]
  on_policy = [r for r in records if r.get('stage') == 'on_policy' and 'on_policy_jsd' in r]
  assert on_policy and all(np.isfinite(r['on_policy_jsd']) for r in on_policy)
  assert '| seq_kd |' in (workdir / 'report.md').read_text()


def test_sequence_kd_trains_on_the_teachers_beam_outputs(tiny_run):
  config, workdir, results = tiny_run
  corpus = translate.prepare(config, workdir)
  teacher_dir = workdir / 'teacher' / 'export' / 'teacher'
  model, params, _ = translate.load_export(teacher_dir)
  targets, info = translate.teacher_beam_targets(config, corpus, teacher_dir, model, params)
  assert info['hit']
  dc = config.decode.copy_and_resolve_references()
  dc.length_penalty = config.kd.seq_length_penalty
  some = corpus.train.src_ids[:40]
  want = translate.decode_ids(model, params, some, dc, config.data.buckets, config.kd.seq_beam_size)
  for got, w in zip(targets[:40], want):
    np.testing.assert_array_equal(got, w[: config.data.max_len])


def test_a_corrupt_beam_cache_entry_is_recomputed_not_used(tiny_run, capsys):
  config, workdir, results = tiny_run
  entry = pathlib.Path(results['stages']['seq_kd']['teacher_beams']['entry'])
  tokens = np.load(entry / 'tokens.npy')
  np.save(entry / 'tokens.npy', tokens + 1)  # same shape, wrong content
  corpus = translate.prepare(config, workdir)
  teacher_dir = workdir / 'teacher' / 'export' / 'teacher'
  model, params, _ = translate.load_export(teacher_dir)
  targets, info = translate.teacher_beam_targets(config, corpus, teacher_dir, model, params)
  assert not info['hit'] and 'does not match the recorded' in capsys.readouterr().out
  assert teacher_cache.TeacherCache(entry.parent).load(entry.name) is not None  # rewritten
  np.testing.assert_array_equal(np.load(entry / 'tokens.npy'), tokens)


def test_a_finished_run_is_read_back(tiny_run, capsys):
  config, workdir, results = tiny_run
  again = translate.run(config, workdir)
  # Compared as JSON: a throughput of a run too short to time is NaN, which != itself.
  assert json.dumps(again['stages'], sort_keys=True) == json.dumps(
    results['stages'], sort_keys=True
  )
  assert '[teacher] already complete' in capsys.readouterr().out


def test_predict_translates_a_file_with_the_final_student(tiny_run, tmp_path):
  config, workdir, _ = tiny_run
  sentences = ['A man rides a bike.', 'Two dogs are playing in the snow.']
  greedy = predict.translate_sentences(str(workdir), sentences, beam_size=1)
  model, params, tok = translate.load_export(workdir / 'on_policy' / 'export' / 'student')
  ids = tok.encode_batch(sentences, config.data.max_len)
  want = translate.translate(model, params, tok, ids, config.decode, config.data.buckets, 1)
  assert greedy == want and len(greedy) == 2


@pytest.mark.parametrize(
  'override, message',
  [
    ({'stages': ('teacher', 'bogus')}, 'config.stages='),
    ({'stages': ('word_kd', 'teacher')}, 'in the order'),
    ({'stages': ('word_kd',)}, 'config.teacher_path='),
    ({'data.max_len': 64}, 'config.data.max_len=64'),
    ({'kd.jsd_beta': 1.5}, 'config.kd.jsd_beta=1.5'),
    ({'student.d_model': 33}, 'config.student.d_model=33'),
  ],
)
def test_bad_configs_fail_in_one_line(override, message):
  config = experiment.get_config('runlocal')
  for key, value in override.items():
    section, _, name = key.rpartition('.')
    (config[section] if section else config)[name] = value
  with pytest.raises(config_lib.ConfigError, match=message) as error:
    translate.validate(config)
  assert '\n' not in str(error.value)
