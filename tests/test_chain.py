"""Compression chained with distillation from one config (kdjax/chain.py): distill → compress
→ recover (teacher-guided, pruning or quantization-aware) → quantize, each stage measured, the
final artifact run by kdjax.predict, a killed chain resumed, bad chain configs named."""

import json
import pathlib

import jax
import numpy as np
import pytest

from configs import models
from configs.default import get_config as config_defaults
from experiments import sst2_from_scratch
from kdjax import checkpoint, evaluate, predict, ptq, train
from kdjax import config as config_lib
from kdjax import step as step_lib
from kdjax.compress import artifact, quantize, rules
from kdjax.data import pipeline

CHAIN = ('compress', 'recover', 'quantize')


def _config(tfds_dir, stages=('teacher', 'distill', *CHAIN)):
  config = sst2_from_scratch.get_config('runlocal,student=cnn')
  config.data.tfds_data_dir = str(tfds_dir)
  config.data.train_limit = 1000
  config.stages = stages
  config.train.recover_steps = 20
  # One padded length: each stage compiles its step and evaluation once, not once per bucket.
  config.data.buckets = (64,)
  config.compress.timing_repeats = 2
  return config


def _dev_sentences(workdir: pathlib.Path) -> tuple[list[str], np.ndarray]:
  d = json.loads((workdir / 'config.json').read_text())['data']
  return pipeline.load_split(d['name'], d['eval_split'], d['tfds_data_dir'], d['raw_dir'])


def _dev_logits(workdir: pathlib.Path, model_path: str) -> tuple[np.ndarray, np.ndarray]:
  """Dev logits of an export or artifact, evaluated here from its files alone."""
  model, params, tokenizer = predict.load_model(workdir, model_path)
  ids, labels, buckets = ptq.eval_data(workdir, tokenizer)
  batches = pipeline.ordered_pass(ids, labels, 64, buckets)
  return evaluate.predict_logits(step_lib.make_logits_fn(model), params, batches), labels


@pytest.fixture(scope='module')
def cnn_chain(tmp_path_factory, tfds_dir):
  """Half the CNN's filters removed, then recovered by distillation while pruned to 50 %
  unstructured, then int8."""
  config = _config(tfds_dir)
  config.compress.method = 'units'
  config.compress.keep = 0.5
  config.prune.method = 'magnitude'
  config.prune.sparsity = 0.5
  config.prune.stages = ('recover',)
  config.prune.update_every = 2
  workdir = tmp_path_factory.mktemp('cnn_chain')
  return workdir, config, train.run(config, workdir)


def test_compress_stage_exports_the_smaller_model(cnn_chain):
  workdir, _, results = cnn_chain
  stages = results['stages']
  distilled = checkpoint.read_export_spec(workdir / 'distill' / 'export' / 'student')
  compressed = checkpoint.read_export_spec(workdir / 'compress' / 'export' / 'student')
  assert compressed['kwargs']['num_filters'] == distilled['kwargs']['num_filters'] // 2
  rows = {r['stage']: r for r in stages['compress']['compression']}
  assert set(rows) == {'distill', 'compress'}
  assert rows['compress']['params'] < rows['distill']['params']
  # The reported accuracy is what the export gives when evaluated from its files.
  logits, labels = _dev_logits(workdir, 'compress/export/student')
  assert rows['compress']['eval_accuracy'] == evaluate.accuracy(logits, labels)


def test_recover_starts_from_the_compressed_export_and_prunes(cnn_chain):
  workdir, _, results = cnn_chain
  recover = results['stages']['recover']
  assert recover['steps'] == 20
  spec = checkpoint.read_export_spec(workdir / 'recover' / 'export' / 'student')
  assert spec == checkpoint.read_export_spec(workdir / 'compress' / 'export' / 'student')
  params = checkpoint.load_export_params(workdir / 'recover' / 'export' / 'student')
  flat = dict(zip(rules.param_paths(params), jax.tree_util.tree_leaves(params)))
  selected = rules.selected_paths(params, ('kernel$',), exclude=('classifier',))
  for path in selected:
    assert np.sum(np.asarray(flat[path]) == 0) == round(0.5 * flat[path].size), path
  assert recover['sparsity']['total'] == pytest.approx(0.5, abs=1e-3)
  # The teacher guided the recovery: it is the frozen teacher of the stage.
  assert recover['frozen_teacher']['export'].endswith('teacher/export/teacher')
  (row,) = recover['compression']  # its source, 'compress', measured itself
  assert row['stage'] == 'recover'
  assert {path: row['zeros_per_layer'][path] for path in selected} == pytest.approx(
    dict.fromkeys(selected, 0.5), abs=0.01
  )


