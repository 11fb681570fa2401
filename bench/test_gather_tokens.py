"""gather_tokens at MAE encoder shapes (bf16 tokens on GPUs, float32 position table)."""

import pytest
import torch

from mae_fast.ops import add_pos_embed, gather_tokens, sample_mask
from mae_fast.ops.gather_tokens import bytes_moved
from bench_env import DEVICE
from op_bench import MODES, PROVIDERS, SHAPE_IDS, SHAPES, float_dtype, run


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_gather_tokens(benchmark, record, shape, provider, mode):
    B, L, K, D = shape.batch, shape.num_patches, shape.num_kept, shape.dim
    dtype = float_dtype()

    def make_inputs():
        ids_keep, _, _ = sample_mask(B, L, shape.mask_ratio, device=DEVICE)
        return {"x": torch.randn(B, L, D, device=DEVICE, dtype=dtype), "ids_keep": ids_keep,
                "pos_embed": torch.randn(L, D, device=DEVICE)}

    moved = bytes_moved(B, L, K, D, dtype)
    run(benchmark, record, "gather_tokens", shape, provider, mode, make_inputs,
        lambda backend, x, ids_keep, pos_embed: gather_tokens(x, ids_keep, pos_embed, backend=backend,
                                                              check_indices=False),
        ["x"], moved)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_add_pos_embed(benchmark, record, shape, provider, mode):
    """The encoder's position add after embedding the gathered patches: bf16 tokens in, float32 out."""
    B, L, K, D = shape.batch, shape.num_patches, shape.num_kept, shape.dim
    dtype = float_dtype()

    def make_inputs():
        ids_keep, _, _ = sample_mask(B, L, shape.mask_ratio, device=DEVICE)
        return {"x": torch.randn(B, K, D, device=DEVICE, dtype=dtype), "ids_keep": ids_keep,
                "pos_embed": torch.randn(L, D, device=DEVICE)}

    moved = bytes_moved(B, L, K, D, dtype, gathered=True, out_dtype=torch.float32)
    run(benchmark, record, "add_pos_embed", shape, provider, mode, make_inputs,
        lambda backend, x, ids_keep, pos_embed: add_pos_embed(x, ids_keep, pos_embed, backend=backend,
                                                              check_indices=False),
        ["x"], moved)
