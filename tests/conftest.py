"""Shared test setup: strict numerics and a session-wide prepared copy of the shipped SST-2."""

import jax
import pytest

# Accidental broadcasting between [B] and [B, 1] is a classic silent loss bug.
jax.config.update('jax_numpy_rank_promotion', 'raise')


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))
