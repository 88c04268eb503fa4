"""`python -m kdjax.sweep --config=experiments/x.py[:args] --workdir=DIR`: every point of the
experiment's `get_sweep()` in its own sub-workdir, then mean ± std over seeds.

`get_sweep()` returns a list of override dicts (dotted config keys → values). Every point is
applied and validated before any runs, so a typo fails in seconds, not hours later. Points
already finished are read back; an interrupted one resumes, so the command can be re-run.
"""

import copy
import importlib.util
import pathlib
import re
import statistics
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from kdjax import config as config_lib
from kdjax import report, train
from kdjax.cli import USER_ERRORS, parse_flags


def point_name(overrides: dict) -> str:
  return ','.join(f'{k}={v}' for k, v in sorted(overrides.items())) or 'default'


def point_dir(name: str) -> str:
  """A point's sub-workdir: its name with path separators and quotes replaced, so a path
  value (a teacher's workdir) does not nest folders."""
  return re.sub(r"[/\\'\" ]", '_', name)


def apply_overrides(config, overrides: dict):
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node[part] if part in node else None
      if node is None:
        break
    if node is None or leaf not in node:
      raise config_lib.ConfigError(f'sweep override {key}={value!r}: no such config key')
    node[leaf] = value
  return config


def load_points(config, sweep: list[dict]) -> list[tuple[str, dict, object]]:
  points = [(point_name(o), o, apply_overrides(config, o)) for o in sweep]
  for name, _, point_config in points:
    try:
      config_lib.validate(point_config)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f'sweep point {name}: {e}') from None
  return points


def aggregate(points: list[tuple[str, dict, dict]]) -> list[dict]:
  """Groups points by their non-seed overrides: mean, std and n of every summary figure."""
  groups: dict[str, list[dict]] = {}
  for _, overrides, results in points:
    key = point_name({k: v for k, v in overrides.items() if k != 'seed'})
    groups.setdefault(key, []).append(results['summary'])
  rows = []
  for key, summaries in groups.items():
    row = {'group': key, 'n': len(summaries)}
    for metric in summaries[0]:
      values = [s[metric] for s in summaries if s.get(metric) is not None]
      if values:
        row[metric] = {
          'mean': statistics.fmean(values),
          'std': statistics.stdev(values) if len(values) > 1 else 0.0,
          'values': values,
        }
    rows.append(row)
  return rows


def format_rows(rows: list[dict]) -> str:
  # Groups may report different figures (a mutual-learning group has no distilled student):
  # every figure any group has gets a column.
  metrics = list(dict.fromkeys(m for row in rows for m in row if m not in ('group', 'n')))
  lines = ['| group | n | ' + ' | '.join(metrics) + ' |', '|---|---:|' + '---:|' * len(metrics)]
  for row in rows:
    cells = [
      f'{100 * row[m]["mean"]:.2f} ± {100 * row[m]["std"]:.2f}' if m in row else '—'
      for m in metrics
    ]
    lines.append(f'| {row["group"]} | {row["n"]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def load_sweep() -> list[dict]:
  """Calls get_sweep() of the file named by --config (the part before ':')."""
  path = config_flags.get_config_filename(flags.FLAGS['config']).split(':')[0]
  spec = importlib.util.spec_from_file_location('kdjax_experiment', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_sweep'):
    raise config_lib.ConfigError(f'{path} defines no get_sweep(); nothing to sweep')
  return module.get_sweep()


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  workdir = pathlib.Path(flags.FLAGS.workdir).absolute()
  try:
    points = load_points(flags.FLAGS.config, load_sweep())
    finished = []
    for i, (name, overrides, point_config) in enumerate(points):
      print(f'=== sweep point {i + 1}/{len(points)}: {name}', flush=True)
      finished.append((name, overrides, train.run(point_config, workdir / point_dir(name))))
  except USER_ERRORS as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  rows = aggregate(finished)
  report.write_json(
    workdir / 'results.json', {'points': [n for n, _, _ in finished], 'groups': rows}
  )
  table = format_rows(rows)
  (workdir / 'results.md').write_text(table + '\n')
  print(table)


if __name__ == '__main__':
  # Defined here, not at import, so tests and notebooks can import the sweep helpers.
  config_flags.DEFINE_config_file(
    'config', None, 'Experiment file with get_sweep().', lock_config=True
  )
  flags.DEFINE_string('workdir', None, 'Sweep directory; one sub-folder per point.')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=parse_flags)
