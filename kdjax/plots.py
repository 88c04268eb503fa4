"""Sweep plots as PNG files: accuracy vs size with the Pareto front, a heatmap over two swept
keys, accuracy vs sparsity, and training curves per point.

Figures are drawn on `matplotlib.figure.Figure` objects and saved by the Agg canvas, never
through pyplot: no global backend is switched and no window opens, so this works headless
(CI, a sweep's subprocess) and leaves a notebook's own plotting alone.
"""

import math
import pathlib
import statistics
from typing import Sequence

from matplotlib.figure import Figure

ACCURACY = 'final_student_accuracy'  # the figure every plot shows (kdjax.sweep.point_figures)
SIZE_AXES = {'final_student_params': 'parameters', 'final_student_bytes': 'bytes'}
# Preferred heatmap axes, when swept: the distillation temperature × a loss weight.
HEATMAP_PREFERENCE = ('loss.temperature', 'loss.weights.kl', 'loss.weights.ce')


def pareto_front(sizes: Sequence[float], scores: Sequence[float]) -> list[int]:
  """Indices of the points no other point dominates (smaller or equal size and higher or
  equal score, one of them strictly), ordered by size. Identical points are all kept."""
  order = sorted(range(len(sizes)), key=lambda i: (sizes[i], -scores[i]))
  front, best, last = [], -math.inf, None
  for i in order:
    if scores[i] > best or (sizes[i], scores[i]) == last:
      front.append(i)
      best, last = scores[i], (sizes[i], scores[i])
  return front


def _save(fig: Figure, path: pathlib.Path) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, format='png', dpi=100, bbox_inches='tight')
  return path


def accuracy_vs_size(
  path, labels: list[str], sizes: dict[str, list[float]], accuracy: list[float], std=None
) -> pathlib.Path:
  """One panel per size measure (e.g. parameters, bytes); the Pareto front is drawn and
  its points labelled."""
  fig = Figure(figsize=(6 * len(sizes), 4.5))
  for k, (axis_name, values) in enumerate(sizes.items()):
    ax = fig.add_subplot(1, len(sizes), k + 1)
    ax.errorbar(values, _pct(accuracy), yerr=_pct(std), fmt='o', color='tab:blue', alpha=0.7)
    front = pareto_front(values, accuracy)
    ax.plot(
      [values[i] for i in front],
      [100 * accuracy[i] for i in front],
      'o-',
      color='tab:red',
      drawstyle='steps-post',
      label='Pareto front',
    )
    for i in front:
      ax.annotate(
        labels[i],
        (values[i], 100 * accuracy[i]),
        fontsize=7,
        xytext=(3, 3),
        textcoords='offset points',
      )
    ax.set_xscale('log')
    ax.set_xlabel(axis_name)
    ax.set_ylabel('dev accuracy %')
    ax.legend(loc='lower right')
    ax.grid(alpha=0.3)
  fig.suptitle('Accuracy vs model size')
  return _save(fig, pathlib.Path(path))


def heatmap(path, x_key: str, y_key: str, cells: dict[tuple, float]) -> pathlib.Path:
  """Mean accuracy over each (x, y) pair of two swept keys; missing pairs stay blank."""
  xs = sorted({x for x, _ in cells})
  ys = sorted({y for _, y in cells})
  grid = [[100 * cells.get((x, y), math.nan) for x in xs] for y in ys]
  fig = Figure(figsize=(1.2 * len(xs) + 3, 0.8 * len(ys) + 2))
  ax = fig.add_subplot()
  image = ax.imshow(grid, origin='lower', cmap='viridis', aspect='auto')
  for r, row in enumerate(grid):
    for c, value in enumerate(row):
      if not math.isnan(value):
        ax.text(c, r, f'{value:.1f}', ha='center', va='center', color='white', fontsize=8)
  ax.set_xticks(range(len(xs)), [str(x) for x in xs])
  ax.set_yticks(range(len(ys)), [str(y) for y in ys])
  ax.set_xlabel(x_key)
  ax.set_ylabel(y_key)
  fig.colorbar(image, ax=ax, label='dev accuracy %')
  ax.set_title('Dev accuracy (mean over seeds and other swept keys)')
  return _save(fig, pathlib.Path(path))


def accuracy_vs_sparsity(
  path, labels: list[str], sparsity: list[float], accuracy: list[float], std=None
) -> pathlib.Path:
  fig = Figure(figsize=(6, 4.5))
  ax = fig.add_subplot()
  order = sorted(range(len(sparsity)), key=lambda i: sparsity[i])
  ax.errorbar(
    [100 * sparsity[i] for i in order],
    [100 * accuracy[i] for i in order],
    yerr=None if std is None else [100 * std[i] for i in order],
    fmt='o-',
  )
  for i in order:
    ax.annotate(
      labels[i],
      (100 * sparsity[i], 100 * accuracy[i]),
      fontsize=7,
      xytext=(3, 3),
      textcoords='offset points',
    )
  ax.set_xlabel('sparsity % (zeros among the pruned weights)')
  ax.set_ylabel('dev accuracy %')
  ax.grid(alpha=0.3)
  ax.set_title('Accuracy vs sparsity')
  return _save(fig, pathlib.Path(path))


