"""Teacher-output cache: keys, integrity checks, top-k compression, and that a step fed
cached logits equals a step that runs the teacher live. Transfer-set augmentation too."""

import json

import jax
import numpy as np
import pytest

from configs import default
from configs import models as presets
from kdjax import optim, teacher_cache
from kdjax import step as step_lib
from kdjax.data import augment, pipeline
from kdjax.kd import objective as kd_objective
from kdjax.models import registry

VOCAB = 50


def _ids(n=37, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(4, VOCAB, rng.integers(2, 20)).astype(np.int32) for _ in range(n)]


def _model(preset):
  p = presets.PRESETS[preset]()
  return registry.build_model(p.model, vocab_size=VOCAB, num_classes=2, **p.kwargs.to_dict())


def test_key_changes_with_teacher_ids_tokenizer_and_spec():
  ids = _ids()
  base = ('t' * 64, teacher_cache.ids_fingerprint(ids), 'tok', {'kind': 'logits'})
  key = teacher_cache.cache_key(*base)
  assert key == teacher_cache.cache_key(*base)
  changed_ids = [x.copy() for x in ids]
  changed_ids[5][0] += 1
  variants = [
    ('u' * 64, *base[1:]),
    (base[0], teacher_cache.ids_fingerprint(changed_ids), *base[2:]),
    (base[0], teacher_cache.ids_fingerprint(ids[:-1]), *base[2:]),
    (*base[:2], 'other', base[3]),
    (*base[:3], {'kind': 'topk', 'k': 1}),
  ]
  assert len({teacher_cache.cache_key(*v) for v in variants} | {key}) == len(variants) + 1


def test_directory_fingerprint_sees_content_and_ignores_the_cache_folder(tmp_path):
  (tmp_path / 'params').mkdir()
  (tmp_path / 'params' / 'a').write_bytes(b'123')
  before = teacher_cache.directory_fingerprint(tmp_path)
  (tmp_path / 'cache').mkdir()
  (tmp_path / 'cache' / 'x').write_bytes(b'anything')
  assert teacher_cache.directory_fingerprint(tmp_path) == before
  (tmp_path / 'params' / 'a').write_bytes(b'124')
  assert teacher_cache.directory_fingerprint(tmp_path) != before


def test_store_load_round_trip_and_corruption_is_detected(tmp_path):
  cache = teacher_cache.TeacherCache(tmp_path)
  logits = np.random.default_rng(0).normal(size=(11, 3)).astype(np.float32)
  entry = cache.store('k1', {'logits': logits}, {'examples': 11})
  assert cache.load('missing') is None
  np.testing.assert_array_equal(cache.load('k1')['logits'], logits)
  # Flip one byte of the stored array: the checksum must catch it.
  path = entry / 'logits.npy'
  data = bytearray(path.read_bytes())
  data[-1] ^= 0xFF
  path.write_bytes(bytes(data))
  with pytest.raises(teacher_cache.CacheError, match=r'logits\.npy: sha256'):
    cache.load('k1')
  # A stale entry (metadata for another key) is refused too, naming the file.
  cache.store('k2', {'logits': logits}, {})
  meta = json.loads((tmp_path / 'k2' / 'meta.json').read_text())
  meta['key'] = 'k3'
  (tmp_path / 'k2' / 'meta.json').write_text(json.dumps(meta))
  with pytest.raises(teacher_cache.CacheError, match='meta.json: entry records key'):
    cache.load('k2')
  (tmp_path / 'k2' / 'meta.json').write_text('{not json')
  with pytest.raises(teacher_cache.CacheError, match='unreadable cache metadata'):
    cache.load('k2')
  # Re-storing replaces a corrupt entry.
  cache.store('k1', {'logits': logits}, {})
  np.testing.assert_array_equal(cache.load('k1')['logits'], logits)


def _softmax(x, t=1.0):
  z = np.exp((x - x.max(-1, keepdims=True)) / t)
  return z / z.sum(-1, keepdims=True)


def test_topk_is_exact_on_top_classes_and_total_mass():
  logits = np.random.default_rng(1).normal(size=(20, 7)) * 3
  packed = teacher_cache.compress_topk(logits, 3)
  dense = teacher_cache.expand_topk(
    packed['topk_values'], packed['topk_indices'], packed['lse_rest'], 7
  )
  p, q = _softmax(logits), _softmax(dense.astype(np.float64))
  top = np.argsort(-logits, axis=-1)[:, :3]
  np.testing.assert_allclose(
    np.take_along_axis(q, top, -1), np.take_along_axis(p, top, -1), atol=1e-6
  )
  # The rest of the mass is kept in total and spread evenly.
  rest = np.argsort(-logits, axis=-1)[:, 3:]
  np.testing.assert_allclose(
    np.take_along_axis(q, rest, -1).sum(-1), np.take_along_axis(p, rest, -1).sum(-1), atol=1e-6
  )
  assert np.allclose(np.take_along_axis(q, rest, -1).std(-1), 0, atol=1e-7)


