"""Tests for kdjax.data: SST-2 tfds builder, TSV validation, vocab, batching."""

import gzip
import json

import numpy as np
import pytest

from kdjax.data.errors import DataError
from kdjax.data.pipeline import BatchIterator, encode, load_split
from kdjax.data.sst2_builder import DEFAULT_RAW_DIR, read_sst2_tsv
from kdjax.data.vocab import CLS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID, WordVocab

# -- SST-2 through tfds ----------------------------------------------------------------


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
  """A tfds data dir in which the shipped SST-2 is prepared once per session."""
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='session')
def sst2(tfds_dir):
  return {
    split: load_split('sst2_local', split, tfds_dir) for split in ('train', 'validation', 'test')
  }


def test_shipped_sst2_counts_and_first_rows(sst2):
  sizes = {split: len(sentences) for split, (sentences, _) in sst2.items()}
  assert sizes == {'train': 67_349, 'validation': 872, 'test': 1_821}
  train_x, train_y = sst2['train']
  assert train_x[0] == 'hide new secretions from the parental units'
  assert train_y[0] == 0
  assert train_x[-1] == (
    'this new jangle of noise , mayhem and stupidity must be a serious contender for the title .'
  )
  assert train_y.dtype == np.int32 and len(train_y) == len(train_x)
  # Label balance from the GLUE file, so no row was lost or relabeled.
  assert np.bincount(train_y).tolist() == [29_780, 37_569]
  assert np.bincount(sst2['validation'][1]).tolist() == [428, 444]
  assert sst2['validation'][0][0] == "it 's a charming and often affecting journey ."
  test_x, test_y = sst2['test']
  assert test_x[0] == 'uneasy mishmash of styles and genres .'
  assert (test_y == -1).all()
  # The trailing space GLUE puts before the tab is stripped.
  assert not any(s != s.strip() for s in train_x)


def test_load_matches_raw_file_order(sst2):
  rows = list(read_sst2_tsv(DEFAULT_RAW_DIR / 'dev.tsv.gz', 'validation'))
  assert sst2['validation'][0] == [sentence for _, sentence, _ in rows]
  assert sst2['validation'][1].tolist() == [label for _, _, label in rows]


def test_prepared_data_is_reused_and_readable_by_name(sst2, tfds_dir):
  # A second load must not re-prepare: point raw_dir at nothing to prove it.
  sentences, labels = load_split('sst2_local', 'validation', tfds_dir, raw_dir='/nonexistent')
  assert sentences == sst2['validation'][0]
  # The generic path (tfds.data_source on an already-prepared dir) gives the same data.
  sentences, labels = load_split('sst2_local:1.0.0', 'validation', tfds_dir)
  assert sentences == sst2['validation'][0]
  np.testing.assert_array_equal(labels, sst2['validation'][1])


def test_unprepared_dataset_raises_data_error(tmp_path):
  with pytest.raises(DataError, match=r'glue/sst2.*not prepared.*tfds build'):
    load_split('glue/sst2', 'train', str(tmp_path))


def test_dataset_without_random_access_raises_data_error(tmp_path):
  raw = _write_raw(tmp_path / 'raw')
  tfds_dir = tmp_path / 'tfds'
  load_split('sst2_local', 'train', str(tfds_dir), str(raw))
  # Pretend it was prepared as tfrecord (what `tfds build` writes by default).
  info_path = tfds_dir / 'sst2_local' / '1.0.0' / 'dataset_info.json'
  info = json.loads(info_path.read_text())
  info['fileFormat'] = 'tfrecord'
  info_path.write_text(json.dumps(info))
  with pytest.raises(DataError, match=r'without random access.*array_record'):
    load_split('sst2_local:1.0.0', 'train', str(tfds_dir))


def test_unknown_split_is_rejected(tfds_dir):
  with pytest.raises(ValueError, match='split must be one of'):
    load_split('sst2_local', 'dev', tfds_dir)


# -- malformed TSVs ----------------------------------------------------------------------

GOOD_TRAIN = b'sentence\tlabel\na fine film \t1\na bad one \t0\n'
GOOD_DEV = b'sentence\tlabel\nok \t1\n'
GOOD_TEST = b'index\tsentence\n0\tsome text\n'