def training_curves(path, records: list[dict], title: str = '') -> pathlib.Path:
  """Training loss and dev accuracies against step, one line per stage (and model), from
  the records of a run's metrics.jsonl."""
  fig = Figure(figsize=(12, 4))
  loss_ax, eval_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
  stages = list(dict.fromkeys(r['stage'] for r in records if 'stage' in r))
  for stage in stages:
    rows = [r for r in records if r.get('stage') == stage and 'step' in r]
    loss = [(r['step'], r['loss']) for r in rows if 'loss' in r]
    if loss:
      loss_ax.plot(*zip(*loss), label=stage)
    metrics = dict.fromkeys(
      k for r in rows for k in r if k.startswith('eval_') and k.endswith('_accuracy')
    )
    for metric in metrics:
      points = [(r['step'], 100 * r[metric]) for r in rows if metric in r]
      eval_ax.plot(*zip(*points), 'o-', label=f'{stage} {metric[5:-9]}')
  loss_ax.set_xlabel('step')
  loss_ax.set_ylabel('training loss')
  eval_ax.set_xlabel('step')
  eval_ax.set_ylabel('dev accuracy %')
  for ax in (loss_ax, eval_ax):
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.suptitle(title)
  return _save(fig, pathlib.Path(path))


def _pct(values):
  return None if values is None else [100 * v for v in values]


def _numeric(values) -> bool:
  return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def heatmap_keys(points: list[tuple[str, dict, dict]], keys: list[str]) -> tuple | None:
  """Two swept numeric keys with at least two values each (temperature × a loss weight when
  both are swept), or None."""
  candidates = []
  for key in keys:
    values = [o[key] for _, o, _ in points if key in o]
    if key != 'seed' and values and _numeric(values) and len(set(values)) > 1:
      candidates.append(key)
  preferred = [k for k in HEATMAP_PREFERENCE if k in candidates]
  if 'loss.temperature' in candidates:
    weights = [k for k in candidates if k.startswith('loss.weights.')]
    if weights:
      preferred = ['loss.temperature', next((k for k in preferred if k in weights), weights[0])]
  ordered = list(dict.fromkeys(preferred + candidates))
  return tuple(ordered[:2]) if len(ordered) >= 2 else None


def _groups(points):
  """{group label: [figures of its points]} over the non-seed overrides."""
  groups = {}
  for _, overrides, figures in points:
    label = ','.join(f'{k}={v}' for k, v in sorted(overrides.items()) if k != 'seed')
    groups.setdefault(label or 'default', []).append(figures)
  return groups


def _mean(values):
  values = [v for v in values if v is not None]
  return statistics.fmean(values) if values else None


def _std(values):
  values = [v for v in values if v is not None]
  return statistics.stdev(values) if len(values) > 1 else 0.0


def sweep_plots(
  plot_dir, points: list[tuple[str, dict, dict]], metrics: dict, keys: list[str]
) -> list[pathlib.Path]:
  """The plots that apply to a sweep. `points`: (name, overrides, figures) per point (figures
  as kdjax.sweep.point_figures makes them); `metrics`: {name: its metrics.jsonl path}."""
  from kdjax import report, sweep  # sweep names the per-point curve files as its folders

  plot_dir = pathlib.Path(plot_dir)
  written = []
  groups = _groups(points)
  labels = list(groups)
  acc = [_mean(f.get(ACCURACY) for f in groups[g]) for g in labels]
  std = [_std(f.get(ACCURACY) for f in groups[g]) for g in labels]
  has_acc = [a is not None for a in acc]

  sizes = {}
  for key, axis_name in SIZE_AXES.items():
    values = [_mean(f.get(key) for f in groups[g]) for g in labels]
    if all(v is not None for v, ok in zip(values, has_acc) if ok):
      sizes[axis_name] = values
  keep = [i for i, ok in enumerate(has_acc) if ok]
  if sizes and len({sizes[next(iter(sizes))][i] for i in keep}) > 1:
    written.append(
      accuracy_vs_size(
        plot_dir / 'accuracy_vs_size.png',
        [labels[i] for i in keep],
        {name: [v[i] for i in keep] for name, v in sizes.items()},
        [acc[i] for i in keep],
        [std[i] for i in keep],
      )
    )

  pair = heatmap_keys(points, keys)
  if pair:
    cells = {}
    for _, overrides, figures in points:
      if pair[0] in overrides and pair[1] in overrides and figures.get(ACCURACY) is not None:
        cells.setdefault((overrides[pair[0]], overrides[pair[1]]), []).append(figures[ACCURACY])
    if cells:
      written.append(
        heatmap(
          plot_dir / 'heatmap.png',
          *pair,
          {xy: statistics.fmean(v) for xy, v in cells.items()},
        )
      )

  sparsity = [_mean(f.get('final_student_sparsity') for f in groups[g]) for g in labels]
  with_sparsity = [i for i in keep if sparsity[i] is not None]
  if len({sparsity[i] for i in with_sparsity}) > 1:
    written.append(
      accuracy_vs_sparsity(
        plot_dir / 'accuracy_vs_sparsity.png',
        [labels[i] for i in with_sparsity],
        [sparsity[i] for i in with_sparsity],
        [acc[i] for i in with_sparsity],
        [std[i] for i in with_sparsity],
      )
    )

  for name, path in metrics.items():
    path = pathlib.Path(path)
    if path.is_file():
      written.append(
        training_curves(
          plot_dir / 'curves' / f'{sweep.point_dir(name)}.png', report.read_metrics(path), name
        )
      )
  return written
