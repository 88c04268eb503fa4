"""Orchestration of a run: data → models → stages (teacher, student, online, distill) → report.

Each stage lives in `workdir/<stage>/` with its own checkpoints, export and result.json; a
finished stage is read back, an unfinished one resumes from its newest checkpoint, so the
same command can be re-run after a kill and ends where an uninterrupted run would.
"""

import dataclasses
import json
import os
import pathlib
import time

import jax
import numpy as np

from kdjax import checkpoint, distill_data, evaluate, loop, optim, report
from kdjax import config as config_lib
from kdjax import step as step_lib
from kdjax.data import pipeline, text
from kdjax.kd import objective as kd_objective
from kdjax.models import from_teacher, hf_bert, registry

NUM_CLASSES = 2
# Fixed sub-seeds per role: the student of 'student_alone' and of 'distill' start from the
# same initial weights, so the comparison isolates the effect of distillation.
ROLE_SEEDS = {'teacher': 1, 'student': 2}
STAGE_SEEDS = {'teacher': 11, 'student_alone': 12, 'online': 13, 'distill': 14}
KD_HEADS_SEED = 15
STAGE_ROLES = {
  'teacher': ('teacher',),
  'student_alone': ('student',),
  'online': ('teacher', 'student'),
  'distill': ('student',),
}


@dataclasses.dataclass
class TaskData:
  tokenizer: text.Tokenizer
  train_text: list
  train_ids: list
  train_labels: np.ndarray
  eval_ids: list
  eval_labels: np.ndarray


def default_tfds_dir() -> str:
  return str(pathlib.Path(os.environ.get('KDJAX_CACHE', '~/.cache/kdjax')).expanduser() / 'tfds')


def prepare_data(config, workdir: pathlib.Path) -> TaskData:
  d = config.data
  tfds_dir = d.tfds_data_dir or default_tfds_dir()
  train_text, train_labels = pipeline.load_split(d.name, d.train_split, tfds_dir, d.raw_dir)
  if d.train_limit:
    train_text, train_labels = train_text[: d.train_limit], train_labels[: d.train_limit]
  eval_text, eval_labels = pipeline.load_split(d.name, d.eval_split, tfds_dir, d.raw_dir)
  # A resumed run reloads the tokenizer saved in the workdir: token ids must not change.
  tokenizer = text.make_tokenizer(d, train_text, workdir)
  return TaskData(
    tokenizer,
    train_text,
    pipeline.encode(train_text, tokenizer, d.max_len),
    train_labels,
    pipeline.encode(eval_text, tokenizer, d.max_len),
    eval_labels,
  )


def train_batches(config, ids, labels) -> pipeline.BatchIterator:
  return pipeline.BatchIterator(
    ids,
    labels,
    config.train.batch_size,
    tuple(config.data.buckets),
    config.seed,
    shuffle=True,
    drop_remainder=True,
    bucket_window=config.data.bucket_window,
  )


def eval_batches(config, ids, labels):
  """A zero-argument factory of one ordered pass (evaluators run it more than once)."""
  it = pipeline.BatchIterator(
    ids,
    labels,
    config.train.eval_batch_size,
    tuple(config.data.buckets),
    config.seed,
    shuffle=False,
    drop_remainder=False,
  )
  return it.one_epoch


def model_spec(config, role: str, vocab_size: int) -> dict:
  return {
    'model': config[role].model,
    'vocab_size': vocab_size,
    'num_classes': NUM_CLASSES,
    'kwargs': config[role].kwargs.to_dict(),
  }


def build(spec: dict):
  return registry.build_model(
    spec['model'], vocab_size=spec['vocab_size'], num_classes=spec['num_classes'], **spec['kwargs']
  )


def load_exported_model(export_dir: pathlib.Path):
  """(model, params, spec) from an export written at the end of a stage."""
  spec = checkpoint.read_export_spec(export_dir)
  model = build(spec)
  abstract = jax.eval_shape(lambda: registry.init_params(model, jax.random.PRNGKey(0)))
  return model, checkpoint.load_export_params(export_dir, abstract), spec


def _check_config(config, workdir: pathlib.Path) -> None:
  """A workdir belongs to one config: resuming with another would mix two experiments."""
  path = workdir / 'config.json'
  current = json.loads(config.to_json_best_effort())
  if path.exists():
    saved = json.loads(path.read_text())
    if saved != current:
      diff = _first_difference(saved, current)
      raise config_lib.ConfigError(
        f'workdir {workdir} holds a run with a different config ({diff}); '
        'use a new --workdir or the original config'
      )
  else:
    report.write_json(path, current)


def _first_difference(a, b, prefix='config') -> str:
  if isinstance(a, dict) and isinstance(b, dict):
    for key in sorted(set(a) | set(b)):
      if a.get(key) != b.get(key):
        return _first_difference(a.get(key), b.get(key), f'{prefix}.{key}')
  return f'{prefix} was {a!r}, now {b!r}'


