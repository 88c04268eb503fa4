"""Which tokenizer a run uses, and how it travels with workdirs and exported models.

`data.tokenizer='word'` builds a WordVocab from the training split (saved as vocab.txt);
`'wordpiece'` reads a BERT tokenizer.json (saved as tokenizer.json), needed whenever a
pretrained BERT is trained or distilled from, so teacher and student see the same ids.
"""

from __future__ import annotations

import pathlib
from typing import Sequence, Union

from kdjax.data import wordpiece
from kdjax.data.errors import DataError
from kdjax.data.vocab import WordVocab

Tokenizer = Union[WordVocab, wordpiece.WordPieceTokenizer]
TOKENIZERS = ('word', 'wordpiece')
_FILES = {WordVocab: 'vocab.txt', wordpiece.WordPieceTokenizer: wordpiece.FILENAME}


def wordpiece_source(path: str) -> pathlib.Path:
  """'' or 'minilm' -> the packaged MiniLM folder; otherwise a folder or tokenizer.json."""
  from kdjax.models import hf_bert

  return hf_bert.minilm_dir() if path in ('', 'minilm') else pathlib.Path(path).expanduser()


def make_tokenizer(data_cfg, train_text: Sequence[str], workdir: pathlib.Path) -> Tokenizer:
  """The run's tokenizer; a resumed run reloads the one saved in `workdir`."""
  saved = load_tokenizer(workdir, required=False)
  if saved is not None:
    return saved
  if data_cfg.tokenizer == 'word':
    tok = WordVocab.build(train_text, data_cfg.vocab_size, data_cfg.vocab_min_count)
  else:
    tok = wordpiece.WordPieceTokenizer.load(wordpiece_source(data_cfg.tokenizer_path))
  save_tokenizer(tok, workdir)
  return tok


def save_tokenizer(tok: Tokenizer, directory: pathlib.Path) -> None:
  tok.save(pathlib.Path(directory) / _FILES[type(tok)])


def load_tokenizer(directory: pathlib.Path, required: bool = True) -> Tokenizer | None:
  directory = pathlib.Path(directory)
  for cls, name in _FILES.items():
    if (directory / name).is_file():
      return cls.load(directory / name)
  if required:
    raise DataError(f'{directory}: no tokenizer (expected {" or ".join(_FILES.values())})')
  return None
