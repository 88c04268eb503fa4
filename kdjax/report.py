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
  return out


def format_table(stages: dict) -> str:
  lines = [
    '| stage | model | params | dev acc % | agreement % | train ex/s | eval ex/s |',
    '|---|---|---:|---:|---:|---:|---:|',
  ]
  for stage, result in stages.items():
    for role, m in result['models'].items():
      agree = result.get('agreement') if role == 'student' else None
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
  for stage, result in stages.items():
    lines.append(
      f'- `{stage}`: {result["steps"]} steps, {result["wall_time_sec"]:.0f} s'
      + (f', {result["skipped_note"]}' if result.get('skipped_note') else '')
    )
  pathlib.Path(path).write_text('\n'.join(lines) + '\n')
