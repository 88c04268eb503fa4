"""Sweep aggregation: seeds are pooled, other overrides define groups."""

import numpy as np

from kdjax.sweep import aggregate, format_rows, point_dir, point_name


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
