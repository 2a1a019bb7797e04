"""Pure block arithmetic of the image shards."""

import pytest

from spinifel.parallel.partition import block_range, block_sizes, round_robin


@pytest.mark.parametrize("n,p", [(10, 1), (10, 3), (7, 7), (0, 2), (1001, 16), (5, 4)])
def test_blocks_cover_range_in_order(n, p):
    covered = []
    for r in range(p):
        a, b = block_range(n, p, r)
        covered.extend(range(a, b))
    assert covered == list(range(n))
    sizes = block_sizes(n, p)
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)


def test_block_range_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_parts"):
        block_range(3, 0, 0)
    with pytest.raises(ValueError, match="part"):
        block_range(3, 2, 2)


def test_round_robin():
    assert round_robin(10, 3, 1) == [1, 4, 7]
    allv = sorted(sum((round_robin(10, 4, r) for r in range(4)), []))
    assert allv == list(range(10))
