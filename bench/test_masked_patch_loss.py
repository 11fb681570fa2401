"""masked_patch_loss at MAE shapes, norm_pix_loss on: bf16 predictions on GPUs (the whole decoder output with
its cls row, as the model passes it), with float32 images or uint8 pixels (the training path)."""

import pytest
import torch

from mae_fast.ops import IMAGENET_MEAN_255, IMAGENET_STD_255, masked_patch_loss, sample_mask
from mae_fast.ops.masked_patch_loss import bytes_moved
from bench_env import DEVICE
from op_bench import MODES, PROVIDERS, SHAPE_IDS, SHAPES, float_dtype, run

IMAGES = ("float32", "uint8")


@pytest.mark.parametrize("images", IMAGES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_masked_patch_loss(benchmark, record, shape, provider, mode, images):
    B, L, N = shape.batch, shape.num_patches, shape.patch_dim
    dtype = float_dtype()
    uint8 = images == "uint8"
    stats = torch.tensor([IMAGENET_MEAN_255, IMAGENET_STD_255], device=DEVICE)

    def make_inputs():
        _, _, mask = sample_mask(B, L, shape.mask_ratio, device=DEVICE)
        size = (B, shape.channels, shape.height, shape.width)
        imgs = torch.randint(0, 256, size, dtype=torch.uint8, device=DEVICE) if uint8 else torch.randn(size,
                                                                                                      device=DEVICE)
        return {"pred": torch.randn(B, 1 + L, N, device=DEVICE, dtype=dtype), "imgs": imgs, "mask": mask}

    moved = bytes_moved(B, L, N, L - shape.num_kept, dtype, torch.uint8 if uint8 else torch.float32, pred_offset=1)
    extra = {"mean": stats[0], "std": stats[1]} if uint8 else {}
    run(benchmark, record, "masked_patch_loss", shape, provider, mode, make_inputs,
        lambda backend, pred, imgs, mask: masked_patch_loss(pred, imgs, mask, shape.patch_size, norm_pix=True,
                                                            backend=backend, pred_offset=1, **extra),
        ["pred"], moved, variant="uint8" if uint8 else None)
