"""Temperature and loss-weight schedules: values against closed forms, and bad strings."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.kd import schedules


def _values(spec: str, base: float, total: int, steps):
  fn = schedules.make(schedules.parse(spec, 'config.loss.schedules.kl'), base, total)
  return np.array([float(fn(jnp.asarray(s))) for s in steps])


def test_constant_is_the_configured_value():
  np.testing.assert_allclose(_values('', 0.7, 100, [0, 50, 100, 1000]), 0.7)
  np.testing.assert_allclose(_values('constant', 2.0, 10, [0, 9]), 2.0)


def test_linear_over_the_stage_and_over_a_window():
  np.testing.assert_allclose(_values('linear:0', 1.0, 100, [0, 25, 100, 200]), [1, 0.75, 0, 0])
  # Before FROM the configured value, after TO the end value.
  np.testing.assert_allclose(
    _values('linear:3:10:20', 1.0, 100, [0, 10, 15, 20, 90]), [1, 1, 2, 3, 3]
  )


def test_cosine_follows_the_half_cosine():
  steps = [0, 10, 30, 50, 60]
  expected = [4 + (1 - 4) * 0.5 * (1 - math.cos(math.pi * min(s / 50, 1))) for s in steps]
  np.testing.assert_allclose(_values('cosine:1', 4.0, 50, steps), expected, rtol=1e-6)


def test_step_schedule_switches_at_boundaries():
  np.testing.assert_allclose(
    _values('step:10=0.5,20=0', 1.0, 100, [0, 9, 10, 19, 20, 99]), [1, 1, 0.5, 0.5, 0, 0]
  )


def test_schedules_run_on_a_traced_step():
  fn = schedules.make(schedules.parse('linear:0', 'kl'), 1.0, 10)
  values = jax.jit(jax.vmap(fn))(jnp.arange(0, 11, 5))
  np.testing.assert_allclose(values, [1.0, 0.5, 0.0])


@pytest.mark.parametrize(
  'spec, fragment',
  [
    ('exp:1', "unknown schedule kind 'exp'"),
    ('linear', 'expected END or END:FROM:TO'),
    ('linear:1:5', 'expected END or END:FROM:TO'),
    ('linear:1:20:10', 'need 0 <= FROM < TO'),
    ('cosine:x', 'could not convert'),
    ('step:10', "'10' is not STEP=VALUE"),
    ('step:20=1,10=0', 'steps must be increasing'),
  ],
)
def test_bad_schedules_name_key_value_and_valid_forms(spec, fragment):
  with pytest.raises(schedules.ScheduleError) as e:
    schedules.parse(spec, 'config.loss.schedules.kl')
  message = str(e.value)
  assert message.startswith(f'config.loss.schedules.kl={spec!r}')
  assert fragment in message and 'linear:END[:FROM:TO]' in message and '\n' not in message
