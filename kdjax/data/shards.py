"""Training data in shards that each process reads on its own.

A job with `V = data.shards` shards (0 = one per process) gives shard `s` the records at
storage positions s, s + V, s + 2V, ... of the training split. Process p of P owns the
contiguous block of shards [p·V/P, (p+1)·V/P) and never reads another's records.

Every global batch is the concatenation, in shard order, of one batch of `batch_size / V`
rows from each shard; each shard shuffles with its own stream of the run's seed. The global
batch therefore depends on V only, never on P: a run over V shards gives the same numbers in
one process as in V processes, which is what the multi-process tests compare.

The only cross-process traffic is one small all-reduce per epoch: the per-batch padded lengths
(every shard of a batch pads to the longest row of the global batch, so the global array has
one shape) and, once, the common number of batches per epoch.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from kdjax.data.pipeline import BatchIterator, EpochCursor

# Elementwise maximum of an int array over every process of the job (identity in one process).
AllReduceMax = Callable[[np.ndarray], np.ndarray]


def shard_count(shards: int, process_count: int) -> int:
  """The job's shard count: `shards`, or one per process when it is 0."""
  count = shards or process_count
  if shards < 0 or count % process_count:
    raise ValueError(
      f'data.shards={shards}: must be 0 (one per process) or a positive multiple of the '
      f'process count {process_count}'
    )
  return count


def local_shards(num_shards: int, process_index: int, process_count: int) -> range:
  """The block of shards process `process_index` reads."""
  per_process = num_shards // process_count
  return range(process_index * per_process, (process_index + 1) * per_process)


def shard_positions(num_records: int, shard: int, num_shards: int) -> range:
  """Storage positions of shard `shard`'s records among the first `num_records`."""
  return range(shard, num_records, num_shards)


def _identity(x: np.ndarray) -> np.ndarray:
  return x


class ShardedBatches(EpochCursor):
  """This process's rows of every global batch, built from the shards it holds.

  `shards` are this process's shard ids, `parts` their BatchIterators (batch_size =
  global batch / num_shards, shuffle streams = shard ids). Batch `index` values are row
  numbers into the concatenation of this process's parts, in order: what per-example arrays
  computed over that concatenation (cached teacher outputs) are indexed with.
  Iteration, get_state and set_state follow BatchIterator's contract.
  """

  def __init__(self, parts: Sequence[BatchIterator], all_reduce_max: AllReduceMax = _identity):
    if not parts:
      raise ValueError('ShardedBatches needs at least one shard')
    self.parts = list(parts)
    self.all_reduce_max = all_reduce_max
    sizes = [len(p.token_ids) for p in self.parts]
    self.offsets = np.cumsum([0] + sizes[:-1]).astype(np.int64)
    # Shards differ in size by a row or so (more where augmentation adds copies); every
    # process must step through the same number of batches, so the smallest count wins.
    local = np.asarray([-min(p.batches_per_epoch for p in self.parts)], np.int64)
    self.batches_per_epoch = int(-self.all_reduce_max(local)[0])
    self._plan: tuple[int, list[list[np.ndarray]], np.ndarray] | None = None

  def _epoch_plan(self, epoch: int) -> tuple[list[list[np.ndarray]], np.ndarray]:
    """Each part's batches of `epoch` and the global padded length of each batch."""
    if self._plan is None or self._plan[0] != epoch:
      batches = [p.epoch_batches(epoch)[: self.batches_per_epoch] for p in self.parts]
      local = np.asarray(
        [
          max(p.padded_length(b[i]) for p, b in zip(self.parts, batches))
          for i in range(self.batches_per_epoch)
        ],
        np.int64,
      )
      self._plan = (epoch, batches, self.all_reduce_max(local))
    return self._plan[1], self._plan[2]

  def __iter__(self) -> 'ShardedBatches':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    epoch, i = self.advance()
    batches, lengths = self._epoch_plan(epoch)
    pieces = [p.make_batch(b[i], length=int(lengths[i])) for p, b in zip(self.parts, batches)]
    for piece, offset in zip(pieces, self.offsets):
      piece['index'] = (piece['index'] + offset).astype(np.int32)
    return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
