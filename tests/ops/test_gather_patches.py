"""gather_patches: the reference against its definition, and every kernel backend against the reference."""

import pytest
import torch

from mae_fast.ops import BackendUnavailableError, gather_patches, gather_patches_reference, sample_mask
from op_testing import (DTYPES, SHAPE_IDS, TEST_SHAPES, assert_close_to_reference, check_backend, device,
                        kernel_backends, noncontiguous, normalized_by_definition)

BACKENDS = kernel_backends("gather_patches")



def gather_patches_by_definition(imgs, ids_keep, p):
    B, C, H, W = imgs.shape
    gw = W // p
    out = torch.empty(B, ids_keep.shape[1], C * p * p, dtype=imgs.dtype)
    for b in range(B):
        for k, l in enumerate(ids_keep[b].tolist()):
            h, w = divmod(l, gw)
            out[b, k] = imgs[b, :, h * p:(h + 1) * p, w * p:(w + 1) * p].reshape(-1)  # channel, row, column
    return out


@pytest.mark.parametrize("shape", TEST_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous", "int32"])
def test_gather_patches_definition(shape, layout):
    imgs = torch.randn(shape.batch, shape.channels, shape.height, shape.width)
    ids_keep, _, _ = sample_mask(shape.batch, shape.num_patches, shape.mask_ratio)
    if layout == "noncontiguous":
        imgs = noncontiguous(imgs)
    if layout == "int32":
        ids_keep = ids_keep.int()
    out = gather_patches(imgs, ids_keep, shape.patch_size, backend="torch")
    assert torch.equal(out, gather_patches_by_definition(imgs, ids_keep, shape.patch_size))


def test_gather_patches_embedding_equals_conv_on_kept_patches():
    imgs = torch.randn(2, 3, 24, 40, dtype=torch.float64)
    conv = torch.nn.Conv2d(3, 20, 8, 8).double()
    ids_keep, _, _ = sample_mask(2, 15, 0.6)
    patches = gather_patches(imgs, ids_keep, 8)
    embedded = patches @ conv.weight.view(20, -1).T + conv.bias
    full = conv(imgs).flatten(2).transpose(1, 2)
    torch.testing.assert_close(embedded, torch.stack([full[b, ids_keep[b]] for b in range(2)]))


def test_gather_patches_empty_keep_and_gradient():
    imgs = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    assert gather_patches(imgs, torch.zeros(2, 0, dtype=torch.long), 4).shape == (2, 0, 48)
    ids = torch.tensor([[3, 0], [1, 2]])
    assert torch.autograd.gradcheck(lambda x: gather_patches(x, ids, 4), (imgs,))


def test_gather_patches_errors():
    imgs, ids = torch.randn(2, 3, 8, 8), torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match=r"ids_keep holds index 4, outside \[0, 4\)"):
        gather_patches(imgs, torch.tensor([[0, 4], [1, 2]]), 4)
    with pytest.raises(ValueError, match=r"ids_keep holds index -1"):
        gather_patches(imgs, torch.tensor([[0, -1], [1, 2]]), 4)
    with pytest.raises(ValueError, match="imgs must have 4 dimensions"):
        gather_patches(imgs[0], ids, 4)
    with pytest.raises(TypeError, match="ids_keep must be int64 or int32"):
        gather_patches(imgs, ids.float(), 4)
    with pytest.raises(TypeError, match="imgs must be float32"):
        gather_patches(imgs.int(), ids, 4)
    with pytest.raises(ValueError, match="ids_keep has batch size 1 but imgs has 2"):
        gather_patches(imgs, ids[:1], 4)
    with pytest.raises(ValueError, match="patch_size=3 does not divide"):
        gather_patches(imgs, ids, 3)
    with pytest.raises(ValueError, match="patch_size must be a positive int, got 4.0"):
        gather_patches(imgs, ids, 4.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        gather_patches(imgs, ids, 4, backend="cutlass")
    with pytest.raises(BackendUnavailableError, match="backend='cuda' cannot run|not implemented"):
        gather_patches(imgs, ids, 4, backend="cuda")




# --------------------------------------------------------------------------- kernel backends

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", TEST_SHAPES, ids=SHAPE_IDS)
def test_backend_matches_reference(backend, shape, dtype, layout):
    imgs = torch.randn(shape.batch, shape.channels, shape.height, shape.width)
    ids_keep, _, _ = sample_mask(shape.batch, shape.num_patches, shape.mask_ratio)
    check_backend(gather_patches, backend, dict(imgs=imgs, ids_keep=ids_keep), ["imgs"], dtype, layout,
                  patch_size=shape.patch_size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_is_deterministic_and_handles_int32_and_empty(backend):
    shape = TEST_SHAPES[1]
    imgs = torch.randn(shape.batch, shape.channels, shape.height, shape.width, device=device())
    ids_keep, _, _ = sample_mask(shape.batch, shape.num_patches, shape.mask_ratio, device=device())
    runs = []
    for _ in range(2):
        torch.manual_seed(1)  # the same upstream gradient
        runs.append(check_backend(gather_patches, backend, dict(imgs=imgs, ids_keep=ids_keep.int()), ["imgs"],
                                  torch.float32, patch_size=shape.patch_size)[1][0])
    assert torch.equal(runs[0], runs[1])
    empty = gather_patches(imgs, ids_keep[:, :0], shape.patch_size, backend=backend)
    assert empty.shape == (shape.batch, 0, shape.patch_dim)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_never_reads_out_of_bounds(backend):
    imgs = torch.randn(2, 3, 8, 8, device=device())
    ids = torch.tensor([[0, 99], [-5, 3]], device=device())
    out = gather_patches(imgs, ids, 4, backend=backend, check_indices=False)
    ref = gather_patches_reference(imgs, torch.tensor([[0, 0], [0, 3]], device=device()), 4)
    assert torch.equal(out[0, 0], ref[0, 0]) and torch.equal(out[1, 1], ref[1, 1])
    assert torch.all(out[0, 1] == 0) and torch.all(out[1, 0] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_registered_ops_pass_opcheck(backend):
    imgs = torch.randn(2, 3, 8, 12, device=device(), requires_grad=True)
    ids = torch.tensor([[4, 0, 2], [1, 5, 3]], device=device())
    op = getattr(torch.ops.mae_fast, f"gather_patches_{backend}")
    torch.library.opcheck(op.default, (imgs, ids, 4, None, torch.float32))
    torch.library.opcheck(op.default, (imgs, ids, 4, None, torch.bfloat16))
    pixels = torch.randint(0, 256, (2, 3, 8, 12), dtype=torch.uint8, device=device())
    stats = torch.tensor([[120.0, 110, 100], [60, 55, 58]], device=device())
    torch.library.opcheck(op.default, (pixels, ids, 4, stats, torch.float32))
    grad = torch.randn(2, 3, 48, device=device())
    torch.library.opcheck(getattr(torch.ops.mae_fast, f"gather_patches_{backend}_backward").default,
                          (grad, ids, 4, 8, 12, torch.bfloat16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_without_graph_breaks(backend):
    imgs = torch.randn(2, 3, 8, 12, device=device(), requires_grad=True)
    ids = torch.tensor([[4, 0, 2], [1, 5, 3]], device=device())

    def f(x, i):
        return (gather_patches(x, i, 4, backend=backend) * 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    expected_grad, = torch.autograd.grad(f(imgs, ids), imgs)
    loss = compiled(imgs, ids)
    grad, = torch.autograd.grad(loss, imgs)
    torch.testing.assert_close(loss, f(imgs, ids))
    torch.testing.assert_close(grad, expected_grad)


# --------------------------------------------------------------------------- uint8 images and the output dtype

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def uint8_images(shape, layout="nchw"):
    pixels = torch.randint(0, 256, (shape.batch, shape.channels, shape.height, shape.width), dtype=torch.uint8)
    if layout == "nhwc":  # what a loader delivering channels-last batches gives, viewed as NCHW
        pixels = pixels.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    return pixels.to(device())


def scatter_patches_by_definition(grad_rows, ids_keep, p, height, width):
    """The image gradient of gather_patches: each row's values added back into its patch, zeros elsewhere."""
    B, _, N = grad_rows.shape
    C, gw = N // (p * p), width // p
    grad = torch.zeros(B, C, height, width, dtype=torch.float64)
    for b in range(B):
        for k, l in enumerate(ids_keep[b].tolist()):
            h, w = divmod(l, gw)
            grad[b, :, h * p:(h + 1) * p, w * p:(w + 1) * p] += grad_rows[b, k].double().view(C, p, p)
    return grad


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape", TEST_SHAPES, ids=SHAPE_IDS)
def test_uint8_images_are_bit_compatible_with_normalizing_first(backend, shape, layout):
    # Every backend, the reference included, against pixels normalized in float64 and gathered by loops here (the
    # torch backend normalizes with normalize_images, so comparing it with normalize_images first proves nothing).
    from mae_fast.ops import normalize_images
    MEAN_, STD_ = MEAN[:shape.channels], STD[:shape.channels]
    pixels = uint8_images(shape, layout)
    ids_keep, _, _ = sample_mask(shape.batch, shape.num_patches, shape.mask_ratio, device=device())
    exact = gather_patches_by_definition(normalized_by_definition(pixels, MEAN_, STD_, torch.float64), ids_keep.cpu(),
                                         shape.patch_size)
    single = gather_patches_by_definition(normalized_by_definition(pixels, MEAN_, STD_, torch.float32),
                                          ids_keep.cpu(), shape.patch_size)
    got = gather_patches(pixels, ids_keep, shape.patch_size, backend=backend, mean=MEAN_, std=STD_)
    assert got.dtype == torch.float32
    assert_close_to_reference(got.cpu(), exact, single)
    stats = torch.tensor([MEAN_, STD_], device=device())  # tensors, as the model passes them
    low = gather_patches(pixels, ids_keep, shape.patch_size, backend=backend, mean=stats[0], std=stats[1],
                         out_dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16
    assert_close_to_reference(low.cpu(), exact, single.bfloat16(), name="bfloat16 output")
    if backend != "torch":  # the kernels: bit for bit what normalizing first gives
        expected = gather_patches(normalize_images(pixels, MEAN_, STD_), ids_keep, shape.patch_size, backend="torch")
        assert torch.equal(got, expected) and torch.equal(low, expected.bfloat16())


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
def test_out_dtype_rows_and_gradient_in_the_image_dtype(backend):
    # Checked against the gather and its gradient written out by loops, so the torch case tests the reference too.
    shape = TEST_SHAPES[1]
    imgs = torch.randn(shape.batch, shape.channels, shape.height, shape.width, device=device(), requires_grad=True)
    ids_keep, _, _ = sample_mask(shape.batch, shape.num_patches, shape.mask_ratio, device=device())
    out = gather_patches(imgs, ids_keep, shape.patch_size, backend=backend, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    expected = gather_patches_by_definition(imgs.detach().cpu(), ids_keep.cpu(), shape.patch_size)
    assert torch.equal(out.cpu(), expected.bfloat16())
    grad_out = torch.randn_like(out)
    grad, = torch.autograd.grad(out, imgs, grad_out)
    assert grad.dtype == torch.float32
    # Patches do not overlap: each image element receives at most one bfloat16 value, exact in float32.
    expected_grad = scatter_patches_by_definition(grad_out.cpu(), ids_keep.cpu(), shape.patch_size, shape.height,
                                                  shape.width)
    assert torch.equal(grad.cpu().double(), expected_grad)


def test_uint8_argument_errors():
    pixels = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    ids = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="uint8 imgs need mean and std"):
        gather_patches(pixels, ids, 4)
    with pytest.raises(ValueError, match="mean must hold 3 values"):
        gather_patches(pixels, ids, 4, mean=(1.0, 2.0), std=STD)
    with pytest.raises(ValueError, match="std must be positive"):
        gather_patches(pixels, ids, 4, mean=MEAN, std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="mean and std are for uint8 imgs"):
        gather_patches(pixels.float(), ids, 4, mean=MEAN, std=STD)
    with pytest.raises(TypeError, match="out_dtype must be a float dtype"):
        gather_patches(pixels.float(), ids, 4, out_dtype=torch.int32)
