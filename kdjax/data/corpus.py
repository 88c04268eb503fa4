"""The unlabeled English sentences a sentence-embedding student is distilled on.

SST-2 train sentences, STS-B train sentences (scores unused) and the English side of Multi30k
train, in that order, each sentence kept at its first occurrence. Sentences that also occur in
the evaluation set (STS-B dev) are removed: the student must not be fitted to the teacher's
embeddings of the very sentences its correlation is measured on.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from kdjax.data import pipeline, stsb
from kdjax.data.errors import DataError

SOURCES = ('sst2', 'stsb', 'multi30k')
DEFAULT_MULTI30K = Path(__file__).resolve().parent / 'raw' / 'multi30k' / 'train.en.gz'


def dedup_key(sentence: str) -> str:
  # The MiniLM WordPiece tokenizer lowercases and splits on whitespace, so sentences that
  # differ only in case or spacing get the same token ids: count them once.
  return ' '.join(sentence.split()).lower()


@dataclasses.dataclass(frozen=True)
class Corpus:
  sentences: list[str]
  stats: dict  # per source: lines read and sentences kept; duplicates; eval sentences removed

  def fingerprint(self) -> str:
    return sentences_fingerprint(self.sentences)


def sentences_fingerprint(sentences: Sequence[str]) -> str:
  """sha256 over the sentences in order (NUL-separated, so no two lists collide)."""
  digest = hashlib.sha256()
  for s in sentences:
    digest.update(s.encode('utf-8') + b'\0')
  return digest.hexdigest()


def merge(sources: Mapping[str, Sequence[str]], exclude: Iterable[str]) -> Corpus:
  """Concatenates `sources` in their order, keeping each sentence's first occurrence and
  dropping empty ones and any that match a sentence in `exclude` (same `dedup_key`)."""
  banned = {dedup_key(s) for s in exclude}
  seen: set[str] = set()
  sentences: list[str] = []
  stats: dict = {'duplicates': 0, 'eval_sentences_removed': 0}
  for name, texts in sources.items():
    kept = 0
    for text in texts:
      key = dedup_key(text)
      if not key:
        continue
      if key in banned:
        stats['eval_sentences_removed'] += 1
        continue
      if key in seen:
        stats['duplicates'] += 1
        continue
      seen.add(key)
      sentences.append(text.strip())
      kept += 1
    stats[name] = {'read': len(texts), 'kept': kept}
  stats['total'] = len(sentences)
  return Corpus(sentences, stats)


def read_lines(path: str | os.PathLike) -> list[str]:
  """One sentence per line of a UTF-8 text file, gzipped or not; empty lines are errors."""
  path = Path(path)
  opener = gzip.open if path.suffix == '.gz' else open
  lines = []
  try:
    with opener(path, 'rb') as f:
      for line_no, raw in enumerate(f, start=1):
        try:
          line = raw.decode('utf-8').strip()
        except UnicodeDecodeError:
          raise DataError(f'{path}:{line_no}: invalid UTF-8; the file must be UTF-8') from None
        if not line:
          raise DataError(f'{path}:{line_no}: empty line; expected one sentence per line')
        lines.append(line)
  except FileNotFoundError:
    raise DataError(f'{path}: file not found') from None
  except (EOFError, OSError) as e:  # gzip.BadGzipFile is an OSError
    raise DataError(f'{path}: unreadable ({e})') from None
  return lines


def load_corpus(
  tfds_dir: str,
  sources: Sequence[str] = SOURCES,
  sst2_raw_dir: str = '',
  stsb_dir: str = '',
  multi30k_path: str = '',
) -> Corpus:
  """The training corpus from the shipped files ('' paths) with STS-B dev sentences removed."""
  unknown = [s for s in sources if s not in SOURCES]
  if unknown or not sources:
    raise ValueError(f'corpus sources must be drawn from {SOURCES}, got {tuple(sources)}')
  texts: dict[str, list[str]] = {}
  for name in SOURCES:  # fixed order, whatever order the config lists them in
    if name not in sources:
      continue
    if name == 'sst2':
      texts[name] = pipeline.load_split('sst2_local', 'train', tfds_dir, sst2_raw_dir)[0]
    elif name == 'stsb':
      train = stsb.load_split('train', stsb_dir)
      texts[name] = [s for pair in zip(train.sentences1, train.sentences2) for s in pair]
    else:
      texts[name] = read_lines(multi30k_path or DEFAULT_MULTI30K)
  dev = stsb.load_split('dev', stsb_dir)
  return merge(texts, exclude=dev.sentences1 + dev.sentences2)
