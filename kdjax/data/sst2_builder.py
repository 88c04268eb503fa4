"""TFDS builder for GLUE SST-2 read from local TSV files (no download, no TensorFlow).

The parsing lives in `read_sst2_tsv`, a plain generator, so it can be tested and reused
without tfds; the builder only wires it into tfds' array_record writer.
"""

from __future__ import annotations

import csv
import gzip
import os
from pathlib import Path
from typing import IO, Iterator

import numpy as np
import tensorflow_datasets as tfds

from kdjax.data.errors import DataError

DEFAULT_RAW_DIR = Path(__file__).resolve().parent / 'raw' / 'sst2'

# tfds split name -> GLUE file stem.
SPLIT_FILES = {'train': 'train', 'validation': 'dev', 'test': 'test'}
# GLUE's test file is unlabeled and puts an index column first.
_HEADERS = {
  'train': ['sentence', 'label'],
  'validation': ['sentence', 'label'],
  'test': ['index', 'sentence'],
}
UNLABELED = -1


def find_split_file(raw_dir: str | os.PathLike, split: str) -> Path:
  """Returns `<stem>.tsv.gz` if present, else `<stem>.tsv`; DataError if neither exists."""
  stem = SPLIT_FILES[split]
  raw_dir = Path(raw_dir)
  for candidate in (raw_dir / f'{stem}.tsv.gz', raw_dir / f'{stem}.tsv'):
    if candidate.is_file():
      return candidate
  raise DataError(
    f'{raw_dir / (stem + ".tsv")}: missing file for split {split!r}; '
    f'expected {stem}.tsv.gz or {stem}.tsv in {raw_dir}'
  )


def _open_binary(path: Path) -> IO[bytes]:
  if not path.is_file():
    raise DataError(f'{path}: file not found')
  return gzip.open(path, 'rb') if path.suffix == '.gz' else open(path, 'rb')


class TsvReader:
  """Rows of a GLUE-style TSV (no quoting: a `"` in a sentence is literal text), each line
  decoded as UTF-8; what csv cannot parse (a stray carriage return inside a line) becomes a
  DataError naming file and line. `line_num` is the line of the last row returned."""

  def __init__(self, f: IO[bytes], path: Path):
    self.path = path
    self._reader = csv.reader(_utf8_lines(f, path), delimiter='\t', quoting=csv.QUOTE_NONE)

  @property
  def line_num(self) -> int:
    return self._reader.line_num

  def __iter__(self) -> 'TsvReader':
    return self

  def __next__(self) -> list[str]:
    try:
      return next(self._reader)
    except csv.Error as e:
      raise DataError(
        f'{self.path}:{self._reader.line_num + 1}: unparseable line ({e}); expected '
        'tab-separated fields, one row per line'
      ) from None


def _utf8_lines(f: IO[bytes], path: Path) -> Iterator[str]:
  # Decode line by line ourselves (instead of a text-mode file) so a bad byte is
  # reported with its line number rather than as an opaque UnicodeDecodeError.
  try:
    for line_no, raw in enumerate(f, start=1):
      try:
        yield raw.decode('utf-8')
      except UnicodeDecodeError as e:
        raise DataError(
          f'{path}:{line_no}: invalid UTF-8 byte {raw[e.start : e.start + 1]!r} '
          f'at column {e.start + 1}; the file must be UTF-8 encoded'
        ) from None
  except (EOFError, OSError) as e:  # gzip.BadGzipFile is an OSError.
    raise DataError(
      f'{path}: unreadable ({e}); expected a valid gzip-compressed '
      f'(.tsv.gz) or plain (.tsv) TSV file'
    ) from None


def read_sst2_tsv(path: str | os.PathLike, split: str) -> Iterator[tuple[int, str, int]]:
  """Yields `(idx, sentence, label)` for each row of a GLUE SST-2 TSV, in file order.

  `idx` is the 0-based row number (for test, the file's own index column, which must
  match it); `label` is -1 for the unlabeled test split. Raises DataError on any
  malformed row instead of skipping it: silently dropped rows would change the dataset.
  """
  path = Path(path)
  expected_header = _HEADERS[split]
  expected_text = repr('\t'.join(expected_header))
  labeled = split != 'test'
  with _open_binary(path) as f:
    reader = TsvReader(f, path)
    header = next(reader, None)
    if header != expected_header:
      found = repr('\t'.join(header)) if header else 'missing'
      raise DataError(f'{path}:1: header is {found}, expected {expected_text}')
    idx = -1
    for idx, row in enumerate(reader):
      where = f'{path}:{reader.line_num}'
      if len(row) != 2:
        raise DataError(
          f'{where}: {len(row)} tab-separated fields, expected 2 ({" and ".join(expected_header)})'
        )
      if labeled:
        sentence, label_text = row
        if label_text not in ('0', '1'):
          raise DataError(f'{where}: label {label_text!r}, expected 0 or 1')
        label = int(label_text)
      else:
        index_text, sentence = row
        if index_text != str(idx):
          raise DataError(
            f'{where}: index {index_text!r}, expected {idx} '
            f'(rows numbered 0, 1, 2, ... in file order)'
          )
        label = UNLABELED
      # GLUE ends every train/dev sentence with a space before the tab.
      sentence = sentence.strip()
      if not sentence:
        raise DataError(f'{where}: empty sentence, expected non-blank text')
      yield idx, sentence, label
    if idx < 0:
      raise DataError(f'{path}:2: no examples after the header; a split needs at least one row')


class Sst2Local(tfds.core.GeneratorBasedBuilder):
  """GLUE SST-2 from local TSVs (gzipped or plain), written as array_record.

  Features match tfds' `glue/sst2` (`sentence`, `label`, `idx`) except that `label` is a
  plain int64 (-1 on test) rather than a ClassLabel.

  The prepared data is cached per `data_dir` only: preparing from a different `raw_dir`
  into a `data_dir` that already holds `sst2_local/1.0.0` reuses the old data.
  """

  name = 'sst2_local'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'GLUE SST-2 read from local TSV files.'}
  # tfds only uses code_path to find a download-checksums file, and we download
  # nothing. Its default lookup for a class inside a package imports
  # `importlib_resources`, which tfds does not install; without TF that import fails.
  code_path = None

  def __init__(self, *, raw_dir: str | os.PathLike = '', **kwargs):
    self._raw_dir = Path(raw_dir) if raw_dir else DEFAULT_RAW_DIR
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly: `dataset_info_from_configs` wants a packaged metadata dir.
    return tfds.core.DatasetInfo(
      builder=self,
      description='GLUE SST-2 (Stanford Sentiment Treebank, binary) from local TSVs.',
      features=tfds.features.FeaturesDict(
        {
          'sentence': tfds.features.Text(),
          'label': tfds.features.Scalar(dtype=np.int64),
          'idx': tfds.features.Scalar(dtype=np.int32),
        }
      ),
      homepage='https://gluebenchmark.com',
      # Keep file order so `idx` order == storage order and runs are reproducible.
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    # Resolve every file before writing anything, so a missing one fails fast.
    paths = {split: find_split_file(self._raw_dir, split) for split in SPLIT_FILES}
    return {split: self._generate_examples(path, split) for split, path in paths.items()}

  def _generate_examples(self, path: Path, split: str):
    for idx, sentence, label in read_sst2_tsv(path, split):
      yield idx, {'sentence': sentence, 'label': label, 'idx': idx}
