"""The Python API: a tiny run, its evaluation and a sweep as Python objects, no CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

import kdjax
from experiments import sst2_from_scratch
from kdjax import config as kdjax_config


def tiny_config(tfds_dir):
  config = sst2_from_scratch.get_config('runlocal,student=cnn')
  config.name = 'api_tiny'
  config.stages = ('teacher', 'distill')
  config.data.tfds_data_dir = str(tfds_dir)
  config.data.train_limit = 500
  config.data.vocab_size = 2000
  config.data.max_len = 32
  config.data.buckets = (32,)  # one padded shape: one compilation per function
  config.teacher.kwargs.max_len = 32
  config.teacher.kwargs.hidden_size = 32
  config.teacher.kwargs.num_layers = 1
  config.teacher.kwargs.intermediate_size = 64
  config.student.kwargs.update(embed_dim=16, num_filters=8, mlp_dim=16)
  config.train.teacher_steps = 10
  config.train.student_steps = 10
  config.train.eval_every = 5
  config.train.checkpoint_every = 10
  return config


def _config_of(run):
  """The config of the fixture's run (it names the session's tfds folder)."""
  return tiny_config(json.loads((run.workdir / 'config.json').read_text())['data']['tfds_data_dir'])


@pytest.fixture(scope='module')
def run(tmp_path_factory, tfds_dir):
  return kdjax.train(tiny_config(tfds_dir), tmp_path_factory.mktemp('api_run'))


def test_train_returns_the_results_as_python_objects(run):
  assert isinstance(run, kdjax.RunResult)
  assert run.results == json.loads((run.workdir / 'results.json').read_text())
  assert run.summary is run.results['summary']
  assert 0.0 <= run.summary['distilled_student_accuracy'] <= 1.0
  assert run.final_student == run.workdir / 'distill' / 'export' / 'student'
  student = run.load_final_student()
  probs = student.predict(['a gorgeous , witty movie .', 'the worst film of the year .'])
  assert probs.shape == (2, 2)
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_a_second_call_reads_back_and_a_changed_config_is_refused(run, capsys):
  config = _config_of(run)
  again = kdjax.train(config, run.workdir)
  assert again.results == run.results
  assert '[distill] already complete' in capsys.readouterr().out
  with pytest.raises(kdjax_config.ConfigError, match='config.loss.temperature was 2.0, now 3.0'):
    kdjax.train(config, run.workdir, {'loss.temperature': 3.0})


def test_evaluate_a_split_matches_the_run_and_sentences_match_predict(run):
  evaluation = kdjax.evaluate(run.workdir, split='validation')
  want = run.results['stages']['distill']['models']['student']['eval_accuracy']
  assert evaluation.accuracy == pytest.approx(want, abs=1.5 / len(evaluation.labels))
  assert len(evaluation.labels) == run.results['eval_examples'] == len(evaluation.predictions)
  teacher = run.workdir / 'teacher' / 'export' / 'teacher'
  sentences = evaluation.sentences[:5]
  some = kdjax.evaluate(teacher, sentences=sentences)
  assert some.accuracy is None and some.labels is None
  np.testing.assert_array_equal(some.predictions, np.argmax(some.probabilities, axis=-1))
  np.testing.assert_allclose(
    some.probabilities, kdjax.load_model(teacher).predict(sentences), rtol=1e-5
  )
  with pytest.raises(ValueError, match='not both'):
    kdjax.evaluate(run.workdir, sentences=['x'], split='validation')


def test_runs_write_tensorboard_scalars(run):
  acc = event_accumulator.EventAccumulator(str(run.workdir / 'tensorboard'))
  acc.Reload()
  records = [json.loads(x) for x in (run.workdir / 'metrics.jsonl').read_text().splitlines()]
  want = [(r['step'], r['loss']) for r in records if r['stage'] == 'distill' and 'loss' in r]
  got = [(e.step, e.value) for e in acc.Scalars('distill/loss')]
  assert [s for s, _ in got] == [s for s, _ in want] == [5, 10]
  np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)
  assert 'teacher/eval_teacher_accuracy' in acc.Tags()['scalars']


def test_sweep_run_from_python(run, tmp_path):
  config = _config_of(run)
  config.stages = ('distill',)
  config.teacher.path = str(run.workdir)
  sweep = kdjax.sweep_run(
    config,
    tmp_path / 'sweep',
    sweep_points=[
      {'loss.temperature': 1.0, 'loss.weights.kl': 0.5},
      {'loss.temperature': 4.0, 'loss.weights.kl': 0.9},
    ],
  )
  assert list(sweep.points) == [
    'loss.temperature=1.0,loss.weights.kl=0.5',
    'loss.temperature=4.0,loss.weights.kl=0.9',
  ]
  for name, point in sweep.points.items():
    assert point.workdir == tmp_path / 'sweep' / name
    assert 0.0 <= point.summary['distilled_student_accuracy'] <= 1.0
  rows = sweep.results_csv.read_text().splitlines()
  assert rows[0].startswith('loss.temperature,loss.weights.kl,n,')
  assert rows[1].startswith('1.0,0.5,1,') and rows[2].startswith('4.0,0.9,1,')
  assert len(rows) == 3
  names = sorted(p.name for p in sweep.plots)
  assert 'heatmap.png' in names and len(names) == 3  # the heatmap and 2 training curves
  assert all(p.read_bytes()[:4] == b'\x89PNG' for p in sweep.plots)


def test_importing_kdjax_stays_cheap_and_submodules_still_work():
  code = (
    'import sys, kdjax; assert "jax" not in sys.modules and "matplotlib" not in sys.modules;'
    'from kdjax import train, evaluate; assert callable(kdjax.train) and kdjax.train.run;'
    'assert callable(kdjax.evaluate) and evaluate.accuracy; print("ok")'
  )
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
  assert proc.stdout.strip() == 'ok', proc.stderr[-2000:]
