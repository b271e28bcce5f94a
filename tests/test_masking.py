import numpy as np
import pytest
from scipy import ndimage

from cimfast.objective.masking import BlockMaskGenerator


@pytest.mark.parametrize("grid,num,min_block", [(14, 75, 16), (14, 118, 16), (7, 20, 4), (14, 16, 16), (7, 49, 4)])
def test_exact_count_and_blocks(grid, num, min_block):
    gen = BlockMaskGenerator(grid, num, min_block)
    for seed in range(40):
        m = gen(seed)
        assert m.shape == (grid, grid) and m.dtype == bool
        assert m.sum() == num
        labels, n = ndimage.label(m)  # 4-connected regions
        sizes = np.bincount(labels.ravel())[1:]
        assert sizes.min() >= min_block, (seed, sizes)


def test_block_aspect_ratio_bounds():
    gen = BlockMaskGenerator(14, 40, 16, min_aspect=0.6)
    seen = 0
    for seed in range(300):
        m = gen(seed)
        rows, cols = np.nonzero(m)
        h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
        if h * w == 40 == m.sum():  # one rectangle covers the whole mask
            seen += 1
            assert 0.6 <= h / w <= 1 / 0.6, (h, w)
    assert seen > 5


def test_seeds_differ_and_repeat():
    gen = BlockMaskGenerator(14, 75, 16)
    assert not np.array_equal(gen(1), gen(2))
    assert np.array_equal(gen(3), gen(3))
    batch = gen.batch([1, 2, 3])
    assert batch.shape == (3, 196) and (batch.sum(1) == 75).all()


def test_bad_settings():
    with pytest.raises(ValueError, match="between 0 and the 196 patches"):
        BlockMaskGenerator(14, 200)
    with pytest.raises(ValueError, match="smaller than min_block"):
        BlockMaskGenerator(14, 10, 16)
