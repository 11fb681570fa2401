"""The sharding and shuffling rule every loader backend follows."""

import numpy as np
import pytest

from mae_fast.data.sampler import batches_per_epoch, epoch_indices


@pytest.mark.parametrize("num_samples,batch,world", [(10, 3, 2), (7, 2, 3), (1, 4, 2), (12, 3, 2), (5, 5, 1)])
def test_ranks_cover_every_image_exactly_once(num_samples, batch, world):
    seen = []
    for rank in range(world):
        indices, valid, seeds = epoch_indices(num_samples, batch, rank, world, epoch=3, seed=7)
        assert len(indices) == len(valid) == len(seeds) == batches_per_epoch(num_samples, batch, world) * batch
        assert np.all((indices >= 0) & (indices < num_samples))
        seen.extend(indices[valid].tolist())
    assert sorted(seen) == list(range(num_samples))  # once each, no overlap


def test_reshuffled_every_epoch_and_repeatable():
    a0, _, s0 = epoch_indices(100, 8, 0, 2, epoch=0, seed=1)
    a0b, _, s0b = epoch_indices(100, 8, 0, 2, epoch=0, seed=1)
    a1, _, _ = epoch_indices(100, 8, 0, 2, epoch=1, seed=1)
    b0, _, _ = epoch_indices(100, 8, 0, 2, epoch=0, seed=2)
    assert np.array_equal(a0, a0b) and np.array_equal(s0, s0b)
    assert not np.array_equal(a0, a1) and not np.array_equal(a0, b0)
    fixed, _, _ = epoch_indices(10, 5, 0, 1, epoch=4, seed=1, shuffle=False)
    assert fixed.tolist() == list(range(10))


def test_one_rank_with_the_global_batch_sees_what_two_ranks_see():
    single, _, single_seeds = epoch_indices(20, 8, 0, 1, epoch=2, seed=5)
    for step in range(batches_per_epoch(20, 8, 1)):
        global_batch = single[step * 8:(step + 1) * 8]
        for rank in range(2):
            part, _, seeds = epoch_indices(20, 4, rank, 2, epoch=2, seed=5)
            assert np.array_equal(part[step * 4:(step + 1) * 4], global_batch[rank::2])
            assert np.array_equal(seeds[step * 4:(step + 1) * 4], single_seeds[step * 8:(step + 1) * 8][rank::2])


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_samples must be positive"):
        epoch_indices(0, 4, 0, 1, 0, 0)
    with pytest.raises(ValueError, match=r"rank 2 is outside \[0, 2\)"):
        epoch_indices(4, 4, 2, 2, 0, 0)
