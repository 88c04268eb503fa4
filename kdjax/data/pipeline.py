"""Loading SST-2 through tfds data sources and batching it for training.

No TensorFlow: tfds is used only to prepare and read array_record files
(`as_data_source`), and batches are plain numpy dicts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from kdjax.data.errors import DataError
from kdjax.data.sst2_builder import SPLIT_FILES, Sst2Local

# Progress bars would flood training logs (and tests) for a 67k-row prepare.
tfds.disable_progress_bar()


def load_split(
  name: str,
  split: str,
  tfds_data_dir: str,
  raw_dir: str = '',
  positions: Callable[[int], Sequence[int]] | None = None,
) -> tuple[list[str], np.ndarray]:
  """Returns (sentences, int32 labels) of one split, in original file order.

  `name='sst2_local'` prepares SST-2 from the TSVs in `raw_dir` (default: the shipped
  ones) into `tfds_data_dir` on first use. Any other name (e.g. 'glue/sst2') must
  already be prepared as array_record in `tfds_data_dir`. `positions(num_records)` picks
  the storage positions to read (one data shard); only those records are read.
  """
  if split not in SPLIT_FILES:
    raise ValueError(f'split must be one of {sorted(SPLIT_FILES)}, got {split!r}')
  if name == Sst2Local.name:
    builder = Sst2Local(data_dir=tfds_data_dir, raw_dir=raw_dir)
    if not builder.is_prepared():
      builder.download_and_prepare(file_format='array_record')
    source = builder.as_data_source(split=split)
  else:
    source = _prepared_source(name, split, tfds_data_dir)
  wanted = range(len(source)) if positions is None else positions(len(source))
  records = source.__getitems__(wanted)  # One batched read, not 67k calls.
  # Storage order is not promised by tfds in general (only with disable_shuffling).
  order = np.argsort([int(r['idx']) for r in records], kind='stable')
  sentences = [_as_str(records[i]['sentence']) for i in order]
  labels = np.asarray([int(records[i]['label']) for i in order], dtype=np.int32)
  return sentences, labels


def _prepared_source(name: str, split: str, data_dir: str):
  dataset_dir = Path(data_dir) / name.split(':')[0]
  if not any(dataset_dir.glob('*/dataset_info.json')):
    raise DataError(
      f'{dataset_dir}: TFDS dataset {name!r} is not prepared in {data_dir} '
      f'(no <version>/dataset_info.json); prepare it first as array_record, e.g. '
      f'`tfds build {name} --data_dir={data_dir} --file_format=array_record` '
      f"(needs TensorFlow and network), or use name='sst2_local' to build SST-2 "
      f'from the shipped TSVs'
    )
  try:
    # download=False: never try to fetch or build anything behind the caller's back.
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except NotImplementedError as e:  # tfds' answer to a tfrecord-only dataset.
    raise DataError(
      f'{dataset_dir}: TFDS dataset {name!r} is prepared in a format without random '
      f'access ({str(e).splitlines()[0]}); re-prepare it with '
      f'--file_format=array_record'
    ) from None


def _as_str(value) -> str:
  # Data sources decode Text features to bytes, not str.
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def encode(sentences: Sequence[str], tokenizer, max_len: int) -> list[np.ndarray]:
  """Token ids per sentence with a WordVocab or a WordPieceTokenizer (batched in Rust)."""
  if hasattr(tokenizer, 'encode_batch'):
    return tokenizer.encode_batch(sentences, max_len)
  return [tokenizer.encode(s, max_len) for s in sentences]


class EpochCursor:
  """Where a never-ending stream of `batches_per_epoch` batches per epoch stands: the
  resumable (epoch, position) state that training checkpoints store."""

  batches_per_epoch: int
  _epoch = 0
  _position = 0

  def advance(self) -> tuple[int, int]:
    """The (epoch, position) of the batch to return now; moves on past it."""
    current = (self._epoch, self._position)
    self._position += 1
    if self._position == self.batches_per_epoch:
      self._epoch, self._position = self._epoch + 1, 0
    return current

  def get_state(self) -> dict[str, int]:
    """The batch the next `next()` returns, as JSON-serialisable ints."""
    return {'epoch': self._epoch, 'position': self._position}

  def set_state(self, state: dict[str, int]) -> None:
    epoch, position = int(state['epoch']), int(state['position'])
    if epoch < 0 or not 0 <= position < self.batches_per_epoch:
      raise ValueError(
        f'invalid iterator state {state}: need epoch >= 0 and '
        f'0 <= position < {self.batches_per_epoch}'
      )
    self._epoch, self._position = epoch, position


class BatchIterator(EpochCursor):
  """Deterministic, resumable, length-bucketed batches of padded token ids.

  Every batch has exactly `batch_size` rows so jitted steps see few shapes: with
  drop_remainder=False the last batch is filled with copies of its first example
  carrying weight 0 (copies rather than empty rows, so no row has an all-zero
  attention mask, which would turn into NaN in masked softmax/mean pooling).
  """

  def __init__(
    self,
    token_ids: list[np.ndarray],
    labels: np.ndarray,
    batch_size: int,
    buckets: tuple[int, ...],
    seed: int,
    shuffle: bool,
    drop_remainder: bool,
    bucket_window: int = 50,
    sort_by_length: bool = False,
    stream: int | None = None,
  ):
    if len(token_ids) != len(labels):
      raise ValueError(f'{len(token_ids)} sequences but {len(labels)} labels')
    if batch_size <= 0 or bucket_window <= 0:
      raise ValueError('batch_size and bucket_window must be positive')
    if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] <= 0:
      raise ValueError(f'buckets must be strictly increasing positive ints, got {buckets}')
    self.token_ids = token_ids
    self.labels = np.asarray(labels, dtype=np.int32)
    self.batch_size = batch_size
    self.buckets = tuple(int(b) for b in buckets)
    self.seed = seed
    self.shuffle = shuffle
    # Unshuffled passes whose consumer reorders by batch['index'] (the teacher-output cache)
    # can run shortest-first: each batch pads to its own bucket, not to its longest outlier.
    self.sort_by_length = sort_by_length
    self.drop_remainder = drop_remainder
    self.bucket_window = bucket_window
    # A data shard's own shuffle stream (kdjax.data.shards); None keeps the unsharded order.
    self.stream = stream
    # Lengths after truncation to the largest bucket: what the batch actually holds.
    self._lengths = np.array([min(len(t), self.buckets[-1]) for t in token_ids], dtype=np.int64)
    n = len(token_ids)
    self.batches_per_epoch = n // batch_size if drop_remainder else math.ceil(n / batch_size)
    if self.batches_per_epoch == 0:
      raise ValueError(
        f'{n} examples give no batch of size {batch_size}'
        f'{" with drop_remainder" if drop_remainder else ""}'
      )
    self._cached: tuple[int, list[np.ndarray]] | None = None

  # -- order -------------------------------------------------------------------------

  def epoch_batches(self, epoch: int) -> list[np.ndarray]:
    """Example indices of each batch of `epoch`; a pure function of (seed, epoch)."""
    n, size = len(self.token_ids), self.batch_size
    if not self.shuffle:
      order = np.argsort(self._lengths, kind='stable') if self.sort_by_length else np.arange(n)
      return [order[i : i + size] for i in range(0, self.batches_per_epoch * size, size)]
    key = [self.seed, epoch] if self.stream is None else [self.seed, epoch, self.stream]
    rng = np.random.default_rng(key)
    order = rng.permutation(n)
    if self.drop_remainder:
      # Drop before sorting, so the dropped examples are random, not the longest.
      order = order[: self.batches_per_epoch * size]
    # Sorting inside windows of the random order groups similar lengths (less
    # padding) while keeping the epoch random at a coarser grain.
    window = self.bucket_window * size
    for start in range(0, len(order), window):
      chunk = order[start : start + window]
      order[start : start + window] = chunk[np.argsort(self._lengths[chunk], kind='stable')]
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    # Otherwise batches would run short-to-long within each window.
    return [batches[i] for i in rng.permutation(len(batches))]

  def _batches_of(self, epoch: int) -> list[np.ndarray]:
    if self._cached is None or self._cached[0] != epoch:
      self._cached = (epoch, self.epoch_batches(epoch))
    return self._cached[1]

  # -- assembly ----------------------------------------------------------------------

  def padded_length(self, indices: np.ndarray) -> int:
    """The smallest bucket that holds the longest example at `indices`."""
    longest = int(self._lengths[indices].max())
    return next(b for b in self.buckets if b >= longest)

  def make_batch(self, indices: np.ndarray, length: int = 0) -> dict[str, np.ndarray]:
    """Pads the examples at `indices` (at most batch_size) to a full batch of `length`
    tokens (0: their own bucket; sharded batches pass the global batch's)."""
    size, real = self.batch_size, len(indices)
    length = length or self.padded_length(indices)
    # Filler rows repeat the first example (see class docstring).
    rows = np.concatenate([indices, np.full(size - real, indices[0], dtype=indices.dtype)])
    weights = np.zeros(size, dtype=np.float32)
    weights[:real] = 1.0
    input_ids = np.zeros((size, length), dtype=np.int32)  # 0 == [PAD]
    attention_mask = np.zeros((size, length), dtype=np.int32)
    for r, i in enumerate(rows):
      ids = self.token_ids[i][:length]
      input_ids[r, : len(ids)] = ids
      attention_mask[r, : len(ids)] = 1
    return {
      'input_ids': input_ids,
      'attention_mask': attention_mask,
      'labels': self.labels[rows],
      'weights': weights,
      # Row numbers into the example list: how cached per-example data (teacher outputs)
      # is looked up for a batch.
      'index': rows.astype(np.int32),
    }

  # -- iteration ---------------------------------------------------------------------

  def one_epoch(self, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """A single pass over `epoch`'s batches (for evaluation); leaves the state alone."""
    for indices in self.epoch_batches(epoch):
      yield self.make_batch(indices)

  def __iter__(self) -> 'BatchIterator':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    """Next training batch; never stops, moving on to the next epoch as needed."""
    epoch, position = self.advance()
    return self.make_batch(self._batches_of(epoch)[position])


def ordered_pass(ids, labels, batch_size: int, buckets) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `ids` in their order, padded to `buckets`, the last batch kept (filler
  rows weighted 0): what evaluation and prediction read."""
  return BatchIterator(
    ids, labels, batch_size, tuple(buckets), seed=0, shuffle=False, drop_remainder=False
  ).one_epoch()


class WithRowData:
  """A training iterator whose batches also carry `array[batch['index']]` under `key`:
  per-example data computed once (cached teacher logits or embeddings) joins each batch.
  Its position is the wrapped iterator's, so checkpoints and resume are unchanged."""

  def __init__(self, batches: BatchIterator, key: str, array: np.ndarray):
    self.batches, self.key, self.array = batches, key, array

  def __iter__(self) -> 'WithRowData':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self.batches)
    batch[self.key] = self.array[batch['index']]
    return batch

  def get_state(self) -> dict[str, int]:
    return self.batches.get_state()

  def set_state(self, state: dict[str, int]) -> None:
    self.batches.set_state(state)
