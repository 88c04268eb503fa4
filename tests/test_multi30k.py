"""Tests for the Multi30k en-de data, the joint subword tokenizer, translation batches and BLEU."""

import gzip
import hashlib
import math
import re

import numpy as np
import pytest

from kdjax.bleu import corpus_bleu
from kdjax.data import multi30k, subword
from kdjax.data.errors import DataError
from kdjax.data.translation_batches import TranslationBatches, ordered_batches

RAW = multi30k.DEFAULT_RAW_DIR
LINES = {'train': 29_000, 'val': 1_014, 'test_2016_flickr': 1_000}


def _gz_lines(path):
  with gzip.open(path, 'rt', encoding='utf-8') as f:
    return [line.strip() for line in f]


# -- shipped files ------------------------------------------------------------------------


def test_shipped_files_match_source_md():
  source_md = (RAW / 'SOURCE.md').read_text(encoding='utf-8')
  listed = dict(
    (name, digest) for digest, name in re.findall(r'^\s+([0-9a-f]{64})\s+(\S+)$', source_md, re.M)
  )
  for stem, count in LINES.items():
    for lang in multi30k.LANGS:
      name = f'{stem}.{lang}.gz'
      data = (RAW / name).read_bytes()
      assert hashlib.sha256(data).hexdigest() == listed[name], name
      text = gzip.decompress(data)
      assert hashlib.sha256(text).hexdigest() == listed[name[: -len('.gz')]], name
      assert text.count(b'\n') == count, name
      assert f'{count:,}' in source_md
  assert sorted(p.name for p in RAW.glob('*.gz')) == sorted(
    name for name in listed if name.endswith('.gz')
  )


# -- read_pairs errors --------------------------------------------------------------------


def _write(directory, name, text: bytes):
  with gzip.open(directory / name, 'wb') as f:
    f.write(text)


def test_read_pairs_reads_plain_or_gz_and_strips(tmp_path):
  _write(tmp_path, 'val.en.gz', b'A dog.\nTwo cats. \n')
  (tmp_path / 'val.de').write_bytes('Ein Hund.\nZwei Katzen.\n'.encode())
  assert multi30k.read_pairs(tmp_path, 'validation') == [
    (0, 'A dog.', 'Ein Hund.'),
    (1, 'Two cats.', 'Zwei Katzen.'),
  ]


@pytest.mark.parametrize(
  'en, de, pattern',
  [
    (None, b'x\n', r'val\.en: missing file for Multi30k split .validation.; expected val\.en\.gz'),
    (b'a\nb\n', b'x\n', r'val\.en\.gz: 2 lines but .*val\.de\.gz has 1; .*same count'),
    (b'a\n\nb\n', b'x\ny\nz\n', r'val\.en\.gz:2: empty line'),
    (b'a\n', b'\xc3(\n', r'val\.de\.gz:1: invalid UTF-8'),
  ],
)
def test_read_pairs_errors(tmp_path, en, de, pattern):
  if en is not None:
    _write(tmp_path, 'val.en.gz', en)
  _write(tmp_path, 'val.de.gz', de)
  with pytest.raises(DataError, match=pattern):
    multi30k.read_pairs(tmp_path, 'validation')


def test_unknown_split_and_language_pair_are_rejected(tfds_dir):
  with pytest.raises(ValueError, match=r"split must be one of \['test', 'train', 'validation'\]"):
    multi30k.load_split('dev', tfds_dir)
  with pytest.raises(ValueError, match=r'en->de or de->en'):
    multi30k.load_split('test', tfds_dir, source_lang='en', target_lang='en')


# -- tfds builder -------------------------------------------------------------------------


@pytest.fixture(scope='module')
def raw_pairs():
  return {
    split: (_gz_lines(RAW / f'{stem}.en.gz'), _gz_lines(RAW / f'{stem}.de.gz'))
    for split, stem in multi30k.SPLIT_FILES.items()
  }


def test_builder_round_trip_both_directions(tfds_dir, raw_pairs):
  for split, (en, de) in raw_pairs.items():
    assert multi30k.load_split(split, tfds_dir) == (en, de)
  assert multi30k.load_split('validation', tfds_dir, source_lang='de', target_lang='en') == (
    raw_pairs['validation'][1],
    raw_pairs['validation'][0],
  )
  assert raw_pairs['train'][1][0] == (
    'Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.'
  )


# -- subword tokenizer --------------------------------------------------------------------


