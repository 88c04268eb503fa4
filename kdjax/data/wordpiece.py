"""WordPiece tokenization from a Hugging Face `tokenizer.json` (the `tokenizers` library).

Same interface as `WordVocab` (`encode`, `__len__`, `save`/`load`, equality), so the
pipeline, the batcher and exported models treat both alike; [PAD] must be id 0 because
batches are zero-padded. Sentences become `[CLS] pieces [SEP]`, truncated to `max_len`
with [SEP] kept last, exactly as BERT was pre-trained.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Sequence

import numpy as np

from kdjax.data.errors import DataError

FILENAME = 'tokenizer.json'


def _cut(type_ids: Sequence[int], max_len: int) -> np.ndarray:
  """Token types truncated like `_fit` cuts ids: the last kept position is the final [SEP]."""
  if len(type_ids) > max_len:
    type_ids = list(type_ids[: max_len - 1]) + [type_ids[-1]]
  return np.asarray(type_ids, dtype=np.int32)


def parse_tokenizer_json(tokenizer_json: str, source: str, what: str):
  """A `tokenizers.Tokenizer` from JSON text, with the file's own truncation and padding off:
  kdjax truncates and pads per the pipeline's buckets (all-MiniLM's file pads everything to
  128). DataError naming `source` (and `what` it should be) when the JSON is malformed."""
  from tokenizers import Tokenizer

  try:
    tok = Tokenizer.from_str(tokenizer_json)
  except Exception as e:  # the Rust side raises a bare Exception on malformed JSON
    raise DataError(f'{source}: not a valid {what} ({str(e).splitlines()[0]})') from None
  tok.no_truncation()
  tok.no_padding()
  return tok


class WordPieceTokenizer:
  def __init__(self, tokenizer_json: str, source: str = '<memory>'):
    tok = parse_tokenizer_json(tokenizer_json, source, 'tokenizer.json')
    vocab = tok.get_vocab()
    for token in ('[PAD]', '[CLS]', '[SEP]', '[UNK]'):
      if token not in vocab:
        raise DataError(f'{source}: tokenizer has no {token} token; a BERT WordPiece one is needed')
    if vocab['[PAD]'] != 0:
      raise DataError(f'{source}: [PAD] has id {vocab["[PAD]"]}; batches are zero-padded, need 0')
    self._json = tokenizer_json
    self._tok = tok
    self.cls_id, self.sep_id = vocab['[CLS]'], vocab['[SEP]']
    self.mask_id = vocab.get('[MASK]')
    self.fingerprint = hashlib.sha256(tokenizer_json.encode()).hexdigest()[:16]

  @classmethod
  def load(cls, path: str | os.PathLike) -> 'WordPieceTokenizer':
    """From a tokenizer.json file, or a folder (e.g. a HF checkpoint) that holds one."""
    path = pathlib.Path(path)
    if path.is_dir():
      path = path / FILENAME
    try:
      return cls(path.read_text(encoding='utf-8'), str(path))
    except FileNotFoundError:
      raise DataError(f'{path}: tokenizer file not found') from None
    except UnicodeDecodeError:
      raise DataError(f'{path}: tokenizer file is not valid UTF-8') from None

  def save(self, path: str | os.PathLike) -> None:
    pathlib.Path(path).write_text(self._json, encoding='utf-8')

  def __len__(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def vocab(self) -> dict[str, int]:
    """{token: id}, word pieces ('##ing') and specials ([PAD], [unused0]) included."""
    return self._tok.get_vocab(with_added_tokens=True)

  def __eq__(self, other) -> bool:
    return isinstance(other, WordPieceTokenizer) and self.fingerprint == other.fingerprint

  def _fit(self, ids: Sequence[int], max_len: int) -> np.ndarray:
    # The file's post-processor added [CLS] ... [SEP]; cut the middle, keep [SEP] last.
    if len(ids) > max_len:
      ids = list(ids[: max_len - 1]) + [self.sep_id]
    return np.asarray(ids, dtype=np.int32)

  def encode(self, sentence: str, max_len: int) -> np.ndarray:
    return self._fit(self._tok.encode(sentence).ids, max_len)

  def encode_batch(self, sentences: Sequence[str], max_len: int) -> list[np.ndarray]:
    """Many sentences at once (the Rust tokenizer runs them in parallel)."""
    return [self._fit(e.ids, max_len) for e in self._tok.encode_batch(list(sentences))]

  def encode_padded(
    self,
    sentences: Sequence[str],
    max_len: int,
    buckets: Sequence[int] = (),
    pairs: Sequence[str] | None = None,
  ) -> dict[str, np.ndarray]:
    """input_ids, attention_mask, token_type_ids [N, L] for a batch, L the smallest bucket
    that fits (or the longest row without buckets). `pairs` gives BERT sentence pairs:
    `[CLS] a [SEP] b [SEP]`, token type 1 on the second segment."""
    if pairs is None:
      encodings = self._tok.encode_batch(list(sentences))
    else:
      # Pairs are cut like Hugging Face does ('longest_first': tokens come off the longer
      # segment), so neither segment vanishes; enabled only for this call.
      self._tok.enable_truncation(max_len, strategy='longest_first')
      try:
        encodings = self._tok.encode_batch(list(zip(sentences, pairs)))
      finally:
        self._tok.no_truncation()
    rows = [(self._fit(e.ids, max_len), _cut(e.type_ids, max_len)) for e in encodings]
    longest = max(len(ids) for ids, _ in rows)
    length = next((b for b in buckets if b >= longest), longest) if buckets else longest
    out = {
      k: np.zeros((len(rows), length), np.int32)
      for k in ('input_ids', 'attention_mask', 'token_type_ids')
    }
    for r, (ids, types) in enumerate(rows):
      out['input_ids'][r, : len(ids)] = ids
      out['attention_mask'][r, : len(ids)] = 1
      out['token_type_ids'][r, : len(ids)] = types
    return out

  def tokens(self, ids: Sequence[int]) -> list[str]:
    return [self._tok.id_to_token(int(i)) for i in ids]
