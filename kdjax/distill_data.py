"""What the distillation stage trains on: the transfer set (gold training examples plus
optional augmented copies) and the teacher's outputs for it, read from the teacher-output
cache when enabled (`config.distill.teacher_cache`) or computed live in every step."""

from __future__ import annotations

import os
import pathlib
import time

import jax
import numpy as np

from kdjax import config as config_lib
from kdjax import teacher_cache
from kdjax.data import augment, pipeline
from kdjax.kd import objective as kd_objective
from kdjax.models import from_teacher

# Augmented inputs have no gold label; the loss skips them in CE and accuracy.
NO_LABEL = -1


def default_cache_root() -> pathlib.Path:
  base = pathlib.Path(os.environ.get('KDJAX_CACHE', '~/.cache/kdjax')).expanduser()
  return base / 'teacher_outputs'


def replacement_neighbours(config, texts, tokenizer, teacher_params):
  """The word -> nearest-words map that `distill.augment_replace='neighbours'` swaps from,
  for the words of `texts`, taken from the teacher's input embedding table; None when the
  transfer set draws replacements by unigram frequency or is not augmented."""
  d = config.distill
  if not d.augment_copies or d.augment_replace == 'unigram':
    return None
  # A BERT's params (a dict or FrozenDict) hold embeddings/word_embeddings at the top level.
  if 'word_embeddings' not in teacher_params.get('embeddings', {}):
    raise config_lib.ConfigError(
      "config.distill.augment_replace='neighbours' needs a BERT teacher (params "
      f"embeddings/word_embeddings); this teacher's top-level params are {sorted(teacher_params)}"
    )
  start = time.perf_counter()
  table = np.asarray(from_teacher.teacher_word_table(teacher_params), np.float32)
  words = [w for t in texts for w in t.split()]
  neighbours = augment.embedding_neighbours(words, tokenizer.vocab(), table, d.augment_neighbours)
  print(
    f'distill: {d.augment_neighbours} embedding neighbours for {len(neighbours)} words '
    f'({time.perf_counter() - start:.0f}s)',
    flush=True,
  )
  return neighbours


def transfer_set(
  config, train_text, train_ids, train_labels, tokenizer, stream=None, neighbours=None
):
  """(token ids, labels) of the gold examples followed by their augmented copies; a data
  shard passes its id as `stream` so shards draw different augmentations. `neighbours`:
  from `replacement_neighbours`."""
  d = config.distill
  if not d.augment_copies:
    return train_ids, train_labels
  extra = augment.augment(
    train_text,
    d.augment_copies,
    seed=d.augment_seed if stream is None else [d.augment_seed, stream],
    mask_prob=d.augment_mask_prob,
    replace_prob=d.augment_replace_prob,
    ngram_prob=d.augment_ngram_prob,
    neighbours=neighbours,
  )
  extra_ids = pipeline.encode(extra, tokenizer, config.data.max_len)
  print(f'distill: {len(extra)} augmented sentences added to {len(train_ids)}', flush=True)
  labels = np.concatenate([train_labels, np.full(len(extra), NO_LABEL, np.int32)])
  return list(train_ids) + list(extra_ids), labels


def cached_teacher_outputs(config, ids, tokenizer, teacher_dir, teacher_model, teacher_params):
  """({'logits': [N, C], and 'pooled': [N, D] when a pooled term needs it} for every example
  of `ids`, cache info), or (None, info) when the cache is off."""
  d = config.distill
  if d.teacher_cache == 'off':
    return None, {'mode': 'off'}
  pooled = kd_objective.needs_teacher_pooled(config.loss)
  spec = {'kind': d.teacher_cache, 'k': d.cache_topk if d.teacher_cache == 'topk' else None}
  if pooled:  # only then, so the keys of logits-only entries stay what they were
    spec['pooled'] = True
  key = teacher_cache.cache_key(
    teacher_cache.directory_fingerprint(teacher_dir),
    teacher_cache.ids_fingerprint(ids),
    tokenizer.fingerprint,
    spec,
  )
  cache = teacher_cache.TeacherCache(d.cache_dir or default_cache_root())
  try:
    arrays = cache.load(key)
    if arrays is not None and pooled and 'pooled' not in arrays:
      raise teacher_cache.CacheError(f'{cache.entry(key)}: no pooled vectors in the entry')
  except teacher_cache.CacheError as e:
    print(f'teacher cache: {e}; recomputing the entry', flush=True)
    arrays = None
  info = {'mode': d.teacher_cache, 'entry': str(cache.entry(key)), 'hit': arrays is not None}
  if arrays is None:
    start = time.perf_counter()
    teacher_fn = jax.jit(
      lambda p, b: teacher_model.apply({'params': p}, b['input_ids'], b['attention_mask'])
    )
    batches = pipeline.BatchIterator(
      ids,
      np.zeros(len(ids), np.int32),
      config.train.eval_batch_size,
      tuple(config.data.buckets),
      seed=0,
      shuffle=False,
      drop_remainder=False,
      sort_by_length=True,
    )
    outputs = teacher_cache.compute_outputs(
      lambda b: jax.device_get(teacher_fn(teacher_params, b)),
      _with_progress(batches.one_epoch(), batches.batches_per_epoch, start),
      len(ids),
      pooled,
    )
    arrays = dict(outputs)
    if d.teacher_cache == 'topk':  # the logits are stored as their top k + the rest's lse
      arrays.update(teacher_cache.compress_topk(arrays.pop('logits'), d.cache_topk))
    cache.store(key, arrays, {'examples': len(ids), 'spec': spec})
    info['compute_seconds'] = time.perf_counter() - start
    print(
      f'teacher cache: {len(ids)} examples in {info["compute_seconds"]:.0f}s -> {info["entry"]}',
      flush=True,
    )
  else:
    print(f'teacher cache: reusing {info["entry"]}', flush=True)
  logits = (
    arrays['logits']
    if d.teacher_cache == 'logits'
    else teacher_cache.expand_topk(
      arrays['topk_values'], arrays['topk_indices'], arrays['lse_rest'], teacher_model.num_classes
    )
  )
  return {'logits': logits, **({'pooled': arrays['pooled']} if pooled else {})}, info


def _with_progress(batches, total: int, start: float):
  """Passes batches through, printing progress about every tenth of the way: filling the
  cache is a long teacher pass (minutes to tens of minutes on a CPU)."""
  every = max(total // 10, 1)
  for i, batch in enumerate(batches, start=1):
    yield batch
    if i % every == 0 or i == total:
      elapsed = time.perf_counter() - start
      print(
        f'teacher cache: batch {i}/{total}, {elapsed:.0f}s, eta {elapsed * (total - i) / i:.0f}s',
        flush=True,
      )
