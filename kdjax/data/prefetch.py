"""Host-to-device prefetch: copy the next batches while the device runs the current step.

`jax.device_put` returns at once and copies asynchronously, so keeping `size` batches already
put ahead of the consumer overlaps the transfer (and the host work of producing the batch)
with the previous step's compute. Not wired into kdjax.loop; benchmarks/speedups.py measures
what it buys.
"""

import collections
import itertools
from typing import Any, Iterable, Iterator

import jax


def prefetch_to_device(iterator: Iterable[Any], size: int = 2, device=None) -> Iterator[Any]:
  """Yields the batches (pytrees of arrays) of `iterator`, each already `jax.device_put` on
  `device` (default: the default device), with up to `size` of them put before they are
  needed. The order and values are those of `iterator`."""
  if size < 1:
    raise ValueError(f'prefetch_to_device: size={size}; valid: an int >= 1')
  iterator = iter(iterator)
  queue = collections.deque()

  def enqueue(n: int) -> None:
    for batch in itertools.islice(iterator, n):
      queue.append(jax.device_put(batch, device))

  enqueue(size)
  while queue:
    batch = queue.popleft()
    enqueue(1)  # put the next one before handing this one over, so they overlap
    yield batch