@pytest.fixture(scope='module')
def train_texts(raw_pairs):
  en, de = raw_pairs['train']
  return [s for pair in zip(en[:1000], de[:1000]) for s in pair]  # 2,000 sentences


@pytest.fixture(scope='module')
def bpe(train_texts):
  return subword.train_subword(train_texts, vocab_size=1000)


def test_special_ids_and_vocab_size(bpe):
  assert bpe.tokens(range(4)) == ['<pad>', '<s>', '</s>', '<unk>']
  assert (subword.PAD_ID, subword.BOS_ID, subword.EOS_ID, subword.UNK_ID) == (0, 1, 2, 3)
  assert bpe.vocab_size == 1000


@pytest.mark.parametrize('kind', subword.KINDS)
def test_round_trip_on_all_validation_sentences(kind, train_texts, raw_pairs, bpe):
  tok = bpe if kind == 'bpe' else subword.train_subword(train_texts, 1000, kind='unigram')
  texts = [s for side in raw_pairs['validation'] for s in side]
  decoded = tok.decode_batch(tok.encode_batch(texts, max_len=1000))
  # Characters absent from the 2,000 training sentences come back as <unk>; nothing else
  # may change (no normaliser, spaces restored by the Metaspace decoder).
  alphabet = set(''.join(train_texts))
  for text, back in zip(texts, decoded):
    if set(text) <= alphabet:
      assert back == text
    else:
      assert '<unk>' in back
  assert sum(t == d for t, d in zip(texts, decoded)) >= 0.99 * len(texts)


def test_double_space_tab_and_no_break_space_round_trip():
  text = 'Ein  Mann\tin\u00a0Rot.'
  tok = subword.train_subword([text] * 3, vocab_size=50)
  assert tok.decode_batch(tok.encode_batch([text], 100)) == [text]


def test_encode_truncates_and_decode_stops_at_eos(bpe):
  ids = bpe.encode_batch(['A man in a blue shirt is standing on a ladder.'], max_len=1000)[0]
  assert ids.dtype == np.int32 and len(ids) > 4
  assert subword.EOS_ID not in ids and subword.BOS_ID not in ids
  assert list(bpe.encode_batch(['A man in a blue shirt is standing on a ladder.'], 3)[0]) == list(
    ids[:3]
  )
  row = np.concatenate([[subword.BOS_ID], ids, [subword.EOS_ID], ids, [0, 0]])
  assert bpe.decode_batch([row]) == ['A man in a blue shirt is standing on a ladder.']


@pytest.mark.parametrize('kind', subword.KINDS)
def test_training_is_deterministic(kind, train_texts, bpe):
  first = bpe if kind == 'bpe' else subword.train_subword(train_texts, 1000, kind=kind)
  again = subword.train_subword(train_texts, 1000, kind=kind)
  assert again.fingerprint() == first.fingerprint()
  assert again.tokens(range(first.vocab_size)) == first.tokens(range(first.vocab_size))


def test_save_load_and_bad_files(bpe, tmp_path):
  path = bpe.save(tmp_path)
  assert path == tmp_path / 'subword.json'
  loaded = subword.SubwordTokenizer.load(tmp_path)
  assert loaded == bpe and loaded.fingerprint() == bpe.fingerprint()
  assert bpe.fingerprint() == hashlib.sha256(path.read_bytes()).hexdigest()
  with pytest.raises(DataError, match=r'missing/subword\.json: subword tokenizer file not found'):
    subword.SubwordTokenizer.load(tmp_path / 'missing')
  path.write_text(path.read_text()[:100])
  with pytest.raises(DataError, match=r'subword\.json: not a valid tokenizer file'):
    subword.SubwordTokenizer.load(tmp_path)
  path.write_bytes(b'\xff\xfe')
  with pytest.raises(DataError, match=r'subword\.json: subword tokenizer file is not valid UTF-8'):
    subword.SubwordTokenizer.load(tmp_path)


def test_wrong_special_ids_are_rejected(bpe):
  swapped = bpe._json.replace('"<pad>"', '"<tmp>"').replace('"<s>"', '"<pad>"')
  with pytest.raises(DataError, match=r'special token <pad> has id 1, expected 0'):
    subword.SubwordTokenizer(swapped, 'x.json')


def test_bad_training_arguments():
  with pytest.raises(ValueError, match=r"kind must be one of \('bpe', 'unigram'\)"):
    subword.train_subword(['a'], 100, kind='wordpiece')
  with pytest.raises(ValueError, match=r'vocab_size must exceed the 4 special tokens'):
    subword.train_subword(['a'], 4)