def _write_raw(raw_dir, train=GOOD_TRAIN, dev=GOOD_DEV, test=GOOD_TEST, gz=False):
  raw_dir.mkdir(exist_ok=True)
  for stem, content in (('train', train), ('dev', dev), ('test', test)):
    if content is None:
      continue
    if gz:
      (raw_dir / f'{stem}.tsv.gz').write_bytes(gzip.compress(content))
    else:
      (raw_dir / f'{stem}.tsv').write_bytes(content)
  return raw_dir


def test_small_plain_tsvs_build(tmp_path):
  raw = _write_raw(tmp_path / 'raw')
  sentences, labels = load_split('sst2_local', 'train', str(tmp_path / 'tfds'), str(raw))
  assert sentences == ['a fine film', 'a bad one']
  assert labels.tolist() == [1, 0]


@pytest.mark.parametrize(
  'split,content,line,what',
  [
    (
      'train',
      b'sentence\tlabel\ngood \t1\ntoo\tmany\tfields\n',
      3,
      '3 tab-separated fields, expected 2',
    ),
    (
      'train',
      b'sentence\tlabel\ngood \t1\nno label field\n',
      3,
      '1 tab-separated fields, expected 2',
    ),
    ('train', b'sentence\tlabel\ngood \t1\nbad label \t2\n', 3, "label '2', expected 0 or 1"),
    ('train', b'sentence\tlabel\ngood \tpositive\n', 2, "label 'positive', expected 0 or 1"),
    (
      'train',
      b'text\tlabel\ngood \t1\n',
      1,
      "header is 'text\\tlabel', expected 'sentence\\tlabel'",
    ),
    ('train', b'', 1, 'header is missing'),
    ('train', b'sentence\tlabel\n', 2, 'no examples after the header'),
    ('train', b'sentence\tlabel\nfine \t1\ncaf\xe9 \t0\n', 3, 'invalid UTF-8'),
    ('train', b'sentence\tlabel\nfine \t1\n \t0\n', 3, 'empty sentence'),
    ('test', b'index\tsentence\n0\tok\n5\tskipped\n', 3, "index '5', expected 1"),
  ],
)
def test_malformed_tsv_raises_data_error_naming_file_and_line(tmp_path, split, content, line, what):
  path = tmp_path / 'bad.tsv'
  path.write_bytes(content)
  with pytest.raises(DataError) as info:
    list(read_sst2_tsv(path, split))
  message = str(info.value)
  assert message.startswith(f'{path}:{line}: ')
  assert what in message
  assert '\n' not in message


def test_malformed_gzipped_split_fails_the_build(tmp_path):
  # Through the tfds builder too: the error surfaces unchanged and nothing is left
  # half-prepared (a retry after fixing the file must rebuild).
  raw = _write_raw(tmp_path / 'raw', dev=b'sentence\tlabel\nok \t1\nbad \t7\n', gz=True)
  tfds_dir = str(tmp_path / 'tfds')
  with pytest.raises(DataError, match=r"dev\.tsv\.gz:3: label '7', expected 0 or 1"):
    load_split('sst2_local', 'validation', tfds_dir, str(raw))
  (raw / 'dev.tsv.gz').write_bytes(gzip.compress(GOOD_DEV))
  sentences, labels = load_split('sst2_local', 'validation', tfds_dir, str(raw))
  assert sentences == ['ok'] and labels.tolist() == [1]


def test_missing_file_raises_data_error(tmp_path):
  raw = _write_raw(tmp_path / 'raw', test=None)
  with pytest.raises(DataError, match=r'test\.tsv: missing file .*test\.tsv\.gz or test\.tsv'):
    load_split('sst2_local', 'train', str(tmp_path / 'tfds'), str(raw))


def test_corrupt_gzip_raises_data_error(tmp_path):
  path = tmp_path / 'train.tsv.gz'
  path.write_bytes(b'not gzip at all')
  with pytest.raises(DataError, match=r'train\.tsv\.gz: unreadable'):
    list(read_sst2_tsv(path, 'train'))


# -- vocab -------------------------------------------------------------------------------

