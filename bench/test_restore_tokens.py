"""restore_tokens at MAE decoder shapes (bf16 visible tokens in, float32 sequence out, as in the model)."""

import pytest
import torch

from mae_fast.ops import restore_tokens, sample_mask
from mae_fast.ops.restore_tokens import bytes_moved
from bench_env import DEVICE
from op_bench import MODES, PROVIDERS, SHAPE_IDS, SHAPES, float_dtype, run


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_restore_tokens(benchmark, record, shape, provider, mode):
    B, L, K, D = shape.batch, shape.num_patches, shape.num_kept, shape.decoder_dim
    dtype = float_dtype()

    def make_inputs():
        _, ids_restore, _ = sample_mask(B, L, shape.mask_ratio, device=DEVICE)
        return {"x_visible": torch.randn(B, K, D, device=DEVICE, dtype=dtype), "ids_restore": ids_restore,
                "mask_token": torch.randn(D, device=DEVICE), "pos_embed": torch.randn(L, D, device=DEVICE)}

    # The backward's partial sums scale with the SM count (4 blocks per SM): this GPU's own, not a fixed figure.
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count if DEVICE.type == "cuda" else 132
    moved = bytes_moved(B, L, K, D, dtype, torch.float32, num_sms=sms)
    run(benchmark, record, "restore_tokens", shape, provider, mode, make_inputs,
        lambda backend, x_visible, ids_restore, mask_token, pos_embed: restore_tokens(
            x_visible, ids_restore, mask_token, pos_embed, backend=backend, check_indices=False,
            out_dtype=torch.float32),
        ["x_visible", "mask_token"], moved)
