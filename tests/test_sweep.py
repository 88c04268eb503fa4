"""Sweeps: seeds are pooled and other overrides define groups; a killed sweep resumes,
reading finished points back, and runs the rest N at a time."""

import csv
import json
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kdjax.config import ConfigError, check_workdir_config
from kdjax.sweep import (
  aggregate,
  apply_overrides,
  finished_results,
  format_rows,
  load_points,
  point_dir,
  point_name,
)

REPO = pathlib.Path(__file__).resolve().parents[1]


def _summary(alone, distilled):
  return {
    'summary': {
      'student_alone_accuracy': alone,
      'distilled_student_accuracy': distilled,
      'teacher_accuracy': None,
    }
  }


def test_seeds_are_pooled_and_other_keys_group():
  points = [
    ('a', {'seed': 0, 'loss.temperature': 2.0}, _summary(0.80, 0.82)),
    ('b', {'seed': 1, 'loss.temperature': 2.0}, _summary(0.84, 0.86)),
    ('c', {'seed': 2, 'loss.temperature': 2.0}, _summary(0.82, 0.87)),
    ('d', {'seed': 0, 'loss.temperature': 4.0}, _summary(0.70, 0.75)),
  ]
  rows = {r['group']: r for r in aggregate(points)}
  assert set(rows) == {point_name({'loss.temperature': 2.0}), point_name({'loss.temperature': 4.0})}
  t2 = rows['loss.temperature=2.0']
  assert t2['n'] == 3
  np.testing.assert_allclose(t2['distilled_student_accuracy']['mean'], np.mean([0.82, 0.86, 0.87]))
  np.testing.assert_allclose(
    t2['student_alone_accuracy']['std'], np.std([0.80, 0.84, 0.82], ddof=1)
  )
  assert 'teacher_accuracy' not in t2  # all-None figures are left out, not averaged as 0
  assert rows['loss.temperature=4.0']['distilled_student_accuracy']['std'] == 0.0
  table = format_rows(list(rows.values()))
  assert '| loss.temperature=2.0 | 3 | 82.00 ± 2.00 |' in table


def test_point_dir_never_nests_folders():
  name = point_name({'distill.extra_teachers': ('runs/teacher',), 'seed': 0})
  assert point_dir(name) == 'distill.extra_teachers=(_runs_teacher_,),seed=0'


TINY_SWEEP = '''
"""A tiny CNN-student sweep: a few steps on a few hundred examples."""

from experiments import sst2_from_scratch


def get_config(arg: str = ''):
  config = sst2_from_scratch.get_config('runlocal,student=cnn')
  config.name = 'tiny_sweep'
  config.stages = ('student_alone',)
  config.data.train_limit = 500
  config.data.vocab_size = 2000
  config.data.max_len = 32
  config.data.buckets = (32,)
  config.student.kwargs.update(embed_dim=16, mlp_dim=16)
  config.train.student_steps = 10
  config.train.eval_every = 5
  config.train.checkpoint_every = 5
  return config


def get_sweep():
  return [
    {'student.kwargs.num_filters': 4, 'seed': 0},
    {'student.kwargs.num_filters': 16, 'seed': 0},
    {'student.kwargs.num_filters': 16, 'seed': 1},
  ]
'''


def _sweep_command(experiment, workdir, tfds_dir, *flags):
  return [
    sys.executable,
    '-m',
    'kdjax.sweep',
    f'--config={experiment}',
    f'--workdir={workdir}',
    f'--config.data.tfds_data_dir={tfds_dir}',
    *flags,
  ]


