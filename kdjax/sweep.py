"""`python -m kdjax.sweep --config=experiments/x.py[:args] --workdir=DIR [--parallel=N]`: every
point of the experiment's `get_sweep()` in its own sub-workdir, then mean ± std over seeds.

`get_sweep()` returns a list of override dicts (dotted config keys → values). Every point is
applied and validated before any runs, so a typo fails in seconds, not hours later. Points
already finished are read back without training; an interrupted one resumes, so the command
can be re-run after a kill. With --parallel=N, N points run at a time, each in its own
subprocess (log in <point>/sweep.log); by default they run one after another in-process.

Outputs in DIR: results.md and results.csv (one row per group of points that differ only in
seed: mean, std and n of every figure), points.csv (one row per point), results.json, and
plots/ (the PNGs of kdjax.plots that apply to the swept keys).
"""

import copy
import csv
import importlib.util
import json
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
import time

from kdjax import config as config_lib
from kdjax import report

LOG_NAME = 'sweep.log'  # a subprocess point's stdout and stderr, in its sub-workdir


class SweepPointFailed(RuntimeError):
  """A point's subprocess exited with an error; its log names the cause."""

  def __init__(self, message: str, returncode: int):
    super().__init__(message)
    self.returncode = returncode


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
  names = [name for name, _, _ in points]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise config_lib.ConfigError(f'sweep lists a point twice: {", ".join(duplicates)}')
  return points


# ------------------------------------------------------------------------------------------------
# Running the points


def finished_results(config, directory: pathlib.Path) -> dict | None:
  """A point's results.json if it finished with this config (a different config in the
  same folder is a ConfigError, as when train.run resumes it); None if it has not."""
  path = directory / 'results.json'
  if not path.is_file():
    return None

  def schema():
    from configs import default  # the text trainer's schema, as train.run checks it

    return default.get_config()

  config_lib.check_workdir_config(config, directory, schema)
  return report.read_json(path)


def run_points(points: list, workdir: pathlib.Path, parallel: int = 1) -> list:
  """[(name, overrides, results)] of every point, in sweep order: finished ones read back,
  the rest trained in-process one at a time (parallel=1) or N at a time in subprocesses."""
  workdir = pathlib.Path(workdir).expanduser().absolute()
  results, todo = {}, []
  for i, (name, _, point_config) in enumerate(points):
    done = finished_results(point_config, workdir / point_dir(name))
    if done is None:
      todo.append(i)
    else:
      results[i] = done
      print(f'=== sweep point {i + 1}/{len(points)}: {name} (finished; read back)', flush=True)
  if parallel <= 1:
    from kdjax import train  # JAX is imported only when something trains

    for i in todo:
      name, _, point_config = points[i]
      print(f'=== sweep point {i + 1}/{len(points)}: {name}', flush=True)
      results[i] = train.run(point_config, workdir / point_dir(name))
  else:
    _run_subprocesses(points, todo, workdir, parallel, results)
  return [(name, overrides, results[i]) for i, (name, overrides, _) in enumerate(points)]


def _run_subprocesses(points, todo, workdir, parallel, results) -> None:
  """Runs `todo` with at most `parallel` subprocesses alive; after a failure no new point
  starts, the running ones finish, and SweepPointFailed names the first failure."""
  pending, running, failures = list(todo), {}, []
  try:
    while running or (pending and not failures):
      while pending and len(running) < parallel and not failures:
        i = pending.pop(0)
        name, _, point_config = points[i]
        directory = workdir / point_dir(name)
        directory.mkdir(parents=True, exist_ok=True)
        print(
          f'=== sweep point {i + 1}/{len(points)}: {name} (started; log {directory / LOG_NAME})',
          flush=True,
        )
        running[i] = (_start_child(point_config, directory), time.perf_counter())
      time.sleep(0.2)
      for i, (proc, start) in list(running.items()):
        if proc.poll() is None:
          continue
        del running[i]
        name, _, point_config = points[i]
        directory = workdir / point_dir(name)
        seconds = time.perf_counter() - start
        if proc.returncode == 0:
          results[i] = report.read_json(directory / 'results.json')
          print(f'=== sweep point {i + 1}/{len(points)}: {name} done ({seconds:.0f} s)', flush=True)
        else:
          log = (directory / LOG_NAME).read_text(errors='replace').strip().splitlines()
          failures.append((i, proc.returncode, log[-1] if log else ''))
          print(
            f'=== sweep point {i + 1}/{len(points)}: {name} FAILED (exit {proc.returncode}): '
            f'{failures[-1][2]}',
            flush=True,
          )
  finally:
    for proc, _ in running.values():  # interrupted (Ctrl-C): stop the children too
      proc.kill()
      proc.wait()
  if failures:
    i, code, last = failures[0]
    raise SweepPointFailed(
      f'sweep point {points[i][0]} failed (exit {code}): {last} '
      f'(log: {workdir / point_dir(points[i][0]) / LOG_NAME}); finished points are kept, '
      're-run the sweep to resume',
      code,
    )