def _teacher_dir(config, workdir: pathlib.Path) -> pathlib.Path:
  if config.teacher.path:
    return config_lib.teacher_export_dir(config.teacher.path)
  return workdir / 'teacher' / 'export' / 'teacher'


def _load_teacher(config, workdir: pathlib.Path, tokenizer: text.Tokenizer):
  export_dir = _teacher_dir(config, workdir)
  if text.load_tokenizer(export_dir) != tokenizer:
    raise config_lib.ConfigError(
      f'config.teacher.path={config.teacher.path!r}: the teacher was trained with another '
      f'tokenizer ({export_dir}); distill with the same data settings or retrain it'
    )
  return (*load_exported_model(export_dir), export_dir)


def initial_params(config, role: str, model, key, workdir: pathlib.Path):
  """Fresh parameters, overwritten from a pretrained checkpoint or the trained teacher if
  `config.<role>.init_from` says so."""
  params = registry.init_params(model, jax.random.fold_in(key, ROLE_SEEDS[role]))
  source = config[role].init_from
  if source == 'teacher':
    teacher_dir = _teacher_dir(config, workdir)
    params, info = from_teacher.student_from_teacher(
      config[role].model,
      checkpoint.load_export_params(teacher_dir),
      jax.device_get(params),
      tuple(config[role].init_layers),
    )
    print(f'{role}: initialised from the teacher at {teacher_dir} ({info})', flush=True)
  elif (config_lib.teacher_export_dir(source) / 'model.json').is_file():
    export = config_lib.teacher_export_dir(source)
    params = checkpoint.load_export_params(export, jax.eval_shape(lambda: params))
    print(f'{role}: continuing from the kdjax export {export}', flush=True)
  elif source:
    params, info = hf_bert.load_bert_params(source, params)
    print(
      f'{role}: {info["loaded"]} tensors from {info["source"]}; '
      f'newly initialised: {", ".join(info["kept_from_init"]) or "none"}',
      flush=True,
    )
  return params


def _objective(loss_cfg, steps: int, student_shapes=None, teacher_shapes=None):
  """The configured distillation objective; model mismatches become one-line ConfigErrors."""
  try:
    if student_shapes is None:
      return kd_objective.logits_only(loss_cfg, steps)
    return kd_objective.build(loss_cfg, steps, student_shapes, teacher_shapes)
  except kd_objective.ObjectiveError as e:
    raise config_lib.ConfigError(str(e)) from None


def _check_objective(config, vocab_size: int) -> None:
  """Distillation terms that cannot apply to these two models fail before any stage runs."""
  if 'distill' not in config.stages:
    return
  if config.teacher.path:
    teacher_spec = checkpoint.read_export_spec(config_lib.teacher_export_dir(config.teacher.path))
  else:
    teacher_spec = model_spec(config, 'teacher', vocab_size)
  student = build(model_spec(config, 'student', vocab_size))
  _objective(
    config.loss,
    config.train.student_steps,
    registry.output_shapes(student),
    registry.output_shapes(build(teacher_spec)),
  )


