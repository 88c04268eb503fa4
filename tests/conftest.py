"""Shared test setup: strict numerics and a session-wide prepared copy of the shipped SST-2."""

import os

# 8 simulated CPU devices for the data-parallel tests; set before JAX starts its backend.
# Single-device code keeps running on the first device.
if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  ).strip()

import jax  # noqa: E402
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
