"""Validation of a run config: every bad value is reported before anything is compiled."""

import json
import math
import pathlib
from typing import Callable, Mapping

from kdjax import optim, report

# Compression chained with distillation (kdjax/chain.py); each takes over the student of the
# nearest stage before it that exports one (STUDENT_EXPORTS).
CHAIN_STAGES = ('compress', 'recover', 'quantize')
STAGES = ('teacher', 'student_alone', 'online', 'distill', 'assistant', 'mutual', *CHAIN_STAGES)
STUDENT_EXPORTS = ('student_alone', 'online', 'distill', 'compress', 'recover')
MULTI_TEACHER = ('average_probs', 'sum_losses')
# Terms that only read softmax(z/T) of the teacher, so a mixture of teachers can stand in.
MIXTURE_TERMS = ('ce', 'kl', 'reverse_kl', 'jsd', 'soft_ce', 'dkd')
EVAL_SPLITS = ('train', 'validation')  # the GLUE test split has no labels


class ConfigError(ValueError):
  """A config key holds a value kdjax cannot run with; the message names key and fix."""


def _require(ok: bool, key: str, value, valid: str) -> None:
  if not ok:
    raise ConfigError(f'config.{key}={value!r} is invalid: {valid}')


def teacher_export_dir(path: str) -> pathlib.Path:
  """`teacher.path` may name an export folder or the workdir of a run that trained one."""
  p = pathlib.Path(path).expanduser()
  return p if (p / 'model.json').is_file() else p / 'teacher' / 'export' / 'teacher'


def _validate_model(config, role: str) -> None:
  from kdjax.models import registry  # the model zoo is only needed to check names/fields

  spec = config[role]
  kwargs = spec.kwargs.to_dict()
  # NaN and infinity were refused by validate's sweep over every float.
  for name, value in kwargs.items():
    if name.endswith('dropout_rate'):
      rate_ok = isinstance(value, (int, float)) and 0 <= value < 1
      _require(rate_ok, f'{role}.kwargs.{name}', value, 'must be in [0, 1)')
  try:
    registry.build_model(spec.model, vocab_size=8, num_classes=2, **kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f'config.{role}: {e}') from None


def _validate_init_from(config, role: str) -> None:
  """A pretrained checkpoint (Hugging Face BERT folder, or a kdjax export / run workdir to
  continue from) must exist and fit the configured model and tokenizer."""
  from kdjax.checkpoint import CheckpointError
  from kdjax.models import hf_bert

  spec = config[role]
  key = f'{role}.init_from'
  export = teacher_export_dir(spec.init_from)
  if (export / 'model.json').is_file():  # a kdjax export: continue training that model
    saved = json.loads((export / 'model.json').read_text())
    for name in ('hidden_size', 'num_layers', 'num_heads', 'intermediate_size', 'embed_dim'):
      _require(
        saved['kwargs'].get(name) == spec.kwargs.get(name),
        f'{role}.kwargs.{name}',
        spec.kwargs.get(name),
        f'the export {export} has {name}={saved["kwargs"].get(name)}',
      )
    _require(
      saved['model'] == spec.model,
      f'{role}.model',
      spec.model,
      f'{export} holds a {saved["model"]!r}',
    )
    return
  _require(
    spec.model == 'bert', key, spec.init_from, f"needs {role}.model='bert', got {spec.model!r}"
  )
  _require(
    config.data.tokenizer == 'wordpiece',
    key,
    spec.init_from,
    "a pretrained BERT needs data.tokenizer='wordpiece' (its own WordPiece ids)",
  )
  try:
    ckpt = hf_bert.bert_kwargs(spec.init_from)
  except CheckpointError as e:
    raise ConfigError(f'config.{key}={spec.init_from!r} is invalid: {e}') from None
  for name in ('hidden_size', 'num_layers', 'num_heads', 'intermediate_size'):
    _require(
      spec.kwargs.get(name) == ckpt[name],
      f'{role}.kwargs.{name}',
      spec.kwargs.get(name),
      f'the checkpoint {spec.init_from!r} has {name}={ckpt[name]}',
    )
  _require(
    spec.kwargs.get('max_len', 512) <= ckpt['max_len'],
    f'{role}.kwargs.max_len',
    spec.kwargs.get('max_len', 512),
    f"at most the checkpoint's {ckpt['max_len']} positions",
  )