SENTENCES = ['The cat sat', 'the dog sat', 'a Dog ran', 'the end']


def test_vocab_build_order_and_limits():
  vocab = WordVocab.build(SENTENCES, max_size=100, min_count=1)
  # Count desc (the=3; dog, sat=2), then word asc among ties.
  assert vocab.tokens == list(SPECIAL_TOKENS) + ['the', 'dog', 'sat', 'a', 'cat', 'end', 'ran']
  assert len(WordVocab.build(SENTENCES, max_size=6, min_count=1)) == 6
  assert WordVocab.build(SENTENCES, max_size=100, min_count=2).tokens[4:] == ['the', 'dog', 'sat']
  # Input order does not matter.
  assert WordVocab.build(SENTENCES[::-1], max_size=6, min_count=1) == WordVocab.build(
    SENTENCES, max_size=6, min_count=1
  )


def test_vocab_encode():
  vocab = WordVocab.build(SENTENCES, max_size=100, min_count=1)
  ids = vocab.encode('The DOG flew', max_len=10)
  assert ids.dtype == np.int32
  assert ids.tolist() == [CLS_ID, vocab.token_id('the'), vocab.token_id('dog'), UNK_ID]
  assert vocab.encode('the dog sat down', max_len=3).tolist() == ids[:3].tolist()
  assert [len(x) for x in encode(['a', 'a b c'], vocab, 3)] == [2, 3]


def test_vocab_save_load_round_trip(tmp_path):
  vocab = WordVocab.build(SENTENCES, max_size=100, min_count=1)
  path = tmp_path / 'vocab.txt'
  vocab.save(path)
  assert path.read_text(encoding='utf-8').splitlines() == vocab.tokens
  loaded = WordVocab.load(path)
  assert loaded == vocab and len(loaded) == len(vocab)
  assert loaded.encode('the cat ran', 8).tolist() == vocab.encode('the cat ran', 8).tolist()


def test_vocab_load_rejects_foreign_files(tmp_path):
  path = tmp_path / 'vocab.txt'
  path.write_text('hello\nworld\n', encoding='utf-8')
  with pytest.raises(DataError, match='vocab.txt: invalid vocab file'):
    WordVocab.load(path)


def test_vocab_on_sst2_is_deterministic(sst2):
  train_x = sst2['train'][0]
  a = WordVocab.build(train_x, max_size=5000, min_count=2)
  b = WordVocab.build(list(reversed(train_x)), max_size=5000, min_count=2)
  assert a == b and len(a) == 5000
  assert a.tokens[4] == 'the'


# -- batching ----------------------------------------------------------------------------

BUCKETS = (4, 8, 16)


def _toy_data(n=103, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 21, size=n)  # Some exceed the largest bucket (16).
  # Token ids are 10 + example index so every row can be traced back to its example.
  token_ids = [np.full(length, 10 + i, dtype=np.int32) for i, length in enumerate(lengths)]
  labels = (np.arange(n) % 2).astype(np.int32)
  return token_ids, labels


def _iterator(seed=1, shuffle=True, drop_remainder=False, n=103, batch_size=8, window=3):
  token_ids, labels = _toy_data(n)
  return BatchIterator(
    token_ids,
    labels,
    batch_size,
    BUCKETS,
    seed=seed,
    shuffle=shuffle,
    drop_remainder=drop_remainder,
    bucket_window=window,
  )


def _example_ids(batch):
  """Example index of each real row (rows hold 10 + index in their tokens)."""
  return (batch['input_ids'][batch['weights'] > 0, 0] - 10).tolist()


def _same_batches(a, b):
  return len(a) == len(b) and all(
    x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
  )


def test_same_seed_same_batches_different_seed_different_order():
  a, b, c = _iterator(seed=1), _iterator(seed=1), _iterator(seed=2)
  assert _same_batches([next(a) for _ in range(30)], [next(b) for _ in range(30)])
  order = lambda it, e: np.concatenate(it.epoch_batches(e)).tolist()
  assert order(a, 0) != order(c, 0)
  assert order(a, 0) != order(a, 1)  # Epochs are reshuffled.
  assert order(a, 0) == order(_iterator(seed=1), 0)