def test_topk_with_k_equal_classes_minus_one_is_lossless():
  logits = np.random.default_rng(2).normal(size=(9, 2)).astype(np.float32)
  packed = teacher_cache.compress_topk(logits, 1)
  dense = teacher_cache.expand_topk(
    packed['topk_values'], packed['topk_indices'], packed['lse_rest'], 2
  )
  np.testing.assert_allclose(dense, logits, atol=1e-6)
  with pytest.raises(ValueError, match='k < num_classes'):
    teacher_cache.compress_topk(logits, 2)


@pytest.mark.parametrize('sort_by_length', [False, True])
def test_compute_outputs_covers_every_example_in_order(sort_by_length):
  ids = _ids(23)
  batches = pipeline.BatchIterator(
    ids,
    np.zeros(23, np.int32),
    8,
    (8, 16, 32),
    seed=0,
    shuffle=False,
    drop_remainder=False,
    sort_by_length=sort_by_length,
  )
  if sort_by_length:  # shortest first, so each batch pads to its own bucket
    lengths = [max(len(ids[i]) for i in b) for b in batches.epoch_batches(0)]
    assert lengths == sorted(lengths)
  # A fake teacher whose logits encode the row's first token, so order errors show.
  forward = lambda b: (np.stack([b['input_ids'][:, 0], -b['input_ids'][:, 0]], -1), {})
  out = teacher_cache.compute_outputs(forward, batches.one_epoch(), 23, pooled=False)
  np.testing.assert_array_equal(out['logits'][:, 0], [x[0] for x in ids])


def test_cached_logits_step_equals_live_teacher_step():
  """Same student update whether the teacher runs in the step or its logits come cached."""
  student, teacher = _model('bilstm_small'), _model('bert_tiny')
  t_params = registry.init_params(teacher, jax.random.PRNGKey(1))
  s_params = registry.init_params(student, jax.random.PRNGKey(0))
  cfg = default.get_config()
  ids = _ids(16)
  labels = np.arange(16, dtype=np.int32) % 2
  batches = pipeline.BatchIterator(ids, labels, 8, (32,), seed=3, shuffle=True, drop_remainder=True)
  batch = next(batches)
  logits_fn = step_lib.make_logits_fn(teacher)
  cached = np.zeros((16, 2), np.float32)
  cached[batch['index']] = np.asarray(logits_fn(t_params, batch))
  tx = optim.make_optimizer(cfg.student_optim, 10)
  objective = kd_objective.logits_only(cfg.loss, 10)
  live_step = step_lib.make_train_step(step_lib.distill_loss_fn(student, teacher, objective), tx)
  cached_step = step_lib.make_train_step(step_lib.distill_loss_fn(student, None, objective), tx)
  fresh = lambda: step_lib.create_state(
    jax.tree_util.tree_map(np.array, s_params), tx, jax.random.PRNGKey(2)
  )
  live, live_metrics = live_step(fresh(), t_params, batch)
  cached_batch = dict(batch, teacher_logits=cached[batch['index']])
  fed, fed_metrics = cached_step(fresh(), None, cached_batch)
  np.testing.assert_allclose(
    float(fed_metrics['loss'][0]), float(live_metrics['loss'][0]), rtol=1e-6
  )
  for a, b in zip(jax.tree_util.tree_leaves(live.params), jax.tree_util.tree_leaves(fed.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_unlabelled_examples_count_only_in_teacher_terms():
  student = _model('cnn_small')
  params = registry.init_params(student, jax.random.PRNGKey(0))
  objective = kd_objective.logits_only(default.get_config().loss, 10)
  ids = _ids(8)
  batch = next(
    pipeline.BatchIterator(ids, np.zeros(8, np.int32), 8, (32,), 0, False, False).one_epoch()
  )
  batch['teacher_logits'] = np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32)
  batch['labels'] = np.array([0, 1, -1, -1, 0, -1, 1, -1], np.int32)
  loss_fn = step_lib.distill_loss_fn(student, None, objective)
  _, metrics = loss_fn(params, None, batch, jax.random.PRNGKey(0), 0)
  assert float(metrics['ce'][1]) == 4.0 and float(metrics['accuracy'][1]) == 4.0
  assert float(metrics['kl_T'][1]) == 8.0 and float(metrics['loss'][1]) == 8.0


def test_augment_is_deterministic_distinct_and_follows_the_rules():
  sentences = ['a truly great movie with fine acting', 'dull', 'not bad at all , really']
  first = augment.augment(sentences, copies=5, seed=0)
  assert first == augment.augment(sentences, copies=5, seed=0)
  assert first != augment.augment(sentences, copies=5, seed=1)
  assert len(set(first)) == len(first) and not set(first) & set(sentences)
  vocab = {w for s in sentences for w in s.split()} | {augment.MASK_TOKEN}
  assert all(set(s.split()) <= vocab for s in first)
  # Only masking, every word: each copy is all [MASK] (one distinct copy per length).
  masked = augment.augment(
    sentences, copies=3, seed=0, mask_prob=1.0, replace_prob=0.0, ngram_prob=0.0
  )
  assert masked == [' '.join([augment.MASK_TOKEN] * len(s.split())) for s in sentences]
  with pytest.raises(ValueError, match='mask_prob'):
    augment.augment(sentences, 1, 0, mask_prob=1.5)
  with pytest.raises(ValueError, match='exceeds 1'):
    augment.augment(sentences, 1, 0, mask_prob=0.6, replace_prob=0.6)