def _validate_optimizer(cfg: Mapping, key: str) -> None:
  _require(
    cfg['name'] in optim.OPTIMIZERS,
    f'{key}.name',
    cfg['name'],
    f'one of {", ".join(optim.OPTIMIZERS)}',
  )
  _require(
    cfg['schedule'] in optim.SCHEDULES,
    f'{key}.schedule',
    cfg['schedule'],
    f'one of {", ".join(optim.SCHEDULES)}',
  )
  _require(cfg['learning_rate'] > 0, f'{key}.learning_rate', cfg['learning_rate'], 'must be > 0')
  _require(cfg['warmup_steps'] >= 0, f'{key}.warmup_steps', cfg['warmup_steps'], 'must be >= 0')
  _require(cfg['weight_decay'] >= 0, f'{key}.weight_decay', cfg['weight_decay'], 'must be >= 0')
  _require(
    cfg['grad_clip_norm'] >= 0,
    f'{key}.grad_clip_norm',
    cfg['grad_clip_norm'],
    'must be >= 0 (0 disables clipping)',
  )


def require_finite(config) -> None:
  """Refuses NaN and infinity in every float setting of `config`. No setting means anything
  at either, and most range checks (w >= 0, T > 0) let infinity through, so each job's
  validation runs this sweep before its per-key rules."""
  for path, value in report.flatten(config.to_dict()).items():
    if isinstance(value, float):
      _require(math.isfinite(value), path, value, 'must be a finite number')


