"""The data order: a permutation per epoch, a pure function of (seed, position), in constant
memory even at 10^9 records."""
import tracemalloc

import numpy as np
import pytest

from ascan_jax.data import order


@pytest.mark.parametrize("shuffle", order.SHUFFLES)
def test_each_epoch_is_a_permutation_and_epochs_differ(shuffle):
  n = 257
  first = [order.record_at(g, n, seed=3, shuffle=shuffle) for g in range(n)]
  second = [order.record_at(g, n, seed=3, shuffle=shuffle) for g in range(n, 2 * n)]
  other_seed = [order.record_at(g, n, seed=4, shuffle=shuffle) for g in range(n)]
  assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))
  assert first != second and first != other_seed
  assert first != list(range(n))  # actually shuffled.


def test_record_at_a_position_does_not_depend_on_what_was_read_before():
  n, positions = 1000, [5, 999, 1000, 123456, 7]
  forward = [order.record_at(g, n, seed=11) for g in positions]
  order.record_at(424242, n, seed=11)
  backward = [order.record_at(g, n, seed=11) for g in reversed(positions)][::-1]
  assert forward == backward


def test_memory_does_not_grow_with_the_number_of_records():
  """At 10^9 records a materialised permutation would be 8 GB per epoch and worker; the
  index shuffle reads any position of any epoch in constant memory."""
  n = 10 ** 9
  rng = np.random.default_rng(0)
  positions = rng.integers(0, 3 * n, size=2000)
  order.record_at(0, n, seed=1)  # import grain's kernel before measuring.
  tracemalloc.start()
  records = [order.record_at(int(g), n, seed=1) for g in positions]
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert peak < 512 * 1024, f"peak {peak} bytes"
  assert all(0 <= r < n for r in records)
  assert len(set(records)) > 1990  # distinct positions map to (almost surely) distinct records.


def test_an_empty_source_and_an_unknown_shuffle_are_named():
  with pytest.raises(ValueError, match="no records"):
    order.record_at(0, 0, seed=1)
  with pytest.raises(ValueError, match="data.shuffle"):
    order.record_at(0, 10, seed=1, shuffle="sorted")
