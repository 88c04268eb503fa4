"""A joint source+target subword tokenizer for translation (the `tokenizers` library).

Trained on both languages at once so the encoder and decoder share one vocabulary (and can
share embeddings). Text is split on spaces by a Metaspace pre-tokenizer (a space becomes
'▁' at the start of the following piece) and the matching decoder turns '▁' back into spaces,
so `decode(encode(text)) == text` for text without leading/trailing whitespace. There is no
normaliser: NFKC would change the no-break spaces of upstream train.de/val.de, and BLEU is
computed against the untouched references. Characters never seen in training become <unk>.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Iterable, Sequence

import numpy as np

from kdjax.data.errors import DataError
from kdjax.data.wordpiece import parse_tokenizer_json

FILENAME = 'subword.json'
# Fixed ids: batches are zero-padded, and the decoder's start/stop tokens are constants.
SPECIALS = ('<pad>', '<s>', '</s>', '<unk>')
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIALS))
KINDS = ('bpe', 'unigram')
_SCORE_DECIMALS = 4
# Gap between the trainer's appended characters (1e-4), with room for rounding.
_TAIL_STEP = 1.5e-4


class SubwordTokenizer:
  def __init__(self, tokenizer_json: str, source: str = '<memory>'):
    tok = parse_tokenizer_json(tokenizer_json, source, 'tokenizer file')
    for want, token in enumerate(SPECIALS):
      got = tok.token_to_id(token)
      if got != want:
        raise DataError(
          f'{source}: special token {token} has id {got}, expected {want} '
          f'(ids 0-3 must be {", ".join(SPECIALS)}); retrain with train_subword'
        )
    self._json = tokenizer_json
    self._tok = tok

  @classmethod
  def load(cls, directory: str | os.PathLike) -> 'SubwordTokenizer':
    path = pathlib.Path(directory) / FILENAME
    try:
      return cls(path.read_text(encoding='utf-8'), str(path))
    except FileNotFoundError:
      raise DataError(f'{path}: subword tokenizer file not found; save one first') from None
    except UnicodeDecodeError:
      raise DataError(f'{path}: subword tokenizer file is not valid UTF-8') from None

  def save(self, directory: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(directory) / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(self._json, encoding='utf-8')
    return path

  def fingerprint(self) -> str:
    """sha256 of the saved JSON: a cache key for anything computed from these ids."""
    return hashlib.sha256(self._json.encode('utf-8')).hexdigest()

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def __eq__(self, other) -> bool:
    return isinstance(other, SubwordTokenizer) and self._json == other._json

  def encode_batch(self, texts: Sequence[str], max_len: int) -> list[np.ndarray]:
    """int32 ids per text, at most `max_len` of them; no BOS/EOS (the batcher adds those)."""
    if max_len <= 0:
      raise ValueError(f'max_len must be positive, got {max_len}')
    return [
      np.asarray(e.ids[:max_len], dtype=np.int32) for e in self._tok.encode_batch(list(texts))
    ]

  def decode_batch(self, ids: Iterable[Sequence[int]]) -> list[str]:
    """Text per id row: stops at the first EOS, skips pad and BOS, keeps <unk> visible."""
    rows = []
    for row in ids:
      row = [int(i) for i in row]
      if EOS_ID in row:
        row = row[: row.index(EOS_ID)]
      rows.append([i for i in row if i not in (PAD_ID, BOS_ID)])
    # skip_special_tokens=False: an <unk> in a hypothesis should cost BLEU, not vanish.
    return self._tok.decode_batch(rows, skip_special_tokens=False)

  def tokens(self, ids: Sequence[int]) -> list[str]:
    return [self._tok.id_to_token(int(i)) for i in ids]


def train_subword(
  texts: Iterable[str], vocab_size: int = 8000, kind: str = 'bpe'
) -> SubwordTokenizer:
  """A tokenizer trained on `texts` (pass sources and targets together for a joint vocab).

  Training is deterministic (same texts, same vocabulary and ids), so there is no seed.
  `kind='unigram'` trains a SentencePiece-style unigram model instead of BPE.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  if kind not in KINDS:
    raise ValueError(f'subword kind must be one of {KINDS}, got {kind!r}')
  if vocab_size <= len(SPECIALS):
    raise ValueError(f'vocab_size must exceed the {len(SPECIALS)} special tokens, got {vocab_size}')
  common = dict(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False)
  if kind == 'bpe':
    tok = Tokenizer(models.BPE(unk_token='<unk>'))
    trainer = trainers.BpeTrainer(**common)
  else:
    tok = Tokenizer(models.Unigram())
    trainer = trainers.UnigramTrainer(unk_token='<unk>', **common)
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  tok.train_from_iterator(texts, trainer)
  tokenizer_json = tok.to_str()
  if kind == 'unigram':
    tokenizer_json = _canonical_unigram(tokenizer_json)
  return SubwordTokenizer(tokenizer_json, f'<trained {kind}>')


def _canonical_unigram(tokenizer_json: str) -> str:
  """The unigram model with log-probabilities rounded and pieces in a fixed order.

  The unigram trainer works in hash-map order, so two runs on the same texts give the same
  pieces but (a) scores ~1e-11 apart and (b) the characters it adds at the end (those its
  pruning dropped) get the scores min, min-1e-4, min-2e-4, ... in a random order. Rounding to
  1e-4, giving that tail its scores in code-point order, and sorting by (score, piece) makes
  the file, the ids and the fingerprint reproducible. Segmentations are unaffected: single
  characters only compete with longer pieces, never with each other.
  """
  config = json.loads(tokenizer_json)
  vocab = config['model']['vocab']
  pieces = sorted(
    ((piece, round(score, _SCORE_DECIMALS)) for piece, score in vocab[len(SPECIALS) :]),
    key=lambda p: p[1],
  )
  tail = 1
  while tail < len(pieces) and len(pieces[tail][0]) == 1 and len(pieces[tail - 1][0]) == 1:
    if pieces[tail][1] - pieces[tail - 1][1] > _TAIL_STEP:
      break
    tail += 1
  chars = sorted(piece for piece, _ in pieces[:tail])
  scores = sorted((score for _, score in pieces[:tail]), reverse=True)
  pieces = list(zip(chars, scores)) + pieces[tail:]
  pieces.sort(key=lambda p: (-p[1], p[0]))
  config['model']['vocab'] = vocab[: len(SPECIALS)] + [list(p) for p in pieces]
  return json.dumps(config, ensure_ascii=False)
