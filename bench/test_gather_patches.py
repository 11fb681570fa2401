"""gather_patches at MAE shapes: float32 images, and uint8 pixels into bf16 rows (the training path on GPUs)."""

import pytest
import torch

from mae_fast.ops import IMAGENET_MEAN_255, IMAGENET_STD_255, gather_patches, sample_mask
from mae_fast.ops.gather_patches import bytes_moved
from bench_env import DEVICE
from op_bench import MODES, PROVIDERS, SHAPE_IDS, SHAPES, float_dtype, run

IMAGES = ("float32", "uint8")


@pytest.mark.parametrize("images", IMAGES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_gather_patches(benchmark, record, shape, provider, mode, images):
    if images == "uint8" and mode != "forward":
        pytest.skip("uint8 pixels have no gradient")
    B, K = shape.batch, shape.num_kept
    uint8 = images == "uint8"
    out_dtype = float_dtype() if uint8 else None
    stats = torch.tensor([IMAGENET_MEAN_255, IMAGENET_STD_255], device=DEVICE)

    def make_inputs():
        ids_keep, _, _ = sample_mask(B, shape.num_patches, shape.mask_ratio, device=DEVICE)
        size = (B, shape.channels, shape.height, shape.width)
        imgs = torch.randint(0, 256, size, dtype=torch.uint8, device=DEVICE) if uint8 else torch.randn(size,
                                                                                                      device=DEVICE)
        return {"imgs": imgs, "ids_keep": ids_keep}

    moved = bytes_moved(B, shape.channels, shape.height, shape.width, shape.patch_size, K,
                        torch.uint8 if uint8 else torch.float32, out_dtype)
    extra = {"mean": stats[0], "std": stats[1]} if uint8 else {}
    run(benchmark, record, "gather_patches", shape, provider, mode, make_inputs,
        lambda backend, imgs, ids_keep: gather_patches(imgs, ids_keep, shape.patch_size, backend=backend,
                                                       check_indices=False, out_dtype=out_dtype, **extra),
        [] if uint8 else ["imgs"], moved, variant="uint8" if uint8 else None)
