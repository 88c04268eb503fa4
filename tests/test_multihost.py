"""Whole runs over several devices and processes: `python -m kdjax.main` started as two
processes of four simulated CPU devices each (one JAX job over gloo) matches the same run in
one process on eight devices, which matches one device; a single process restores the
two-process job's checkpoint.

Every run splits the training data into two shards: in the two-process job each process reads,
augments and caches teacher outputs for its own shard only; the one-process runs hold both
shards and so see the same global batches."""

import json
import os
import pathlib
import socket
import subprocess

import chex
import numpy as np
import pytest

from kdjax import checkpoint
from tests.tiny_run import main_command

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 10


def _command(workdir, tfds_dir, mode):
  return main_command(
    workdir,
    f'--config.data.tfds_data_dir={tfds_dir}',
    f'--config.train.teacher_steps={STEPS}',
    f'--config.train.student_steps={STEPS}',
    '--config.train.batch_size=32',
    f'--config.parallel.mode={mode}',
    '--config.data.shards=2',
    '--config.distill.augment_copies=1',
    # SGD: Adam's g / (|g| + eps) turns summation-order noise in near-zero gradients (rare
    # embedding rows) into whole steps, which would hide a real mismatch in noise.
    '--config.teacher_optim.name=sgd',
    '--config.student_optim.name=sgd',
    train_limit=2000,
  )


def _env(devices, **extra):
  env = dict(os.environ, **extra)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _single_process(workdir, tfds_dir, mode, devices):
  proc = subprocess.run(
    _command(workdir, tfds_dir, mode),
    cwd=REPO,
    env=_env(devices),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _export(workdir, stage='distill', role='student'):
  return checkpoint.load_export_params(pathlib.Path(workdir) / stage / 'export' / role)


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory, tfds_dir):
  workdir = tmp_path_factory.mktemp('two_processes')
  port = _free_port()
  procs = [
    subprocess.Popen(
      _command(workdir, tfds_dir, 'mesh'),
      cwd=REPO,
      env=_env(
        4,
        JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
        KDJAX_NUM_PROCESSES='2',
        KDJAX_PROCESS_ID=str(index),
      ),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for index in range(2)
  ]
  outputs = []
  for proc in procs:
    try:
      outputs.append(proc.communicate(timeout=600))
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
  for proc, (_, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-3000:]
  return workdir, [out for out, _ in outputs]


@pytest.fixture(scope='module')
def eight_devices(tmp_path_factory, tfds_dir):
  workdir = tmp_path_factory.mktemp('eight_devices')
  _single_process(workdir, tfds_dir, 'mesh', 8)
  return workdir


def test_two_processes_run_as_one_job(two_processes):
  workdir, stdouts = two_processes
  lead, other = stdouts
  assert 'parallel mesh over 8 devices in 2 process(es)' in lead
  assert '[distill] step 10/10' in lead
  # One process speaks and writes for the job: no progress lines, no tables from the other.
  assert '[distill] step' not in other and '[teacher] step' not in other
  assert 'parallel mesh' not in other and '| distill |' not in other
  results = json.loads((workdir / 'results.json').read_text())
  assert set(results['stages']) == {'teacher', 'distill'}
  records = (workdir / 'metrics.jsonl').read_text().splitlines()
  steps = [json.loads(r)['step'] for r in records if '"distill"' in r and '"loss"' in r]
  assert steps == [5, 10]  # logged once, not once per process


def test_two_processes_match_one_process_on_eight_devices(two_processes, eight_devices):
  workdir, _ = two_processes
  for stage, role in (('teacher', 'teacher'), ('distill', 'student')):
    chex.assert_trees_all_close(
      _export(workdir, stage, role), _export(eight_devices, stage, role), rtol=1e-5, atol=1e-6
    )
  got = json.loads((workdir / 'results.json').read_text())['summary']
  want = json.loads((eight_devices / 'results.json').read_text())['summary']
  assert got['distilled_student_accuracy'] == pytest.approx(want['distilled_student_accuracy'])


def test_eight_devices_match_one_device(eight_devices, tmp_path, tfds_dir):
  """The mesh path draws the one-device dropout masks (partitionable threefry), so a whole
  run with dropout on agrees with the one-device run."""
  _single_process(tmp_path, tfds_dir, 'single', 1)
  for stage, role in (('teacher', 'teacher'), ('distill', 'student')):
    chex.assert_trees_all_close(
      _export(tmp_path, stage, role), _export(eight_devices, stage, role), rtol=1e-5, atol=1e-6
    )


def test_one_process_restores_the_two_process_checkpoint(two_processes):
  workdir, _ = two_processes
  final = workdir / 'distill' / 'checkpoints' / str(STEPS)
  state = checkpoint.restore_on_host(final / 'state')  # this test: one process, no cluster
  assert int(np.asarray(state['step'])) == STEPS
  chex.assert_trees_all_close(state['params'], _export(workdir), rtol=0, atol=0)
