"""Training data in shards read by separate processes (kdjax.data.shards)."""

import threading

import numpy as np
import pytest

from kdjax.data import shards
from kdjax.data.pipeline import BatchIterator, load_split

BUCKETS = (4, 8, 16)
NUM_SHARDS = 4
GLOBAL_BATCH = 8


def _rows(n=203, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 17, size=n)
  # Token ids are 10 + row number, so every batch row can be traced back to its record.
  token_ids = [np.full(length, 10 + i, dtype=np.int32) for i, length in enumerate(lengths)]
  return token_ids, (np.arange(n) % 2).astype(np.int32)


def _process_parts(process, processes, n=203):
  """The BatchIterators of the shards `process` reads: only its own records."""
  token_ids, labels = _rows(n)
  parts = []
  for shard in shards.local_shards(NUM_SHARDS, process, processes):
    rows = list(shards.shard_positions(n, shard, NUM_SHARDS))
    parts.append(
      BatchIterator(
        [token_ids[r] for r in rows],
        labels[rows],
        GLOBAL_BATCH // NUM_SHARDS,
        BUCKETS,
        seed=3,
        shuffle=True,
        drop_remainder=True,
        bucket_window=2,
        stream=shard,
      )
    )
  return parts


class _ThreadCluster:
  """`processes` threads standing in for processes; all_reduce_max is a real rendezvous."""

  def __init__(self, processes):
    self.barrier = threading.Barrier(processes)
    self.slots = [None] * processes

  def all_reduce_max(self, process):
    def reduce(x):
      self.slots[process] = np.asarray(x)
      self.barrier.wait()
      out = np.max(np.stack(self.slots), axis=0)
      self.barrier.wait()  # nobody overwrites a slot before everyone has read them all
      return out

    return reduce


def _run_processes(processes, num_batches, restore_at=None):
  """Each 'process' builds its ShardedBatches and draws `num_batches` local batches."""
  cluster = _ThreadCluster(processes)
  out = [None] * processes

  def work(p):
    it = shards.ShardedBatches(_process_parts(p, processes), cluster.all_reduce_max(p))
    got = []
    for i in range(num_batches):
      if restore_at == i:  # a restart: a new iterator set to the saved state
        state = it.get_state()
        it = shards.ShardedBatches(_process_parts(p, processes), cluster.all_reduce_max(p))
        it.set_state(state)
      got.append(next(it))
    out[p] = got

  threads = [threading.Thread(target=work, args=(p,)) for p in range(processes)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  assert all(o is not None for o in out), 'a simulated process failed'
  return out


def _global_token(batch):
  """Record id of each row (token id 10 + record)."""
  return batch['input_ids'][:, 0] - 10


def test_global_batches_depend_on_the_shard_count_not_the_process_count():
  (one,) = _run_processes(1, 60)  # 60 > batches per epoch: crosses an epoch boundary
  two = _run_processes(2, 60)
  four = _run_processes(4, 60)
  for i, want in enumerate(one):
    for split in (two, four):
      got = {k: np.concatenate([proc[i][k] for proc in split]) for k in ('input_ids', 'labels')}
      np.testing.assert_array_equal(got['input_ids'], want['input_ids'])
      np.testing.assert_array_equal(got['labels'], want['labels'])


def test_each_process_holds_only_its_shards_records_and_pads_to_one_global_length():
  n = 203
  processes = _run_processes(2, 25)
  it = shards.ShardedBatches(_process_parts(0, 2, n))
  epoch = it.batches_per_epoch
  assert epoch == (n // NUM_SHARDS) // (GLOBAL_BATCH // NUM_SHARDS)  # smallest shard decides
  for p, batches in enumerate(processes):
    own = set(shards.local_shards(NUM_SHARDS, p, 2))
    for b in batches:
      assert {int(r) % NUM_SHARDS for r in _global_token(b)} <= own
      assert b['input_ids'].shape[0] == GLOBAL_BATCH // 2
  for i in range(25):
    lengths = {batches[i]['input_ids'].shape[1] for batches in processes}
    assert len(lengths) == 1  # one global array shape
    longest = max(int(b['attention_mask'].sum(1).max()) for b in (x[i] for x in processes))
    assert lengths.pop() == next(b for b in BUCKETS if b >= longest)
  # Within an epoch no record repeats.
  seen = np.concatenate([_global_token(b) for batches in processes for b in batches[:epoch]])
  assert len(seen) == len(set(seen.tolist()))


def test_index_points_into_this_process_rows_in_shard_order():
  (batches,) = _run_processes(1, 10)
  token_ids, _ = _rows()
  local = [
    token_ids[r] for s in range(NUM_SHARDS) for r in shards.shard_positions(203, s, NUM_SHARDS)
  ]
  for b in batches:
    for row, index in zip(b['input_ids'], b['index']):
      assert row[0] == local[index][0]


def test_resume_gives_the_same_batches():
  want = _run_processes(2, 40)
  got = _run_processes(2, 40, restore_at=27)
  for w, g in zip(want, got):
    for a, b in zip(w, g):
      np.testing.assert_array_equal(a['input_ids'], b['input_ids'])


def test_shard_count_and_assignment():
  assert shards.shard_count(0, 4) == 4
  assert shards.shard_count(8, 4) == 8
  with pytest.raises(ValueError, match='data.shards=6: must be 0'):
    shards.shard_count(6, 4)
  assert [list(shards.local_shards(8, p, 4)) for p in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
  covered = sorted(r for s in range(3) for r in shards.shard_positions(10, s, 3))
  assert covered == list(range(10))


def test_load_split_reads_only_the_requested_positions(tfds_dir):
  text, labels = load_split('sst2_local', 'validation', tfds_dir)
  part_text, part_labels = load_split(
    'sst2_local', 'validation', tfds_dir, positions=lambda n: shards.shard_positions(n, 1, 3)
  )
  assert part_text == text[1::3]
  np.testing.assert_array_equal(part_labels, labels[1::3])