def validate(config) -> None:
  require_finite(config)
  stages = tuple(config.stages)
  _require(
    len(stages) > 0 and all(s in STAGES for s in stages),
    'stages',
    stages,
    f'a non-empty tuple drawn from {", ".join(STAGES)}',
  )
  _require(len(set(stages)) == len(stages), 'stages', stages, 'each stage at most once')
  for stage in ('assistant', 'distill', 'recover'):
    if stage in stages and config.teacher.path:
      export = teacher_export_dir(config.teacher.path)
      _require(
        (export / 'model.json').is_file(),
        'teacher.path',
        config.teacher.path,
        f'no trained teacher found (looked for {export}/model.json)',
      )
    elif stage in stages:
      _require(
        'teacher' in stages and stages.index('teacher') < stages.index(stage),
        'stages',
        stages,
        f"'{stage}' needs a teacher: run 'teacher' before it or set config.teacher.path",
      )

  d = config.data
  _require(bool(d.name), 'data.name', d.name, "'sst2_local' or a prepared tfds dataset name")
  _require(
    d.eval_split in EVAL_SPLITS,
    'data.eval_split',
    d.eval_split,
    f'one of {", ".join(EVAL_SPLITS)} (test has no labels)',
  )
  _require(d.max_len >= 2, 'data.max_len', d.max_len, 'must be >= 2 ([CLS] plus a word)')
  buckets = tuple(d.buckets)
  _require(
    len(buckets) > 0
    and all(b > 0 for b in buckets)
    and all(a < b for a, b in zip(buckets, buckets[1:]))
    and buckets[-1] == d.max_len,
    'data.buckets',
    buckets,
    f'strictly increasing positive lengths ending at data.max_len={d.max_len}',
  )
  _require(d.vocab_size >= 5, 'data.vocab_size', d.vocab_size, 'must be >= 5')
  _require(d.vocab_min_count >= 1, 'data.vocab_min_count', d.vocab_min_count, 'must be >= 1')
  _require(d.train_limit >= 0, 'data.train_limit', d.train_limit, 'must be >= 0 (0 = all)')
  _require(d.bucket_window >= 1, 'data.bucket_window', d.bucket_window, 'must be >= 1')
  _require(
    d.shards >= 0, 'data.shards', d.shards, '0 (one per process) or a multiple of the process count'
  )

  from kdjax.data import text

  _require(
    d.tokenizer in text.TOKENIZERS,
    'data.tokenizer',
    d.tokenizer,
    f'one of {", ".join(text.TOKENIZERS)}',
  )
  for role in ('teacher', 'student', 'assistant'):
    _validate_model(config, role)
    if config[role].init_from == 'teacher':
      _require(
        role != 'teacher' and (bool(config.teacher.path) or stages[:1] == ('teacher',)),
        f'{role}.init_from',
        'teacher',
        "students and the assistant only, with config.teacher.path set or 'teacher' as the "
        'first stage',
      )
    elif config[role].init_from:
      _validate_init_from(config, role)
    _require(
      not config[role].init_layers or config[role].init_from == 'teacher',
      f'{role}.init_layers',
      tuple(config[role].init_layers),
      "only used with init_from='teacher'; leave it () otherwise",
    )
  for key in ('teacher_optim', 'student_optim', 'assistant_optim', 'recover_optim'):
    _validate_optimizer(config[key], key)

  from kdjax.kd import objective

  objective.validate(config.loss, lambda ok, key, value, valid: _require(ok, key, value, valid))
  _require(
    config.loss.online_teacher_kd_weight >= 0,
    'loss.online_teacher_kd_weight',
    config.loss.online_teacher_kd_weight,
    'must be >= 0',
  )
  weights_on = {k: v for k, v in config.loss.weights.items() if v}
  if objective.needs_teacher_features(config.loss):
    _require(
      ('distill' in stages or 'assistant' in stages) and 'online' not in stages,
      'loss.weights',
      weights_on,
      "hidden-state, attention, relation, CRD and pooled terms need the teacher's features: "
      'only in the distill or assistant stage (not online)',
    )
  if objective.needs_live_teacher(config.loss):
    _require(
      config.distill.teacher_cache == 'off',
      'loss.weights',
      weights_on,
      'hidden-state, attention and relation terms need the teacher live: '
      "distill.teacher_cache='off' (the cache stores logits and pooled vectors only)",
    )
  if objective.needs_teacher_pooled(config.loss) and config.distill.teacher_cache != 'off':
    _require(
      not tuple(config.distill.extra_teachers),
      'distill.extra_teachers',
      tuple(config.distill.extra_teachers),
      "the pooled terms read one teacher's cached pooled vectors: leave it () or set "
      "distill.teacher_cache='off'",
    )

  _validate_prune(config.prune)
  _validate_quant(config.quant)
  _validate_chain(config, stages)
  validate_parallel(config.parallel)

  dc = config.distill
  _require(
    dc.teacher_cache in ('off', 'logits', 'topk'),
    'distill.teacher_cache',
    dc.teacher_cache,
    'one of off, logits, topk',
  )
  _require(dc.cache_topk >= 1, 'distill.cache_topk', dc.cache_topk, 'must be >= 1 (and < classes)')
  _require(dc.augment_copies >= 0, 'distill.augment_copies', dc.augment_copies, 'must be >= 0')
  for name in ('augment_mask_prob', 'augment_replace_prob', 'augment_ngram_prob'):
    _require(0 <= dc[name] <= 1, f'distill.{name}', dc[name], 'a probability in [0, 1]')
  _require(
    dc.augment_mask_prob + dc.augment_replace_prob <= 1,
    'distill.augment_replace_prob',
    dc.augment_replace_prob,
    f'augment_mask_prob + augment_replace_prob must be <= 1 (mask is {dc.augment_mask_prob})',
  )
  _require(
    dc.augment_replace in ('unigram', 'neighbours'),
    'distill.augment_replace',
    dc.augment_replace,
    'one of unigram, neighbours',
  )
  _require(dc.augment_neighbours >= 1, 'distill.augment_neighbours', dc.augment_neighbours, '>= 1')
  _require(
    dc.augment_replace == 'unigram' or config.data.tokenizer == 'wordpiece',
    'distill.augment_replace',
    dc.augment_replace,
    "'neighbours' looks words up in the teacher's vocabulary: needs data.tokenizer='wordpiece'",
  )
  _validate_strategies(config, stages)

  t = config.train
  for name in (
    'batch_size',
    'teacher_steps',
    'student_steps',
    'recover_steps',
    'log_every',
    'checkpoint_every',
    'keep_checkpoints',
    'eval_batch_size',
  ):
    _require(t[name] >= 1, f'train.{name}', t[name], 'must be >= 1')
  _require(t.eval_every >= 0, 'train.eval_every', t.eval_every, 'must be >= 0 (0 = at the end)')
  _require(
    t.nonfinite in NONFINITE_POLICIES,
    'train.nonfinite',
    t.nonfinite,
    f'one of {", ".join(NONFINITE_POLICIES)}',
  )
  _require(t.max_skipped_steps >= 0, 'train.max_skipped_steps', t.max_skipped_steps, 'must be >= 0')
  _require(
    isinstance(t.ema_decay, (int, float)) and 0 <= t.ema_decay < 1,
    'train.ema_decay',
    t.ema_decay,
    'a decay in [0, 1): 0 = off, e.g. 0.999',
  )
  _require(
    t.ema_decay == 0 or config.prune.method == 'none',
    'train.ema_decay',
    t.ema_decay,
    f'a moving average of gradually pruned weights is not sparse; use 0 with '
    f'prune.method={config.prune.method!r}',
  )
  _require(
    t.checkpoint_every % t.log_every == 0,
    'train.checkpoint_every',
    t.checkpoint_every,
    f'must be a multiple of train.log_every={t.log_every}',
  )


