"""Per-step schedules for the distillation temperature and every loss term's weight.

A schedule is a short string so it fits on a command line
(`--config.loss.schedules.temperature=cosine:1`); the value it starts from is the term's
configured weight (or `loss.temperature`), so a schedule only says where it goes:
  ''  or 'constant'            the configured value throughout
  'linear:END[:FROM:TO]'       linear from the configured value to END between steps FROM
                               and TO (default: the whole stage), constant outside
  'cosine:END[:FROM:TO]'       half-cosine from the configured value to END, same range
  'step:S1=V1[,S2=V2...]'      the configured value until step S1, then V1 until S2, ...
Schedules run inside the jitted step, so they are functions of a traced step number.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax.numpy as jnp

KINDS = ('constant', 'linear', 'cosine', 'step')
Schedule = Callable[[jnp.ndarray], jnp.ndarray]


class ScheduleError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
  kind: str
  end: float = 0.0
  begin_step: int | None = None  # None = start of the stage
  end_step: int | None = None  # None = end of the stage
  boundaries: tuple[tuple[int, float], ...] = ()


def parse(spec: str, where: str) -> ScheduleSpec:
  """Parses a schedule string; `where` names the config key in error messages."""
  text = spec.strip()
  if text in ('', 'constant'):
    return ScheduleSpec('constant')
  kind, _, rest = text.partition(':')
  usage = (
    "valid: '', 'constant', 'linear:END[:FROM:TO]', 'cosine:END[:FROM:TO]', "
    "'step:STEP=VALUE[,STEP=VALUE...]'"
  )
  try:
    if kind in ('linear', 'cosine'):
      parts = rest.split(':')
      if not rest or len(parts) not in (1, 3):
        raise ValueError('expected END or END:FROM:TO')
      begin, end_step = (None, None) if len(parts) == 1 else (int(parts[1]), int(parts[2]))
      if begin is not None and not 0 <= begin < end_step:
        raise ValueError(f'need 0 <= FROM < TO, got FROM={begin} TO={end_step}')
      return ScheduleSpec(kind, float(parts[0]), begin, end_step)
    if kind == 'step':
      pairs = []
      for item in rest.split(','):
        step_text, sep, value_text = item.partition('=')
        if not sep:
          raise ValueError(f'{item!r} is not STEP=VALUE')
        pairs.append((int(step_text), float(value_text)))
      steps = [s for s, _ in pairs]
      if steps != sorted(set(steps)) or steps[0] < 0:
        raise ValueError(f'steps must be increasing and >= 0, got {steps}')
      return ScheduleSpec('step', boundaries=tuple(pairs))
  except ValueError as e:
    raise ScheduleError(f'{where}={spec!r}: {e}; {usage}') from None
  raise ScheduleError(f'{where}={spec!r}: unknown schedule kind {kind!r}; {usage}')


def make(spec: ScheduleSpec, base: float, total_steps: int) -> Schedule:
  """The schedule as a function of the (traced) step number, starting from `base`."""
  if spec.kind == 'constant':
    return lambda step: jnp.asarray(base, jnp.float32)
  if spec.kind == 'step':
    boundaries = spec.boundaries

    def stepwise(step):
      value = jnp.asarray(base, jnp.float32)
      for at, v in boundaries:  # later boundaries override earlier ones
        value = jnp.where(step >= at, jnp.float32(v), value)
      return value

    return stepwise
  begin = 0 if spec.begin_step is None else spec.begin_step
  end_step = total_steps if spec.end_step is None else spec.end_step
  span = max(end_step - begin, 1)

  def ramp(step):
    frac = jnp.clip((jnp.asarray(step, jnp.float32) - begin) / span, 0.0, 1.0)
    if spec.kind == 'cosine':
      frac = 0.5 * (1.0 - jnp.cos(math.pi * frac))
    return jnp.float32(base) + (jnp.float32(spec.end) - jnp.float32(base)) * frac

  return ramp