def run_stage(
  name: str, config, data: TaskData, workdir: pathlib.Path, writer: report.MetricsWriter
) -> dict:
  stage_dir = workdir / name
  result_path = stage_dir / 'result.json'
  if result_path.exists():
    print(f'[{name}] already complete ({result_path})', flush=True)
    return json.loads(result_path.read_text())
  stage_dir.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  key = jax.random.PRNGKey(config.seed)
  vocab_size = len(data.tokenizer)
  specs = {role: model_spec(config, role, vocab_size) for role in STAGE_ROLES[name]}
  models = {role: build(spec) for role, spec in specs.items()}
  init = {role: initial_params(config, role, m, key, workdir) for role, m in models.items()}
  make_eval = eval_batches(config, data.eval_ids, data.eval_labels)
  logits_fns = {role: step_lib.make_logits_fn(m) for role, m in models.items()}

  steps = config.train.teacher_steps if name == 'teacher' else config.train.student_steps
  teacher_params, frozen, cache_info, objective = None, None, None, None
  batches = train_batches(config, data.train_ids, data.train_labels)
  if name == 'distill':
    teacher_model, frozen_params, teacher_spec, teacher_dir = _load_teacher(
      config, workdir, data.tokenizer
    )
    frozen = (step_lib.make_logits_fn(teacher_model), frozen_params)
    objective = _objective(
      config.loss,
      steps,
      registry.output_shapes(models['student']),
      registry.output_shapes(teacher_model),
    )
    ids, labels = distill_data.transfer_set(
      config, data.train_text, data.train_ids, data.train_labels, data.tokenizer
    )
    batches = train_batches(config, ids, labels)
    cached, cache_info = distill_data.cached_teacher_logits(
      config, ids, data.tokenizer, teacher_dir, teacher_model, frozen_params
    )
    if cached is None:  # the teacher runs inside every step
      teacher_params = frozen_params
      loss_fn = step_lib.distill_loss_fn(models['student'], teacher_model, objective)
    else:
      batches = pipeline.WithRowData(batches, 'teacher_logits', cached)
      loss_fn = step_lib.distill_loss_fn(models['student'], None, objective)
  elif name == 'online':
    objective = _objective(config.loss, steps)
    loss_fn = step_lib.online_loss_fn(
      models['student'], models['teacher'], objective, config.loss.online_teacher_kd_weight
    )
  else:
    loss_fn = step_lib.supervised_loss_fn(models[STAGE_ROLES[name][0]])

  txs = {role: optim.make_optimizer(config[f'{role}_optim'], steps) for role in models}
  schedule = optim.learning_rate_schedule(config[f'{STAGE_ROLES[name][-1]}_optim'], steps)
  joint = len(models) > 1
  params = init if joint else init[STAGE_ROLES[name][0]]
  tx = optim.make_joint_optimizer(txs) if joint else txs[STAGE_ROLES[name][0]]
  with_heads = objective is not None and bool(objective.head_shapes)
  if with_heads:
    # Projection/CRD heads train with the student, under its optimizer, and are not exported.
    heads_key = jax.random.fold_in(key, KD_HEADS_SEED)
    params = {'student': params, 'kd_heads': objective.init_heads(heads_key)}

  def as_roles(p):
    if with_heads:
      return {'student': p['student']}
    return p if joint else {STAGE_ROLES[name][0]: p}

  def periodic_eval(p):
    return {
      f'{role}_accuracy': evaluate.accuracy(
        evaluate.predict_logits(logits_fns[role], rp, make_eval()), data.eval_labels
      )
      for role, rp in as_roles(p).items()
    }

  spec = loop.StageSpec(
    name=name,
    loss_fn=loss_fn,
    tx=tx,
    schedule=schedule,
    params=params,
    rng=jax.random.fold_in(key, STAGE_SEEDS[name]),
    steps=steps,
    teacher_params=teacher_params,
    evaluate=periodic_eval,
  )
  trained, info = loop.train_stage(spec, batches, stage_dir, config.train, writer)

  result = {
    'steps': info['steps'],
    'train_examples_per_sec': info['train_examples_per_sec'],
    'models': {},
  }
  logits = {}
  for role, p in as_roles(trained).items():
    logits[role], eval_rate = evaluate.timed_logits(logits_fns[role], p, make_eval)
    result['models'][role] = {
      'model': specs[role]['model'],
      'eval_accuracy': evaluate.accuracy(logits[role], data.eval_labels),
      'eval_examples_per_sec': eval_rate,
      **evaluate.model_stats(p),
    }
    export_dir = stage_dir / 'export' / role
    checkpoint.export_model(export_dir, p, specs[role])
    text.save_tokenizer(data.tokenizer, export_dir)
  if cache_info is not None:
    result['teacher_cache'] = cache_info
  if frozen is not None:
    logits['teacher'] = evaluate.predict_logits(*frozen, make_eval())
    result['frozen_teacher'] = {
      'model': teacher_spec['model'],
      'eval_accuracy': evaluate.accuracy(logits['teacher'], data.eval_labels),
      **evaluate.model_stats(frozen[1]),
    }
  if 'teacher' in logits and 'student' in logits:
    result['agreement'] = evaluate.agreement(logits['student'], logits['teacher'])
  result['wall_time_sec'] = time.perf_counter() - start
  writer.write(
    {
      'stage': name,
      'step': steps,
      'final': True,
      **{f'eval_{r}_accuracy': m['eval_accuracy'] for r, m in result['models'].items()},
    }
  )
  report.write_json(result_path, result)
  return result


def run(config, workdir) -> dict:
  """Runs every stage of `config` in `workdir` and writes results.json and report.md."""
  config_lib.validate(config)
  workdir = pathlib.Path(workdir).expanduser().absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  _check_config(config, workdir)
  data = prepare_data(config, workdir)
  _check_objective(config, len(data.tokenizer))
  print(
    f'data: {len(data.train_ids)} train / {len(data.eval_ids)} {config.data.eval_split} '
    f'examples, vocabulary {len(data.tokenizer)}; devices: {jax.devices()}',
    flush=True,
  )
  writer = report.MetricsWriter(workdir / 'metrics.jsonl')
  stages = {name: run_stage(name, config, data, workdir, writer) for name in config.stages}
  student_stage = next((s for s in ('distill', 'online', 'student_alone') if s in stages), None)
  results = {
    'schema_version': report.RESULTS_SCHEMA_VERSION,
    'name': config.name,
    'seed': config.seed,
    'dataset': config.data.name,
    'eval_split': config.data.eval_split,
    'train_examples': len(data.train_ids),
    'eval_examples': len(data.eval_ids),
    'stages': stages,
    'summary': report.summary(stages),
    'final_student': f'{student_stage}/export/student' if student_stage else None,
    'wall_time_sec': sum(s['wall_time_sec'] for s in stages.values()),
  }
  report.write_json(workdir / 'results.json', results)
  report.write_report(workdir / 'report.md', results)
  print(report.format_table(stages), flush=True)
  return results