# -- translation batches ------------------------------------------------------------------


def _pairs(n=103, seed=0):
  rng = np.random.default_rng(seed)
  src = [rng.integers(4, 50, rng.integers(1, 40)).astype(np.int32) for _ in range(n)]
  tgt = [rng.integers(4, 50, rng.integers(0, 40)).astype(np.int32) for _ in range(n)]
  return src, tgt


def _check_batch(batch, src, tgt, buckets, size):
  assert set(batch) == {'src_ids', 'src_mask', 'tgt_in', 'tgt_out', 'tgt_mask', 'index', 'weights'}
  assert all(v.dtype == np.int32 for k, v in batch.items() if k != 'weights')
  assert batch['weights'].dtype == np.float32
  b, s = batch['src_ids'].shape
  t = batch['tgt_in'].shape[1]
  assert b == size and s in buckets and t in buckets
  rows = batch['index']
  real = batch['weights'] > 0
  # The smallest bucket that fits the longest row of the batch.
  longest_src = max(len(src[i]) for i in rows)
  longest_tgt = max(len(tgt[i]) + 1 for i in rows)
  assert s == min(x for x in buckets if x >= longest_src)
  assert t == min(x for x in buckets if x >= longest_tgt)
  for r, i in enumerate(rows):
    n, m = len(src[i]), len(tgt[i])
    np.testing.assert_array_equal(batch['src_ids'][r, :n], src[i])
    assert batch['src_ids'][r, n:].sum() == 0
    assert list(batch['src_mask'][r]) == [1] * n + [0] * (s - n)
    assert batch['tgt_in'][r, 0] == subword.BOS_ID
    np.testing.assert_array_equal(batch['tgt_in'][r, 1 : m + 1], tgt[i])
    np.testing.assert_array_equal(batch['tgt_out'][r, :m], tgt[i])
    assert batch['tgt_out'][r, m] == subword.EOS_ID
    # tgt_out is tgt_in shifted left by one: position k predicts the token after tgt_in[k].
    np.testing.assert_array_equal(batch['tgt_out'][r, :m], batch['tgt_in'][r, 1 : m + 1])
    assert list(batch['tgt_mask'][r]) == [1] * (m + 1) + [0] * (t - m - 1)
    assert batch['tgt_in'][r, m + 1 :].sum() == 0 and batch['tgt_out'][r, m + 1 :].sum() == 0
  # Filler rows come last and repeat a real row.
  assert list(real) == sorted(real, reverse=True)
  assert set(rows[~real]) <= set(rows[real])
  return rows[real]


def test_batches_shapes_masks_and_every_row_once_per_epoch():
  src, tgt = _pairs()
  buckets = (8, 16, 32, 64)
  it = TranslationBatches(src, tgt, batch_size=10, buckets=buckets, seed=3)
  assert it.batches_per_epoch == 11
  for epoch in range(2):
    seen = [_check_batch(b, src, tgt, buckets, 10) for b in it.one_epoch(epoch)]
    assert sorted(np.concatenate(seen)) == list(range(103))
  first, second = (list(np.concatenate([b['index'] for b in it.one_epoch(e)])) for e in (0, 1))
  assert first != second  # reshuffled each epoch


def test_sorting_within_windows_keeps_padding_low():
  # Like translations: target lengths follow source lengths (1..40) within a few tokens.
  rng = np.random.default_rng(1)
  src_len = rng.integers(1, 41, 2000)
  tgt_len = np.clip(src_len + rng.integers(-3, 4, 2000), 0, 40)
  src = [np.full(n, 5, np.int32) for n in src_len]
  tgt = [np.full(n, 6, np.int32) for n in tgt_len]
  padding = {}
  for shuffle in (True, False):
    batches = TranslationBatches(src, tgt, 32, buckets=(8, 16, 24, 32, 48), shuffle=shuffle)
    real = sum(int(b['src_mask'].sum() + b['tgt_mask'].sum()) for b in batches.one_epoch())
    total = sum(b['src_mask'].size + b['tgt_mask'].size for b in batches.one_epoch())
    padding[shuffle] = 1 - real / total
  # File order pads nearly every batch to 48 (~55% padding); sorted windows ~24%.
  assert padding[True] < 0.3 < 0.5 < padding[False], padding


