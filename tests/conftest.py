"""Shared test setup: strict numerics and a session-wide prepared copy of the shipped SST-2."""

import os

import jax
import pytest

# Accidental broadcasting between [B] and [B, 1] is a classic silent loss bug.
jax.config.update('jax_numpy_rank_promotion', 'raise')


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(autouse=True, scope='session')
def private_kdjax_cache(tmp_path_factory):
  """Runs started by tests (in-process or as subprocesses) keep their teacher-output cache and
  prepared data in a temporary folder, never in the user's ~/.cache/kdjax."""
  os.environ['KDJAX_CACHE'] = str(tmp_path_factory.mktemp('kdjax_cache'))