def test_sweep_killed_midway_resumes_and_runs_the_rest_in_parallel(tmp_path, tfds_dir):
  experiment = tmp_path / 'tiny_sweep.py'
  experiment.write_text(TINY_SWEEP)
  workdir = tmp_path / 'sweep'
  names = [
    point_name(o)
    for o in [
      {'student.kwargs.num_filters': 4, 'seed': 0},
      {'student.kwargs.num_filters': 16, 'seed': 0},
      {'student.kwargs.num_filters': 16, 'seed': 1},
    ]
  ]
  dirs = [workdir / point_dir(n) for n in names]
  proc = subprocess.Popen(
    _sweep_command(experiment, workdir, tfds_dir),
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 300
  while not (dirs[0] / 'results.json').exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert proc.poll() is None, 'the sweep ended before it could be killed'
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (workdir / 'results.md').exists()
  assert not (dirs[2] / 'results.json').exists()
  first = (dirs[0] / 'results.json').stat().st_mtime_ns, (dirs[0] / 'metrics.jsonl').read_text()

  resumed = subprocess.run(
    _sweep_command(experiment, workdir, tfds_dir, '--parallel=2'),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'=== sweep point 1/3: {names[0]} (finished; read back)' in resumed.stdout
  assert f'=== sweep point 2/3: {names[1]} (started;' in resumed.stdout
  assert f'=== sweep point 3/3: {names[2]} done' in resumed.stdout
  # Read back, not re-run: its results and metrics are untouched.
  assert (
    (dirs[0] / 'results.json').stat().st_mtime_ns,
    (dirs[0] / 'metrics.jsonl').read_text(),
  ) == first
  for d in dirs:
    assert json.loads((d / 'results.json').read_text())['summary']['student_alone_accuracy'] > 0
    assert (d / 'tensorboard').is_dir()
  with (workdir / 'results.csv').open() as f:
    groups = list(csv.DictReader(f))
  assert [(g['student.kwargs.num_filters'], g['n']) for g in groups] == [('4', '1'), ('16', '2')]
  accs = [
    json.loads((d / 'results.json').read_text())['summary']['student_alone_accuracy'] for d in dirs
  ]
  np.testing.assert_allclose(float(groups[1]['student_alone_accuracy_mean']), np.mean(accs[1:]))
  with (workdir / 'points.csv').open() as f:
    assert [r['point'] for r in csv.DictReader(f)] == names
  plots = workdir / 'plots'
  assert (plots / 'accuracy_vs_size.png').read_bytes()[:4] == b'\x89PNG'
  assert sorted(p.name for p in (plots / 'curves').iterdir()) == sorted(
    point_dir(n) + '.png' for n in names
  )
  assert '| student.kwargs.num_filters=16 | 2 |' in (workdir / 'results.md').read_text()


def test_a_finished_point_with_another_config_is_refused(tmp_path):
  from configs import default

  config = default.get_config()
  check_workdir_config(config, tmp_path, default.get_config)
  (tmp_path / 'results.json').write_text('{"summary": {}}')
  assert finished_results(config, tmp_path) == {'summary': {}}
  assert finished_results(config, tmp_path / 'missing') is None
  changed = apply_overrides(config, {'loss.temperature': 9.0})
  with pytest.raises(ConfigError, match='config.loss.temperature was 2.0, now 9.0'):
    finished_results(changed, tmp_path)


def test_duplicate_points_are_refused_before_any_runs():
  from configs import default

  with pytest.raises(ConfigError, match='twice: seed=1'):
    load_points(default.get_config(), [{'seed': 1}, {'seed': 1}])


def test_a_failing_point_stops_new_starts_and_exits_with_its_code(tmp_path):
  experiment = tmp_path / 'tiny_sweep.py'
  experiment.write_text(TINY_SWEEP)
  proc = subprocess.run(
    _sweep_command(
      experiment,
      tmp_path / 'sweep',
      tmp_path / 'no_tfds',
      '--config.data.name=glue/sst2',  # not prepared: every point fails when it loads data
      '--parallel=2',
    ),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stdout.count('FAILED (exit 2)') == 2
  assert 'is not prepared' in proc.stderr and 'error: sweep point' in proc.stderr
  assert '3/3' not in proc.stdout  # no point starts after a failure
  assert not (tmp_path / 'sweep' / 'results.md').exists()