def _validate_strategies(config, stages: tuple) -> None:
  """Multi-teacher, born-again generations and deep mutual learning (kdjax/strategies.py)."""
  from kdjax.kd import objective

  dc = config.distill
  extra = tuple(dc.extra_teachers)
  _require(
    not extra or 'distill' in stages or 'assistant' in stages,
    'distill.extra_teachers',
    extra,
    "only used by the 'distill' or 'assistant' stage; leave it () otherwise",
  )
  for i, path in enumerate(extra):
    export = teacher_export_dir(path)
    _require(
      bool(path) and (export / 'model.json').is_file(),
      f'distill.extra_teachers[{i}]',
      path,
      f'no trained teacher found (looked for {export}/model.json)',
    )
  _require(
    dc.multi_teacher in MULTI_TEACHER,
    'distill.multi_teacher',
    dc.multi_teacher,
    f'one of {", ".join(MULTI_TEACHER)}',
  )
  weights = tuple(dc.teacher_weights)
  _require(
    not weights or len(weights) == 1 + len(extra),
    'distill.teacher_weights',
    weights,
    f'one weight per teacher: {1 + len(extra)} (teacher + {len(extra)} extra), or () = equal',
  )
  _require(
    all(isinstance(w, (int, float)) and w >= 0 for w in weights)
    and (not weights or sum(weights) > 0),
    'distill.teacher_weights',
    weights,
    'numbers >= 0 with a sum > 0',
  )
  if extra and dc.multi_teacher == 'average_probs':
    # A mixture of probabilities has no logits of its own: only terms of softmax(z/T) apply.
    unfit = [t for t in objective.active_terms(config.loss) if t not in MIXTURE_TERMS]
    _require(
      not unfit,
      'distill.multi_teacher',
      dc.multi_teacher,
      f'loss.weights.{unfit[0] if unfit else ""} cannot use a mixture of teacher '
      f"probabilities (only {', '.join(MIXTURE_TERMS)}); use 'sum_losses'",
    )
  _require(
    isinstance(dc.generations, int) and dc.generations >= 1,
    'distill.generations',
    dc.generations,
    'an integer >= 1 (1 = one distill stage)',
  )
  _require(
    dc.generations == 1 or 'distill' in stages,
    'distill.generations',
    dc.generations,
    "repeats the 'distill' stage, which config.stages does not run; use 1",
  )
  m = config.mutual
  _require(
    isinstance(m.num_students, int) and m.num_students >= 2,
    'mutual.num_students',
    m.num_students,
    'an integer >= 2 (students learn from each other)',
  )
  _require(m.kd_weight >= 0, 'mutual.kd_weight', m.kd_weight, 'must be >= 0')
  _require(m.temperature > 0, 'mutual.temperature', m.temperature, 'must be > 0')


