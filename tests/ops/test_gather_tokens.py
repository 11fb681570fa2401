"""gather_tokens: the reference against its definition, and every kernel backend against the reference."""

import pytest
import torch

from mae_fast.ops import add_pos_embed, add_pos_embed_reference, gather_tokens, sample_mask
from op_testing import DTYPES, SHAPE_IDS, TEST_SHAPES, check_backend, device, kernel_backends, noncontiguous

BACKENDS = kernel_backends("gather_tokens")



@pytest.mark.parametrize("shape", TEST_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("pos_form", ["none", "2d", "3d"])
def test_gather_tokens_definition(shape, pos_form):
    B, L, D = shape.batch, shape.num_patches, shape.dim
    x = noncontiguous(torch.randn(B, L, D))
    pos = torch.randn(L, D)
    ids_keep, _, _ = sample_mask(B, L, shape.mask_ratio)
    arg = {"none": None, "2d": pos, "3d": pos[None]}[pos_form]
    out = gather_tokens(x, ids_keep, arg, backend="torch")
    expected = torch.stack([x[b, ids_keep[b]] + (0 if arg is None else pos[ids_keep[b]]) for b in range(B)])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_gather_tokens_expanded_table_and_gradients():
    pos = torch.randn(1, 6, 5, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[5, 0, 2], [1, 5, 3]])
    out = gather_tokens(pos.expand(2, -1, -1), ids, None)
    torch.testing.assert_close(out, pos[0][ids])
    x = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    table = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, t: gather_tokens(a, ids, t), (x, table))


def test_gather_tokens_keeps_input_dtype():
    x = torch.randn(2, 6, 4).bfloat16()
    out = gather_tokens(x, torch.tensor([[1], [2]]), torch.randn(6, 4))
    assert out.dtype == torch.bfloat16