def test_quantize_stage_writes_the_int8_artifact_predict_runs(cnn_chain):
  workdir, _, results = cnn_chain
  assert results['final_student'] == 'quantize/artifact'
  quant = results['stages']['quantize']
  (row,) = quant['compression']  # its source, recover, measured itself
  stored, spec = artifact.load(workdir / 'quantize' / 'artifact')
  assert spec == checkpoint.read_export_spec(workdir / 'recover' / 'export' / 'student')
  on_disk = sum(
    (workdir / 'quantize' / 'artifact' / f).stat().st_size
    for f in (artifact.WEIGHTS, artifact.MANIFEST)
  )
  assert row['artifact_bytes'] == on_disk
  logits, labels = _dev_logits(workdir, 'quantize/artifact')
  assert row['eval_accuracy'] == evaluate.accuracy(logits, labels)
  # kdjax.predict (the run's final student by default) runs the artifact on raw sentences.
  sentences, _ = _dev_sentences(workdir)
  probs = predict.predict(str(workdir), sentences[:8])
  np.testing.assert_allclose(probs, jax.nn.softmax(logits[:8], axis=-1), atol=1e-5)
  # int8 + a 50 % sparse mask on half the filters: far smaller than the distilled float32.
  stages = json.loads((workdir / 'results.json').read_text())['stages']
  rows = {r['stage']: r for r in stages['compress']['compression']}
  assert rows['distill']['artifact_bytes'] > 3.9 * row['artifact_bytes']
  assert row['bits_per_param'] < 8.5


def test_report_has_one_compression_table_in_stage_order(cnn_chain):
  workdir, _, results = cnn_chain
  text = (workdir / 'report.md').read_text()
  table = text[text.index('| stage | params | zeros %') :].split('\n\n')[0].splitlines()
  assert [line.split('|')[1].strip() for line in table[2:]] == list(('distill', *CHAIN))
  summary = results['summary']
  assert summary['chain_quantize_bytes'] < summary['chain_distill_bytes']


def test_a_finished_chain_reruns_to_the_same_results(cnn_chain):
  workdir, config, results = cnn_chain
  again = train.run(config, workdir)
  assert again['stages'] == json.loads(json.dumps(results['stages']))


@pytest.fixture(scope='module')
def lowrank_qat_chain(cnn_chain, tmp_path_factory):
  """A BERT student trained alone, factorised to rank 8, recovered by distillation from the
  first chain's teacher with int4 quantization-aware training, then stored as int4."""
  teacher_dir, base, _ = cnn_chain
  config = _config(base.data.tfds_data_dir, ('student_alone', *CHAIN))
  config.teacher.path = str(teacher_dir)
  config.student = models.bert_tiny()
  config.student_optim.learning_rate = 1e-3
  config.compress.method = 'lowrank'
  config.compress.rank = 8
  config.compress.rules = (r'layer_\d+/.*kernel$',)
  config.quant.qat_bits = 4
  config.quant.ptq_bits = 4
  config.quant.stages = ('recover',)
  workdir = tmp_path_factory.mktemp('lowrank_chain')
  return workdir, train.run(config, workdir)


@pytest.mark.slow  # a second chain; low-rank and QAT are unit-tested in their own files
def test_lowrank_compress_factorises_every_selected_layer(lowrank_qat_chain):
  workdir, results = lowrank_qat_chain
  spec = checkpoint.read_export_spec(workdir / 'compress' / 'export' / 'student')
  ranks = dict(tuple(x) for x in spec['kwargs']['low_rank'])
  # bert_tiny: 2 layers × query/key/value/output (64 × 64) + intermediate/output (64 ↔ 128)
  assert len(ranks) == 12 and set(ranks.values()) == {8}
  rows = {r['stage']: r for r in results['stages']['compress']['compression']}
  saved = 2 * (4 * (64 * 64 - 8 * 128) + 2 * (64 * 128 - 8 * 192))
  assert rows['student_alone']['params'] - rows['compress']['params'] == saved


