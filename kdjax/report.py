"""Run outputs a person and a script can both read: metrics.jsonl (mirrored to TensorBoard
event files), results.json, report.md."""

import json
import math
import os
import pathlib

RESULTS_SCHEMA_VERSION = 1


def write_json(path: str | os.PathLike, obj) -> None:
  """Atomic write: a kill mid-write never leaves a truncated JSON file behind."""
  path = pathlib.Path(path)
  tmp = path.with_suffix(path.suffix + '.tmp')
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + '\n')
  os.replace(tmp, path)


TENSORBOARD_DIR = 'tensorboard'  # next to metrics.jsonl; `tensorboard --logdir=<workdir>`


def read_json(path: str | os.PathLike):
  return json.loads(pathlib.Path(path).read_text())


class MetricsWriter:
  """Appends one JSON object per line; on resume drops records past the restored step.

  Every numeric scalar of a record is mirrored to TensorBoard (tensorboardX event files in
  `tensorboard/` next to the JSONL file) as `<stage>/<key>` at `record['step']`.
  metrics.jsonl stays the source of truth: a resume that drops records rebuilds the event
  files from the kept records, so TensorBoard never shows steps a killed run redid.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    self.tb_dir = self.path.parent / TENSORBOARD_DIR
    self._tb = None  # opened on first use: a run that writes nothing leaves no event file

  def truncate_after(self, stage: str, step: int) -> None:
    if not self.path.exists():
      return
    records = read_metrics(self.path)
    kept = [r for r in records if not (r.get('stage') == stage and r.get('step', 0) > step)]
    tmp = self.path.with_suffix('.tmp')
    tmp.write_text(''.join(json.dumps(r, sort_keys=True) + '\n' for r in kept))
    os.replace(tmp, self.path)
    self._rebuild_tensorboard(kept)

  def write(self, record: dict) -> None:
    with self.path.open('a') as f:
      f.write(json.dumps(record, sort_keys=True) + '\n')
    if self._write_scalars(record):
      self._tb.flush()  # a SIGKILL loses nothing already in metrics.jsonl

  def write_hparams(self, hparams: dict) -> None:
    """Records a run's hyperparameters (e.g. its config, nested dicts allowed) for TensorBoard:
    a text table under `hparams` and the HParams dashboard's session summary. Kept in
    tensorboard/hparams.json too, so a rebuild after a resume writes them again."""
    # The HParams plugin takes bool, int, float or str values; a tuple becomes its JSON text.
    flat = {
      k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
      for k, v in flatten(hparams).items()
    }
    self.tb_dir.mkdir(parents=True, exist_ok=True)
    write_json(self.tb_dir / 'hparams.json', flat)
    self._write_hparams(flat)
    self._tb_writer().flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __del__(self):
    # A notebook may start many runs in one process: each run's event file is closed (and
    # its writer thread ended) once its writer is dropped.
    try:
      self.close()
    except Exception:  # at interpreter exit the modules close() needs may be gone
      pass

  def _tb_writer(self):
    if self._tb is None:
      from tensorboardX import SummaryWriter  # imported on first write: `import kdjax` stays cheap

      self.tb_dir.mkdir(parents=True, exist_ok=True)
      self._tb = SummaryWriter(logdir=str(self.tb_dir), flush_secs=10)
    return self._tb

  def _write_scalars(self, record: dict) -> bool:
    """Adds the record's numeric scalars; False if it has none (or no step)."""
    stage, step = record.get('stage', 'run'), record.get('step')
    scalars = {
      k: v
      for k, v in record.items()
      if k not in ('stage', 'step') and not isinstance(v, bool) and _is_number(v)
    }
    if step is None or not scalars:
      return False
    writer = self._tb_writer()
    for key, value in scalars.items():
      writer.add_scalar(f'{stage}/{key}', float(value), int(step))
    return True

  def _write_hparams(self, flat: dict) -> None:
    from tensorboardX.summary import hparams as hparams_summary

    writer = self._tb_writer()
    lines = ['| key | value |', '|---|---|'] + [f'| {k} | {v} |' for k, v in flat.items()]
    writer.add_text('hparams', '\n'.join(lines), 0)
    for summary in hparams_summary(flat, {}):
      writer.file_writer.add_summary(summary)

  def _rebuild_tensorboard(self, records: list[dict]) -> None:
    self.close()
    if self.tb_dir.is_dir():
      for old in self.tb_dir.glob('events.out.tfevents.*'):
        old.unlink()
    hparams_path = self.tb_dir / 'hparams.json'
    if hparams_path.is_file():
      self._write_hparams(json.loads(hparams_path.read_text()))
    for record in records:
      self._write_scalars(record)
    if records or hparams_path.is_file():
      self._tb_writer().flush()


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value)


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """The records of a metrics.jsonl file, in order."""
  lines = pathlib.Path(path).read_text().splitlines()
  return [json.loads(line) for line in lines if line.strip()]


def flatten(tree: dict, prefix: str = '') -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}: a nested config as dotted keys (sweep overrides use the
  same names)."""
  out = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      out.update(flatten(value, f'{name}.'))
    else:
      out[name] = value
  return out


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
  for stage in ('student_alone', 'distill'):
    if 'qat' in stages.get(stage, {}):  # the accuracy of the weights kdjax.ptq will store
      out[f'{stage}_quantized_accuracy'] = stages[stage]['qat']['eval_accuracy_quantized']
  for row in compression_rows(stages):  # chain stages: compress, recover, quantize
    out[f'chain_{row["stage"]}_accuracy'] = row['eval_accuracy']
    out[f'chain_{row["stage"]}_bytes'] = row['artifact_bytes']
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


def compression_rows(stages: dict) -> list[dict]:
  """Every chain stage's rows in stage order, each stage measured once."""
  rows, seen = [], set()
  for result in stages.values():
    for row in result.get('compression', []):
      if row['stage'] not in seen:
        seen.add(row['stage'])
        rows.append(row)
  return rows


def compression_table(stages: dict) -> str:
  """The markdown table report.md shows for a run with chain stages ('' without)."""
  rows = compression_rows(stages)
  if not rows:
    return ''
  lines = [
    '| stage | params | zeros % | bytes on disk | bits/param | dev acc % | batch 1 ms | batch 32 ms |',
    '|---|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for r in rows:
    lines.append(
      f'| {r["stage"]} | {r["params"]:,} | {100 * r["sparsity"]:.1f} | {r["artifact_bytes"]:,} | '
      f'{r["bits_per_param"]:.2f} | {100 * r["eval_accuracy"]:.2f} | '
      f'{r["latency_ms_batch1"]:.2f} | {r["latency_ms_batch32"]:.2f} |'
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
  table = compression_table(stages)
  if table:
    lines += [
      '',
      'Compression (sizes are the compact artifacts on disk; latency on this CPU):',
      '',
      table,
      '',
    ]
  for stage, result in stages.items():
    lines.append(
      f'- `{stage}`: {result["steps"]} steps, {result["wall_time_sec"]:.0f} s'
      + (f', {result["skipped_note"]}' if result.get('skipped_note') else '')
    )
  pathlib.Path(path).write_text('\n'.join(lines) + '\n')


def finished_stage(stage_dir: pathlib.Path, name: str) -> dict | None:
  """A finished stage's result.json, read back instead of running the stage again (the same
  command re-run after a kill or in a later session ends where an uninterrupted run would)."""
  result_path = pathlib.Path(stage_dir) / 'result.json'
  if not result_path.exists():
    return None
  print(f'[{name}] already complete ({result_path})', flush=True)
  return json.loads(result_path.read_text())
