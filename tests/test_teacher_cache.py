"""Teacher-output cache: keys, integrity checks, top-k compression, and that a step fed
cached logits equals a step that runs the teacher live. Transfer-set augmentation too."""

import collections
import json

import jax
import numpy as np
import pytest

from configs import default
from configs import models as presets
from kdjax import config as config_lib
from kdjax import distill_data, optim, teacher_cache
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


def test_unigram_replacement_draws_the_stream_it_always_drew():
  """Cached teacher outputs are keyed on the augmented token ids, so the default augmentation
  must keep drawing the same copies; this is the draw loop as first written."""
  sentences = ['a truly great movie with fine acting', 'dull', 'not bad at all , really'] * 4
  rng = np.random.default_rng(3)
  counts = collections.Counter(w for s in sentences for w in s.split())
  vocab = sorted(counts)
  freqs = np.asarray([counts[w] for w in vocab], np.float64) / sum(counts.values())
  expected, seen = [], set(sentences)
  for sentence in sentences:
    words = sentence.split()
    for _ in range(2):
      draws = rng.random(len(words))
      replacements = rng.choice(len(vocab), size=len(words), p=freqs)
      new = [
        augment.MASK_TOKEN if u < 0.2 else vocab[r] if u < 0.5 else w
        for w, u, r in zip(words, draws, replacements)
      ]
      if rng.random() < 0.25 and len(new) > 1:
        n = int(rng.integers(1, min(augment.MAX_NGRAM, len(new)) + 1))
        start = int(rng.integers(0, len(new) - n + 1))
        new = new[start : start + n]
      if ' '.join(new) not in seen:
        seen.add(' '.join(new))
        expected.append(' '.join(new))
  got = augment.augment(sentences, 2, 3, mask_prob=0.2, replace_prob=0.3, ngram_prob=0.25)
  assert got == expected


def _toy_vocab():
  tokens = ['[PAD]', '[UNK]', '[MASK]', '[unused0]', 'good', 'great', 'fine', 'bad', 'awful']
  tokens += ['movie', 'film', '##s', '##ly', ',', 'the']
  return {t: i for i, t in enumerate(tokens)}


def test_embedding_neighbours_match_a_brute_force_cosine_ranking():
  vocab = _toy_vocab()
  table = np.random.default_rng(0).normal(size=(len(vocab), 6))
  words = 'the good movie , goodly films bad unknownword'.split()
  got = augment.embedding_neighbours(words, vocab, table, k=3)
  # Independent reference: full cosine matrix, candidates = whole-word non-special tokens.
  unit = table / np.linalg.norm(table, axis=1, keepdims=True)
  whole = [t for t in vocab if not t.startswith('##') and not t.startswith('[')]
  expected = {}
  for w in sorted({w for w in words if w in whole}):
    others = [t for t in whole if t != w]
    sims = [float(unit[vocab[w]] @ unit[vocab[t]]) for t in others]
    expected[w] = tuple(others[i] for i in np.argsort(sims)[::-1][:3])
  assert got == expected
  # Neither pieces nor out-of-vocabulary words are queries; no special is ever a candidate.
  assert set(got) == {'the', 'good', 'movie', ',', 'bad'}
  assert not {c for cands in got.values() for c in cands} & {'[PAD]', '[MASK]', '##s', '##ly'}
  with pytest.raises(ValueError, match='does not hold a row for each of the 15'):
    augment.embedding_neighbours(words, vocab, table[:10], k=3)


def test_neighbour_replacement_swaps_only_for_a_listed_neighbour():
  neighbours = {'good': ('great', 'fine'), 'movie': ('film',)}
  sentences = ['a good movie', 'good good good good', 'plain words']
  out = augment.augment(
    sentences, 4, 0, mask_prob=0.0, replace_prob=1.0, ngram_prob=0.0, neighbours=neighbours
  )
  # Every word is replaced: by one of its neighbours, or kept when it has none. So the
  # neighbour-less 'plain words' has no distinct copy, 'a good movie' has two ('a great
  # film', 'a fine film'), and the copies of 'good good good good' use both neighbours.
  source = {len(s.split()): s for s in sentences}
  for copy in out:
    for w, new in zip(source[len(copy.split())].split(), copy.split()):
      assert new in neighbours.get(w, (w,))
  assert sorted(c for c in out if len(c.split()) == 3) == ['a fine film', 'a great film']
  assert not [c for c in out if len(c.split()) == 2]
  assert {w for c in out if len(c.split()) == 4 for w in c.split()} == {'great', 'fine'}


def test_neighbour_replacement_needs_a_bert_teacher():
  config = default.get_config()
  config.distill.augment_copies = 1
  assert distill_data.replacement_neighbours(config, ['a b'], None, {}) is None  # unigram
  config.distill.augment_replace = 'neighbours'
  with pytest.raises(config_lib.ConfigError, match=r"needs a BERT teacher .* are \['dense_0'\]"):
    distill_data.replacement_neighbours(config, ['a b'], None, {'dense_0': {}})
