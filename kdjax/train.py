"""Orchestration of a run: data → models → stages (teacher, student, online, distill,
assistant, mutual) → report. Multi-teacher, born-again and teacher-assistant strategies are
resolved in strategies.py.

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

from kdjax import checkpoint, distill_data, evaluate, loop, optim, parallel, report, strategies
from kdjax import config as config_lib
from kdjax import step as step_lib
from kdjax.data import pipeline, shards, text
from kdjax.kd import objective as kd_objective
from kdjax.models import from_teacher, hf_bert, registry

NUM_CLASSES = 2
# Fixed sub-seeds per role: the student of 'student_alone' and of 'distill' start from the
# same initial weights, so the comparison isolates the effect of distillation.
ROLE_SEEDS = {'teacher': 1, 'student': 2, 'assistant': 3}
STAGE_SEEDS = {
  'teacher': 11,
  'student_alone': 12,
  'online': 13,
  'distill': 14,
  'assistant': 16,
  'mutual': 17,
  'recover': 18,
}
KD_HEADS_SEED = 15
# The config roles a stage trains ('distill_gen<g>' stages train what 'distill' does).
STAGE_ROLES = {
  'teacher': ('teacher',),
  'student_alone': ('student',),
  'online': ('teacher', 'student'),
  'distill': ('student',),
  'assistant': ('assistant',),
  'mutual': ('student',),
  'recover': ('student',),
}
DISTILLING = ('distill', 'assistant', 'recover')  # stages that learn from frozen teachers
# Stages that train nothing: they transform or quantize the student before them (chain.py).
TRANSFORMS = ('compress', 'quantize')


@dataclasses.dataclass
class TaskData:
  tokenizer: text.Tokenizer
  train_text: list
  train_ids: list
  train_labels: np.ndarray
  eval_ids: list
  eval_labels: np.ndarray
  # The training rows above are this process's data shards one after another: (shard id,
  # rows) per shard; ((None, all rows),) when the data is not sharded.
  train_shards: tuple = ()
  num_shards: int = 1

  def shard_parts(self, ids, labels, text=None):
    """(shard id, ids, labels[, text]) per shard of row-aligned training arrays."""
    parts, start = [], 0
    for shard, size in self.train_shards:
      rows = slice(start, start + size)
      extra = () if text is None else (text[rows],)
      parts.append((shard, ids[rows], labels[rows], *extra))
      start += size
    return parts


def default_tfds_dir() -> str:
  return str(pathlib.Path(os.environ.get('KDJAX_CACHE', '~/.cache/kdjax')).expanduser() / 'tfds')


def _read_train_split(d, tfds_dir: str, positions=None) -> tuple[list, np.ndarray]:
  if positions is None and d.train_limit:  # unsharded: the first N rows in file order
    train_text, train_labels = pipeline.load_split(d.name, d.train_split, tfds_dir, d.raw_dir)
    return train_text[: d.train_limit], train_labels[: d.train_limit]
  return pipeline.load_split(d.name, d.train_split, tfds_dir, d.raw_dir, positions)


def prepare_data(config, workdir: pathlib.Path) -> TaskData:
  """The run's tokenizer and encoded splits. With data shards this process reads only the
  training records of its own shards (kdjax.data.shards); the small eval split is read
  whole by every process, each of which evaluates its replica of the model."""
  d = config.data
  tfds_dir = d.tfds_data_dir or default_tfds_dir()
  num_shards = shards.shard_count(d.shards, jax.process_count())
  if num_shards == 1:
    train_text, train_labels = _read_train_split(d, tfds_dir)
    train_shards = ((None, len(train_text)),)
    vocab_text = train_text
  else:
    train_text, labels, train_shards = [], [], []
    for shard in shards.local_shards(num_shards, jax.process_index(), jax.process_count()):
      positions = lambda n, s=shard: shards.shard_positions(
        min(n, d.train_limit or n), s, num_shards
      )
      shard_text, shard_labels = _read_train_split(d, tfds_dir, positions)
      train_text += shard_text
      labels.append(shard_labels)
      train_shards.append((shard, len(shard_text)))
    train_labels, train_shards = np.concatenate(labels), tuple(train_shards)
    # A word vocabulary comes from the whole split, read once by the process that builds it
    # (the lead; the others then load it from the workdir).
    vocab_text = train_text
    if d.tokenizer == 'word' and text.load_tokenizer(workdir, required=False) is None:
      vocab_text, _ = _read_train_split(d, tfds_dir)
  eval_text, eval_labels = pipeline.load_split(d.name, d.eval_split, tfds_dir, d.raw_dir)
  # A resumed run reloads the tokenizer saved in the workdir: token ids must not change.
  tokenizer = text.make_tokenizer(d, vocab_text, workdir)
  return TaskData(
    tokenizer,
    train_text,
    pipeline.encode(train_text, tokenizer, d.max_len),
    train_labels,
    pipeline.encode(eval_text, tokenizer, d.max_len),
    eval_labels,
    train_shards,
    num_shards,
  )


def train_batches(config, data: TaskData, parts) -> pipeline.EpochCursor:
  """Global batches of train.batch_size, of which this process assembles the rows of its
  shards; `parts` is TaskData.shard_parts(...) of the rows to train on."""
  if config.train.batch_size % data.num_shards:
    raise ValueError(
      f'train.batch_size={config.train.batch_size} does not split over data.shards='
      f'{data.num_shards}: use a multiple of {data.num_shards}'
    )

  def batches(shard, ids, labels):
    return pipeline.BatchIterator(
      ids,
      labels,
      config.train.batch_size // data.num_shards,
      tuple(config.data.buckets),
      config.seed,
      shuffle=True,
      drop_remainder=True,
      bucket_window=config.data.bucket_window,
      stream=shard,
    )

  if data.num_shards == 1:
    ((_, ids, labels, *_),) = parts
    return batches(None, ids, labels)
  return shards.ShardedBatches(
    [batches(shard, ids, labels) for shard, ids, labels, *_ in parts], parallel.all_reduce_max
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


def build(spec: dict, scan_layers: bool = False):
  """The model a spec describes. scan_layers (config.train.scan_layers) runs a BERT's layers
  as one lax.scan: a compute choice, so it is applied here and never written into a spec."""
  kwargs = dict(spec['kwargs'])
  if scan_layers and spec['model'] == 'bert':
    kwargs['scan_layers'] = True
  return registry.build_model(
    spec['model'], vocab_size=spec['vocab_size'], num_classes=spec['num_classes'], **kwargs
  )


def load_exported_model(export_dir: pathlib.Path, scan_layers: bool = False):
  """(model, params, spec) from an export written at the end of a stage."""
  spec = checkpoint.read_export_spec(export_dir)
  model = build(spec, scan_layers)
  abstract = jax.eval_shape(lambda: registry.init_params(model, jax.random.PRNGKey(0)))
  return model, checkpoint.load_export_params(export_dir, abstract), spec


def _check_config(config, workdir: pathlib.Path) -> None:
  """config_lib.check_workdir_config against the text trainer's schema (configs/default.py),
  so a workdir written before the schema gained keys still resumes."""

  def schema():
    from configs import default  # only needed when a workdir is resumed

    return default.get_config()

  config_lib.check_workdir_config(config, workdir, schema)


def _load_teacher(
  source: strategies.TeacherSource, tokenizer: text.Tokenizer, scan_layers: bool = False
):
  export_dir = source.export_dir
  if text.load_tokenizer(export_dir) != tokenizer:
    raise config_lib.ConfigError(
      f'{source.name}: the teacher was trained with another '
      f'tokenizer ({export_dir}); distill with the same data settings or retrain it'
    )
  return (*load_exported_model(export_dir, scan_layers), export_dir)


def stage_members(config, name: str) -> dict[str, str]:
  """{name a stage's trained model is exported under: its config role}."""
  if name == 'mutual':
    return {f'student_{i}': 'student' for i in range(config.mutual.num_students)}
  return {role: role for role in STAGE_ROLES[strategies.base_stage(name)]}


def initial_params(config, role: str, model, key, workdir: pathlib.Path):
  """Fresh parameters, overwritten from a pretrained checkpoint or the trained teacher if
  `config.<role>.init_from` says so."""
  params = registry.init_params(model, jax.random.fold_in(key, ROLE_SEEDS[role]))
  source = config[role].init_from
  if source == 'teacher':
    teacher_dir = strategies.teacher_dir(config, workdir)
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


def _objectives(config, steps: int, learner, teachers: list) -> list:
  """One objective per teacher for 'sum_losses', else one (a mixture of several teachers
  only has logits, and validate() allowed only logit terms for it)."""
  per_teacher = len(teachers) > 1 and config.distill.multi_teacher == 'sum_losses'
  shapes = registry.output_shapes(learner)
  return [
    _objective(config.loss, steps, shapes, registry.output_shapes(t))
    for t in (teachers if per_teacher else teachers[:1])
  ]


def _check_objective(config, workdir: pathlib.Path, vocab_size: int) -> None:
  """Distillation terms that cannot apply to these models fail before any stage runs."""
  for name in strategies.stage_names(config):
    # The recover stage's model is the compressed export, known once 'compress' ran; its
    # objective is checked when the stage builds it.
    if strategies.base_stage(name) not in DISTILLING or name == 'recover':
      continue
    (learner,) = STAGE_ROLES[strategies.base_stage(name)]
    teachers = [
      build(
        model_spec(config, s.role, vocab_size)
        if s.role
        else checkpoint.read_export_spec(s.export_dir)
      )
      for s in strategies.teacher_sources(config, workdir, name)
    ]
    learner_model = build(model_spec(config, learner, vocab_size))
    _objectives(config, config.train.student_steps, learner_model, teachers)


def run_stage(
  name: str,
  config,
  data: TaskData,
  workdir: pathlib.Path,
  writer: report.MetricsWriter,
  data_parallel: parallel.DataParallel | None = None,
) -> dict:
  stage_dir = workdir / name
  finished = report.finished_stage(stage_dir, name)
  if finished is not None:
    return finished
  stage_dir.mkdir(parents=True, exist_ok=True)
  make_eval = eval_batches(config, data.eval_ids, data.eval_labels)
  if name in TRANSFORMS:
    from kdjax import chain  # compression is only imported by runs that use it

    run = {'compress': chain.run_compress, 'quantize': chain.run_quantize}[name]
    return run(config, workdir, data.tokenizer, _evalset(config, data, make_eval), writer)
  start = time.perf_counter()
  key = jax.random.PRNGKey(config.seed)
  vocab_size = len(data.tokenizer)
  base = strategies.base_stage(name)
  members = stage_members(config, name)
  role_specs = {role: model_spec(config, role, vocab_size) for role in STAGE_ROLES[base]}
  if base == 'recover':  # the model is the (compressed) student of the stage before
    from kdjax import chain

    source = chain.source_export(config, workdir, name)
    role_specs['student'] = checkpoint.read_export_spec(source)
  specs = {m: role_specs[role] for m, role in members.items()}
  # Members of one role (mutual students) share a module and its compiled functions.
  role_models = {role: build(spec, config.train.scan_layers) for role, spec in role_specs.items()}
  role_logits_fns = {role: step_lib.make_logits_fn(m) for role, m in role_models.items()}
  models = {m: role_models[role] for m, role in members.items()}
  logits_fns = {m: role_logits_fns[role] for m, role in members.items()}
  if base == 'recover':
    abstract = jax.eval_shape(lambda: registry.init_params(models['student'], key))
    init = {'student': checkpoint.load_export_params(source, abstract)}
    print(f'[{name}] continuing from {source}', flush=True)
  else:
    init = {
      m: initial_params(config, role, models[m], strategies.init_key(key, name, m), workdir)
      for m, role in members.items()
    }

  steps = {'teacher': config.train.teacher_steps, 'recover': config.train.recover_steps}.get(
    name, config.train.student_steps
  )
  teacher_params, teachers, cache_infos, objectives = None, [], [], []
  parts = data.shard_parts(data.train_ids, data.train_labels, data.train_text)
  batches = train_batches(config, data, parts)
  if base in DISTILLING:
    (learner,) = members
    sources = strategies.teacher_sources(config, workdir, name)
    teachers = [_load_teacher(s, data.tokenizer, config.train.scan_layers) for s in sources]
    teacher_models = [t[0] for t in teachers]
    weights = strategies.teacher_weights(config, len(teachers))
    objectives = _objectives(config, steps, models[learner], teacher_models)
    neighbours = distill_data.replacement_neighbours(
      config, [t for *_, texts in parts for t in texts], data.tokenizer, teachers[0][1]
    )
    # Each shard adds its own augmented copies (its own stream of the augmentation seed).
    parts = [
      (
        shard,
        *distill_data.transfer_set(
          config, t, i, lab, data.tokenizer, stream=shard, neighbours=neighbours
        ),
      )
      for shard, i, lab, t in parts
    ]
    batches = train_batches(config, data, parts)
    ids = [row for _, part_ids, _ in parts for row in part_ids]
    cached = []
    for t_model, t_params, _, t_dir in teachers:
      # Each process caches the teacher's outputs on the rows of its own shards (one cache
      # entry per set of rows), all processes at once.
      outputs, info = distill_data.cached_teacher_outputs(
        config, ids, data.tokenizer, t_dir, t_model, t_params
      )
      cached.append(outputs)
      cache_infos.append(info)
    if cached[0] is None:  # the teachers run inside every step
      teacher_params = teachers[0][1] if len(teachers) == 1 else tuple(t[1] for t in teachers)
    else:
      # One teacher: [N, C] rows, as before; several: stacked [N, K, C].
      logits = [c['logits'] for c in cached]
      rows = logits[0] if len(teachers) == 1 else np.stack(logits, axis=1)
      batches = pipeline.WithRowData(batches, 'teacher_logits', rows)
      if 'pooled' in cached[0]:  # validate() allows pooled terms from the cache for one teacher
        batches = pipeline.WithRowData(batches, 'teacher_pooled', cached[0]['pooled'])
      teacher_models = None
    if len(teachers) == 1:
      teacher = None if teacher_models is None else teacher_models[0]
      loss_fn = step_lib.distill_loss_fn(models[learner], teacher, objectives[0])
    else:
      loss_fn = step_lib.multi_teacher_loss_fn(
        models[learner], teacher_models, objectives, config.distill.multi_teacher, weights
      )
  elif base == 'online':
    objectives = [_objective(config.loss, steps)]
    loss_fn = step_lib.online_loss_fn(
      models['student'], models['teacher'], objectives[0], config.loss.online_teacher_kd_weight
    )
  elif base == 'mutual':
    mc = config.mutual
    loss_fn = step_lib.mutual_loss_fn(
      role_models['student'], mc.num_students, mc.kd_weight, mc.temperature
    )
  else:
    loss_fn = step_lib.supervised_loss_fn(role_models[STAGE_ROLES[base][0]])

  optim_cfg = lambda role: config['recover_optim' if base == 'recover' else f'{role}_optim']
  txs = {m: optim.make_optimizer(optim_cfg(role), steps) for m, role in members.items()}
  schedule = optim.learning_rate_schedule(optim_cfg(STAGE_ROLES[base][-1]), steps)
  joint = len(members) > 1
  (only,) = members if not joint else (None,)
  params = init if joint else init[only]
  tx = optim.make_joint_optimizer(txs) if joint else txs[only]
  with_heads = any(o.head_shapes for o in objectives)
  if with_heads:
    # Projection/CRD heads train with the learner, under its optimizer, and are not exported.
    heads_key = jax.random.fold_in(key, KD_HEADS_SEED)
    if len(teachers) > 1:  # multi_teacher_loss_fn: objective k's heads under teacher_<k>
      heads = {
        f'teacher_{k}': o.init_heads(jax.random.fold_in(heads_key, k))
        for k, o in enumerate(objectives)
      }
    else:
      heads = objectives[0].init_heads(heads_key)
    params = {'student': params, 'kd_heads': heads}
  pruned = config.prune.method != 'none' and name in config.prune.stages
  if pruned:
    tx = optim.with_pruning(tx, config.prune, steps, with_heads)
  qat = bool(config.quant.qat_bits) and base in config.quant.stages and not joint
  if qat:
    loss_fn = _quantization_aware(loss_fn, config.quant, with_heads)

  def as_members(p):
    if with_heads:
      return {only: p['student']}
    return p if joint else {only: p}

  def periodic_eval(p):
    return {
      f'{m}_accuracy': evaluate.accuracy(
        evaluate.predict_logits(logits_fns[m], mp, make_eval()), data.eval_labels
      )
      for m, mp in as_members(p).items()
    }

  rng = jax.random.fold_in(key, STAGE_SEEDS[base])
  if strategies.generation(name) > 1:
    rng = jax.random.fold_in(rng, strategies.generation(name))
  spec = loop.StageSpec(
    name=name,
    loss_fn=loss_fn,
    tx=tx,
    schedule=schedule,
    params=params,
    rng=rng,
    steps=steps,
    teacher_params=teacher_params,
    evaluate=periodic_eval,
  )
  trained, info = loop.train_stage(spec, batches, stage_dir, config.train, writer, data_parallel)
  lead = parallel.is_lead_process()

  result = {
    'steps': info['steps'],
    'train_examples_per_sec': info['train_examples_per_sec'],
    'models': {},
  }
  logits = {}
  for m, p in as_members(trained).items():
    logits[m], eval_rate = evaluate.timed_logits(logits_fns[m], p, make_eval)
    result['models'][m] = {
      'model': specs[m]['model'],
      'eval_accuracy': evaluate.accuracy(logits[m], data.eval_labels),
      'eval_examples_per_sec': eval_rate,
      **evaluate.model_stats(p),
    }
    export_dir = stage_dir / 'export' / m
    checkpoint.export_model(export_dir, p, specs[m])  # every process joins orbax's save
    if lead:
      text.save_tokenizer(data.tokenizer, export_dir)
  if qat:
    result['qat'] = _quantized_accuracy(
      config.quant, as_members(trained)[only], logits_fns[only], make_eval, data.eval_labels
    )
  if pruned:
    from kdjax.compress import pruning

    result['sparsity'] = pruning.sparsity_report(
      as_members(trained)[only], tuple(config.prune.rules), tuple(config.prune.exclude)
    )
  if base == 'recover':
    from kdjax import chain

    evalset = _evalset(config, data, make_eval)
    (p,) = as_members(trained).values()
    rows = [chain.source_row(config, workdir, name, evalset)[0]]  # None after 'compress'
    rows.append(chain.measure_float(config, name, stage_dir, p, specs['student'], evalset)[0])
    result['compression'] = [r for r in rows if r]
  if cache_infos:
    result['teacher_cache'] = cache_infos[0]
  if teachers:
    entries, logits['teacher'] = _frozen_teachers(
      config, teachers, sources, weights, cache_infos, make_eval, data.eval_labels
    )
    result.update(entries)
  if 'teacher' in logits:
    pupil = 'assistant' if 'assistant' in logits else 'student'
    if pupil in logits:
      result['agreement'] = evaluate.agreement(logits[pupil], logits['teacher'])
  if base == 'mutual':
    result['mutual'] = strategies.mutual_report(logits, data.eval_labels)
  if strategies.generation(name) > 1:
    result['generations'] = strategies.generation_report(
      workdir, name, logits['student'], data.eval_labels, lambda d: _export_logits(d, make_eval)
    )
  result['wall_time_sec'] = time.perf_counter() - start
  return finish_stage(stage_dir, name, steps, result, writer)


def finish_stage(stage_dir: pathlib.Path, name: str, steps: int, result: dict, writer) -> dict:
  """Logs a stage's final dev accuracies and writes its result.json, which marks it done."""
  writer.write(
    {
      'stage': name,
      'step': steps,
      'final': True,
      **{f'eval_{r}_accuracy': m['eval_accuracy'] for r, m in result['models'].items()},
    }
  )
  if parallel.is_lead_process():
    report.write_json(stage_dir / 'result.json', result)
  # The next stage may read this one's export and result on any process.
  parallel.barrier(f'{name} done')
  return result


def _evalset(config, data: TaskData, make_eval):
  from kdjax import chain

  return chain.EvalSet(data.eval_ids, data.eval_labels, tuple(config.data.buckets), make_eval)


def _fake_quant(quant_cfg, params):
  from kdjax.compress import quantize  # compression is only imported by runs that use it

  return quantize.fake_quant_params(
    params,
    quant_cfg.qat_bits,
    quant_cfg.symmetric,
    quant_cfg.per_channel,
    tuple(quant_cfg.rules),
    tuple(quant_cfg.exclude),
  )


def _quantization_aware(loss_fn, quant_cfg, with_heads: bool):
  """`loss_fn` run on the student's fake-quantized weights (config.quant); distillation
  heads, which are not exported, stay in float."""

  def qat_loss_fn(params, teacher_params, batch, rng, step):
    if with_heads:
      params = {**params, 'student': _fake_quant(quant_cfg, params['student'])}
    else:
      params = _fake_quant(quant_cfg, params)
    return loss_fn(params, teacher_params, batch, rng, step)

  return qat_loss_fn


def _quantized_accuracy(quant_cfg, params, logits_fn, make_eval, labels) -> dict:
  """Dev accuracy of the weights as `kdjax.ptq` with the same settings stores them."""
  quantized = jax.device_get(jax.jit(lambda p: _fake_quant(quant_cfg, p))(params))
  return {
    'bits': quant_cfg.qat_bits,
    'eval_accuracy_quantized': evaluate.accuracy(
      evaluate.predict_logits(logits_fn, quantized, make_eval()), labels
    ),
  }


def _frozen_teachers(config, teachers, sources, weights, cache_infos, make_eval, labels):
  """(result.json entries, logits standing for 'the teacher' in the agreement figure) of a
  distilling stage's frozen teachers: with several, each one's dev accuracy and weight, and
  their weighted averaged-probability ensemble, which then stands for the teacher."""
  t_logits = [
    evaluate.predict_logits(step_lib.make_logits_fn(model), params, make_eval())
    for model, params, _, _ in teachers
  ]
  _, params, spec, export_dir = teachers[0]
  out = {
    'frozen_teacher': {
      'model': spec['model'],
      'export': str(export_dir),
      'eval_accuracy': evaluate.accuracy(t_logits[0], labels),
      **evaluate.model_stats(params),
    }
  }
  if len(teachers) == 1:
    return out, t_logits[0]
  out['teachers'] = [
    {
      'source': source.name,
      'export': str(export_dir),
      'model': spec['model'],
      'weight': weight,
      'eval_accuracy': evaluate.accuracy(z, labels),
      'cache': info,
      **evaluate.model_stats(params),
    }
    for (_, params, spec, export_dir), source, weight, z, info in zip(
      teachers, sources, weights, t_logits, cache_infos
    )
  ]
  ensemble = strategies.ensemble_log_probs(t_logits, weights)
  out['teacher_ensemble'] = {
    'mode': config.distill.multi_teacher,
    'eval_accuracy': evaluate.accuracy(ensemble, labels),
  }
  return out, ensemble


def _export_logits(export_dir: pathlib.Path, make_eval) -> np.ndarray:
  model, params, _ = load_exported_model(export_dir)
  return evaluate.predict_logits(step_lib.make_logits_fn(model), params, make_eval())


class _SilentWriter:
  """The metrics writer of every process but the lead one: drops whatever it is given."""

  def __getattr__(self, name):
    return lambda *args, **kwargs: None


def run(config, workdir) -> dict:
  """Runs every stage of `config` in `workdir` and writes results.json and report.md.

  Started as N processes (config.parallel.distributed), it runs as one job: every process
  trains on its rows and joins checkpoint saves; process 0 writes logs and reports.
  """
  config_lib.validate(config)
  parallel.initialize_distributed(config.parallel.distributed)
  data_parallel = parallel.DataParallel.from_config(config.parallel)
  data_parallel.local_batch_size(config.train.batch_size)  # fails before any data work
  lead = parallel.is_lead_process()
  workdir = pathlib.Path(workdir).expanduser().absolute()
  workdir.mkdir(parents=True, exist_ok=True)

  def prepare() -> TaskData:
    _check_config(config, workdir)
    return prepare_data(config, workdir)

  # The lead process writes config.json, the prepared dataset and the tokenizer first.
  data = parallel.lead_first('prepare', prepare)
  # Training rows over the whole job (each process holds those of its shards).
  per_process = np.zeros(jax.process_count(), np.int64)
  per_process[jax.process_index()] = len(data.train_ids)
  train_examples = int(parallel.all_reduce_max(per_process).sum())
  _check_objective(config, workdir, len(data.tokenizer))
  if lead:
    print(
      f'data: {train_examples} train / {len(data.eval_ids)} {config.data.eval_split} '
      f'examples, vocabulary {len(data.tokenizer)}; parallel {config.parallel.mode} over '
      f'{jax.device_count()} devices in {jax.process_count()} process(es) '
      f'({jax.devices()[0].device_kind})',
      flush=True,
    )
  writer = report.MetricsWriter(workdir / 'metrics.jsonl') if lead else _SilentWriter()
  writer.write_hparams(json.loads(config.to_json_best_effort()))  # TensorBoard's HParams
  names = strategies.stage_names(config)
  stages = {name: run_stage(name, config, data, workdir, writer, data_parallel) for name in names}
  last_generation = strategies.generation_stage(config.distill.generations)
  # The last stage's student in chain order: compression stages, then the trained ones.
  candidates = ('quantize', 'recover', 'compress', last_generation, 'online', 'student_alone')
  student_stage = next((s for s in candidates + ('mutual',) if s in stages), None)
  final_role = 'student_0' if student_stage == 'mutual' else 'student'
  # The quantize stage's student is its compact artifact, which kdjax.predict also runs.
  final = (
    'quantize/artifact' if student_stage == 'quantize' else f'{student_stage}/export/{final_role}'
  )
  results = {
    'schema_version': report.RESULTS_SCHEMA_VERSION,
    'name': config.name,
    'seed': config.seed,
    'dataset': config.data.name,
    'eval_split': config.data.eval_split,
    'train_examples': train_examples,
    'eval_examples': len(data.eval_ids),
    'stages': stages,
    'summary': report.summary(stages),
    'final_student': final if student_stage else None,
    'wall_time_sec': sum(s['wall_time_sec'] for s in stages.values()),
  }
  if lead:
    report.write_json(workdir / 'results.json', results)
    report.write_report(workdir / 'report.md', results)
    print(report.format_table(stages), flush=True)
  return results
