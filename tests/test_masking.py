"""masking.py: the official random_masking and the original design's get_and_apply_mask."""

import pytest
import torch

from mae_fast.masking import get_and_apply_mask, random_masking


def test_random_masking_is_the_official_one():
    x = torch.randn(3, 10, 6)
    noise = torch.rand(3, 10)
    x_masked, mask, ids_restore = random_masking(x, 0.7, noise=noise)
    len_keep = int(10 * (1 - 0.7))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    assert torch.equal(x_masked, torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, 6)))
    official_mask = torch.ones(3, 10)
    official_mask[:, :len_keep] = 0
    assert torch.equal(mask, torch.gather(official_mask, 1, torch.argsort(ids_shuffle, dim=1)))
    assert torch.equal(ids_restore, torch.argsort(ids_shuffle, dim=1))


def test_get_and_apply_mask_returns_visible_masked_and_resolve_ids():
    patches = torch.randn(2, 16, 5)
    noise = torch.rand(2, 16)
    visible, masked_indices, resolve_ids = get_and_apply_mask(patches, 0.75, noise=noise)
    order = torch.argsort(noise, dim=1)
    assert visible.shape == (2, 4, 5) and masked_indices.shape == (2, 12)
    assert torch.equal(masked_indices, order[:, 4:])
    assert torch.equal(visible, torch.stack([patches[b, order[b, :4]] for b in range(2)]))
    # resolve_ids puts the shuffled sequence back in the original order
    shuffled = torch.stack([patches[b, order[b]] for b in range(2)])
    restored = torch.gather(shuffled, 1, resolve_ids.unsqueeze(-1).expand(-1, -1, 5))
    assert torch.equal(restored, patches)


def test_masking_errors():
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        random_masking(torch.randn(4, 5), 0.5)
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        get_and_apply_mask(torch.randn(1, 4, 2), 1.5)