@pytest.mark.slow  # a second chain; low-rank and QAT are unit-tested in their own files
def test_qat_recovery_matches_the_int4_artifact(lowrank_qat_chain):
  workdir, results = lowrank_qat_chain
  recover, quant = results['stages']['recover'], results['stages']['quantize']
  # The recover stage trained on exactly the int4 grid the quantize stage stores.
  (row,) = quant['compression']
  assert quant['bits'] == 4
  assert row['eval_accuracy'] == recover['qat']['eval_accuracy_quantized']
  logits, labels = _dev_logits(workdir, 'quantize/artifact')
  assert row['eval_accuracy'] == evaluate.accuracy(logits, labels)
  # The factors are quantized too (quant.rules' default selects kernel_a / kernel_b).
  assert 'layer_0/intermediate/kernel_a' in quant['quantized_params']
  assert tuple(config_defaults().quant.rules) == quantize.DEFAULT_RULES


def test_heads_compress_without_recovery(cnn_chain, tmp_path):
  teacher_dir, base, _ = cnn_chain
  config = _config(base.data.tfds_data_dir, ('student_alone', 'compress', 'quantize'))
  config.teacher.path = str(teacher_dir)
  config.student = models.bert_tiny()
  config.compress.method = 'heads'
  config.compress.keep = 0.5
  results = train.run(config, tmp_path)
  spec = checkpoint.read_export_spec(tmp_path / 'compress' / 'export' / 'student')
  assert spec['kwargs']['num_heads'] == 1 and spec['kwargs']['head_dim'] == 32
  assert [r['stage'] for r in results['stages']['compress']['compression']] == [
    'student_alone',
    'compress',
  ]
  assert results['final_student'] == 'quantize/artifact'


def test_recover_right_after_training_measures_its_source(cnn_chain, tmp_path):
  teacher_dir, base, _ = cnn_chain
  config = _config(base.data.tfds_data_dir, ('student_alone', 'recover'))
  config.teacher.path = str(teacher_dir)
  config.train.recover_steps = 5
  results = train.run(config, tmp_path)
  rows = results['stages']['recover']['compression']
  assert [r['stage'] for r in rows] == ['student_alone', 'recover']
  alone = results['stages']['student_alone']['models']['student']['eval_accuracy']
  assert rows[0]['eval_accuracy'] == alone
  assert results['final_student'] == 'recover/export/student'


@pytest.mark.parametrize(
  'stages, overrides, fragment',
  [
    (('teacher', 'compress'), {'compress.method': 'units'}, "'compress' needs a student"),
    (('teacher', 'distill', 'compress'), {}, "the 'compress' stage needs one of"),
    (('teacher', 'distill', 'compress'), {'compress.method': 'svd'}, 'compress.method'),
    (
      ('teacher', 'distill', 'compress'),
      {'compress.method': 'lowrank', 'compress.rank': 4, 'compress.energy': 0.9},
      'exactly one of compress.rank',
    ),
    (('teacher', 'distill', 'quantize'), {'quant.ptq_bits': 3}, 'quant.ptq_bits=3'),
    (
      ('teacher', 'distill', 'compress'),
      {'compress.method': 'heads'},
      "works on bert students; config.student.model is 'cnn'",
    ),
    (
      ('teacher', 'distill', 'quantize'),
      {'quant.qat_bits': 8, 'quant.ptq_bits': 4},
      'must equal quant.qat_bits=8',
    ),
    (('teacher', 'distill', 'recover'), {'train.recover_steps': 0}, 'train.recover_steps'),
    (('student_alone', 'recover'), {}, "'recover' needs a teacher"),
  ],
)
def test_bad_chain_configs_are_named(tfds_dir, stages, overrides, fragment):
  config = _config(tfds_dir, stages)
  for key, value in overrides.items():
    section, name = key.split('.')
    config[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=fragment):
    config_lib.validate(config)