def _start_child(point_config, directory: pathlib.Path) -> subprocess.Popen:
  log = (directory / LOG_NAME).open('ab')
  proc = subprocess.Popen(
    [sys.executable, '-c', 'from kdjax import sweep; sweep.child_main()', str(directory)],
    stdin=subprocess.PIPE,
    stdout=log,
    stderr=subprocess.STDOUT,
    env={**os.environ, 'KDJAX_SWEEP_PARENT': str(os.getpid())},
  )
  log.close()
  # The config travels through the pipe as JSON (no pickle: nothing executable crosses).
  proc.stdin.write(point_config.to_json().encode('utf-8'))
  proc.stdin.close()
  return proc


def child_main() -> None:
  """A subprocess point: train.run(the JSON config on stdin, argv[1]); dies with its
  parent, so a killed sweep leaves no orphan training behind."""
  _die_with_parent()
  import ml_collections

  config = ml_collections.ConfigDict(_with_tuples(json.loads(sys.stdin.buffer.read())))
  from absl import logging

  from kdjax import cli, train

  logging.set_verbosity(logging.WARNING)
  with cli.exit_on_user_errors():
    train.run(config, sys.argv[1])


def _with_tuples(value):
  """JSON arrays back to the tuples kdjax configs use for every sequence."""
  if isinstance(value, dict):
    return {k: _with_tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_with_tuples(v) for v in value)
  return value


def _die_with_parent() -> None:
  if not sys.platform.startswith('linux'):
    return
  import ctypes

  pr_set_pdeathsig = 1
  ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
  if str(os.getppid()) != os.environ.get('KDJAX_SWEEP_PARENT', str(os.getppid())):
    sys.exit(1)  # the parent died before prctl took effect


# ------------------------------------------------------------------------------------------------
# Aggregation


def point_figures(results: dict) -> dict:
  """The summary figures of a run plus its final student's accuracy, size and sparsity."""
  out = dict(results['summary'])
  final = results.get('final_student')
  if final:
    stage, _, role = final.split('/')
    result = results['stages'][stage]
    model = result['models'][role]
    out['final_student_accuracy'] = model['eval_accuracy']
    out['final_student_params'] = model.get('params')
    out['final_student_bytes'] = model.get('bytes')
    sparsity = result.get('sparsity')
    out['final_student_sparsity'] = sparsity['total'] if sparsity else None
  return out


def aggregate(points: list[tuple[str, dict, dict]], figures=lambda r: r['summary']) -> list[dict]:
  """Groups points by their non-seed overrides: mean, std and n of every figure."""
  groups: dict[str, list[dict]] = {}
  keys: dict[str, dict] = {}
  for _, overrides, results in points:
    swept = {k: v for k, v in overrides.items() if k != 'seed'}
    key = point_name(swept)
    groups.setdefault(key, []).append(figures(results))
    keys[key] = swept
  rows = []
  for key, summaries in groups.items():
    row = {'group': key, 'n': len(summaries), 'overrides': keys[key]}
    for metric in dict.fromkeys(m for s in summaries for m in s):
      values = [s[metric] for s in summaries if s.get(metric) is not None]
      if values:
        row[metric] = {
          'mean': statistics.fmean(values),
          'std': statistics.stdev(values) if len(values) > 1 else 0.0,
          'values': values,
        }
    rows.append(row)
  return rows


def _metrics(rows: list[dict]) -> list[str]:
  # Groups may report different figures (a mutual-learning group has no distilled student):
  # every figure any group has gets a column.
  skip = ('group', 'n', 'overrides')
  return list(dict.fromkeys(m for row in rows for m in row if m not in skip))


