"""gather_patches at MAE shapes (float32 images, as the model reads them)."""

import pytest
import torch

from mae_fast.ops import gather_patches, sample_mask
from bench_env import DEVICE
from op_bench import MODES, PROVIDERS, SHAPE_IDS, SHAPES, run


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_gather_patches(benchmark, record, shape, provider, mode):
    B, K, N = shape.batch, shape.num_kept, shape.patch_dim

    def make_inputs():
        ids_keep, _, _ = sample_mask(B, shape.num_patches, shape.mask_ratio, device=DEVICE)
        imgs = torch.randn(B, shape.channels, shape.height, shape.width, device=DEVICE)
        return {"imgs": imgs, "ids_keep": ids_keep}

    floor = {"forward": 2 * B * K * N * 4 + B * K * 8,
             "backward": B * K * N * 4 + B * shape.channels * shape.height * shape.width * 4 + B * K * 8}
    run(benchmark, record, "gather_patches", shape, provider, mode, make_inputs,
        lambda backend, imgs, ids_keep: gather_patches(imgs, ids_keep, shape.patch_size, backend=backend,
                                                       check_indices=False),
        ["imgs"], floor)
