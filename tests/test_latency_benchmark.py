"""Smoke test of benchmarks/latency.py at tiny sizes: every row is timed, and the int8 rows run
the quantized weights themselves (int8 in, dequantized inside the jitted forward)."""

import json

import jax
import numpy as np

from benchmarks import latency
from experiments import sst2_minilm_students
from kdjax import train
from kdjax.compress import quantize
from kdjax.models import registry


def test_main_times_every_row(tmp_path):
  out = tmp_path / 'bench.json'
  result = latency.main(
    [
      '--models=bilstm,bert',
      '--variants=float32,int8,sparse90,structured',  # sparse50 is sparse90's code path
      '--batch-sizes=1,2',
      '--seq-len=8',
      '--repeats=3',
      '--block=2',
      f'--out={out}',
    ]
  )
  assert json.loads(out.read_text())['rows'] == result['rows']
  assert result['cpu_count'] and result['versions']['jax'] and result['device']['kind']
  assert 'dequantized' in result['quantized_path']
  names = {(r['name'], r['batch_size']) for r in result['rows']}
  expected = [
    'bilstm',
    'bilstm int8',
    'bilstm 90% unstructured',
    'bilstm half units',
    'bert',
    'bert int8',
    'bert 90% unstructured',
    'bert half FFN',
    'bert half heads',
  ]
  assert names == {(n, b) for n in expected for b in (1, 2)}
  by_name = {(r['name'], r['batch_size']): r for r in result['rows']}
  for row in result['rows']:
    assert 0 < row['p50_ms'] <= row['p90_ms'], row
    assert row['examples_per_sec'] > 0 and row['compile_s'] > 0, row
    full = by_name[(row['base'], row['batch_size'])]
    if row['variant'] == 'int8':
      # Quantization changed the logits (a float copy would match exactly), but only a little.
      assert 0 < row['max_abs_diff_vs_float32'] <= 0.05 * row['max_abs_float32_logit'] + 1e-4
      assert row['stored_bytes'] < 0.3 * row['float32_bytes']
      assert row['int4_bytes'] < row['stored_bytes']
    elif row['variant'].startswith('sparse'):
      assert row['num_params'] == full['num_params']  # same dense shapes
      assert row['stored_bytes'] < full['stored_bytes']
    elif row['variant'] == 'structured':
      assert row['num_params'] < full['num_params']  # units physically removed


def test_int8_row_feeds_int8_weights_to_the_forward():
  # The transformer student's preset with a smaller vocabulary, to keep the test quick.
  spec = dict(latency._spec(sst2_minilm_students.small_bert()), vocab_size=2000)
  params = jax.device_get(registry.init_params(train.build(spec), jax.random.PRNGKey(0)))
  rows = {r['variant']: r for r in latency.variants('bert', spec, params, ['float32', 'int8'])}
  is_q = lambda x: isinstance(x, quantize.QTensor)  # noqa: E731
  qtensors = [x for x in jax.tree_util.tree_leaves(rows['int8']['params'], is_leaf=is_q) if is_q(x)]
  assert qtensors and all(q.values.dtype == np.int8 for q in qtensors)
  batch = {
    'input_ids': np.full((2, 8), 1500, np.int32),
    'attention_mask': np.ones((2, 8), np.int32),
  }
  quantized = np.asarray(rows['int8']['fn'](rows['int8']['params'], batch))
  dense = np.asarray(rows['float32']['fn'](rows['float32']['params'], batch))
  expected = np.asarray(
    rows['float32']['fn'](quantize.dequantize_params(rows['int8']['params']), batch)
  )
  np.testing.assert_allclose(quantized, expected, atol=1e-5)
  np.testing.assert_allclose(quantized, dense, atol=0.05 * np.abs(dense).max() + 1e-4)