def format_rows(rows: list[dict]) -> str:
  metrics = _metrics(rows)
  lines = ['| group | n | ' + ' | '.join(metrics) + ' |', '|---|---:|' + '---:|' * len(metrics)]
  for row in rows:
    cells = [
      f'{100 * row[m]["mean"]:.2f} ± {100 * row[m]["std"]:.2f}' if m in row else '—'
      for m in metrics
    ]
    lines.append(f'| {row["group"]} | {row["n"]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def swept_keys(points: list) -> list[str]:
  """Every key any point overrides, in first-seen order ('seed' last)."""
  keys = list(dict.fromkeys(k for _, overrides, _ in points for k in overrides))
  return [k for k in keys if k != 'seed'] + (['seed'] if 'seed' in keys else [])


def write_csv(path: pathlib.Path, points: list) -> None:
  """results.csv: one row per group: its swept values, n, and <figure>_mean/_std."""
  rows = aggregate(points, point_figures)
  keys = [k for k in swept_keys(points) if k != 'seed']
  metrics = _metrics(rows)
  columns = keys + ['n'] + [f'{m}_{s}' for m in metrics for s in ('mean', 'std')]
  with path.open('w', newline='') as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    for row in rows:
      out = {k: _cell(row['overrides'].get(k)) for k in keys}
      out['n'] = row['n']
      for m in metrics:
        if m in row:
          out[f'{m}_mean'], out[f'{m}_std'] = row[m]['mean'], row[m]['std']
      writer.writerow(out)


def write_points_csv(path: pathlib.Path, points: list) -> None:
  """points.csv: one row per point: its name, swept values and every figure."""
  keys = swept_keys(points)
  figures = [point_figures(results) for _, _, results in points]
  metrics = list(dict.fromkeys(m for f in figures for m in f))
  with path.open('w', newline='') as f:
    writer = csv.DictWriter(f, ['point', *keys, *metrics])
    writer.writeheader()
    for (name, overrides, _), figs in zip(points, figures):
      writer.writerow({'point': name, **{k: _cell(overrides.get(k)) for k in keys}, **figs})


def _cell(value):
  return '' if value is None else value


def write_outputs(workdir: pathlib.Path, finished: list, plots: bool = True) -> dict:
  """results.json/.md/.csv, points.csv and plots/ of finished points; returns the paths."""
  workdir = pathlib.Path(workdir)
  rows = aggregate(finished)
  report.write_json(
    workdir / 'results.json', {'points': [n for n, _, _ in finished], 'groups': rows}
  )
  table = format_rows(rows)
  (workdir / 'results.md').write_text(table + '\n')
  write_csv(workdir / 'results.csv', finished)
  write_points_csv(workdir / 'points.csv', finished)
  out = {
    'table': table,
    'results_md': workdir / 'results.md',
    'results_csv': workdir / 'results.csv',
    'points_csv': workdir / 'points.csv',
    'plots': [],
  }
  if plots:
    from kdjax import plots as plots_lib  # matplotlib only when plots are drawn

    out['plots'] = plots_lib.sweep_plots(
      workdir / 'plots',
      [(name, overrides, point_figures(r)) for name, overrides, r in finished],
      {name: workdir / point_dir(name) / 'metrics.jsonl' for name, _, _ in finished},
      swept_keys(finished),
    )
  return out


# ------------------------------------------------------------------------------------------------
# Entry points


def load_experiment(path: str):
  """The experiment module of a `--config` file path (the part before ':')."""
  path = path.split(':')[0]
  spec = importlib.util.spec_from_file_location('kdjax_experiment', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sweep_of(module, path: str) -> list[dict]:
  if not hasattr(module, 'get_sweep'):
    raise config_lib.ConfigError(f'{path} defines no get_sweep(); nothing to sweep')
  return module.get_sweep()


def main(argv):
  del argv
  from absl import flags, logging
  from ml_collections import config_flags

  from kdjax.cli import USER_ERRORS

  logging.set_verbosity(logging.WARNING)
  workdir = pathlib.Path(flags.FLAGS.workdir).absolute()
  try:
    path = config_flags.get_config_filename(flags.FLAGS['config'])
    points = load_points(flags.FLAGS.config, sweep_of(load_experiment(path), path))
    finished = run_points(points, workdir, flags.FLAGS.parallel)
  except USER_ERRORS as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except SweepPointFailed as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(e.returncode if e.returncode > 0 else 1)
  out = write_outputs(workdir, finished)
  print(out['table'])
  for path in out['plots']:
    print(f'plot: {path}')


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags

  from kdjax.cli import parse_flags

  # Defined here, not at import, so tests and notebooks can import the sweep helpers.
  config_flags.DEFINE_config_file(
    'config', None, 'Experiment file with get_sweep().', lock_config=True
  )
  flags.DEFINE_string('workdir', None, 'Sweep directory; one sub-folder per point.')
  flags.DEFINE_integer(
    'parallel', 1, 'Points run at a time, each in its own subprocess; 1 = in sequence, in-process.'
  )
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=parse_flags)
