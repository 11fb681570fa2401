"""patchify / unpatchify: the official order, round trips and errors."""

import pytest
import torch

from mae_fast.ops import patchify, unpatchify
from op_testing import SHAPE_IDS, TEST_SHAPES



@pytest.mark.parametrize("shape", TEST_SHAPES, ids=SHAPE_IDS)
def test_patchify_order_and_round_trip(shape):
    imgs = torch.randn(shape.batch, shape.channels, shape.height, shape.width)
    x = patchify(imgs, shape.patch_size)
    p, (gh, gw) = shape.patch_size, shape.grid
    assert x.shape == (shape.batch, gh * gw, shape.patch_dim)
    b, h, w, i, j, c = shape.batch - 1, gh - 1, gw - 1, p - 1, 0, shape.channels - 1
    assert x[b, h * gw + w, (i * p + j) * shape.channels + c] == imgs[b, c, h * p + i, w * p + j]
    assert torch.equal(unpatchify(x, p, shape.grid), imgs)


def test_unpatchify_errors():
    with pytest.raises(ValueError, match="not a square grid; pass grid"):
        unpatchify(torch.randn(1, 15, 48), 4)
    with pytest.raises(ValueError, match=r"grid=\(3, 4\) holds 12 patches but x has 15"):
        unpatchify(torch.randn(1, 15, 48), 4, (3, 4))
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        unpatchify(torch.randn(1, 16, 50), 4)
    with pytest.raises(ValueError, match="patch_size=5 does not divide the imgs size 16x16"):
        patchify(torch.randn(1, 3, 16, 16), 5)


