"""GLUE STS-B sentence pairs with their gold similarity scores (0-5).

Read with the standard library only (no tfds): the evaluation set is small and read whole.
A malformed row raises DataError naming file:line instead of being skipped, because a
silently dropped pair would change the Spearman correlation every result is compared on.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from kdjax.data.errors import DataError

# The shared helpers decode line by line so a bad byte is reported with its line number.
from kdjax.data.sst2_builder import TsvReader, _open_binary

DEFAULT_DIR = Path(__file__).resolve().parent / 'raw' / 'stsb'
SPLITS = ('train', 'dev')
MAX_SCORE = 5.0
_COLUMNS = ('sentence1', 'sentence2', 'score')


@dataclasses.dataclass(frozen=True)
class StsPairs:
  sentences1: list[str]
  sentences2: list[str]
  scores: np.ndarray  # float64 [N], in [0, 5]

  def __len__(self) -> int:
    return len(self.scores)

  def head(self, n: int) -> 'StsPairs':
    return StsPairs(self.sentences1[:n], self.sentences2[:n], self.scores[:n])


def split_file(split: str, directory: str | os.PathLike = '') -> Path:
  """`<dir>/<split>.tsv.gz`, else `<dir>/<split>.tsv` ('' = the copy shipped with kdjax)."""
  if split not in SPLITS:
    raise ValueError(f'STS-B split must be one of {SPLITS}, got {split!r}')
  directory = Path(directory) if directory else DEFAULT_DIR
  for candidate in (directory / f'{split}.tsv.gz', directory / f'{split}.tsv'):
    if candidate.is_file():
      return candidate
  raise DataError(f'{directory / (split + ".tsv")}: missing STS-B {split} file (.tsv or .tsv.gz)')


def read_stsb(path: str | os.PathLike) -> StsPairs:
  """All pairs of a GLUE STS-B TSV (header row naming sentence1, sentence2, score)."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f'{path}: STS-B file not found')
  firsts, seconds, scores = [], [], []
  with _open_binary(path) as f:
    # No quoting: sentences contain unbalanced '"' that a quoting reader would merge.
    reader = TsvReader(f, path)
    header = next(reader, None)
    if header is None:
      raise DataError(f'{path}: empty file; expected a header row with {", ".join(_COLUMNS)}')
    missing = [c for c in _COLUMNS if c not in header]
    if missing:
      raise DataError(
        f'{path}:1: header lacks column(s) {", ".join(missing)} (got {header[:10]}); '
        'expected the GLUE STS-B layout'
      )
    i1, i2, i_score = (header.index(c) for c in _COLUMNS)
    for fields in reader:
      where = f'{path}:{reader.line_num}'
      if len(fields) != len(header):
        raise DataError(f'{where}: {len(fields)} tab-separated fields, expected {len(header)}')
      try:
        score = float(fields[i_score])
      except ValueError:
        score = None
      if score is None or not 0.0 <= score <= MAX_SCORE:
        raise DataError(f'{where}: score {fields[i_score]!r} is not a number in [0, {MAX_SCORE:g}]')
      first, second = fields[i1].strip(), fields[i2].strip()
      if not first or not second:
        which = 'sentence1' if not first else 'sentence2'
        raise DataError(f'{where}: empty {which}')
      firsts.append(first)
      seconds.append(second)
      scores.append(score)
  return StsPairs(firsts, seconds, np.asarray(scores, np.float64))


def load_split(split: str, directory: str | os.PathLike = '') -> StsPairs:
  return read_stsb(split_file(split, directory))