def test_drop_remainder_and_max_tokens():
  src, tgt = _pairs()
  it = TranslationBatches(src, tgt, 10, buckets=(8, 16, 32, 64), drop_remainder=True)
  assert it.batches_per_epoch == 10
  assert all((b['weights'] == 1).all() for b in it.one_epoch())
  it = TranslationBatches(src, tgt, 10, buckets=(8, 16, 32, 64), max_tokens=160)
  rows, shapes = [], set()
  for b in it.one_epoch():
    size, s = b['src_ids'].shape
    t = b['tgt_in'].shape[1]
    assert size * max(s, t) <= 160 or size == 10
    assert size == min(10, 160 // max(s, t))
    shapes.add((size, s, t))
    rows += list(b['index'][b['weights'] == 1])
  assert sorted(rows) == list(range(103))
  assert len(list(it.one_epoch())) == it.batches_per_epoch


def test_resume_gives_the_same_next_batch():
  src, tgt = _pairs()
  for max_tokens in (0, 160):
    it = TranslationBatches(src, tgt, 10, buckets=(8, 16, 32, 64), max_tokens=max_tokens)
    for _ in range(it.batches_per_epoch + 3):  # into the second epoch
      next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = TranslationBatches(src, tgt, 10, buckets=(8, 16, 32, 64), max_tokens=max_tokens)
    resumed.set_state(state)
    for want in expected:
      got = next(resumed)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def test_ordered_batches_are_in_file_order():
  src, tgt = _pairs()
  batches = list(ordered_batches(src, tgt, 10, buckets=(8, 16, 32, 64)))
  assert len(batches) == math.ceil(103 / 10)
  index = np.concatenate([b['index'][b['weights'] == 1] for b in batches])
  assert list(index) == list(range(103))
  assert batches[-1]['weights'].sum() == 3 and list(batches[-1]['index'][3:]) == [100] * 7


def test_rows_too_long_or_empty_are_rejected():
  src, tgt = _pairs()
  tgt[7] = np.arange(4, 68, dtype=np.int32)  # 64 tokens + EOS > 64
  with pytest.raises(
    ValueError, match=r'row 7: target has 64 tokens, more than .* bucket 64 .*max_len=63'
  ):
    TranslationBatches(src, tgt, 10, buckets=(8, 16, 32, 64))
  src, tgt = _pairs()
  src[5] = np.zeros(0, np.int32)
  with pytest.raises(ValueError, match=r'row 5: empty source'):
    TranslationBatches(src, tgt, 10, buckets=(8, 16, 32, 64))
  with pytest.raises(ValueError, match=r'103 source rows but 102 target rows'):
    TranslationBatches(src, tgt[:-1], 10)


def test_real_data_batches_fit_default_buckets(bpe, raw_pairs):
  en, de = raw_pairs['validation']
  src, tgt = bpe.encode_batch(en, 128), bpe.encode_batch(de, 127)
  batches = list(ordered_batches(src, tgt, 64))
  assert sum(int(b['weights'].sum()) for b in batches) == len(en)
  decoded = bpe.decode_batch(np.concatenate([b['tgt_out'][b['weights'] == 1] for b in batches]))
  assert sum(d == t for d, t in zip(decoded, de)) >= 0.95 * len(de)


# -- BLEU ---------------------------------------------------------------------------------


def test_bleu_identical_is_100():
  refs = ['Ein Hund läuft.', 'Zwei Männer spielen Fußball im Park.']
  result = corpus_bleu(refs, refs)
  assert result['bleu'] == pytest.approx(100.0)
  assert 'tok:13a' in result['signature'] and 'nrefs:1' in result['signature']


def test_bleu_matches_hand_computation():
  # n-gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty):
  # BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = (1/12) ** 0.25.
  result = corpus_bleu(['the cat sat on the mat'], ['the cat sat on a mat'])
  assert result['bleu'] == pytest.approx(100 * (1 / 12) ** 0.25)
  assert result['bp'] == 1.0 and (result['sys_len'], result['ref_len']) == (6, 6)
  # Shorter hypothesis: all n-grams match, BP = exp(1 - 6/4).
  result = corpus_bleu(['the cat sat on'], ['the cat sat on a mat'])
  assert result['bleu'] == pytest.approx(100 * math.exp(1 - 6 / 4))


def test_bleu_length_mismatch_is_one_line_error():
  with pytest.raises(ValueError, match=r'^corpus_bleu: 2 hypotheses but 1 references; '):
    corpus_bleu(['a', 'b'], ['a'])
