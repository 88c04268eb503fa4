"""Helpers shared by the benchmarks: step timing, percentiles, the measured matmul ceiling, and
the environment block and JSON file every benchmark writes."""

import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np


def percentile(values, q: float) -> float:
  return float(np.percentile(np.asarray(values, np.float64), q))


def summary_ms(seconds) -> dict:
  """Median and p90 in milliseconds of per-step times given in seconds."""
  return {'median_ms': 1e3 * percentile(seconds, 50), 'p90_ms': 1e3 * percentile(seconds, 90)}


def jax_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  """Best-of-`repeats` float32 FLOP/s of one jitted n×n @ n×n `jnp.dot` on the default device.

  The ceiling the MFU column divides by: measured in the same process and under the same load
  as the steps, rather than a datasheet figure the CPU may never reach.
  """
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()  # compile
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    dot(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def compiled_costs(compiled) -> dict:
  """FLOPs (XLA's count) and memory (bytes) of an AOT-compiled executable.

  `peak_bytes` = arguments + outputs + temporaries − aliased (donated) buffers: a donated
  input and the output written into it are one buffer, not two.
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
    cost = cost[0] if cost else {}
  mem = compiled.memory_analysis()
  fields = ('argument', 'output', 'temp', 'alias')
  sizes = {f'{f}_bytes': int(getattr(mem, f'{f}_size_in_bytes', 0) or 0) for f in fields}
  peak = sizes['argument_bytes'] + sizes['output_bytes'] + sizes['temp_bytes']
  return {
    'xla_flops': float((cost or {}).get('flops', 0.0)),
    'peak_bytes': peak - sizes['alias_bytes'],
    **sizes,
  }


def environment() -> dict:
  device = jax.devices()[0]
  return {
    'jax': jax.__version__,
    'platform': device.platform,
    'device_kind': device.device_kind,
    'device_count': jax.device_count(),
    'cpu_count': os.cpu_count(),
    'machine': platform.machine(),
    'python': platform.python_version(),
    'loadavg_start': os.getloadavg(),
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }


def write_json(path: str, payload: dict) -> None:
  if not path:
    return
  out = pathlib.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(payload, indent=2))


def finish(result: dict, rows: list, print_table, path: str) -> dict:
  """The end every benchmark shares: its rows and the load average at the end (other work on
  the machine skews timings, so the JSON keeps the load at both ends) into `result`, the
  table printed by `print_table(result)`, and the JSON written to `path`."""
  result['rows'] = rows
  result['loadavg_end'] = os.getloadavg()
  print_table(result)
  write_json(path, result)
  return result
