"""`python -m kdjax.translate --config=experiments/multi30k.py[:args] --workdir=DIR`.

Distillation for generation on Multi30k: a Transformer encoder-decoder teacher, then students
trained alone, with word-level KD, with sequence-level KD (the teacher's beam outputs over the
training sources, generated once with the jitted decoder and cached), with both, and on-policy
(configs/translate.py lists the stages). Every stage lives in `workdir/<stage>/` with its own
checkpoints, export (params, model.json, subword.json) and result.json; a killed run resumes
from its newest checkpoint, a finished stage is read back.

Each stage is scored with sacreBLEU on the detokenised test_2016_flickr output (greedy and
beam) and timed: sentences per second of batched greedy and beam decoding, compile excluded.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import translate as schema
from kdjax import bleu, checkpoint, decode, loop, optim, report, teacher_cache
from kdjax import config as config_lib
from kdjax.data import multi30k, subword
from kdjax.data.translation_batches import TranslationBatches, ordered_batches
from kdjax.distill_data import default_cache_root
from kdjax.evaluate import model_stats
from kdjax.kd import sequence
from kdjax.models.seq2seq import Seq2SeqTransformer
from kdjax.train import default_tfds_dir

RESULTS_SCHEMA_VERSION = 1
MODEL_NAME = 'seq2seq'
STAGE_SEEDS = {
  'teacher': 21,
  'student_alone': 22,
  'word_kd': 23,
  'seq_kd': 24,
  'seq_word_kd': 25,
  'on_policy': 26,
}
# Students of every stage start from the same weights, so stages differ only in what they learn.
ROLE_SEEDS = {'teacher': 1, 'student': 2}
SEQ_KD_STAGES = ('seq_kd', 'seq_word_kd')
# Stages that learn from references only; every other stage needs a trained teacher.
WITHOUT_TEACHER = ('teacher', 'student_alone')


def role_of(stage: str) -> str:
  return 'teacher' if stage == 'teacher' else 'student'


# -- config ----------------------------------------------------------------------------------


def validate(config) -> None:
  """Every bad value is reported in one line before any data is read or anything compiles."""
  _require = config_lib._require
  config_lib.require_finite(config)
  stages = tuple(config.stages)
  _require(
    bool(stages) and set(stages) <= set(schema.STAGES) and len(set(stages)) == len(stages),
    'stages',
    stages,
    f'distinct names from {", ".join(schema.STAGES)}',
  )
  _require(
    list(stages) == sorted(stages, key=schema.STAGES.index),
    'stages',
    stages,
    f'in the order {", ".join(schema.STAGES)}',
  )
  d = config.data
  _require(d.tokenizer in subword.KINDS, 'data.tokenizer', d.tokenizer, f'one of {subword.KINDS}')
  _require(
    {d.source_lang, d.target_lang} == set(multi30k.LANGS),
    'data.source_lang/target_lang',
    (d.source_lang, d.target_lang),
    'en and de, one each',
  )
  _require(d.vocab_size >= 100, 'data.vocab_size', d.vocab_size, 'must be >= 100')
  buckets = tuple(d.buckets)
  _require(
    bool(buckets) and list(buckets) == sorted(set(buckets)) and buckets[0] > 0,
    'data.buckets',
    buckets,
    'strictly increasing positive lengths',
  )
  _require(
    d.max_len >= 1 and d.max_len + 1 <= buckets[-1],
    'data.max_len',
    d.max_len,
    f'>= 1, and max_len + 1 (BOS/EOS) must fit the largest bucket {buckets[-1]}',
  )
  for key in ('train_limit', 'eval_limit'):
    _require(d[key] >= 0, f'data.{key}', d[key], 'must be >= 0 (0 = all)')
  for role in ('teacher', 'student'):
    m = config[role]
    for key in ('d_model', 'num_heads', 'enc_layers', 'dec_layers', 'd_ff'):
      _require(m[key] >= 1, f'{role}.{key}', m[key], 'must be >= 1')
    _require(
      m.d_model % m.num_heads == 0 and m.d_model % 2 == 0,
      f'{role}.d_model',
      m.d_model,
      f'even and divisible by num_heads={m.num_heads}',
    )
    for key in ('dropout_rate', 'attention_dropout_rate'):
      _require(0 <= m[key] < 1, f'{role}.{key}', m[key], 'must be in [0, 1)')
    _require(
      m.max_len >= max(buckets[-1], config.decode.max_len),
      f'{role}.max_len',
      m.max_len,
      f'must cover the largest bucket and decode.max_len ({max(buckets[-1], config.decode.max_len)})',
    )
  needs_teacher = any(s not in WITHOUT_TEACHER for s in stages)
  _require(
    not (needs_teacher and 'teacher' not in stages and not config.teacher_path),
    'teacher_path',
    config.teacher_path,
    "a finished translate workdir or teacher export when distilling without a 'teacher' stage",
  )
  _require(
    not ('teacher' in stages and config.teacher_path),
    'teacher_path',
    config.teacher_path,
    "'' when the run trains its own teacher (drop 'teacher' from stages to reuse one)",
  )
  config_lib._validate_optimizer(config.teacher_optim, 'teacher_optim')
  config_lib._validate_optimizer(config.student_optim, 'student_optim')
  t = config.train
  for key in ('batch_size', 'teacher_steps', 'student_steps', 'log_every', 'checkpoint_every'):
    _require(t[key] >= 1, f'train.{key}', t[key], 'must be >= 1')
  _require(t.keep_checkpoints >= 1, 'train.keep_checkpoints', t.keep_checkpoints, 'must be >= 1')
  _require(t.eval_every >= 0, 'train.eval_every', t.eval_every, 'must be >= 0 (0 = at the end)')
  _require(t.eval_sentences >= 1, 'train.eval_sentences', t.eval_sentences, 'must be >= 1')
  _require(0 <= t.label_smoothing < 1, 'train.label_smoothing', t.label_smoothing, 'in [0, 1)')
  _require(
    t.nonfinite in config_lib.NONFINITE_POLICIES,
    'train.nonfinite',
    t.nonfinite,
    f'one of {", ".join(config_lib.NONFINITE_POLICIES)}',
  )
  k = config.kd
  _require(k.temperature > 0, 'kd.temperature', k.temperature, 'must be > 0')
  for key in ('word_weight', 'on_policy_weight', 'jsd_beta'):
    _require(0 <= k[key] <= 1, f'kd.{key}', k[key], 'must be in [0, 1]')
  _require(k.seq_beam_size >= 1, 'kd.seq_beam_size', k.seq_beam_size, 'must be >= 1')
  _require(k.sample_temperature > 0, 'kd.sample_temperature', k.sample_temperature, 'must be > 0')
  dc = config.decode
  _require(dc.beam_size >= 1, 'decode.beam_size', dc.beam_size, 'must be >= 1')
  _require(dc.max_len >= 2, 'decode.max_len', dc.max_len, 'must be >= 2')
  _require(dc.batch_size >= 1, 'decode.batch_size', dc.batch_size, 'must be >= 1')


# -- data ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Split:
  sources: list[str]
  references: list[str]
  src_ids: list[np.ndarray]
  tgt_ids: list[np.ndarray]


@dataclasses.dataclass
class Corpus:
  tokenizer: subword.SubwordTokenizer
  train: Split
  validation: Split
  test: Split


def teacher_export_dir(path: str | pathlib.Path) -> pathlib.Path:
  """A teacher export folder, given it or the translate workdir that holds it (resolved as
  config.teacher.path is for text runs), or a CheckpointError when neither holds one."""
  export = config_lib.teacher_export_dir(str(path)).absolute()
  if not (export / 'model.json').is_file():
    raise checkpoint.CheckpointError(
      f'{pathlib.Path(path).absolute()}: no teacher export (expected model.json here or in '
      'teacher/export/teacher)'
    )
  return export


def make_tokenizer(config, train_sources, train_targets, workdir: pathlib.Path):
  """The run's joint subword tokenizer: a reused teacher's, else the one saved in the
  workdir (a resumed run must not change token ids), else trained on the training split."""
  if config.teacher_path:
    return subword.SubwordTokenizer.load(teacher_export_dir(config.teacher_path))
  if (workdir / subword.FILENAME).is_file():
    return subword.SubwordTokenizer.load(workdir)
  started = time.perf_counter()
  tok = subword.train_subword(
    list(train_sources) + list(train_targets), config.data.vocab_size, config.data.tokenizer
  )
  tok.save(workdir)
  print(
    f'tokenizer: {config.data.tokenizer} vocabulary of {tok.vocab_size} trained in '
    f'{time.perf_counter() - started:.1f}s',
    flush=True,
  )
  return tok


def prepare(config, workdir: pathlib.Path) -> Corpus:
  d = config.data
  tfds_dir = d.tfds_data_dir or default_tfds_dir()

  def load(split: str, limit: int):
    sources, targets = multi30k.load_split(split, tfds_dir, d.raw_dir, d.source_lang, d.target_lang)
    return (sources[:limit], targets[:limit]) if limit else (sources, targets)

  raw = {
    'train': load('train', d.train_limit),
    'validation': load('validation', d.eval_limit),
    'test': load('test', d.eval_limit),
  }
  tok = make_tokenizer(config, *raw['train'], workdir)
  splits = {
    name: Split(
      sources,
      targets,
      tok.encode_batch(sources, d.max_len),
      tok.encode_batch(targets, d.max_len),
    )
    for name, (sources, targets) in raw.items()
  }
  return Corpus(tok, **splits)


# -- models ----------------------------------------------------------------------------------


def model_spec(config, role: str, vocab_size: int) -> dict:
  return {'model': MODEL_NAME, 'kwargs': {**config[role].to_dict(), 'vocab_size': vocab_size}}


def build(spec: dict) -> Seq2SeqTransformer:
  if spec.get('model') != MODEL_NAME:
    raise checkpoint.CheckpointError(
      f'export holds a {spec.get("model")!r} model, not a {MODEL_NAME!r} translation model'
    )
  return Seq2SeqTransformer(**spec['kwargs'])


def init_params(model: Seq2SeqTransformer, key: jax.Array):
  ids = jnp.full((2, 8), 5, jnp.int32)
  mask = jnp.ones((2, 8), jnp.int32)
  init = jax.jit(lambda k: model.init({'params': k}, ids, mask, ids, mask, deterministic=True))
  return init(key)['params']


def load_export(export_dir: pathlib.Path):
  """(model, params, tokenizer) of an exported translation model."""
  spec = checkpoint.read_export_spec(export_dir)
  model = build(spec)
  abstract = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
  params = checkpoint.load_export_params(export_dir, abstract)
  return model, params, subword.SubwordTokenizer.load(export_dir)


# -- decoding and BLEU -----------------------------------------------------------------------


def decode_ids(model, params, src_ids, decode_cfg, buckets, beam_size: int = 1, progress=None):
  """Token arrays (EOS and padding stripped) for every source, in order; greedy when
  beam_size is 1 (the two are equal there, and greedy is cheaper)."""
  out: list[np.ndarray | None] = [None] * len(src_ids)
  batches = ordered_batches(src_ids, src_ids, decode_cfg.batch_size, tuple(buckets))
  for number, batch in enumerate(batches):
    src, mask = jnp.asarray(batch['src_ids']), jnp.asarray(batch['src_mask'])
    if beam_size == 1:
      tokens, lengths = decode.greedy_decode(model, params, src, mask, max_len=decode_cfg.max_len)
    else:
      tokens, lengths, _ = decode.beam_search(
        model,
        params,
        src,
        mask,
        beam_size=beam_size,
        length_penalty=decode_cfg.length_penalty,
        max_len=decode_cfg.max_len,
      )
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    for row in np.flatnonzero(batch['weights'] > 0):
      seq = tokens[row, : lengths[row]]
      out[batch['index'][row]] = seq[:-1] if len(seq) and seq[-1] == subword.EOS_ID else seq
    if progress is not None:
      progress(number + 1)
  return out


def translate(model, params, tok, src_ids, decode_cfg, buckets, beam_size: int) -> list[str]:
  return tok.decode_batch(decode_ids(model, params, src_ids, decode_cfg, buckets, beam_size))


def score(model, params, corpus: Corpus, split: Split, decode_cfg, buckets, beam_size: int):
  """BLEU on `split` and decoding speed: the first pass compiles every batch shape, the
  second is timed."""
  hypotheses = translate(
    model, params, corpus.tokenizer, split.src_ids, decode_cfg, buckets, beam_size
  )
  started = time.perf_counter()
  decode_ids(model, params, split.src_ids, decode_cfg, buckets, beam_size)
  seconds = time.perf_counter() - started
  result = bleu.corpus_bleu(hypotheses, split.references)
  return {
    'bleu': result['bleu'],
    'signature': result['signature'],
    'sentences_per_sec': len(split.src_ids) / seconds,
  }, hypotheses


# -- sequence-level KD targets ---------------------------------------------------------------


def teacher_beam_targets(config, corpus: Corpus, teacher_dir: pathlib.Path, model, params):
  """The teacher's beam output for every training source, computed once and cached on disk
  under a key of (teacher export, source ids, tokenizer, beam settings); a corrupt or stale
  entry is reported and recomputed, never used."""
  k, d = config.kd, config.data
  spec = {
    'kind': 'beam',
    'beam_size': k.seq_beam_size,
    'length_penalty': k.seq_length_penalty,
    'max_len': config.decode.max_len,
  }
  key = teacher_cache.cache_key(
    teacher_cache.directory_fingerprint(teacher_dir),
    teacher_cache.ids_fingerprint(corpus.train.src_ids),
    corpus.tokenizer.fingerprint(),
    spec,
  )
  cache = teacher_cache.TeacherCache(default_cache_root())
  try:
    arrays = cache.load(key)
  except teacher_cache.CacheError as e:
    print(f'teacher beams: {e}; recomputing the entry', flush=True)
    arrays = None
  info = {'entry': str(cache.entry(key)), 'hit': arrays is not None, **spec}
  if arrays is None:
    started = time.perf_counter()
    n = len(corpus.train.src_ids)
    total = -(-n // config.decode.batch_size)
    every = max(1, total // 10)

    def progress(done):
      if done % every == 0 or done == total:
        print(
          f'teacher beams: {done}/{total} batches {time.perf_counter() - started:.0f}s', flush=True
        )

    decode_cfg = config.decode.copy_and_resolve_references()
    decode_cfg.length_penalty = k.seq_length_penalty
    seqs = decode_ids(
      model, params, corpus.train.src_ids, decode_cfg, d.buckets, k.seq_beam_size, progress
    )
    lengths = np.asarray([len(s) for s in seqs], np.int32)
    tokens = np.zeros((n, config.decode.max_len), np.int32)
    for i, s in enumerate(seqs):
      tokens[i, : len(s)] = s
    arrays = {'tokens': tokens, 'lengths': lengths}
    cache.store(key, arrays, {'examples': n, 'spec': spec})
    info['compute_seconds'] = time.perf_counter() - started
    info['sentences_per_sec'] = n / info['compute_seconds']
  else:
    print(f'teacher beams: reusing {info["entry"]}', flush=True)
  # Targets keep at most data.max_len tokens, like references (EOS is added by the batches).
  return [
    arrays['tokens'][i, : min(int(length), d.max_len)] for i, length in enumerate(arrays['lengths'])
  ], info


# -- stages ----------------------------------------------------------------------------------


def _loss_fn(name: str, config, model, teacher_model):
  t, k = config.train, config.kd
  if name in ('teacher', 'student_alone', 'seq_kd'):
    return sequence.supervised_loss_fn(model, t.label_smoothing)
  if name in ('word_kd', 'seq_word_kd'):
    return sequence.word_kd_loss_fn(
      model, teacher_model, k.word_weight, k.temperature, t.label_smoothing
    )
  return sequence.on_policy_loss_fn(
    model,
    teacher_model,
    k.on_policy_weight,
    k.jsd_beta,
    k.word_weight,
    k.temperature,
    k.sample_temperature,
    t.label_smoothing,
  )


def run_stage(name, config, corpus: Corpus, workdir, writer, teacher) -> dict:
  """Trains, exports and scores one stage; `teacher` is (dir, model, params) or None."""
  stage_dir = workdir / name
  finished = report.finished_stage(stage_dir, name)
  if finished is not None:
    return finished
  stage_dir.mkdir(parents=True, exist_ok=True)
  started = time.perf_counter()
  role = role_of(name)
  spec = model_spec(config, role, corpus.tokenizer.vocab_size)
  model = build(spec)
  key = jax.random.PRNGKey(config.seed)
  params = init_params(model, jax.random.fold_in(key, ROLE_SEEDS[role]))
  teacher_model = teacher_params = None
  extra: dict = {}
  targets = corpus.train.tgt_ids
  if name not in WITHOUT_TEACHER:
    teacher_dir, teacher_model, teacher_params = teacher
    if name in SEQ_KD_STAGES:
      targets, extra['teacher_beams'] = teacher_beam_targets(
        config, corpus, teacher_dir, teacher_model, teacher_params
      )
  t = config.train
  steps = t.teacher_steps if role == 'teacher' else t.student_steps
  optim_cfg = config[f'{role}_optim']
  batches = TranslationBatches(
    corpus.train.src_ids,
    targets,
    t.batch_size,
    tuple(config.data.buckets),
    shuffle=True,
    seed=config.seed,
    drop_remainder=True,
  )
  val = corpus.validation
  val_ids = val.src_ids[: t.eval_sentences]

  def periodic_eval(p):
    hyps = translate(model, p, corpus.tokenizer, val_ids, config.decode, config.data.buckets, 1)
    return {'val_bleu_greedy': bleu.corpus_bleu(hyps, val.references[: len(hyps)])['bleu']}

  stage_spec = loop.StageSpec(
    name=name,
    loss_fn=_loss_fn(name, config, model, teacher_model),
    tx=optim.make_optimizer(optim_cfg, steps),
    schedule=optim.learning_rate_schedule(optim_cfg, steps),
    params=params,
    rng=jax.random.fold_in(key, STAGE_SEEDS[name]),
    steps=steps,
    teacher_params=teacher_params,
    evaluate=periodic_eval,
  )
  trained, info = loop.train_stage(stage_spec, batches, stage_dir, t, writer)
  export_dir = stage_dir / 'export' / role
  checkpoint.export_model(export_dir, trained, spec)
  corpus.tokenizer.save(export_dir)

  buckets, dc = config.data.buckets, config.decode
  greedy, _ = score(model, trained, corpus, corpus.test, dc, buckets, 1)
  beam, hypotheses = score(model, trained, corpus, corpus.test, dc, buckets, dc.beam_size)
  (stage_dir / 'test_beam.txt').write_text('\n'.join(hypotheses) + '\n', encoding='utf-8')
  result = {
    'model': spec,
    **model_stats(trained),
    'steps': info['steps'],
    'train_examples_per_sec': info['train_examples_per_sec'],
    'test_bleu_greedy': greedy['bleu'],
    'test_bleu_beam': beam['bleu'],
    'bleu_signature': beam['signature'],
    'greedy_sentences_per_sec': greedy['sentences_per_sec'],
    'beam_sentences_per_sec': beam['sentences_per_sec'],
    'val_bleu_greedy': periodic_eval(trained)['val_bleu_greedy'],
    **extra,
    'wall_time_sec': time.perf_counter() - started,
  }
  writer.write({'stage': name, 'step': steps, 'final': True, 'test_bleu_beam': beam['bleu']})
  report.write_json(stage_dir / 'result.json', result)
  print(
    f'[{name}] test BLEU greedy {greedy["bleu"]:.2f} beam{dc.beam_size} {beam["bleu"]:.2f}; '
    f'{greedy["sentences_per_sec"]:.0f} / {beam["sentences_per_sec"]:.0f} sentences/s',
    flush=True,
  )
  return result


def results_table(stages: dict) -> str:
  rows = [
    '| stage | params | test BLEU greedy | test BLEU beam | greedy sent/s | beam sent/s |',
    '|---|---|---|---|---|---|',
  ]
  for name, r in stages.items():
    rows.append(
      f'| {name} | {r["params"] / 1e6:.2f} M | {r["test_bleu_greedy"]:.2f} | '
      f'{r["test_bleu_beam"]:.2f} | {r["greedy_sentences_per_sec"]:.0f} | '
      f'{r["beam_sentences_per_sec"]:.0f} |'
    )
  return '\n'.join(rows)


def run(config, workdir) -> dict:
  validate(config)
  workdir = pathlib.Path(workdir).expanduser().absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  config_lib.check_workdir_config(config, workdir, schema.get_config)
  corpus = prepare(config, workdir)
  print(
    f'data: {len(corpus.train.src_ids)} train / {len(corpus.validation.src_ids)} validation / '
    f'{len(corpus.test.src_ids)} test pairs ({config.data.source_lang}->'
    f'{config.data.target_lang}), vocabulary {corpus.tokenizer.vocab_size}',
    flush=True,
  )
  writer = report.MetricsWriter(workdir / 'metrics.jsonl')
  stages, teacher = {}, None
  for name in config.stages:
    if name not in WITHOUT_TEACHER and teacher is None:
      teacher_dir = (
        workdir / 'teacher' / 'export' / 'teacher'
        if 'teacher' in stages
        else teacher_export_dir(config.teacher_path)
      )
      teacher = (teacher_dir, *load_export(teacher_dir)[:2])
    stages[name] = run_stage(name, config, corpus, workdir, writer, teacher)
  students = [s for s in config.stages if s != 'teacher']
  results = {
    'schema_version': RESULTS_SCHEMA_VERSION,
    'name': config.name,
    'seed': config.seed,
    'direction': f'{config.data.source_lang}->{config.data.target_lang}',
    'test_set': f'Multi30k test_2016_flickr, {len(corpus.test.src_ids)} sentences',
    'stages': stages,
    'final_student': f'{students[-1]}/export/student' if students else None,
    'wall_time_sec': sum(s['wall_time_sec'] for s in stages.values()),
  }
  report.write_json(workdir / 'results.json', results)
  table = results_table(stages)
  (workdir / 'report.md').write_text(f'# {config.name}\n\n{table}\n', encoding='utf-8')
  print(table, flush=True)
  return results


if __name__ == '__main__':
  from kdjax.cli import run_config_main

  run_config_main(run)