@pytest.mark.parametrize('shuffle', [True, False])
def test_every_example_exactly_once_per_epoch(shuffle):
  it = _iterator(shuffle=shuffle)
  assert it.batches_per_epoch == 13  # ceil(103 / 8)
  for epoch in (0, 1):
    seen = [i for batch in it.one_epoch(epoch) for i in _example_ids(batch)]
    assert sorted(seen) == list(range(103))
  if not shuffle:
    assert seen == list(range(103))  # Original order.


def test_drop_remainder_drops_only_the_remainder():
  it = _iterator(drop_remainder=True)
  assert it.batches_per_epoch == 12
  batches = list(it.one_epoch())
  assert len(batches) == 12 and all(b['weights'].sum() == 8 for b in batches)
  seen = [i for b in batches for i in _example_ids(b)]
  assert len(set(seen)) == 96


def test_batch_contents_padding_buckets_and_weights():
  token_ids, labels = _toy_data()
  it = _iterator()
  fillers = 0
  for batch in it.one_epoch():
    ids, mask, weights = batch['input_ids'], batch['attention_mask'], batch['weights']
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert batch['labels'].dtype == np.int32 and weights.dtype == np.float32
    assert ids.shape[0] == mask.shape[0] == len(weights) == len(batch['labels']) == 8
    length = ids.shape[1]
    assert length in BUCKETS
    # Padding is exactly where the mask is 0, and it is [PAD].
    assert ((ids != PAD_ID) == (mask == 1)).all()
    # Masks are left-aligned runs of ones.
    assert (np.diff(mask, axis=1) <= 0).all()
    lengths = mask.sum(axis=1)
    # Smallest bucket that fits the longest (truncated) sequence.
    assert length == min(b for b in BUCKETS if b >= lengths.max())
    real = weights > 0
    assert set(np.unique(weights)) <= {0.0, 1.0}
    for row, i in zip(np.flatnonzero(real), _example_ids(batch)):
      assert lengths[row] == min(len(token_ids[i]), 16)
      assert batch['labels'][row] == labels[i]
    # Fillers only ever come last, and never have an empty mask.
    assert real.tolist() == sorted(real.tolist(), reverse=True)
    assert (lengths > 0).all()
    fillers += int((~real).sum())
  assert fillers == 13 * 8 - 103


def test_length_sorting_reduces_padding():
  def padded(it):
    return sum(b['input_ids'].size for b in it.one_epoch())

  assert padded(_iterator(shuffle=True, window=50)) < padded(_iterator(shuffle=True, window=1))


def test_state_restore_mid_epoch_and_across_epoch_boundary():
  reference = _iterator()
  stream = [next(reference) for _ in range(40)]  # 40 batches cross 3 epochs of 13.
  for stop in (5, 13, 12, 25):  # Mid-epoch, exactly at a boundary, one before, later.
    it = _iterator()
    for _ in range(stop):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert set(state) == {'epoch', 'position'}
    restored = _iterator()
    restored.set_state(state)
    assert _same_batches([next(restored) for _ in range(40 - stop)], stream[stop:])
  it = _iterator()
  for _ in range(13):
    next(it)
  assert it.get_state() == {'epoch': 1, 'position': 0}


def test_one_epoch_does_not_touch_training_state():
  it = _iterator()
  next(it), next(it)
  state = it.get_state()
  list(it.one_epoch())
  assert it.get_state() == state
  with pytest.raises(ValueError):
    it.set_state({'epoch': 0, 'position': it.batches_per_epoch})


def test_batch_iterator_on_sst2(sst2):
  train_x, train_y = sst2['train']
  vocab = WordVocab.build(train_x, max_size=8000, min_count=1)
  ids = encode(train_x[:2000], vocab, max_len=64)
  it = BatchIterator(
    ids, train_y[:2000], 32, (16, 32, 64), seed=0, shuffle=True, drop_remainder=False
  )
  batches = list(it.one_epoch())
  assert len(batches) == it.batches_per_epoch == 63
  assert sum(b['weights'].sum() for b in batches) == 2000
  assert all((b['input_ids'][:, 0] == CLS_ID).all() for b in batches)
