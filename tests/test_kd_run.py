"""The method library through a whole run: feature, relation and contrastive terms with
learned projections, scheduled weights, checkpoints, resume and the exported student, and the
pooled terms read from the teacher-output cache."""

import json

import numpy as np
import pytest

from configs import models
from experiments import sst2_from_scratch
from kdjax import checkpoint, train
from kdjax import config as config_lib


def _config(tfds_dir, **overrides):
  config = sst2_from_scratch.get_config('runlocal')
  config.data.tfds_data_dir = str(tfds_dir)
  config.data.train_limit = 1000
  config.stages = ('teacher', 'distill')
  config.train.student_steps = 10
  # One padded length: each stage compiles its step and evaluation once, not once per bucket.
  config.data.buckets = (64,)
  config.student = models.bert_tiny()
  config.student.kwargs.hidden_size = 32  # narrower than the 64-wide teacher: projections
  config.student.kwargs.num_layers = 1
  config.distill.teacher_cache = 'off'
  weights = {'ce': 0.5, 'kl': 0.5, 'dkd': 0.5, 'hidden_mse': 1.0, 'attention_kl': 1.0}
  weights.update(minilmv2=1.0, crd=0.1)
  for name, value in {**weights, **overrides}.items():
    config.loss.weights[name] = value
  config.loss.schedules.kl = 'linear:0'
  config.loss.schedules.temperature = 'step:5=1'
  return config


@pytest.fixture(scope='module')
def feature_run(tmp_path_factory, tfds_dir):
  workdir = tmp_path_factory.mktemp('kd_run')
  return workdir, train.run(_config(tfds_dir), workdir)


def test_feature_terms_train_and_are_logged(feature_run):
  workdir, results = feature_run
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  distill = [r for r in records if r['stage'] == 'distill' and 'loss' in r]
  assert [r['step'] for r in distill] == [5, 10]
  for name in ('hidden_mse', 'attention_kl', 'minilmv2', 'minilmv2_query', 'crd', 'dkd_tckd'):
    assert name in distill[-1], name
  # Schedules are logged as the interval's mean: the KL weight falls linearly from its
  # configured 0.5 to 0 over 10 steps; the temperature is 2 until step 5, then 1.
  first_five = [0.5 * (1 - s / 10) for s in range(5)]
  assert distill[0]['schedule/kl'] == pytest.approx(sum(first_five) / 5)
  assert distill[0]['schedule/temperature'] == 2.0 and distill[1]['schedule/temperature'] == 1.0
  assert results['stages']['distill']['models']['student']['eval_accuracy'] > 0


def test_export_holds_the_student_without_the_projection_heads(feature_run):
  workdir, _ = feature_run
  params = checkpoint.load_export_params(workdir / 'distill' / 'export' / 'student')
  assert 'kd_heads' not in params and 'layer_0' in params
  assert params['layer_0']['attention']['query']['kernel'].shape == (32, 32)


def test_feature_terms_refuse_the_logit_cache(tfds_dir, tmp_path):
  config = _config(tfds_dir)
  config.distill.teacher_cache = 'logits'
  with pytest.raises(config_lib.ConfigError) as e:
    train.run(config, tmp_path)
  assert "distill.teacher_cache='off'" in str(e.value) and '\n' not in str(e.value)


def test_model_mismatch_is_a_config_error_before_training(tfds_dir, tmp_path):
  config = _config(tfds_dir, attention_kl=1.0)
  config.student.kwargs.num_heads = 4  # the teacher has 2: head-by-head terms cannot apply
  with pytest.raises(config_lib.ConfigError, match='use loss.weights.minilmv2'):
    train.run(config, tmp_path)
  assert not (tmp_path / 'teacher').exists()  # refused before the teacher stage ran


def test_pooled_terms_train_from_the_cache_as_with_the_teacher_live(
  feature_run, tfds_dir, tmp_path
):
  """pooled_mse and CRD read only the teacher's pooled vectors, which the teacher-output cache
  stores: distilling from the cache logs the same losses as running the teacher live. (With
  2 classes the top-1 entry plus the log-sum-exp of the rest restores the logits exactly.)"""
  teacher_workdir, _ = feature_run
  logged, entries = {}, {}
  for mode in ('off', 'logits', 'topk'):
    config = _config(tfds_dir, dkd=0.0, hidden_mse=0.0, attention_kl=0.0, minilmv2=0.0)
    config.loss.weights.pooled_mse = 1.0
    config.teacher.path = str(teacher_workdir)
    config.stages = ('distill',)
    config.distill.teacher_cache = mode
    config.distill.cache_dir = str(tmp_path / 'cache')
    results = train.run(config, tmp_path / mode)
    entries[mode] = results['stages']['distill']['teacher_cache'].get('entry')
    lines = (tmp_path / mode / 'metrics.jsonl').read_text().splitlines()
    logged[mode] = [r for r in map(json.loads, lines) if r['stage'] == 'distill' and 'loss' in r]
  assert entries['off'] is None and entries['logits'] != entries['topk']
  for mode in ('logits', 'topk'):
    pooled = np.load(f'{entries[mode]}/pooled.npy')
    assert pooled.shape == (1000, 64) and np.abs(pooled).max() > 0  # the 64-wide teacher
    assert [r['step'] for r in logged[mode]] == [r['step'] for r in logged['off']] == [5, 10]
    for cached, live in zip(logged[mode], logged['off']):
      for name in ('loss', 'pooled_mse', 'crd', 'kl_T'):
        assert cached[name] == pytest.approx(live[name], rel=1e-4), (mode, name)