PRUNE_METHODS = ('none', 'magnitude', 'movement', 'nm')
PRUNE_STAGES = ('student_alone', 'distill', 'recover')
COMPRESS_METHODS = ('none', 'units', 'heads', 'lowrank')


def _validate_chain(config, stages: tuple) -> None:
  for stage in CHAIN_STAGES:
    if stage in stages:
      before = stages[: stages.index(stage)]
      _require(
        any(s in STUDENT_EXPORTS for s in before),
        'stages',
        stages,
        f"'{stage}' needs a student to work on: put one of {', '.join(STUDENT_EXPORTS)} before it",
      )
  c = config.compress
  _require(
    c.method in COMPRESS_METHODS,
    'compress.method',
    c.method,
    f'one of {", ".join(COMPRESS_METHODS)}',
  )
  if 'compress' in stages:
    _require(
      c.method != 'none',
      'compress.method',
      c.method,
      f"the 'compress' stage needs one of {', '.join(COMPRESS_METHODS[1:])}",
    )
  if 'compress' in stages and c.method != 'none':
    # The chain compresses the student trained from config.student: refuse a method that
    # model lacks now, not after the stages before 'compress' have trained.
    from kdjax.compress import structured
    from kdjax.models import registry

    model = config.student.model
    supported = {
      'units': sorted(structured.PRUNERS),
      'heads': sorted(m for m, _ in structured.PRUNERS_BY_PART),
      'lowrank': registry.low_rank_models(),
    }[c.method]
    _require(
      model in supported,
      'compress.method',
      c.method,
      f'works on {", ".join(supported)} students; config.student.model is {model!r}',
    )
  if c.method in ('units', 'heads'):
    _require(0 < c.keep <= 1, 'compress.keep', c.keep, 'a fraction of units kept in (0, 1]')
  if c.method == 'lowrank':
    _require(
      (c.rank > 0) != (0 < c.energy <= 1),
      'compress.rank',
      (c.rank, c.energy),
      'set exactly one of compress.rank (> 0) and compress.energy (in (0, 1])',
    )
    _require(len(c.rules) > 0, 'compress.rules', tuple(c.rules), 'at least one regex')
  _require(c.timing_repeats >= 1, 'compress.timing_repeats', c.timing_repeats, 'must be >= 1')
  q = config.quant
  _require(q.ptq_bits in (4, 8), 'quant.ptq_bits', q.ptq_bits, '4 or 8')
  trained_quantized = q.qat_bits and any(s in stages for s in q.stages)
  if 'quantize' in stages and trained_quantized:
    _require(
      q.ptq_bits == q.qat_bits,
      'quant.ptq_bits',
      q.ptq_bits,
      f'must equal quant.qat_bits={q.qat_bits}: the quantize stage stores the grid QAT trained on',
    )


PARALLEL_MODES = ('single', 'pmap', 'shard_map', 'mesh')
NONFINITE_POLICIES = ('stop', 'skip')  # what kdjax.loop does with a NaN/Inf step
# Top-level config sections a resumed run may change (see check_workdir_config).
RESUMABLE_ACROSS = ('parallel',)


def validate_parallel(p) -> None:
  """config.parallel (configs/default.py:parallel); device counts are checked at run time."""
  _require(p.mode in PARALLEL_MODES, 'parallel.mode', p.mode, f'one of {", ".join(PARALLEL_MODES)}')
  for key in ('params', 'teacher'):
    _require(p[key] in ('replicated', 'fsdp'), f'parallel.{key}', p[key], 'replicated or fsdp')
    _require(
      p[key] == 'replicated' or p.mode == 'mesh',
      f'parallel.{key}',
      p[key],
      f"replicated: fsdp needs parallel.mode='mesh' (mode is {p.mode!r})",
    )
  _require(len(p.fsdp_rules) > 0, 'parallel.fsdp_rules', tuple(p.fsdp_rules), 'at least one regex')
  _require(p.fsdp_min_size >= 0, 'parallel.fsdp_min_size', p.fsdp_min_size, 'must be >= 0')
  d = p.distributed
  _require(
    d.initialize in ('never', 'auto', 'always'),
    'parallel.distributed.initialize',
    d.initialize,
    'one of never, auto, always',
  )
  _require(
    d.num_processes >= 0, 'parallel.distributed.num_processes', d.num_processes, 'must be >= 0'
  )
  _require(
    d.process_id >= -1, 'parallel.distributed.process_id', d.process_id, '-1 (unset) or >= 0'
  )


