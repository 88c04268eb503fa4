"""MetricsWriter mirrors metrics.jsonl to TensorBoard event files that TensorBoard reads."""

import json

import pytest
from tensorboard.backend.event_processing import event_accumulator

from kdjax import report


def _load(tb_dir):
  acc = event_accumulator.EventAccumulator(str(tb_dir), size_guidance={'scalars': 0, 'tensors': 0})
  acc.Reload()
  return acc


def _scalars(acc, tag):
  return [(e.step, pytest.approx(e.value)) for e in acc.Scalars(tag)]


def test_numeric_scalars_are_written_as_stage_key_at_the_record_step(tmp_path):
  writer = report.MetricsWriter(tmp_path / 'metrics.jsonl')
  writer.write({'stage': 'teacher', 'step': 5, 'loss': 0.75, 'accuracy': 0.5, 'note': 'x'})
  writer.write({'stage': 'teacher', 'step': 10, 'loss': 0.25, 'final': True})
  writer.write({'stage': 'distill', 'step': 5, 'kl_T': 1.5})
  writer.close()
  acc = _load(tmp_path / 'tensorboard')
  tags = set(acc.Tags()['scalars'])
  assert tags == {'teacher/loss', 'teacher/accuracy', 'distill/kl_T'}  # no text, no bools
  assert _scalars(acc, 'teacher/loss') == [(5, 0.75), (10, 0.25)]
  assert _scalars(acc, 'distill/kl_T') == [(5, 1.5)]
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(x)['step'] for x in lines] == [5, 10, 5]


def test_resume_truncation_rebuilds_the_event_files(tmp_path):
  writer = report.MetricsWriter(tmp_path / 'metrics.jsonl')
  writer.write_hparams({'loss': {'temperature': 2.0, 'weights': {'kl': 0.5}}, 'stages': ('a',)})
  for step in (5, 10, 15):
    writer.write({'stage': 'distill', 'step': step, 'loss': float(step)})
  writer.write({'stage': 'teacher', 'step': 20, 'loss': 9.0})
  writer.close()
  # A resumed run (a new process) restored distill's step-10 checkpoint and redoes step 15.
  resumed = report.MetricsWriter(tmp_path / 'metrics.jsonl')
  resumed.truncate_after('distill', 10)
  resumed.write({'stage': 'distill', 'step': 15, 'loss': 15.5})
  resumed.close()
  acc = _load(tmp_path / 'tensorboard')
  assert _scalars(acc, 'distill/loss') == [(5, 5.0), (10, 10.0), (15, 15.5)]
  assert _scalars(acc, 'teacher/loss') == [(20, 9.0)]  # other stages' later steps are kept
  # The hyperparameters survive the rebuild: as a text table and as the HParams session.
  (text,) = acc.Tensors('hparams/text_summary')
  table = text.tensor_proto.string_val[0].decode()
  assert '| loss.temperature | 2.0 |' in table and '| loss.weights.kl | 0.5 |' in table
  assert '| stages | ["a"] |' in table
  assert (
    json.loads((tmp_path / 'tensorboard' / 'hparams.json').read_text())['loss.weights.kl'] == 0.5
  )
  plugin = acc.PluginTagToContent('hparams')
  assert '_hparams_/session_start_info' in plugin
  assert b'loss.temperature' in plugin['_hparams_/session_start_info']


def test_flatten_uses_dotted_config_keys():
  assert report.flatten({'a': {'b': {'c': 1}, 'd': 'x'}, 'e': 2.0}) == {
    'a.b.c': 1,
    'a.d': 'x',
    'e': 2.0,
  }


def test_records_without_numbers_or_step_open_no_event_file(tmp_path):
  writer = report.MetricsWriter(tmp_path / 'metrics.jsonl')
  writer.write({'stage': 'teacher', 'step': 5, 'note': 'text only', 'final': True})
  writer.write({'stage': 'teacher', 'loss': 0.5})  # no step: nowhere on TensorBoard's axis
  writer.close()
  assert not (tmp_path / 'tensorboard').exists()
  assert len(report.read_metrics(tmp_path / 'metrics.jsonl')) == 2
