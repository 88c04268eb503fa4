"""Sentence-embedding distillation: STS-B reading, the corpus, Spearman, the loss, the student
built from teacher layers, the teacher-embedding store and a runlocal run end to end."""

import gzip
import json

import jax
import numpy as np
import pytest

from configs import embed_distill as schema
from experiments import stsb_embed_distill
from kdjax import config as config_lib
from kdjax import embed_distill, embedding_cache
from kdjax import sentence_embed as se
from kdjax.data import corpus, stsb
from kdjax.data.errors import DataError
from kdjax.models import from_teacher

HEADER = 'index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n'


def _row(s1='A man plays.', s2='A man is playing.', score='4.2', extra=''):
  return f'0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\t{s1}\t{s2}\t{score}{extra}\n'


# -- STS-B -----------------------------------------------------------------------------


def test_stsb_reads_pairs_plain_and_gzipped(tmp_path):
  text = HEADER + _row() + _row('He said "hi.', 'She left.', '0')
  (tmp_path / 'dev.tsv').write_text(text)
  pairs = stsb.read_stsb(tmp_path / 'dev.tsv')
  assert pairs.sentences1 == ['A man plays.', 'He said "hi.']  # unbalanced quote kept as is
  np.testing.assert_array_equal(pairs.scores, [4.2, 0.0])
  (tmp_path / 'dev.tsv.gz').write_bytes(gzip.compress(text.encode()))
  assert stsb.load_split('dev', tmp_path).sentences2 == pairs.sentences2


def test_shipped_stsb_splits():
  train, dev = stsb.load_split('train'), stsb.load_split('dev')
  assert (len(train), len(dev)) == (5749, 1500)
  assert dev.sentences1[0] == 'A man with a hard hat is dancing.'
  assert abs(dev.scores.mean() - 2.3639) < 1e-3


@pytest.mark.parametrize(
  'row, message',
  [
    (_row(extra='\textra'), r'bad\.tsv:3: 11 tab-separated fields, expected 10'),
    (_row(score='high'), r"bad\.tsv:3: score 'high' is not a number in \[0, 5\]"),
    (_row(score='5.5'), r"bad\.tsv:3: score '5.5' is not a number"),
    (_row(score='nan'), r"bad\.tsv:3: score 'nan'"),
    (_row(s2='  '), r'bad\.tsv:3: empty sentence2'),
  ],
)
def test_stsb_malformed_rows_name_file_and_line(tmp_path, row, message):
  path = tmp_path / 'bad.tsv'
  path.write_text(HEADER + _row() + row)
  with pytest.raises(DataError, match=message):
    stsb.read_stsb(path)


def test_stsb_missing_columns_and_files(tmp_path):
  (tmp_path / 'dev.tsv').write_text('a\tb\n')
  with pytest.raises(DataError, match=r'dev\.tsv:1: header lacks column\(s\) sentence1'):
    stsb.read_stsb(tmp_path / 'dev.tsv')
  with pytest.raises(DataError, match='missing STS-B train file'):
    stsb.split_file('train', tmp_path)


# -- corpus ----------------------------------------------------------------------------


def test_merge_deduplicates_in_order_and_drops_eval_sentences():
  merged = corpus.merge(
    {'a': ['One.', 'Two.', 'one.', 'Eval  sentence.'], 'b': ['Three.', 'TWO.', ' Four. ', '']},
    exclude=['eval sentence.'],
  )
  assert merged.sentences == ['One.', 'Two.', 'Three.', 'Four.']
  assert merged.stats['duplicates'] == 2 and merged.stats['eval_sentences_removed'] == 1
  assert merged.stats['a'] == {'read': 4, 'kept': 2}


def test_shipped_corpus_excludes_stsb_dev_and_has_no_duplicates():
  built = corpus.load_corpus('', sources=('stsb', 'multi30k'))  # no SST-2: needs no tfds
  keys = [corpus.dedup_key(s) for s in built.sentences]
  assert len(keys) == len(set(keys)) == built.stats['total']
  dev = stsb.load_split('dev')
  dev_keys = {corpus.dedup_key(s) for s in dev.sentences1 + dev.sentences2}
  assert not dev_keys & set(keys)
  assert built.stats['eval_sentences_removed'] > 0  # STS-B train and dev share sentences
  assert built.stats['multi30k']['read'] == 29000
  assert built.fingerprint() == corpus.load_corpus('', sources=('multi30k', 'stsb')).fingerprint()


# -- Spearman --------------------------------------------------------------------------


def test_average_ranks_share_ties():
  np.testing.assert_array_equal(se.average_ranks([10, 20, 20, 5, 20]), [2, 4, 4, 1, 4])


