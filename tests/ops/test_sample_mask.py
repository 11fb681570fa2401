"""sample_mask: exactly the official random masking."""

import pytest
import torch

from mae_fast.ops import sample_mask



def official_masking(noise, mask_ratio):
    B, L = noise.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(B, L)
    mask[:, :len_keep] = 0
    return ids_shuffle[:, :len_keep], ids_restore, torch.gather(mask, 1, ids_restore)


@pytest.mark.parametrize("L,ratio,expected_keep", [(196, 0.75, 49), (10, 0.9, 0), (16, 0.0, 16), (9, 0.85, 1),
                                                   (7, 0.5, 3)])
def test_sample_mask_is_the_official_masking(L, ratio, expected_keep):
    noise = torch.rand(3, L)
    ids_keep, ids_restore, mask = sample_mask(3, L, ratio, noise=noise)
    ref_keep, ref_restore, ref_mask = official_masking(noise, ratio)
    assert ids_keep.shape == (3, expected_keep)  # int(L * (1 - ratio)), truncated
    assert ids_keep.dtype == ids_restore.dtype == torch.int64 and mask.dtype == torch.float32
    assert torch.equal(ids_keep, ref_keep) and torch.equal(ids_restore, ref_restore) and torch.equal(mask, ref_mask)
    # kept tokens come in noise-sorted order and have the smallest noise
    kept_noise = torch.gather(noise, 1, ids_keep)
    assert torch.all(kept_noise[:, 1:] >= kept_noise[:, :-1])
    if 0 < expected_keep < L:
        assert torch.all(kept_noise.max(1).values < noise.masked_fill(mask == 0, 2).min(1).values)


def test_sample_mask_random_draw_and_generator():
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = sample_mask(4, 49, 0.75, generator=g1)
    b = sample_mask(4, 49, 0.75, generator=g2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.all(a[2].sum(1) == 49 - 12)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(batch_size=0, num_patches=4, mask_ratio=0.5), ValueError, "batch_size must be a positive int, got 0"),
    (dict(batch_size=2, num_patches=-1, mask_ratio=0.5), ValueError, "num_patches must be a positive int, got -1"),
    (dict(batch_size=2, num_patches=4, mask_ratio=1.0), ValueError, r"mask_ratio must be in \[0, 1\), got 1.0"),
    (dict(batch_size=2, num_patches=4, mask_ratio=-0.1), ValueError, "mask_ratio must be in"),
    (dict(batch_size=2, num_patches=4, mask_ratio="0.5"), TypeError, "mask_ratio must be a number"),
    (dict(batch_size=2, num_patches=4, mask_ratio=0.5, noise=torch.rand(2, 5)), ValueError, r"noise must have shape \[2, 4\]"),
    (dict(batch_size=2, num_patches=4, mask_ratio=0.5, noise=torch.zeros(2, 4, dtype=torch.long)), TypeError, "noise must be float"),
])
def test_sample_mask_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        sample_mask(**kwargs)


