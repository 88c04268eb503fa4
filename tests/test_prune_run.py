"""Gradual pruning inside a distillation run: exact final sparsity, dense exclusions, the
report in result.json, and a bad prune config named in one line."""

import jax
import numpy as np
import pytest

from experiments import sst2_from_scratch
from kdjax import checkpoint, train
from kdjax import config as config_lib
from kdjax.compress import rules


def _config(tfds_dir, **prune):
  config = sst2_from_scratch.get_config('runlocal,student=cnn')
  config.data.tfds_data_dir = str(tfds_dir)
  config.data.train_limit = 1000
  # One padded length: each stage compiles its step and evaluation once, not once per bucket.
  config.data.buckets = (64,)
  config.stages = ('teacher', 'distill')
  config.train.student_steps = 20
  config.prune.method = 'magnitude'
  config.prune.sparsity = 0.8
  config.prune.update_every = 2
  for key, value in prune.items():
    config.prune[key] = value
  return config


@pytest.fixture(scope='module')
def pruned_run(tmp_path_factory, tfds_dir):
  workdir = tmp_path_factory.mktemp('pruned')
  return workdir, train.run(_config(tfds_dir), workdir)


def test_exported_student_has_the_scheduled_sparsity_per_kernel(pruned_run):
  workdir, results = pruned_run
  params = checkpoint.load_export_params(workdir / 'distill' / 'export' / 'student')
  selected = rules.selected_paths(params, ('kernel$',), exclude=('classifier',))
  assert selected  # conv and dense kernels
  flat = dict(zip(rules.param_paths(params), jax.tree_util.tree_leaves(params)))
  for path in selected:
    kernel = np.asarray(flat[path])
    assert np.sum(kernel == 0) == round(0.8 * kernel.size), path
  assert (
    np.count_nonzero(np.asarray(params['classifier']['kernel']))
    > 0.9 * params['classifier']['kernel'].size
  )
  report = results['stages']['distill']['sparsity']
  assert report['total'] == pytest.approx(0.8, abs=1e-3)
  assert set(report['per_path']) == set(selected)


def test_the_teacher_stage_is_not_pruned(pruned_run):
  workdir, results = pruned_run
  assert 'sparsity' not in results['stages']['teacher']
  params = checkpoint.load_export_params(workdir / 'teacher' / 'export' / 'teacher')
  leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(params) if np.ndim(x) == 2]
  assert all(np.mean(x == 0) < 0.05 for x in leaves)


@pytest.mark.parametrize(
  'overrides, fragment',
  [
    ({'method': 'snip'}, 'prune.method'),
    ({'sparsity': 1.0}, r'prune.sparsity=1.0 is invalid: a fraction in \(0, 1\)'),
    ({'stages': ('teacher',)}, 'prune.stages'),
    ({'begin_fraction': 0.9}, 'begin_fraction < end_fraction'),
    ({'method': 'nm', 'nm': (4, 4)}, r'prune.nm=\(4, 4\) is invalid'),
  ],
)
def test_bad_prune_values_are_named(tfds_dir, overrides, fragment):
  with pytest.raises(config_lib.ConfigError, match=fragment):
    config_lib.validate(_config(tfds_dir, **overrides))


# slow: a whole run; the 2:4 masks themselves are unit-tested in test_compress_pruning.py.
@pytest.mark.slow
def test_nm_pruning_run_exports_a_2_4_pattern(tfds_dir, tmp_path):
  # Conv kernels [width 3, in, out] have no input axis of groups of 4: left dense.
  config = _config(tfds_dir, method='nm', exclude=('classifier', 'conv_'))
  train.run(config, tmp_path)
  params = checkpoint.load_export_params(tmp_path / 'distill' / 'export' / 'student')
  flat = dict(zip(rules.param_paths(params), jax.tree_util.tree_leaves(params)))
  selected = rules.selected_paths(params, ('kernel$',), exclude=('classifier', 'conv_'))
  assert selected
  for path in selected:
    kernel = np.asarray(flat[path])
    groups = (kernel.reshape(-1, 4, kernel.shape[1]) != 0).sum(axis=1)
    assert np.all(groups == 2), path