def _validate_quant(q) -> None:
  _require(q.qat_bits in (0, 4, 8), 'quant.qat_bits', q.qat_bits, '0 (off), 4 or 8')
  _require(len(q.rules) > 0, 'quant.rules', tuple(q.rules), 'at least one regex')
  if not q.qat_bits:
    return
  _require(
    len(q.stages) > 0 and all(s in PRUNE_STAGES for s in q.stages),
    'quant.stages',
    tuple(q.stages),
    f'stages drawn from {", ".join(PRUNE_STAGES)}',
  )


def _validate_prune(p) -> None:
  _require(
    p.method in PRUNE_METHODS, 'prune.method', p.method, f'one of {", ".join(PRUNE_METHODS)}'
  )
  if p.method == 'none':
    return
  if p.method == 'nm':
    n, m = tuple(p.nm)
    _require(0 < n < m, 'prune.nm', tuple(p.nm), '(N, M) with 0 < N < M, e.g. (2, 4)')
  else:
    _require(0 < p.sparsity < 1, 'prune.sparsity', p.sparsity, 'a fraction in (0, 1)')
  _require(len(p.rules) > 0, 'prune.rules', tuple(p.rules), 'at least one regex')
  _require(p.scope in ('layer', 'global'), 'prune.scope', p.scope, 'layer or global')
  _require(
    0 <= p.begin_fraction < p.end_fraction <= 1,
    'prune.end_fraction',
    (p.begin_fraction, p.end_fraction),
    '0 <= begin_fraction < end_fraction <= 1',
  )
  _require(p.update_every >= 1, 'prune.update_every', p.update_every, 'must be >= 1')
  _require(
    len(p.stages) > 0 and all(s in PRUNE_STAGES for s in p.stages),
    'prune.stages',
    tuple(p.stages),
    f'stages drawn from {", ".join(PRUNE_STAGES)}',
  )


def check_workdir_config(config, workdir: pathlib.Path, schema: Callable | None = None) -> None:
  """A workdir belongs to one config: resuming with another would mix two experiments. The
  first run writes workdir/config.json; later runs must match it, naming the first key
  that differs. With `schema` (a zero-argument function returning the full default config),
  keys the schema gained since the workdir was written are accepted at their defaults."""
  path = workdir / 'config.json'
  current = json.loads(config.to_json_best_effort())
  if not path.exists():
    report.write_json(path, current)
    return
  saved = json.loads(path.read_text())
  if schema is not None:
    saved = _with_new_defaults(saved, current, json.loads(schema().to_json_best_effort()))
  # Where a run executes is not what it computes: a run may resume on another device count
  # or process layout (checkpoints restore across topologies).
  for ignored in RESUMABLE_ACROSS:
    saved.pop(ignored, None)
    current.pop(ignored, None)
  if saved != current:
    raise ConfigError(
      f'workdir {workdir} holds a run with a different config '
      f'({_first_difference(saved, current)}); use a new --workdir or the original config'
    )


def _with_new_defaults(saved: dict, current: dict, defaults: dict) -> dict:
  """`saved` plus the keys the schema gained since it was written, where the current run
  keeps their defaults: a workdir stays resumable when kdjax adds an option it did not use."""

  def fill(s, c, d):
    if not (isinstance(s, dict) and isinstance(c, dict) and isinstance(d, dict)):
      return s
    out = {k: fill(v, c.get(k), d.get(k)) for k, v in s.items()}
    for k in set(c) - set(s):
      if k in d and c[k] == d[k]:
        out[k] = c[k]
    return out

  return fill(saved, current, defaults)


def _first_difference(a, b, prefix='config') -> str:
  if isinstance(a, dict) and isinstance(b, dict):
    for key in sorted(set(a) | set(b)):
      if a.get(key) != b.get(key):
        return _first_difference(a.get(key), b.get(key), f'{prefix}.{key}')
  return f'{prefix} was {a!r}, now {b!r}'
