"""Teacher outputs for a whole training set, computed once and read back by every student run.

A frozen teacher gives the same outputs for the same example in every epoch and every
student run (seeds, ablations), so running it live repeats the most expensive forward pass
of the distillation step. The cache stores, per example:
  'logits': the full logits [N, C], or
  'topk':   the k largest logits, their class ids and the log-sum-exp of the other classes
            ([N, k], [N, k], [N]) -- for many classes, what matters at moderate T,
  plus, optionally, 'pooled' representations [N, D] for feature losses.

Entries live in `<root>/<key>/`, where `key` hashes the teacher's exported files, the token
ids of every example, the tokenizer and the stored outputs, so any change to one of them
misses the cache instead of reusing stale outputs. Each array's sha256 is recorded and
checked on load: a corrupt entry is reported by path and recomputed, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Callable, Iterable, Sequence

import numpy as np

FORMAT_VERSION = 1
KINDS = ('logits', 'topk')


class CacheError(RuntimeError):
  """A cache entry is unreadable or does not match its recorded checksum/key."""


def file_sha256(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def directory_fingerprint(directory: pathlib.Path) -> str:
  """sha256 over every file's relative path and bytes: identifies an exported teacher."""
  digest = hashlib.sha256()
  directory = pathlib.Path(directory)
  for path in sorted(p for p in directory.rglob('*') if p.is_file()):
    rel = path.relative_to(directory).as_posix()
    if rel.startswith('cache/'):  # the cache may live inside the teacher's folder
      continue
    digest.update(rel.encode() + b'\0' + file_sha256(path).encode())
  return digest.hexdigest()


def ids_fingerprint(token_ids: Sequence[np.ndarray]) -> str:
  digest = hashlib.sha256()
  digest.update(np.asarray([len(t) for t in token_ids], np.int64).tobytes())
  for t in token_ids:
    digest.update(np.asarray(t, np.int32).tobytes())
  return digest.hexdigest()


def cache_key(teacher_fingerprint: str, ids_digest: str, tokenizer_id: str, spec: dict) -> str:
  payload = json.dumps(
    {
      'format': FORMAT_VERSION,
      'teacher': teacher_fingerprint,
      'ids': ids_digest,
      'tokenizer': tokenizer_id,
      'spec': spec,
    },
    sort_keys=True,
  )
  return hashlib.sha256(payload.encode()).hexdigest()[:32]


# -- top-k compression -----------------------------------------------------------------


def compress_topk(logits: np.ndarray, k: int) -> dict[str, np.ndarray]:
  """The k largest logits per row, their class ids, and log Σ exp(other logits)."""
  num_classes = logits.shape[-1]
  if not 1 <= k < num_classes:
    raise ValueError(f'top-k needs 1 <= k < num_classes={num_classes}, got k={k}')
  logits = np.asarray(logits, np.float64)
  order = np.argsort(-logits, axis=-1, kind='stable')
  top, rest = order[:, :k], order[:, k:]
  rest_logits = np.take_along_axis(logits, rest, axis=-1)
  peak = rest_logits.max(axis=-1, keepdims=True)
  lse_rest = peak[:, 0] + np.log(np.exp(rest_logits - peak).sum(axis=-1))
  return {
    'topk_values': np.take_along_axis(logits, top, axis=-1).astype(np.float32),
    'topk_indices': top.astype(np.int32),
    'lse_rest': lse_rest.astype(np.float32),
  }


def expand_topk(
  values: np.ndarray, indices: np.ndarray, lse_rest: np.ndarray, num_classes: int
) -> np.ndarray:
  """Dense logits whose softmax equals the teacher's on the top k classes and spreads the
  remaining probability mass evenly over the other classes (exact when k = C - 1)."""
  n, k = values.shape
  others = num_classes - k
  fill = lse_rest - np.log(others)
  logits = np.repeat(fill[:, None], num_classes, axis=1).astype(np.float32)
  np.put_along_axis(logits, indices.astype(np.int64), values, axis=1)
  return logits


# -- storage ---------------------------------------------------------------------------


class TeacherCache:
  """One folder of cached teacher outputs per key under `root`."""

  def __init__(self, root: str | os.PathLike):
    self.root = pathlib.Path(root).expanduser()

  def entry(self, key: str) -> pathlib.Path:
    return self.root / key

  def load(self, key: str) -> dict[str, np.ndarray] | None:
    """The arrays of `key`, or None if absent; CacheError if present but not intact."""
    folder = self.entry(key)
    meta_path = folder / 'meta.json'
    if not meta_path.is_file():
      return None
    try:
      meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CacheError(f'{meta_path}: unreadable cache metadata ({e})') from None
    if meta.get('key') != key or meta.get('format') != FORMAT_VERSION:
      raise CacheError(
        f'{meta_path}: entry records key {meta.get("key")!r} (format {meta.get("format")}), '
        f'expected {key!r} (format {FORMAT_VERSION}); stale or moved entry'
      )
    arrays = {}
    for name, recorded in meta['sha256'].items():
      path = folder / f'{name}.npy'
      if not path.is_file():
        raise CacheError(f'{path}: missing from the cache entry')
      actual = file_sha256(path)
      if actual != recorded:
        raise CacheError(
          f'{path}: sha256 {actual[:12]}… does not match the recorded {recorded[:12]}…'
        )
      arrays[name] = np.load(path, allow_pickle=False)
    return arrays

  def store(self, key: str, arrays: dict[str, np.ndarray], info: dict) -> pathlib.Path:
    """Writes the entry into a temporary folder and renames it into place, so a reader
    never sees a half-written entry and a crash leaves at most a stray temp folder."""
    self.root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.{key}.', dir=self.root))
    sums = {}
    for name, array in arrays.items():
      np.save(tmp / f'{name}.npy', np.ascontiguousarray(array), allow_pickle=False)
      sums[name] = file_sha256(tmp / f'{name}.npy')
    meta = {'key': key, 'format': FORMAT_VERSION, 'sha256': sums, **info}
    (tmp / 'meta.json').write_text(json.dumps(meta, indent=2, sort_keys=True))
    final = self.entry(key)
    if final.exists():  # a corrupt entry being replaced
      shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def compute_outputs(
  forward: Callable, batches: Iterable[dict], num_examples: int, pooled: bool
) -> dict[str, np.ndarray]:
  """Runs `forward(batch) -> (logits, out)` over ordered batches that cover every example
  once (filler rows have weight 0) and gathers outputs by each batch's 'index'."""
  logits, pooled_out, seen = None, None, np.zeros(num_examples, bool)
  for batch in batches:
    batch_logits, out = forward(batch)
    real = batch['weights'] > 0
    rows = batch['index'][real]
    batch_logits = np.asarray(batch_logits)[real]
    if logits is None:
      logits = np.zeros((num_examples, batch_logits.shape[-1]), np.float32)
    logits[rows] = batch_logits
    if pooled:
      values = np.asarray(out['pooled'])[real]
      if pooled_out is None:
        pooled_out = np.zeros((num_examples, values.shape[-1]), np.float32)
      pooled_out[rows] = values
    seen[rows] = True
  if not seen.all():
    raise ValueError(f'teacher cache: {int((~seen).sum())} examples were not in any batch')
  result = {'logits': logits}
  if pooled:
    result['pooled'] = pooled_out
  return result
