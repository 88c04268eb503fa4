"""Word-level vocabulary: lowercase, whitespace split, fixed special tokens."""

from __future__ import annotations

import collections
import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from kdjax.data.errors import DataError

PAD, UNK, CLS, SEP = '[PAD]', '[UNK]', '[CLS]', '[SEP]'
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP)
PAD_ID, UNK_ID, CLS_ID, SEP_ID = range(len(SPECIAL_TOKENS))


def tokenize(sentence: str) -> list[str]:
  return sentence.lower().split()


class WordVocab:
  """Maps words to ids; ids 0..3 are always [PAD], [UNK], [CLS], [SEP]."""

  def __init__(self, tokens: Sequence[str]):
    tokens = list(tokens)
    if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
      raise ValueError(f'vocab must start with {SPECIAL_TOKENS}, got {tokens[:4]}')
    self._tokens = tokens
    self._ids = {token: i for i, token in enumerate(tokens)}
    if len(self._ids) != len(tokens):
      raise ValueError('vocab tokens must be unique')

  @classmethod
  def build(cls, sentences: Iterable[str], max_size: int, min_count: int = 1) -> 'WordVocab':
    """Keeps the most frequent words (count >= min_count).

    `max_size` counts the 4 special tokens, so it is the embedding-table size.
    Ties are broken by the word itself so the vocab does not depend on input order.
    """
    if max_size < len(SPECIAL_TOKENS):
      raise ValueError(f'max_size must be >= {len(SPECIAL_TOKENS)}, got {max_size}')
    counts = collections.Counter()
    for sentence in sentences:
      counts.update(tokenize(sentence))
    words = sorted(
      (w for w, c in counts.items() if c >= min_count and w not in SPECIAL_TOKENS),
      key=lambda w: (-counts[w], w),
    )
    return cls(SPECIAL_TOKENS + tuple(words[: max_size - len(SPECIAL_TOKENS)]))

  @property
  def tokens(self) -> list[str]:
    return list(self._tokens)

  def __len__(self) -> int:
    return len(self._tokens)

  def __eq__(self, other) -> bool:
    return isinstance(other, WordVocab) and self._tokens == other._tokens

  @property
  def fingerprint(self) -> str:
    """Identifies the token list (cache keys); equal vocabularies share it."""
    return hashlib.sha256('\n'.join(self._tokens).encode()).hexdigest()[:16]

  def token_id(self, word: str) -> int:
    return self._ids.get(word, UNK_ID)

  def encode(self, sentence: str, max_len: int) -> np.ndarray:
    """[CLS] + word ids (unknown words -> [UNK]), truncated to max_len; int32."""
    ids = [CLS_ID] + [self._ids.get(w, UNK_ID) for w in tokenize(sentence)]
    return np.asarray(ids[:max_len], dtype=np.int32)

  def save(self, path: str | os.PathLike) -> None:
    # Plain text, one token per line: readable, diffable, no pickle. Tokens come
    # from whitespace splitting, so they never contain a newline.
    Path(path).write_text(''.join(t + '\n' for t in self._tokens), encoding='utf-8')

  @classmethod
  def load(cls, path: str | os.PathLike) -> 'WordVocab':
    path = Path(path)
    try:
      text = path.read_text(encoding='utf-8')
    except FileNotFoundError:
      raise DataError(
        f'{path}: vocab file not found; expected a file written by WordVocab.save'
      ) from None
    except UnicodeDecodeError:
      raise DataError(f'{path}: vocab file is not valid UTF-8') from None
    tokens = text.split('\n')
    if tokens and tokens[-1] == '':
      tokens.pop()  # Trailing newline of the last line.
    try:
      return cls(tokens)
    except ValueError as e:
      raise DataError(f'{path}: invalid vocab file ({e})') from None
