"""Multi30k (task 1) English-German sentence pairs: a tfds builder over the shipped files.

Like `sst2_builder`, the parsing is a plain function (`read_pairs`) that can be tested without
tfds, and the builder only feeds it to tfds' array_record writer; `load_split` reads the
prepared data back through `as_data_source` (no TensorFlow).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from kdjax.data.corpus import read_lines
from kdjax.data.errors import DataError
from kdjax.data.pipeline import _as_str

DEFAULT_RAW_DIR = Path(__file__).resolve().parent / 'raw' / 'multi30k'

# tfds split name -> upstream file stem (`<stem>.<lang>.gz` in data/task1/raw/).
SPLIT_FILES = {'train': 'train', 'validation': 'val', 'test': 'test_2016_flickr'}
LANGS = ('en', 'de')


def split_file(raw_dir: str | os.PathLike, split: str, lang: str) -> Path:
  """`<stem>.<lang>.gz` if present, else `<stem>.<lang>`; DataError if neither exists."""
  if split not in SPLIT_FILES:
    raise ValueError(f'Multi30k split must be one of {sorted(SPLIT_FILES)}, got {split!r}')
  name = f'{SPLIT_FILES[split]}.{lang}'
  raw_dir = Path(raw_dir)
  for candidate in (raw_dir / f'{name}.gz', raw_dir / name):
    if candidate.is_file():
      return candidate
  raise DataError(
    f'{raw_dir / name}: missing file for Multi30k split {split!r}; expected {name}.gz or '
    f'{name} in {raw_dir} (one sentence per line)'
  )


def read_pairs(raw_dir: str | os.PathLike, split: str) -> list[tuple[int, str, str]]:
  """`(index, en, de)` for every line pair of a split, in file order (index 0-based).

  Both files must have the same number of lines, none empty, all UTF-8; surrounding
  whitespace is stripped (40 lines of upstream train.de end in a space). Anything else is a
  DataError rather than a skipped line: a dropped line would misalign every pair after it.
  """
  en_path, de_path = (split_file(raw_dir, split, lang) for lang in LANGS)
  en, de = read_lines(en_path), read_lines(de_path)
  if len(en) != len(de):
    raise DataError(
      f'{en_path}: {len(en)} lines but {de_path} has {len(de)}; line i of the English file '
      f'must translate line i of the German one, so both need the same count'
    )
  return [(i, e, d) for i, (e, d) in enumerate(zip(en, de))]


class Multi30kLocal(tfds.core.GeneratorBasedBuilder):
  """Multi30k task 1 en-de from local files (gzipped or plain), written as array_record.

  The prepared data is cached per `data_dir` only: preparing from a different `raw_dir` into
  a `data_dir` that already holds `multi30k_local/1.0.0` reuses the old data.
  """

  name = 'multi30k_local'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Multi30k task 1 (en-de, test = test_2016_flickr) from local files.'}
  # See Sst2Local: tfds' default code_path lookup needs importlib_resources, absent without TF.
  code_path = None

  def __init__(self, *, raw_dir: str | os.PathLike = '', **kwargs):
    self._raw_dir = Path(raw_dir) if raw_dir else DEFAULT_RAW_DIR
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description='Multi30k task 1: English image captions with German translations.',
      features=tfds.features.FeaturesDict(
        {
          'idx': tfds.features.Scalar(dtype=np.int32),
          'en': tfds.features.Text(),
          'de': tfds.features.Text(),
        }
      ),
      homepage='https://github.com/multi30k/dataset',
      # File order == storage order, so runs are reproducible.
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    # Read (and so validate) every split before writing anything.
    pairs = {split: read_pairs(self._raw_dir, split) for split in SPLIT_FILES}
    return {split: self._generate_examples(rows) for split, rows in pairs.items()}

  def _generate_examples(self, rows):
    for idx, en, de in rows:
      yield idx, {'idx': idx, 'en': en, 'de': de}


def load_split(
  split: str,
  tfds_data_dir: str,
  raw_dir: str = '',
  source_lang: str = 'en',
  target_lang: str = 'de',
) -> tuple[list[str], list[str]]:
  """(sources, targets) of one split in file order, en->de unless the languages are swapped.

  Prepares Multi30k from `raw_dir` (default: the shipped files) into `tfds_data_dir` on first
  use.
  """
  if split not in SPLIT_FILES:
    raise ValueError(f'Multi30k split must be one of {sorted(SPLIT_FILES)}, got {split!r}')
  if {source_lang, target_lang} != set(LANGS):
    raise ValueError(
      f'source_lang={source_lang!r}, target_lang={target_lang!r}: need one of en and de each '
      '(en->de or de->en)'
    )
  builder = Multi30kLocal(data_dir=tfds_data_dir, raw_dir=raw_dir)
  if not builder.is_prepared():
    builder.download_and_prepare(file_format='array_record')
  source = builder.as_data_source(split=split)
  records = source.__getitems__(range(len(source)))  # One batched read.
  records = sorted(records, key=lambda r: int(r['idx']))
  sources = [_as_str(r[source_lang]) for r in records]
  targets = [_as_str(r[target_lang]) for r in records]
  return sources, targets
