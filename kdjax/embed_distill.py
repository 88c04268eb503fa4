"""Sentence-embedding distillation: a small BERT student learns a teacher's sentence embeddings.

  python -m kdjax.embed_distill --config=experiments/stsb_embed_distill.py --workdir=DIR

The teacher (all-MiniLM-L6-v2 by default) embeds an unlabeled English corpus once
(`kdjax.embedding_cache`); the student is trained to reproduce those embeddings with
MSE + cosine losses by the resumable loop every kdjax stage uses, and both are scored by the
Spearman correlation between embedding cosine and gold similarity on STS-B dev. Re-running
the same command after a kill resumes; a finished run prints its results again.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import checkpoint, embedding_cache, loop, optim, report
from kdjax import config as config_lib
from kdjax import sentence_embed as se
from kdjax.cli import run_config_main
from kdjax.data import corpus as corpus_lib
from kdjax.data import pipeline, stsb, wordpiece
from kdjax.models import bert, from_teacher, hf_bert
from kdjax.train import default_tfds_dir

STAGE = 'embed_distill'
RESULTS_SCHEMA_VERSION = 1


# -- config ----------------------------------------------------------------------------


def _require(ok: bool, key: str, value, valid: str) -> None:
  if not ok:
    raise config_lib.ConfigError(f'config.{key}={value!r} is invalid: {valid}')


def validate(config, teacher_kwargs: dict) -> None:
  """Every bad value is reported before the corpus is read or anything compiles."""
  d, s, loss, t = config.data, config.student, config.loss, config.train
  sources = tuple(d.sources)
  _require(
    bool(sources) and set(sources) <= set(corpus_lib.SOURCES) and len(set(sources)) == len(sources),
    'data.sources',
    sources,
    f'a non-empty tuple of distinct names from {", ".join(corpus_lib.SOURCES)}',
  )
  _require(
    2 <= d.max_len <= teacher_kwargs['max_len'],
    'data.max_len',
    d.max_len,
    f"between 2 and the teacher's {teacher_kwargs['max_len']} positions",
  )
  buckets = tuple(d.buckets)
  _require(
    bool(buckets)
    and buckets[0] > 0
    and list(buckets) == sorted(set(buckets))
    and buckets[-1] == d.max_len,
    'data.buckets',
    buckets,
    f'strictly increasing positive lengths ending at data.max_len={d.max_len}',
  )
  for key in ('corpus_limit', 'eval_limit'):
    _require(d[key] >= 0, f'data.{key}', d[key], 'must be >= 0 (0 = all)')
  _require(d.eval_limit != 1, 'data.eval_limit', d.eval_limit, 'a correlation needs >= 2 pairs')
  for key in ('num_layers', 'hidden_size', 'num_heads', 'intermediate_size'):
    _require(s[key] >= 1, f'student.{key}', s[key], 'must be >= 1')
  _require(
    s.hidden_size % s.num_heads == 0,
    'student.hidden_size',
    s.hidden_size,
    f'must be divisible by student.num_heads={s.num_heads}',
  )
  _require(s.init_from in ('teacher', ''), 'student.init_from', s.init_from, "'teacher' or ''")
  if s.init_from == 'teacher':
    for key in ('hidden_size', 'num_heads'):
      _require(
        s[key] == teacher_kwargs[key],
        f'student.{key}',
        s[key],
        f"init_from='teacher' copies teacher layers, so it must equal the teacher's "
        f"{teacher_kwargs[key]} (or set student.init_from='')",
      )
    _require(
      s.num_layers <= teacher_kwargs['num_layers'],
      'student.num_layers',
      s.num_layers,
      f"at most the teacher's {teacher_kwargs['num_layers']} layers with init_from='teacher'",
    )
    _require(
      s.intermediate_size <= teacher_kwargs['intermediate_size'],
      'student.intermediate_size',
      s.intermediate_size,
      f"at most the teacher's {teacher_kwargs['intermediate_size']} (FFN pruning keeps a subset)",
    )
    layers = tuple(s.init_layers)
    _require(
      not layers
      or (
        len(layers) == s.num_layers and all(0 <= i < teacher_kwargs['num_layers'] for i in layers)
      ),
      'student.init_layers',
      layers,
      f'() or {s.num_layers} teacher layer indices in 0..{teacher_kwargs["num_layers"] - 1}',
    )
  else:
    _require(
      not s.freeze_word_embeddings,
      'student.freeze_word_embeddings',
      True,
      "a randomly initialised table must be trained: set it False or init_from='teacher'",
    )
    _require(
      not tuple(s.init_layers),
      'student.init_layers',
      tuple(s.init_layers),
      "needs init_from='teacher'",
    )
  _require(loss.mse_weight >= 0, 'loss.mse_weight', loss.mse_weight, 'must be >= 0')
  _require(loss.cosine_weight >= 0, 'loss.cosine_weight', loss.cosine_weight, 'must be >= 0')
  _require(
    loss.mse_weight + loss.cosine_weight > 0,
    'loss.mse_weight',
    loss.mse_weight,
    'mse_weight and cosine_weight cannot both be 0',
  )
  config_lib._validate_optimizer(config.optim, 'optim')
  for key in (
    'batch_size',
    'steps',
    'log_every',
    'checkpoint_every',
    'keep_checkpoints',
    'eval_batch_size',
  ):
    _require(t[key] >= 1, f'train.{key}', t[key], 'must be >= 1')
  _require(
    t.eval_every >= 0, 'train.eval_every', t.eval_every, 'must be >= 0 (0 = only at the end)'
  )


# -- models ----------------------------------------------------------------------------


def teacher_model(teacher_kwargs: dict) -> se.SentenceEncoder:
  return se.SentenceEncoder(bert.BertEncoder(**teacher_kwargs))


def student_model(config, teacher_kwargs: dict) -> se.SentenceEncoder:
  s = config.student
  encoder = bert.BertEncoder(
    vocab_size=teacher_kwargs['vocab_size'],  # the teacher's tokenizer, so the same ids
    hidden_size=s.hidden_size,
    num_layers=s.num_layers,
    num_heads=s.num_heads,
    intermediate_size=s.intermediate_size,
    max_len=config.data.max_len,
    type_vocab_size=teacher_kwargs['type_vocab_size'],
    dropout_rate=s.dropout_rate,
    attention_dropout_rate=s.attention_dropout_rate,
    layer_norm_eps=teacher_kwargs['layer_norm_eps'],
  )
  width = teacher_kwargs['hidden_size']
  return se.SentenceEncoder(encoder, projection_size=0 if s.hidden_size == width else width)


def init_params(model: se.SentenceEncoder, key: jax.Array):
  ids = jnp.ones((1, 4), jnp.int32)
  return jax.device_get(jax.jit(model.init)(key, ids, jnp.ones_like(ids))['params'])


def load_teacher(checkpoint_name: str, teacher_kwargs: dict):
  model = teacher_model(teacher_kwargs)
  # Shapes only: every tensor comes from the checkpoint, so a random init would be wasted.
  ids = jnp.ones((1, 4), jnp.int32)
  target = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids, ids)['params']
  encoder, _ = hf_bert.load_bert_params(checkpoint_name, target['encoder'], keep_from_target=())
  # On the device once: a numpy tree would be copied over again by every jitted call.
  return model, jax.device_put({'encoder': encoder})


def initial_student_params(config, model: se.SentenceEncoder, teacher_params) -> tuple[dict, dict]:
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)
  if config.student.init_from != 'teacher':
    return init_params(model, key), {'init_from': 'random'}
  # Every student tensor is copied from the teacher: its shapes are all that is needed.
  ids = jnp.ones((1, 4), jnp.int32)
  shapes = jax.eval_shape(model.init, key, ids, ids)['params']
  encoder, info = from_teacher.bert_from_teacher(
    jax.device_get(teacher_params['encoder']), shapes['encoder'], tuple(config.student.init_layers)
  )
  # validate() requires the teacher's width here, so there is no projection to initialise.
  return {'encoder': encoder}, {'init_from': 'teacher', **info}


def parameter_counts(params) -> dict:
  """Word/position/type embeddings and their LayerNorm vs everything else (layers, projection)."""
  embedding = sum(
    int(np.size(x)) for x in jax.tree_util.tree_leaves(params['encoder']['embeddings'])
  )
  total = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
  return {'embedding': embedding, 'non_embedding': total - embedding, 'total': total}


# -- training --------------------------------------------------------------------------


def split_frozen(params, freeze_word_embeddings: bool) -> tuple[dict, dict]:
  """(trainable, frozen): the word-embedding table moves to `frozen` if it is not trained."""
  if not freeze_word_embeddings:
    return params, {}
  embeddings = dict(params['encoder']['embeddings'])
  table = embeddings.pop('word_embeddings')
  trainable = dict(params, encoder=dict(params['encoder'], embeddings=embeddings))
  return trainable, {'word_embeddings': table}


def merge_frozen(trainable, frozen: dict):
  if not frozen:
    return trainable
  embeddings = dict(trainable['encoder']['embeddings'], **frozen)
  return dict(trainable, encoder=dict(trainable['encoder'], embeddings=embeddings))


def make_loss_fn(student: se.SentenceEncoder, loss_cfg):
  # The loop hands every step a frozen, non-donated second argument (for distillation, the
  # teacher's params). Here the teacher's embeddings come in the batch, so that slot carries
  # the student's frozen word-embedding table: no gradient, optimizer state or checkpoint
  # space is spent on it.
  def loss_fn(trainable, frozen, batch, rng, step):
    del step  # constant weights: embedding distillation has no schedules
    embeddings = student.apply(
      {'params': merge_frozen(trainable, frozen)},
      batch['input_ids'],
      batch['attention_mask'],
      deterministic=False,
      rngs={'dropout': rng},
    )
    return se.embedding_loss(
      embeddings,
      batch['teacher_embedding'],
      batch['weights'],
      loss_cfg.mse_weight,
      loss_cfg.cosine_weight,
      loss_cfg.normalize,
    )

  return loss_fn


# -- the run ---------------------------------------------------------------------------


def run(config, workdir: str | pathlib.Path) -> dict:
  start = time.perf_counter()
  workdir = pathlib.Path(workdir).expanduser().absolute()
  results_path = workdir / 'results.json'
  teacher_dir = hf_bert.resolve(config.teacher.checkpoint)
  teacher_kwargs = hf_bert.bert_kwargs(teacher_dir)
  validate(config, teacher_kwargs)
  workdir.mkdir(parents=True, exist_ok=True)
  config_lib.check_workdir_config(config, workdir)
  if results_path.exists():
    print(f'already complete ({results_path})', flush=True)
    results = json.loads(results_path.read_text())
    _print_summary(results)
    return results

  d = config.data
  tokenizer = wordpiece.WordPieceTokenizer.load(teacher_dir)
  corpus = corpus_lib.load_corpus(
    d.tfds_data_dir or default_tfds_dir(),
    tuple(d.sources),
    d.sst2_raw_dir,
    d.stsb_dir,
    d.multi30k_path,
  )
  sentences = corpus.sentences[: d.corpus_limit] if d.corpus_limit else corpus.sentences
  print(f'corpus: {len(sentences)} sentences {corpus.stats}', flush=True)
  token_ids = pipeline.encode(sentences, tokenizer, d.max_len)
  dev = stsb.load_split('dev', d.stsb_dir)
  dev = dev.head(d.eval_limit) if d.eval_limit else dev
  buckets = tuple(d.buckets)

  teacher, teacher_params = load_teacher(config.teacher.checkpoint, teacher_kwargs)
  teacher_embed = se.make_embed_fn(teacher)
  parts = embedding_cache.key_parts(
    embedding_cache.checkpoint_fingerprint(teacher_dir),
    corpus_lib.sentences_fingerprint(sentences),
    tokenizer.fingerprint,
    d.max_len,
  )

  def compute_teacher_embeddings():
    began = time.perf_counter()
    array = se.embed_all(
      teacher_embed,
      teacher_params,
      token_ids,
      config.train.eval_batch_size,
      buckets,
      label='teacher',
      progress_every=max(1, len(token_ids) // config.train.eval_batch_size // 20),
    )
    seconds = time.perf_counter() - began
    return array, {
      'sentences': len(sentences),
      'teacher_checkpoint': str(teacher_dir),
      'seconds': seconds,
      'sentences_per_sec': len(sentences) / seconds,
    }

  targets, teacher_pass = embedding_cache.load_or_compute(
    embedding_cache.EmbeddingStore(workdir), parts, compute_teacher_embeddings
  )
  if targets.shape[0] != len(sentences):  # the key covers the corpus, so this is a bug
    raise RuntimeError(f'{targets.shape[0]} teacher embeddings for {len(sentences)} sentences')

  def dev_spearman(model_embed, params) -> float:
    return se.sts_spearman(
      model_embed, params, tokenizer, dev, d.max_len, buckets, config.train.eval_batch_size
    )

  began = time.perf_counter()
  teacher_spearman = dev_spearman(teacher_embed, teacher_params)
  teacher_eval_seconds = time.perf_counter() - began
  print(f'teacher: STS-B dev Spearman {teacher_spearman:.4f} ({len(dev)} pairs)', flush=True)

  student = student_model(config, teacher_kwargs)
  params, init_info = initial_student_params(config, student, teacher_params)
  counts = {'teacher': parameter_counts(teacher_params), 'student': parameter_counts(params)}
  ratio = counts['student']['non_embedding'] / counts['teacher']['non_embedding']
  for role, c in counts.items():
    print(
      f'{role}: {c["non_embedding"]:,} non-embedding + {c["embedding"]:,} embedding '
      f'= {c["total"]:,} parameters',
      flush=True,
    )
  print(f'student/teacher non-embedding parameters: {ratio:.3f}; init {init_info}', flush=True)
  student_embed = se.make_embed_fn(student)

  t = config.train
  tx = optim.make_optimizer(config.optim, t.steps)
  batches = pipeline.BatchIterator(
    token_ids,
    np.zeros(len(token_ids), np.int32),
    t.batch_size,
    buckets,
    config.seed,
    shuffle=True,
    drop_remainder=True,
    bucket_window=d.bucket_window,
  )
  trainable, frozen = split_frozen(params, config.student.freeze_word_embeddings)
  frozen = jax.device_put(frozen)  # once, not a host-to-device copy of the table every step
  spec = loop.StageSpec(
    name=STAGE,
    loss_fn=make_loss_fn(student, config.loss),
    tx=tx,
    schedule=optim.learning_rate_schedule(config.optim, t.steps),
    params=trainable,
    rng=jax.random.fold_in(jax.random.PRNGKey(config.seed), 14),
    steps=t.steps,
    teacher_params=frozen,
    evaluate=lambda p: {'stsb_spearman': dev_spearman(student_embed, merge_frozen(p, frozen))},
  )
  began = time.perf_counter()
  writer = report.MetricsWriter(workdir / 'metrics.jsonl')
  trainable, train_info = loop.train_stage(
    spec, pipeline.WithRowData(batches, 'teacher_embedding', targets), workdir / STAGE, t, writer
  )
  train_seconds = time.perf_counter() - began
  params = merge_frozen(trainable, frozen)
  student_spearman = dev_spearman(student_embed, params)
  writer.write({'stage': STAGE, 'step': t.steps, 'eval_stsb_spearman': student_spearman})
  checkpoint.export_model(
    workdir / 'export' / 'student',
    params,
    {'model': 'sentence_encoder', 'kwargs': config.student.to_dict(), 'max_len': d.max_len},
  )
  results = {
    'schema_version': RESULTS_SCHEMA_VERSION,
    'name': config.name,
    'eval_set': f'STS-B dev, {len(dev)} pairs; Spearman of cosine vs gold score',
    'teacher': {
      'checkpoint': str(teacher_dir),
      'stsb_dev_spearman': teacher_spearman,
      'params': counts['teacher'],
      'eval_seconds': teacher_eval_seconds,
    },
    'student': {
      'stsb_dev_spearman': student_spearman,
      'params': counts['student'],
      'non_embedding_ratio_to_teacher': ratio,
      'init': init_info,
      'projection': bool(student.projection_size),
      'trained_params': sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(trainable)),
    },
    'corpus': {'sentences': len(sentences), 'fingerprint': parts['corpus_sha256'], **corpus.stats},
    'teacher_embeddings': teacher_pass,
    # Covers this process only: a resumed run times the steps it ran itself.
    'training': {'seconds_this_process': train_seconds, **train_info, 'batch_size': t.batch_size},
    'wall_seconds_this_process': time.perf_counter() - start,
  }
  report.write_json(results_path, results)
  _print_summary(results)
  return results


def _print_summary(results: dict) -> None:
  teacher, student = results['teacher'], results['student']
  print(
    f'STS-B dev Spearman: teacher {teacher["stsb_dev_spearman"]:.4f} '
    f'({teacher["params"]["non_embedding"]:,} non-embedding params), student '
    f'{student["stsb_dev_spearman"]:.4f} ({student["params"]["non_embedding"]:,}, '
    f'{student["non_embedding_ratio_to_teacher"]:.3f}x)',
    flush=True,
  )


# -- command line ----------------------------------------------------------------------


if __name__ == '__main__':
  run_config_main(run)