def test_spearman_hand_computed_case():
  # ranks x: 1, 2.5, 2.5, 4; ranks y: 1, 2, 3, 4 -> rho = 4.5 / sqrt(4.5 * 5)
  assert se.spearman([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(np.sqrt(4.5 / 5.0))
  assert se.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
  assert np.isnan(se.spearman([1, 1, 1], [1, 2, 3]))


def test_spearman_matches_scipy_with_ties():
  scipy_stats = pytest.importorskip('scipy.stats')
  rng = np.random.default_rng(0)
  x = rng.integers(0, 6, 300).astype(float)  # many ties, like STS gold scores
  y = x + rng.normal(0, 2, 300)
  assert se.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)


# -- pooling and loss ------------------------------------------------------------------


def _np_loss(s, t, w, mse_weight, cosine_weight, normalize):
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  cos = np.sum(unit(s) * unit(t), axis=-1)
  if normalize:
    s, t = unit(s), unit(t)
  per = mse_weight * np.mean((s - t) ** 2, axis=-1) + cosine_weight * (1 - cos)
  return np.sum(w * per) / np.sum(w)


@pytest.mark.parametrize('normalize', [False, True])
def test_loss_matches_numpy_and_ignores_padding(normalize):
  rng = np.random.default_rng(1)
  hidden = rng.normal(size=(4, 6, 8)).astype(np.float32)
  mask = np.array([[1] * 6, [1] * 3 + [0] * 3, [1] * 1 + [0] * 5, [1] * 3 + [0] * 3], np.int32)
  teacher = rng.normal(size=(4, 8)).astype(np.float32)
  weights = np.array([1, 1, 1, 0], np.float32)  # the last row is batch filler

  pooled = np.asarray(se.mean_pool(hidden, mask))
  expected = np.stack([hidden[i, : mask[i].sum()].mean(axis=0) for i in range(4)])
  np.testing.assert_allclose(pooled, expected, rtol=1e-6)
  garbage = hidden.copy()
  garbage[mask == 0] = 1e3  # padded positions must not leak into the embedding
  np.testing.assert_allclose(np.asarray(se.mean_pool(garbage, mask)), pooled, rtol=1e-6)

  loss, metrics = se.embedding_loss(pooled, teacher, weights, 0.7, 1.3, normalize)
  want = _np_loss(expected[:3], teacher[:3], weights[:3], 0.7, 1.3, normalize)
  assert float(loss) == pytest.approx(want, rel=1e-5)
  total, count = metrics['loss']
  assert float(count) == 3 and float(total) / 3 == pytest.approx(want, rel=1e-5)


def test_loss_is_zero_and_retrieval_perfect_when_the_student_matches():
  teacher = np.random.default_rng(2).normal(size=(5, 8)).astype(np.float32)
  loss, metrics = se.embedding_loss(teacher, teacher, np.ones(5, np.float32), 1.0, 1.0, False)
  assert float(loss) == pytest.approx(0.0, abs=1e-6)
  assert float(metrics['accuracy'][0]) == 5


# -- student from teacher layers -------------------------------------------------------

TEACHER = dict(
  vocab_size=40,
  hidden_size=32,
  num_layers=3,
  num_heads=4,
  intermediate_size=64,
  max_len=32,
  type_vocab_size=2,
  dropout_rate=0.0,
  attention_dropout_rate=0.0,
  layer_norm_eps=1e-12,
)


def _config(**student):
  config = schema.get_config()
  config.data.max_len, config.data.buckets = 16, (16,)
  tiny = dict(
    hidden_size=32, num_heads=4, intermediate_size=64, dropout_rate=0.0, attention_dropout_rate=0.0
  )
  config.student.update({**tiny, **student})
  return config


@pytest.fixture(scope='module')
def tiny_teacher():
  model = embed_distill.teacher_model(TEACHER)
  return model, embed_distill.init_params(model, jax.random.PRNGKey(0))


def _ids():
  ids = np.random.default_rng(3).integers(4, 40, (3, 10)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  return ids, mask


def test_full_size_student_reproduces_the_teacher_exactly(tiny_teacher):
  model, t_params = tiny_teacher
  config = _config(
    num_layers=3, hidden_size=32, num_heads=4, intermediate_size=64, init_layers=(0, 1, 2)
  )
  student = embed_distill.student_model(config, TEACHER)
  assert student.projection_size == 0
  s_params, _ = embed_distill.initial_student_params(config, student, t_params)
  ids, mask = _ids()
  np.testing.assert_array_equal(
    np.asarray(student.apply({'params': s_params}, ids, mask)),
    np.asarray(model.apply({'params': t_params}, ids, mask)),
  )


def test_ffn_pruning_keeps_the_largest_norm_neurons(tiny_teacher):
  _, t_params = tiny_teacher
  t_params = jax.tree_util.tree_map(np.array, t_params)
  layer = t_params['encoder']['layer_2']
  strong = [5, 17, 40, 63]
  layer['intermediate']['kernel'][:, strong] *= 10.0  # make these neurons the largest
  config = _config(num_layers=1, intermediate_size=4, init_layers=(2,))
  student = embed_distill.student_model(config, TEACHER)
  s_params, info = embed_distill.initial_student_params(config, student, t_params)
  assert info['layer_map'] == [2]
  scores = from_teacher.ffn_neuron_scores(
    layer['intermediate']['kernel'], layer['output']['kernel']
  )
  assert sorted(np.argsort(-scores)[:4]) == strong
  got = s_params['encoder']['layer_0']
  np.testing.assert_array_equal(
    got['intermediate']['kernel'], layer['intermediate']['kernel'][:, strong]
  )
  np.testing.assert_array_equal(got['output']['kernel'], layer['output']['kernel'][strong])
  np.testing.assert_array_equal(
    got['attention']['query']['kernel'], layer['attention']['query']['kernel']
  )


def test_narrow_student_gets_a_projection_and_counts_split(tiny_teacher):
  _, t_params = tiny_teacher
  config = _config(num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32, init_from='')
  student = embed_distill.student_model(config, TEACHER)
  params, _ = embed_distill.initial_student_params(config, student, t_params)
  ids, mask = _ids()
  assert student.apply({'params': params}, ids, mask).shape == (3, 32)  # the teacher's width
  counts = embed_distill.parameter_counts(params)
  assert counts['embedding'] == 40 * 16 + 16 * 16 + 2 * 16 + 2 * 16  # words, positions, types, LN
  layer = 4 * (16 * 16 + 16) + (16 * 32 + 32) + (32 * 16 + 16) + 4 * 16
  assert counts['non_embedding'] == layer + (16 * 32 + 32)  # + the projection


def test_config_errors_name_the_key():
  with pytest.raises(config_lib.ConfigError, match=r'config\.student\.hidden_size=256'):
    embed_distill.validate(_config(hidden_size=256, num_heads=4), TEACHER)
  with pytest.raises(config_lib.ConfigError, match=r'config\.student\.init_layers=\(0, 7\)'):
    embed_distill.validate(_config(num_layers=2, init_layers=(0, 7)), TEACHER)


# -- teacher-embedding store -----------------------------------------------------------


def test_store_reuses_valid_embeddings_and_recomputes_changed_or_corrupt(tmp_path, capsys):
  store = embedding_cache.EmbeddingStore(tmp_path)
  calls = []

  def compute(value):
    def run():
      calls.append(value)
      return np.full((3, 4), value, np.float32), {'sentences': 3}

    return run

  parts = embedding_cache.key_parts(
    't' * 64, corpus.sentences_fingerprint(['a', 'b', 'c']), 'tok', 16
  )
  first, info = embedding_cache.load_or_compute(store, parts, compute(1.0))
  assert not info['reused'] and calls == [1.0]
  again, info = embedding_cache.load_or_compute(store, parts, compute(2.0))
  assert info['reused'] and calls == [1.0]
  np.testing.assert_array_equal(again, first)

  changed = dict(parts, corpus_sha256=corpus.sentences_fingerprint(['a', 'b', 'd']))
  fresh, info = embedding_cache.load_or_compute(store, changed, compute(3.0))
  assert calls == [1.0, 3.0] and fresh[0, 0] == 3.0
  assert 'computed for another setup (corpus_sha256 differ)' in capsys.readouterr().out

  raw = bytearray(store.array_path.read_bytes())
  raw[-1] ^= 0xFF  # one flipped bit in the data, header intact: np.load alone would not see it
  store.array_path.write_bytes(bytes(raw))
  _, problem = store.load(changed)
  assert 'does not match the recorded' in problem
  repaired, _ = embedding_cache.load_or_compute(store, changed, compute(4.0))
  assert calls[-1] == 4.0 and repaired[0, 0] == 4.0
  assert store.load(changed)[0] is not None


# -- end to end ------------------------------------------------------------------------


def test_runlocal_end_to_end(tmp_path, capsys):
  config = stsb_embed_distill.get_config('runlocal')
  results = embed_distill.run(config, tmp_path)
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved == json.loads(json.dumps(results))
  for role in ('teacher', 'student'):
    assert -1.0 <= saved[role]['stsb_dev_spearman'] <= 1.0
  assert saved['teacher']['stsb_dev_spearman'] > 0.8  # MiniLM on the first 200 dev pairs
  assert saved['student']['non_embedding_ratio_to_teacher'] <= 0.25
  assert saved['corpus']['sentences'] == config.data.corpus_limit
  assert (tmp_path / 'teacher_embeddings.npy').is_file()
  assert (tmp_path / 'export' / 'student' / 'model.json').is_file()
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if 'loss' in r] == [4, 8]

  # A finished run only reports again.
  capsys.readouterr()
  embed_distill.run(config, tmp_path)
  assert 'already complete' in capsys.readouterr().out
