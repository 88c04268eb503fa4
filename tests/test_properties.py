"""Property-based tests (hypothesis) of the input boundaries: config validation and the data
readers meet generated bad input with one-line errors of their own type, never a raw
exception, and write nothing anywhere."""

import gzip
import math
import pathlib
import tempfile

import ml_collections
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from configs import default
from kdjax import config as config_lib
from kdjax import train
from kdjax.data import mnist, sst2_builder, stsb
from kdjax.data.errors import DataError

SETTINGS = settings(
  max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _leaves(config: ml_collections.ConfigDict, prefix=''):
  for key, value in config.items():
    path = f'{prefix}{key}'
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, path + '.')
    else:
      yield path, value


SCALAR_KEYS = sorted(
  path
  for path, value in _leaves(default.get_config())
  if isinstance(value, (int, float, str)) and not isinstance(value, bool)
)

# Values a typo, a unit mix-up or a script bug produce.
numbers = st.one_of(
  st.integers(-(10**6), 10**6),
  st.floats(allow_nan=True, allow_infinity=True),
  st.sampled_from([0, -1, 1, 0.0, -0.5, 1.0, 1.5, 1e-12, 1e12]),
)
texts = st.one_of(st.text(max_size=12), st.sampled_from(['', ' ', 'none', 'None', 'auto']))


def _set(config, path, value) -> bool:
  """Assigns like a `--config.<path>=` override would; False where ml_collections itself
  refuses the type (the CLI reports that as a one-line 'bad --config override')."""
  *parents, leaf = path.split('.')
  node = config
  for part in parents:
    node = node[part]
  try:
    node[leaf] = value
  except (TypeError, ValueError):
    return False
  return True


@SETTINGS
@given(key=st.sampled_from(SCALAR_KEYS), value=st.one_of(numbers, texts))
def test_config_validation_answers_any_value_with_a_one_line_config_error(key, value, tmp_path):
  tmp_path = _fresh(tmp_path)
  config = default.get_config()
  if not _set(config, key, value):
    return
  workdir = tmp_path / 'run'
  try:
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    message = str(e)
    assert '\n' not in message and message.startswith('config.'), message
    # A run with it stops at the same line, before creating or writing anything.
    with pytest.raises(config_lib.ConfigError, match='^config'):
      train.run(config, workdir)
    assert list(tmp_path.iterdir()) == []
    return
  # Accepted: then it is a value of the schema's kind (no NaN or infinity slips through).
  if isinstance(value, float):
    assert math.isfinite(value) or key.startswith('data.'), (key, value)


def _only(folder, *names):
  assert sorted(p.name for p in folder.iterdir()) == sorted(names)


def _fresh(tmp_path) -> pathlib.Path:
  """An empty folder per generated example (hypothesis reuses the test's tmp_path)."""
  return pathlib.Path(tempfile.mkdtemp(dir=tmp_path))


tsv_text = st.lists(
  st.one_of(
    st.text(alphabet=st.characters(codec='utf-8'), max_size=20),
    st.sampled_from(['sentence\tlabel', 'a film .\t1', 'bad\t2', '\t0', 'x\ty\tz', '0\tok']),
  ),
  max_size=6,
).map('\n'.join)


@SETTINGS
@given(
  body=st.one_of(tsv_text.map(lambda t: t.encode('utf-8')), st.binary(max_size=200)),
  split=st.sampled_from(['train', 'validation', 'test']),
  gzipped=st.booleans(),
)
def test_sst2_reader_rows_or_data_error(body, split, gzipped, tmp_path):
  tmp_path = _fresh(tmp_path)
  path = tmp_path / ('rows.tsv.gz' if gzipped else 'rows.tsv')
  path.write_bytes(gzip.compress(body) if gzipped and len(body) % 3 else body)
  try:
    rows = list(sst2_builder.read_sst2_tsv(path, split))
  except DataError as e:
    assert str(e).startswith(str(path)) and '\n' not in str(e), str(e)
  else:
    assert rows and all(s.strip() == s and s for _, s, _ in rows)
    assert all(label in ((-1,) if split == 'test' else (0, 1)) for _, _, label in rows)
  _only(tmp_path, path.name)


@SETTINGS
@given(
  body=st.one_of(
    st.binary(max_size=200),
    st.lists(
      st.one_of(
        st.text(max_size=20),
        st.sampled_from(['sentence1\tsentence2\tscore', 'a\tb\t3.5', 'a\tb\tnan', 'a\t\t1']),
      ),
      max_size=5,
    ).map(lambda lines: '\n'.join(lines).encode('utf-8')),
  )
)
def test_stsb_reader_pairs_or_data_error(body, tmp_path):
  tmp_path = _fresh(tmp_path)
  path = tmp_path / 'pairs.tsv'
  path.write_bytes(body)
  try:
    pairs = stsb.read_stsb(path)
  except DataError as e:
    assert str(e).startswith(str(path)) and '\n' not in str(e), str(e)
  else:
    assert all(0.0 <= s <= stsb.MAX_SCORE for s in pairs.scores)
  _only(tmp_path, path.name)


@SETTINGS
@given(
  magic=st.sampled_from([mnist.IMAGE_MAGIC, mnist.LABEL_MAGIC, 0, 2049 + 1]),
  dims=st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=3),
  payload=st.binary(max_size=64),
  expect=st.sampled_from([mnist.IMAGE_MAGIC, mnist.LABEL_MAGIC]),
  gzipped=st.booleans(),
)
def test_idx_reader_array_or_data_error(magic, dims, payload, expect, gzipped, tmp_path):
  tmp_path = _fresh(tmp_path)
  raw = magic.to_bytes(4, 'big') + b''.join(d.to_bytes(4, 'big') for d in dims) + payload
  path = tmp_path / ('x.idx.gz' if gzipped else 'x.idx')
  path.write_bytes(gzip.compress(raw) if gzipped else raw)
  try:
    array = mnist.read_idx(path, expect)
  except DataError as e:
    assert str(e).startswith(str(path)) and '\n' not in str(e), str(e)
  else:
    assert array.ndim == (3 if expect == mnist.IMAGE_MAGIC else 1)
  _only(tmp_path, path.name)


def test_missing_file_is_a_data_error_naming_it(tmp_path):
  missing = pathlib.Path(tmp_path) / 'nope.tsv'
  with pytest.raises(DataError, match=str(missing)):
    stsb.read_stsb(missing)
  with pytest.raises(DataError, match=str(missing)):
    list(sst2_builder.read_sst2_tsv(missing, 'train'))
