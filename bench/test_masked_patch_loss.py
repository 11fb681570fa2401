"""masked_patch_loss at MAE shapes (bf16 predictions on GPUs, float32 images), norm_pix_loss on."""

import pytest
import torch

from mae_fast.ops import masked_patch_loss, sample_mask
from bench_env import DEVICE
from op_bench import MODES, PROVIDERS, SHAPE_IDS, SHAPES, float_dtype, run


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_masked_patch_loss(benchmark, record, shape, provider, mode):
    B, L, N = shape.batch, shape.num_patches, shape.patch_dim
    dtype = float_dtype()
    e = torch.finfo(dtype).bits // 8
    masked = L - shape.num_kept

    def make_inputs():
        _, _, mask = sample_mask(B, L, shape.mask_ratio, device=DEVICE)
        return {"pred": torch.randn(B, L, N, device=DEVICE, dtype=dtype),
                "imgs": torch.randn(B, shape.channels, shape.height, shape.width, device=DEVICE), "mask": mask}

    # The floor: read the masked patches' predictions and pixels; write the whole prediction gradient.
    floor = {"forward": B * masked * N * (e + 4) + B * L * 4, "backward": B * L * N * e + B * L * 4}
    run(benchmark, record, "masked_patch_loss", shape, provider, mode, make_inputs,
        lambda backend, pred, imgs, mask: masked_patch_loss(pred, imgs, mask, shape.patch_size, norm_pix=True,
                                                            backend=backend),
        ["pred"], floor)
