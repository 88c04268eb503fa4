"""Run outputs a person and a script can both read: metrics.jsonl, results.json, report.md."""

import json
import os
import pathlib

RESULTS_SCHEMA_VERSION = 1


def write_json(path: str | os.PathLike, obj) -> None:
  """Atomic write: a kill mid-write never leaves a truncated JSON file behind."""
  path = pathlib.Path(path)
  tmp = path.with_suffix(path.suffix + '.tmp')
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + '\n')
  os.replace(tmp, path)


class MetricsWriter:
  """Appends one JSON object per line; on resume drops records past the restored step."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)

  def truncate_after(self, stage: str, step: int) -> None:
    if not self.path.exists():
      return
    records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
    kept = [r for r in records if not (r.get('stage') == stage and r.get('step', 0) > step)]
    tmp = self.path.with_suffix('.tmp')
    tmp.write_text(''.join(json.dumps(r, sort_keys=True) + '\n' for r in kept))
    os.replace(tmp, self.path)

  def write(self, record: dict) -> None:
    with self.path.open('a') as f:
      f.write(json.dumps(record, sort_keys=True) + '\n')


def _pct(x):
  return '—' if x is None else f'{100 * x:.2f}'


def summary(stages: dict) -> dict:
  def acc(stage, role):
    return stages.get(stage, {}).get('models', {}).get(role, {}).get('eval_accuracy')

  out = {
    'teacher_accuracy': acc('teacher', 'teacher'),
    'student_alone_accuracy': acc('student_alone', 'student'),
    'online_teacher_accuracy': acc('online', 'teacher'),
    'online_student_accuracy': acc('online', 'student'),
    'distilled_student_accuracy': acc('distill', 'student'),
    'distill_agreement': stages.get('distill', {}).get('agreement'),
  }
  if out['distilled_student_accuracy'] is not None and out['student_alone_accuracy'] is not None:
    out['distillation_gain'] = out['distilled_student_accuracy'] - out['student_alone_accuracy']
  # Strategy figures appear only when their stage ran; each is one number (sweeps average
  # every summary figure).
  if 'assistant' in stages:
    out['assistant_accuracy'] = acc('assistant', 'assistant')
  for stage in ('assistant', 'distill'):
    if 'teacher_ensemble' in stages.get(stage, {}):
      out['teacher_ensemble_accuracy'] = stages[stage]['teacher_ensemble']['eval_accuracy']
  if 'mutual' in stages:
    out['mutual_mean_accuracy'] = stages['mutual']['mutual']['mean_eval_accuracy']
    out['mutual_ensemble_accuracy'] = stages['mutual']['mutual']['ensemble_eval_accuracy']
  generations = _generations(stages)
  if generations:
    for stage, accuracy in zip(generations['stages'][1:], generations['eval_accuracy'][1:]):
      out[f'{stage}_student_accuracy'] = accuracy
    out['generation_ensemble_accuracy'] = generations['ensemble_eval_accuracy']
  return out


def _generations(stages: dict) -> dict | None:
  """The born-again figures of the last generation (they cover every earlier one)."""
  last = [s for s in stages if s.startswith('distill_gen')]
  return stages[last[-1]]['generations'] if last else None


def format_table(stages: dict) -> str:
  lines = [
    '| stage | model | params | dev acc % | agreement % | train ex/s | eval ex/s |',
    '|---|---|---:|---:|---:|---:|---:|',
  ]
  for stage, result in stages.items():
    for role, m in result['models'].items():
      agree = result.get('agreement') if role in ('student', 'assistant') else None
      lines.append(
        f'| {stage} | {role} ({m["model"]}) | {m["params"]:,} | '
        f'{_pct(m["eval_accuracy"])} | {_pct(agree)} | '
        f'{result["train_examples_per_sec"]:.0f} | {m["eval_examples_per_sec"]:.0f} |'
      )
  return '\n'.join(lines)


def write_report(path: str | os.PathLike, results: dict) -> None:
  stages = results['stages']
  s = results['summary']
  lines = [
    f'# kdjax run: {results["name"]}',
    '',
    f'Dataset `{results["dataset"]}`, evaluated on `{results["eval_split"]}` '
    f'({results["eval_examples"]} examples); seed {results["seed"]}; '
    f'total wall time {results["wall_time_sec"] / 60:.1f} min.',
    '',
    format_table(stages),
    '',
  ]
  if s.get('distillation_gain') is not None:
    lines.append(
      f"Distillation changed the student's dev accuracy by "
      f'{100 * s["distillation_gain"]:+.2f} points '
      f'({_pct(s["student_alone_accuracy"])} alone → '
      f'{_pct(s["distilled_student_accuracy"])} distilled).'
    )
  if 'teacher_ensemble_accuracy' in s:
    lines.append(
      f"The teachers' averaged-probability ensemble: {_pct(s['teacher_ensemble_accuracy'])} "
      'dev accuracy.'
    )
  if 'mutual' in stages:
    m = stages['mutual']['mutual']
    lines.append(
      f'Deep mutual learning: {len(m["eval_accuracy"])} students, '
      + ', '.join(_pct(a) for a in m['eval_accuracy'])
      + f' (mean {_pct(m["mean_eval_accuracy"])}); '
      f'their ensemble {_pct(m["ensemble_eval_accuracy"])}.'
    )
  generations = _generations(stages)
  if generations:
    lines.append(
      'Born-again generations: '
      + ' → '.join(_pct(a) for a in generations['eval_accuracy'])
      + f'; ensemble of all generations {_pct(generations["ensemble_eval_accuracy"])}.'
    )
  for stage, result in stages.items():
    lines.append(
      f'- `{stage}`: {result["steps"]} steps, {result["wall_time_sec"]:.0f} s'
      + (f', {result["skipped_note"]}' if result.get('skipped_note') else '')
    )
  pathlib.Path(path).write_text('\n'.join(lines) + '\n')
