"""Sweep plots: the Pareto front against a brute-force reference, and real PNG files."""

import itertools
import json
import random

import pytest

from kdjax import plots

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _brute_force_front(sizes, scores):
  def dominated(i):
    return any(
      sizes[j] <= sizes[i]
      and scores[j] >= scores[i]
      and (sizes[j] < sizes[i] or scores[j] > scores[i])
      for j in range(len(sizes))
    )

  return {i for i in range(len(sizes)) if not dominated(i)}


@pytest.mark.parametrize('seed', range(30))
def test_pareto_front_matches_brute_force(seed):
  rng = random.Random(seed)
  n = rng.randint(1, 25)
  # Few distinct values, so ties in size, in score and whole duplicates all occur.
  sizes = [rng.choice([1e3, 2e3, 5e3, 1e4, 3e4]) for _ in range(n)]
  scores = [rng.choice([0.70, 0.75, 0.80, 0.82, 0.85]) for _ in range(n)]
  front = plots.pareto_front(sizes, scores)
  assert set(front) == _brute_force_front(sizes, scores)
  assert len(front) == len(set(front))
  assert [sizes[i] for i in front] == sorted(sizes[i] for i in front)


def test_pareto_front_small_cases():
  assert plots.pareto_front([], []) == []
  assert plots.pareto_front([10, 20, 30], [0.9, 0.8, 0.95]) == [0, 2]
  assert plots.pareto_front([10, 10], [0.8, 0.9]) == [1]


def _assert_png(path):
  assert path.is_file(), path
  data = path.read_bytes()
  assert data[:8] == PNG_MAGIC and len(data) > 2000, path


def _points():
  """(name, overrides, figures) for a temperature × kl-weight × 2-seed sweep over two
  student sizes, with pruning sparsity reported."""
  points = []
  for t, w, width, seed in itertools.product((1.0, 4.0), (0.25, 0.75), (16, 64), (0, 1)):
    overrides = {'loss.temperature': t, 'loss.weights.kl': w, 'width': width, 'seed': seed}
    figures = {
      'final_student_accuracy': 0.7 + 0.01 * t + 0.05 * w + 0.001 * width + 0.002 * seed,
      'final_student_params': 1000 * width,
      'final_student_bytes': 4000 * width,
      'final_student_sparsity': 0.5 if width == 16 else 0.25,
    }
    points.append((','.join(f'{k}={v}' for k, v in overrides.items()), overrides, figures))
  return points


def test_sweep_plots_writes_every_applicable_png(tmp_path):
  points = _points()
  metrics = tmp_path / 'metrics.jsonl'
  records = [
    {'stage': 'teacher', 'step': 5, 'loss': 0.9},
    {'stage': 'teacher', 'step': 10, 'loss': 0.6, 'eval_teacher_accuracy': 0.7},
    {'stage': 'distill', 'step': 10, 'loss': 0.5, 'final': True, 'eval_student_accuracy': 0.8},
  ]
  metrics.write_text(''.join(json.dumps(r) + '\n' for r in records))
  written = plots.sweep_plots(
    tmp_path / 'plots',
    points,
    {points[0][0]: metrics, points[1][0]: tmp_path / 'missing.jsonl'},
    ['loss.temperature', 'loss.weights.kl', 'width', 'seed'],
  )
  names = sorted(p.relative_to(tmp_path / 'plots').as_posix() for p in written)
  assert names == sorted(
    [
      'accuracy_vs_size.png',
      'heatmap.png',
      'accuracy_vs_sparsity.png',
      'curves/' + points[0][0].replace('/', '_') + '.png',
    ]
  )
  for path in written:
    _assert_png(path)


def test_plots_that_do_not_apply_are_skipped(tmp_path):
  # Seeds only: one group, one size, no sparsity, one numeric key: nothing but no error.
  points = [
    ('seed=0', {'seed': 0}, {'final_student_accuracy': 0.8, 'final_student_params': 10}),
    ('seed=1', {'seed': 1}, {'final_student_accuracy': 0.7, 'final_student_params': 10}),
  ]
  assert plots.sweep_plots(tmp_path / 'plots', points, {}, ['seed']) == []


def test_heatmap_prefers_temperature_and_a_loss_weight():
  points = [
    ('p', {'a': a, 'loss.weights.ce': c, 'loss.temperature': t}, {})
    for a, c, t in itertools.product((1, 2), (0.1, 0.2), (1.0, 2.0))
  ]
  keys = ['a', 'loss.weights.ce', 'loss.temperature']
  assert plots.heatmap_keys(points, keys) == ('loss.temperature', 'loss.weights.ce')
  assert plots.heatmap_keys(points, ['a', 'seed']) is None
  assert plots.heatmap_keys([('p', {'s': 'x'}, {}), ('q', {'s': 'y'}, {})], ['s']) is None
