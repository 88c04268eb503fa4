"""A teacher's sentence embeddings of a corpus, computed once and kept in the run's workdir.

The teacher pass over ~100k sentences is the most expensive step of an embedding-distillation
run after training itself, and a resumed or repeated run needs exactly the same numbers. They
are stored as `<name>.npy` (plain array, never pickle) with a `<name>.json` sidecar holding:
  key:       sha256 over the teacher checkpoint's file hashes, the corpus hash, the tokenizer
             fingerprint and max_len (and the pooling), with each part listed in `key_parts`;
  sha256:    of the .npy file, checked on every load.
A different key or a checksum mismatch is reported (which part changed, or which file is
damaged) and the embeddings recomputed; stale or corrupt numbers are never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Callable

import numpy as np

from kdjax import report
from kdjax.teacher_cache import file_sha256

FORMAT_VERSION = 1


def checkpoint_fingerprint(folder: str | os.PathLike) -> str:
  """sha256 over the weights and config of a Hugging Face checkpoint folder."""
  folder = pathlib.Path(folder)
  digest = hashlib.sha256()
  for name in ('config.json', 'model.safetensors'):
    digest.update(name.encode() + b'\0' + file_sha256(folder / name).encode())
  return digest.hexdigest()


def key_parts(teacher: str, corpus: str, tokenizer: str, max_len: int) -> dict:
  return {
    'format': FORMAT_VERSION,
    'pooling': 'masked_mean',
    'teacher_checkpoint_sha256': teacher,
    'corpus_sha256': corpus,
    'tokenizer': tokenizer,
    'max_len': int(max_len),
  }


def key_of(parts: dict) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class EmbeddingStore:
  """`<directory>/<name>.npy` + `<name>.json`; see the module docstring."""

  def __init__(self, directory: str | os.PathLike, name: str = 'teacher_embeddings'):
    directory = pathlib.Path(directory)
    self.array_path = directory / f'{name}.npy'
    self.meta_path = directory / f'{name}.json'

  def load(self, parts: dict) -> tuple[np.ndarray | None, str]:
    """(array, '') if a stored array matches `parts` intact; else (None, why not)."""
    if not self.meta_path.is_file():
      return None, f'no stored embeddings at {self.array_path}'
    try:
      meta = json.loads(self.meta_path.read_text())
      stored_parts, stored_key, recorded = meta['key_parts'], meta['key'], meta['sha256']
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
      return None, f'{self.meta_path}: unreadable sidecar ({type(e).__name__}: {e})'
    if stored_key != key_of(parts):
      changed = sorted(
        k for k in set(parts) | set(stored_parts) if parts.get(k) != stored_parts.get(k)
      )
      return None, (
        f'{self.array_path} was computed for another setup ({", ".join(changed) or "key"} differ)'
      )
    if not self.array_path.is_file():
      return None, f'{self.array_path}: missing (its sidecar {self.meta_path.name} exists)'
    actual = file_sha256(self.array_path)
    if actual != recorded:
      return None, (
        f'{self.array_path}: sha256 {actual[:12]}... does not match the recorded '
        f'{recorded[:12]}... (damaged or modified file)'
      )
    try:
      return np.load(self.array_path, allow_pickle=False), ''
    except (ValueError, OSError) as e:  # checksum matched a file numpy cannot read
      return None, f'{self.array_path}: unreadable ({e})'

  def save(self, parts: dict, array: np.ndarray, info: dict) -> None:
    """Array first, sidecar last, each atomically: a kill in between leaves a sidecar that
    does not describe the array, which the next load reports and recomputes."""
    self.array_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = self.array_path.with_name(self.array_path.name + '.tmp')
    with open(tmp, 'wb') as f:  # a file object: np.save would append .npy to a path
      np.save(f, np.ascontiguousarray(array), allow_pickle=False)
    os.replace(tmp, self.array_path)
    meta = {
      'key': key_of(parts),
      'key_parts': parts,
      'sha256': file_sha256(self.array_path),
      'shape': list(array.shape),
      'dtype': str(array.dtype),
      **info,
    }
    report.write_json(self.meta_path, meta)


def load_or_compute(
  store: EmbeddingStore, parts: dict, compute: Callable[[], tuple[np.ndarray, dict]]
) -> tuple[np.ndarray, dict]:
  """(embeddings, info): the stored array and its sidecar if valid, else `compute()`'s
  (array, info) stored for next time; info['reused'] says which."""
  array, problem = store.load(parts)
  if array is not None:
    print(
      f'teacher embeddings: reusing {store.array_path} ({array.shape[0]} sentences)', flush=True
    )
    meta = json.loads(store.meta_path.read_text())
    return array, {k: v for k, v in meta.items() if k not in ('key', 'key_parts')} | {
      'reused': True
    }
  print(f'teacher embeddings: {problem}; computing them', flush=True)
  array, info = compute()
  store.save(parts, array, info)
  return array, {**info, 'reused': False}
