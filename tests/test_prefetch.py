"""kdjax.data.prefetch.prefetch_to_device: same batches, in order, on the device, at most
`size` ahead of the consumer."""

import jax
import numpy as np
import pytest

from kdjax.data.prefetch import prefetch_to_device


def test_yields_every_batch_in_order_on_the_device():
  batches = [{'x': np.full((2, 3), i, np.float32), 'y': np.arange(2) + i} for i in range(5)]
  out = list(prefetch_to_device(iter(batches), size=2))
  assert len(out) == 5
  for i, batch in enumerate(out):
    assert isinstance(batch['x'], jax.Array) and isinstance(batch['y'], jax.Array)
    np.testing.assert_array_equal(batch['x'], batches[i]['x'])
    np.testing.assert_array_equal(batch['y'], batches[i]['y'])


@pytest.mark.parametrize('size', [1, 2, 3])
def test_reads_at_most_size_batches_ahead(size):
  pulled = []

  def source():
    for i in range(6):
      pulled.append(i)
      yield np.asarray([i])

  it = prefetch_to_device(source(), size=size)
  for consumed in range(6):
    batch = next(it)
    assert int(batch[0]) == consumed
    # The one handed over, plus at most `size` put behind it.
    assert len(pulled) <= consumed + 1 + size
  assert list(it) == []


def test_short_and_empty_iterators():
  assert list(prefetch_to_device(iter([]), size=2)) == []
  assert [int(b[0]) for b in prefetch_to_device([np.asarray([7])], size=4)] == [7]


def test_bad_size_is_one_clear_error():
  with pytest.raises(ValueError, match='size=0; valid: an int >= 1'):
    next(prefetch_to_device(iter([np.zeros(1)]), size=0))