def test_gather_tokens_errors():
    x, ids = torch.randn(2, 6, 4), torch.tensor([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match=r"pos_embed must have shape \[6, 4\]"):
        gather_tokens(x, ids, torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"pos_embed must have shape \[L, D\] or \[1, L, D\]"):
        gather_tokens(x, ids, torch.randn(2, 6, 4))
    with pytest.raises(ValueError, match=r"ids_keep holds index 6, outside \[0, 6\)"):
        gather_tokens(x, torch.tensor([[1, 6], [0, 0]]), None)
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        gather_tokens(x[0], ids)
    with pytest.raises(ValueError, match="ids_keep has batch size 2 but x has 1"):
        gather_tokens(x[:1], ids)




# --------------------------------------------------------------------------- kernel backends

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", TEST_SHAPES, ids=SHAPE_IDS)
def test_backend_matches_reference(backend, shape, dtype, layout):
    B, L, D = shape.batch, shape.num_patches, shape.dim
    ids_keep, _, _ = sample_mask(B, L, shape.mask_ratio)
    args = dict(x=torch.randn(B, L, D), ids_keep=ids_keep, pos_embed=torch.randn(L, D))
    check_backend(gather_tokens, backend, args, ["x", "pos_embed"], dtype, layout, keep_dtype=("pos_embed",))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_without_positions_and_on_an_expanded_table(backend):
    shape = TEST_SHAPES[0]
    B, L, D = shape.batch, shape.num_patches, shape.dim
    ids_keep, _, _ = sample_mask(B, L, shape.mask_ratio)
    check_backend(gather_tokens, backend, dict(x=torch.randn(B, L, D), ids_keep=ids_keep), ["x"], torch.bfloat16)
    table = torch.randn(1, L, D, device=device(), requires_grad=True)
    out = gather_tokens(table.expand(B, -1, -1), ids_keep.to(device()), backend=backend)
    torch.testing.assert_close(out, table[0][ids_keep.to(device())], rtol=0, atol=0)
    out.sum().backward()
    counts = torch.bincount(ids_keep.flatten(), minlength=L).to(device()).float()
    torch.testing.assert_close(table.grad[0], counts[:, None].expand(L, D))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_gradients_are_deterministic(backend):
    shape = TEST_SHAPES[1]
    B, L, D = shape.batch, shape.num_patches, shape.dim
    ids_keep, _, _ = sample_mask(B, L, shape.mask_ratio)
    args = dict(x=torch.randn(B, L, D), ids_keep=ids_keep.int(), pos_embed=torch.randn(L, D))
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        runs.append(check_backend(gather_tokens, backend, args, ["x", "pos_embed"], torch.bfloat16)[1])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_never_reads_out_of_bounds(backend):
    x = torch.randn(2, 6, 5, device=device())
    out = gather_tokens(x, torch.tensor([[1, 6], [-1, 2]], device=device()), None, backend=backend, check_indices=False)
    assert torch.equal(out[0, 0], x[0, 1]) and torch.equal(out[1, 1], x[1, 2])
    assert torch.all(out[0, 1] == 0) and torch.all(out[1, 0] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_registered_ops_pass_opcheck(backend):
    x = torch.randn(2, 6, 5, device=device(), requires_grad=True)
    pos = torch.randn(6, 5, device=device(), requires_grad=True)
    ids = torch.tensor([[4, 0, 2], [1, 5, 3]], device=device())
    op = getattr(torch.ops.mae_fast, f"gather_tokens_{backend}")
    torch.library.opcheck(op.default, (x, ids, pos))
    torch.library.opcheck(op.default, (x, ids, None))
    torch.library.opcheck(getattr(torch.ops.mae_fast, f"gather_tokens_{backend}_backward").default,
                          (torch.randn(2, 3, 5, device=device()), ids, 6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_without_graph_breaks(backend):
    x = torch.randn(2, 6, 5, device=device(), requires_grad=True)
    pos = torch.randn(6, 5, device=device(), requires_grad=True)
    ids = torch.tensor([[4, 0, 2], [1, 5, 3]], device=device())

    def f(a, p, i):
        return (gather_tokens(a, i, p, backend=backend) ** 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    expected = torch.autograd.grad(f(x, pos, ids), (x, pos))
    got = torch.autograd.grad(compiled(x, pos, ids), (x, pos))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- add_pos_embed

ADD_BACKENDS = kernel_backends("add_pos_embed")


def test_add_pos_embed_definition_and_dtype():
    x = torch.randn(2, 3, 5).bfloat16()
    pos = torch.randn(6, 5)
    ids = torch.tensor([[5, 0, 2], [1, 4, 3]])
    out = add_pos_embed(x, ids, pos)
    assert out.dtype == torch.float32  # the official bf16 tokens + float32 table
    assert torch.equal(out, x.float() + pos[ids])
    assert add_pos_embed(x, ids, pos[None], out_dtype=torch.bfloat16).dtype == torch.bfloat16
    xd = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    table = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, t: add_pos_embed(a, ids, t), (xd, table))


@pytest.mark.parametrize("backend", ADD_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", TEST_SHAPES, ids=SHAPE_IDS)
def test_add_pos_embed_backend_matches_reference(backend, shape, dtype, layout):
    B, L, K, D = shape.batch, shape.num_patches, shape.num_kept, shape.dim
    ids_keep, _, _ = sample_mask(B, L, shape.mask_ratio)
    args = {"x": torch.randn(B, K, D), "ids_keep": ids_keep, "pos_embed": torch.randn(L, D)}
    check_backend(add_pos_embed, backend, args, ["x", "pos_embed"], dtype, layout, keep_dtype=("pos_embed",))
    dev = device()
    x = args["x"].to(dev, dtype)
    got = add_pos_embed(x, ids_keep.to(dev), args["pos_embed"].to(dev), backend=backend)
    expected = add_pos_embed_reference(x, ids_keep.to(dev), args["pos_embed"].to(dev))
    assert got.dtype == torch.float32 and torch.equal(got, expected)  # one float32 addition: exact


@pytest.mark.parametrize("backend", ADD_BACKENDS)
def test_add_pos_embed_opcheck_and_compile(backend):
    x = torch.randn(2, 3, 8, device=device(), requires_grad=True)
    ids = torch.tensor([[4, 0, 2], [1, 5, 3]], device=device())
    pos = torch.randn(6, 8, device=device(), requires_grad=True)
    torch.library.opcheck(torch.ops.mae_fast.add_pos_embed_triton.default, (x, ids, pos, torch.float32))
    torch.library.opcheck(torch.ops.mae_fast.add_pos_embed_triton.default, (x.bfloat16(), ids, pos, torch.float32))

    def f(a, t):
        return (add_pos_embed(a, ids, t, backend=backend) * 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    expected = torch.autograd.grad(f(x, pos), [x, pos])
    got = torch.autograd.grad(compiled(x, pos), [x, pos])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_add_pos_embed_errors():
    x, ids, pos = torch.randn(2, 3, 5), torch.tensor([[0, 1, 2], [3, 4, 5]]), torch.randn(6, 5)
    with pytest.raises(ValueError, match=r"pos_embed must have shape \[6, 5\]"):
        add_pos_embed(x, ids, torch.randn(6, 4))
    with pytest.raises(ValueError, match=r"ids_keep must have shape \[2, 3\]"):
        add_pos_embed(x, ids[:, :2], pos)
    with pytest.raises(ValueError, match="outside"):
        add_pos_embed(x, ids + 1, pos)
    with pytest.raises(Exception, match="backend='cuda' is not implemented"):
        add_pos_embed(x, ids, pos, backend="cuda")
