"""Post-training quantization of a finished run's student: artifact, accuracy, latency."""

import json

import numpy as np
import pytest

from experiments import sst2_from_scratch
from kdjax import evaluate, ptq, train
from kdjax import step as step_lib
from kdjax.compress import artifact, quantize, rules


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory, tfds_dir):
  config = sst2_from_scratch.get_config('runlocal,student=cnn')
  config.data.tfds_data_dir = str(tfds_dir)
  config.data.train_limit = 1000
  config.stages = ('student_alone',)
  workdir = tmp_path_factory.mktemp('ptq_run')
  train.run(config, workdir)
  return workdir


@pytest.mark.parametrize('bits, min_compression', [(8, 3.5), (4, 6.0)])
def test_ptq_report_matches_an_independent_evaluation(
  finished_run, tmp_path, bits, min_compression
):
  report = ptq.run(finished_run, tmp_path / 'out', bits=bits, repeats=2)
  saved = json.loads((tmp_path / 'out' / 'report.json').read_text())
  assert saved['artifact_bytes'] == report['artifact_bytes']
  # The artifact on disk is the real size: several times smaller than float32.
  assert report['compression'] >= min_compression
  files = (tmp_path / 'out' / 'artifact').iterdir()
  on_disk = {f.name: f.stat().st_size for f in files}
  assert report['artifact_bytes'] == on_disk['weights.npz'] + on_disk['artifact.json']
  assert report['tokenizer_bytes'] == sum(on_disk.values()) - report['artifact_bytes'] > 0
  # Independently: load the artifact, dequantize, run the float model, score.
  model, params, tokenizer = ptq.load_model(finished_run, '')
  loaded, spec = artifact.load(tmp_path / 'out' / 'artifact')
  assert spec['model'] == 'cnn'
  ids, labels, buckets = ptq.eval_data(finished_run, tokenizer)
  logits = evaluate.predict_logits(
    step_lib.make_logits_fn(model),
    artifact.materialize(loaded),
    ptq.pipeline.ordered_pass(ids, labels, 64, buckets),
  )
  assert report['models'][f'int{bits}']['eval_accuracy'] == evaluate.accuracy(logits, labels)
  assert report['quantized_params'] == rules.selected_paths(params, ('kernel$', 'embedding$'))
  drop = report['models']['float32']['eval_accuracy'] - evaluate.accuracy(logits, labels)
  assert report['accuracy_drop'] == pytest.approx(drop)
  for figures in report['models'].values():
    assert figures['latency_ms_batch1'] > 0 and figures['latency_ms_batch32'] > 0


def test_int8_weights_stay_within_half_a_step(finished_run, tmp_path):
  first = ptq.run(finished_run, tmp_path / 'out', bits=4, repeats=1)
  (tmp_path / 'out' / 'artifact' / 'stray.bin').write_bytes(b'x' * 1000)
  report = ptq.run(finished_run, tmp_path / 'out', bits=8, repeats=1)  # replaces the int4 one
  assert not (tmp_path / 'out' / 'artifact' / 'stray.bin').exists()
  assert report['tokenizer_bytes'] == first['tokenizer_bytes']
  _, params, _ = ptq.load_model(finished_run, '')
  loaded, _ = artifact.load(tmp_path / 'out' / 'artifact')
  table = np.asarray(params['embedding']['embedding'])
  q = loaded['embedding']['embedding']
  error = np.abs(np.asarray(quantize.dequantize(q)) - table)
  assert np.all(error <= np.asarray(q.scale) / 2 + 1e-7)


def test_a_rule_matching_nothing_fails_in_one_line(finished_run, tmp_path):
  with pytest.raises(rules.RuleError, match="rule 'kernal\\$' matches no parameter"):
    ptq.run(finished_run, tmp_path / 'out', rule_list=('kernal$',), repeats=1)


def test_sparse_rules_reach_the_artifact(finished_run, tmp_path):
  """A dense model asked for sparse storage keeps dense storage (it would be larger)."""
  ptq.run(finished_run, tmp_path / 'out', repeats=1, sparse_rules=('embedding$',))
  manifest = json.loads((tmp_path / 'out' / 'artifact' / artifact.MANIFEST).read_text())
  entry = next(e for e in manifest['manifest'] if e['path'] == ['embedding', 'embedding'])
  assert entry['storage'] == 'dense'


def test_predict_runs_on_the_artifact(finished_run, tmp_path):
  """kdjax.predict on the artifact gives the dequantized model's probabilities."""
  import jax

  from kdjax import predict

  ptq.run(finished_run, tmp_path / 'out', bits=8, repeats=1)
  sentences = ['a gripping , funny film .', 'dull and far too long .']
  probs = predict.predict(finished_run, sentences, str(tmp_path / 'out' / 'artifact'))
  model, params, tokenizer = ptq.load_model(finished_run, '')
  loaded, _ = artifact.load(tmp_path / 'out' / 'artifact')
  _, _, buckets = ptq.eval_data(finished_run, tokenizer)
  encoded = ptq.pipeline.encode(sentences, tokenizer, 64)
  batch = next(iter(ptq.pipeline.ordered_pass(encoded, np.zeros(2, np.int32), 2, buckets)))
  expected = jax.nn.softmax(step_lib.make_logits_fn(model)(artifact.materialize(loaded), batch))
  np.testing.assert_allclose(probs, np.asarray(expected)[:2], atol=1e-6)
