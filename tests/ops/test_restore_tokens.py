"""restore_tokens: the reference against its definition, and every kernel backend against the reference."""

import pytest
import torch

from mae_fast.ops import restore_tokens, sample_mask
from op_testing import DTYPES, SHAPE_IDS, TEST_SHAPES, check_backend, device, kernel_backends

BACKENDS = kernel_backends("restore_tokens")



@pytest.mark.parametrize("shape", TEST_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("with_pos", [True, False])
def test_restore_tokens_definition(shape, with_pos):
    B, L, D, K = shape.batch, shape.num_patches, shape.decoder_dim, shape.num_kept
    x_vis = torch.randn(B, K + 1, D)[:, 1:]  # a sliced (non-contiguous) view, as after a cls token
    mask_token = torch.randn(1, 1, D)
    pos = torch.randn(1, L, D) if with_pos else None
    _, ids_restore, _ = sample_mask(B, L, shape.mask_ratio)
    out = restore_tokens(x_vis, ids_restore, mask_token, pos, backend="torch")
    expected = torch.empty(B, L, D)
    for b in range(B):
        for l in range(L):
            r = ids_restore[b, l].item()
            expected[b, l] = (x_vis[b, r] if r < K else mask_token[0, 0]) + (pos[0, l] if with_pos else 0)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_restore_tokens_gradients_and_out_dtype():
    ids_restore = torch.tensor([[2, 0, 3, 1], [0, 1, 2, 3]])
    x = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    tok = torch.randn(3, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, t, q: restore_tokens(a, ids_restore, t, q), (x, tok, pos))
    out = restore_tokens(x.detach().bfloat16(), ids_restore, tok.detach().float(), None, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert restore_tokens(x.detach().bfloat16(), ids_restore, tok.detach().float()).dtype == torch.bfloat16


def test_restore_tokens_errors():
    x, ids, tok = torch.randn(2, 2, 3), torch.tensor([[2, 0, 3, 1], [0, 1, 2, 3]]), torch.randn(3)
    with pytest.raises(ValueError, match="x_visible has 5 tokens but ids_restore has only 4"):
        restore_tokens(torch.randn(2, 5, 3), ids, tok)
    with pytest.raises(ValueError, match=r"mask_token must have shape \[3\] or \[1, 1, 3\]"):
        restore_tokens(x, ids, torch.randn(4))
    with pytest.raises(ValueError, match=r"ids_restore holds index 4, outside \[0, 4\)"):
        restore_tokens(x, torch.tensor([[4, 0, 3, 1], [0, 1, 2, 3]]), tok)
    with pytest.raises(ValueError, match="ids_restore has batch size 1 but x_visible has 2"):
        restore_tokens(x, ids[:1], tok)
    with pytest.raises(TypeError, match="out_dtype must be a float dtype"):
        restore_tokens(x, ids, tok, out_dtype=torch.int64)




# --------------------------------------------------------------------------- kernel backends

def restore_args(shape):
    B, L, D = shape.batch, shape.num_patches, shape.decoder_dim
    _, ids_restore, _ = sample_mask(B, L, shape.mask_ratio)
    return dict(x_visible=torch.randn(B, shape.num_kept, D), ids_restore=ids_restore, mask_token=torch.randn(D),
                pos_embed=torch.randn(L, D))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", TEST_SHAPES, ids=SHAPE_IDS)
def test_backend_matches_reference(backend, shape, dtype, layout):
    check_backend(restore_tokens, backend, restore_args(shape), ["x_visible", "mask_token", "pos_embed"], dtype, layout,
                  keep_dtype=("mask_token", "pos_embed"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_float32_output_from_bf16_tokens_and_no_positions(backend):
    args = restore_args(TEST_SHAPES[1])
    args.pop("pos_embed")
    out, _ = check_backend(restore_tokens, backend, args, ["x_visible", "mask_token"], torch.bfloat16,
                           keep_dtype=("mask_token",), out_dtype=torch.float32)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", ["none", "all"])
def test_backend_all_masked_or_all_visible(backend, keep):
    B, L, D = 2, 9, 12
    K = 0 if keep == "none" else L
    _, ids_restore, _ = sample_mask(B, L, 0.99 if keep == "none" else 0.0)
    args = dict(x_visible=torch.randn(B, K, D), ids_restore=ids_restore, mask_token=torch.randn(D),
                pos_embed=torch.randn(L, D))
    check_backend(restore_tokens, backend, args, ["x_visible", "mask_token", "pos_embed"], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_gradients_are_deterministic(backend):
    args = restore_args(TEST_SHAPES[0])
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        runs.append(check_backend(restore_tokens, backend, args, ["x_visible", "mask_token", "pos_embed"],
                                  torch.bfloat16)[1])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_never_reads_out_of_bounds(backend):
    x, tok = torch.randn(1, 2, 4, device=device()), torch.randn(4, device=device())
    ids = torch.tensor([[1, 50, -3, 0]], device=device())
    out = restore_tokens(x, ids, tok, None, backend=backend, check_indices=False)
    assert torch.equal(out[0, 0], x[0, 1]) and torch.equal(out[0, 3], x[0, 0])
    assert torch.equal(out[0, 1], tok) and torch.equal(out[0, 2], tok)


@pytest.mark.parametrize("backend", BACKENDS)
def test_registered_ops_pass_opcheck(backend):
    x = torch.randn(2, 2, 5, device=device(), requires_grad=True)
    tok = torch.randn(5, device=device(), requires_grad=True)
    pos = torch.randn(4, 5, device=device(), requires_grad=True)
    ids = torch.tensor([[2, 0, 3, 1], [0, 1, 2, 3]], device=device())
    op = getattr(torch.ops.mae_fast, f"restore_tokens_{backend}").default
    torch.library.opcheck(op, (x, ids, tok, pos))
    torch.library.opcheck(op, (x, ids, tok, None, torch.float32))
    torch.library.opcheck(getattr(torch.ops.mae_fast, f"restore_tokens_{backend}_backward").default,
                          (torch.randn(2, 4, 5, device=device()), ids, 2, torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_without_graph_breaks(backend):
    x = torch.randn(2, 2, 5, device=device(), requires_grad=True)
    tok = torch.randn(1, 1, 5, device=device(), requires_grad=True)
    pos = torch.randn(1, 4, 5, device=device())
    ids = torch.tensor([[2, 0, 3, 1], [0, 1, 2, 3]], device=device())

    def f(a, t):
        return (restore_tokens(a, ids, t, pos, backend=backend) ** 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    expected = torch.autograd.grad(f(x, tok), (x, tok))
    got = torch.autograd.grad(compiled(x, tok), (x, tok))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
