"""A tiny run through every layer: killed mid-stage with SIGKILL, resumed, and compared."""

import json
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kdjax import checkpoint
from tests.tiny_run import main_command

REPO = pathlib.Path(__file__).resolve().parents[1]


def _command(workdir, tfds_dir, *overrides):
  return main_command(workdir, f'--config.data.tfds_data_dir={tfds_dir}', *overrides)


def _run(workdir, tfds_dir, *overrides):
  return subprocess.run(
    _command(workdir, tfds_dir, *overrides), cwd=REPO, capture_output=True, text=True, timeout=600
  )


def _export_params(workdir, stage, role):
  directory = pathlib.Path(workdir) / stage / 'export' / role
  return checkpoint.load_export_params(directory)


def _start_until_distill_checkpoint(workdir, tfds_dir, **popen):
  """Starts the run and returns (process, marker) once the distill stage's step-10
  checkpoint exists, with the run still going."""
  proc = subprocess.Popen(_command(workdir, tfds_dir), cwd=REPO, **popen)
  marker = workdir / 'distill' / 'checkpoints' / '10'
  deadline = time.time() + 500
  while not marker.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert proc.poll() is None, 'the run ended before it could be interrupted'
  return proc, marker


def _assert_same_student(reference, workdir):
  a, b = (
    _export_params(reference, 'distill', 'student'),
    _export_params(workdir, 'distill', 'student'),
  )
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, tfds_dir):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  proc = _run(workdir, tfds_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_run_writes_every_output(uninterrupted):
  workdir, proc = uninterrupted
  for name in ('config.json', 'metrics.jsonl', 'results.json', 'report.md', 'vocab.txt'):
    assert (workdir / name).is_file(), name
  results = json.loads((workdir / 'results.json').read_text())
  assert results['final_student'] == 'distill/export/student'
  assert set(results['stages']) == {'teacher', 'distill'}
  distill = results['stages']['distill']
  assert 0.0 <= distill['agreement'] <= 1.0
  assert distill['models']['student']['params'] > 0
  assert 0.4 < results['summary']['teacher_accuracy'] <= 1.0
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  distill_steps = [r['step'] for r in records if r['stage'] == 'distill' and 'loss' in r]
  assert distill_steps == [5, 10, 15, 20]
  assert {'kl_T', 'kl_T1', 'agreement', 'ce'} <= set(records[-2])
  assert '| distill | student (cnn)' in proc.stdout


def test_sigkill_midway_then_resume_matches_uninterrupted(uninterrupted, tmp_path, tfds_dir):
  reference, _ = uninterrupted
  workdir = tmp_path / 'killed'
  proc, _ = _start_until_distill_checkpoint(
    workdir, tfds_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (workdir / 'results.json').exists()

  resumed = _run(workdir, tfds_dir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert '[teacher] already complete' in resumed.stdout
  assert '[distill] resumed from step' in resumed.stdout
  want = json.loads((reference / 'results.json').read_text())
  got = json.loads((workdir / 'results.json').read_text())
  assert got['summary'] == want['summary']
  _assert_same_student(reference, workdir)


def test_sigterm_saves_the_current_step_exits_then_resumes(uninterrupted, tmp_path, tfds_dir):
  """A preemption notice (SIGTERM) mid-stage: a checkpoint of the step in progress, one
  line, exit 143; the same command resumes there and ends bit-identical."""
  reference, _ = uninterrupted
  workdir = tmp_path / 'terminated'
  proc, marker = _start_until_distill_checkpoint(
    workdir, tfds_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-2000:]
  (line,) = err.strip().splitlines()[-1:]
  match = re.fullmatch(
    r'stopped: \[distill\] stopped by SIGTERM/preemption at step (\d+)/20; checkpoint saved '
    r'in (\S+); run the same command to resume',
    line,
  )
  assert match, line
  step = int(match.group(1))
  assert 10 <= step <= 20 and pathlib.Path(match.group(2)) == marker.parent / str(step)
  assert (marker.parent / str(step) / checkpoint.MANIFEST).is_file()  # complete, verified

  resumed = _run(workdir, tfds_dir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  if step < 20:
    assert f'[distill] resumed from step {step}' in resumed.stdout
  _assert_same_student(reference, workdir)


def test_resume_with_a_different_config_is_refused(uninterrupted, tfds_dir):
  workdir, _ = uninterrupted
  proc = _run(workdir, tfds_dir, '--config.loss.temperature=7.0')
  assert proc.returncode == 2
  assert 'config.loss.temperature was 2.0, now 7.0' in proc.stderr


def test_predict_uses_the_final_student(uninterrupted, tmp_path):
  workdir, _ = uninterrupted
  inputs = tmp_path / 'in.txt'
  inputs.write_text('a gorgeous , witty , seductive movie .\nthe worst film of the year .\n')
  out = tmp_path / 'out.tsv'
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'kdjax.predict',
      f'--workdir={workdir}',
      f'--input={inputs}',
      f'--output={out}',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = out.read_text().splitlines()
  assert lines[0] == 'label\tprob_0\tprob_1\tsentence'
  assert len(lines) == 3
  for line in lines[1:]:
    label, p0, p1, _ = line.split('\t')
    assert abs(float(p0) + float(p1) - 1.0) < 1e-5
    assert int(label) == int(float(p1) > float(p0))


def _average(workdir, output, steps):
  return subprocess.run(
    [
      sys.executable,
      '-m',
      'kdjax.average',
      f'--workdir={workdir}',
      '--stage=distill',
      f'--steps={steps}',
      f'--output={output}',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_checkpoint_average_is_the_mean_of_the_saved_params(uninterrupted, tmp_path):
  workdir, _ = uninterrupted
  proc = _average(workdir, tmp_path / 'avg', '10,20')
  assert proc.returncode == 0, proc.stderr[-2000:]
  # Reference: each checkpoint read with orbax directly, averaged in NumPy.
  saved = [
    ocp.StandardCheckpointer().restore(workdir / 'distill' / 'checkpoints' / s / 'state')['params']
    for s in ('10', '20')
  ]
  want = jax.tree_util.tree_map(lambda a, b: (np.asarray(a) + np.asarray(b)) / 2, *saved)
  got = checkpoint.load_export_params(tmp_path / 'avg')
  jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6), got, want)
  report = json.loads((tmp_path / 'avg' / 'average.json').read_text())
  assert set(report['eval_accuracy']) == {'10', '20', 'average'}
  # The step-20 checkpoint is the final model: its accuracy is the run's own.
  results = json.loads((workdir / 'results.json').read_text())
  final = results['stages']['distill']['models']['student']['eval_accuracy']
  assert report['eval_accuracy']['20'] == final
  assert 'validation accuracy average:' in proc.stdout


def test_checkpoint_average_names_missing_steps(uninterrupted, tmp_path):
  workdir, _ = uninterrupted
  proc = _average(workdir, tmp_path / 'avg', '5,20')
  assert proc.returncode == 2
  assert 'no checkpoint' in proc.stderr and 'kept steps: 10, 20' in proc.stderr
