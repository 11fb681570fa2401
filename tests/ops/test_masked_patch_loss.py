"""masked_patch_loss: the reference against its definition, and every kernel backend against the reference."""

import pytest
import torch

from mae_fast.ops import masked_patch_loss, sample_mask
from op_testing import (DTYPES, SHAPE_IDS, TEST_SHAPES, assert_close_to_reference, check_backend, device,
                        kernel_backends, normalized_by_definition)

BACKENDS = kernel_backends("masked_patch_loss")



def loss_by_definition(pred, imgs, mask, p, norm_pix, eps=1e-6):
    """The loss in float64, patch by patch; a 0-dim tensor that autograd can differentiate with respect to pred."""
    B, C, H, W = imgs.shape
    gw = W // p
    total, count = torch.zeros((), dtype=torch.float64), 0.0
    for b in range(B):
        for l in range(pred.shape[1]):
            if mask[b, l] == 0:
                continue
            h, w = divmod(l, gw)
            t = imgs[b, :, h * p:(h + 1) * p, w * p:(w + 1) * p].permute(1, 2, 0).reshape(-1).double()
            if norm_pix:
                t = (t - t.mean()) / (t.var(unbiased=True) + eps).sqrt()
            total = total + float(mask[b, l]) * ((pred[b, l].double() - t) ** 2).mean()
            count += float(mask[b, l])
    return total / count if count else total


@pytest.mark.parametrize("shape", TEST_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_patch_loss_definition(shape, norm_pix):
    imgs = torch.randn(shape.batch, shape.channels, shape.height, shape.width, dtype=torch.float64)
    pred = torch.randn(shape.batch, shape.num_patches, shape.patch_dim, dtype=torch.float64)
    _, _, mask = sample_mask(shape.batch, shape.num_patches, shape.mask_ratio)
    loss = masked_patch_loss(pred, imgs, mask, shape.patch_size, norm_pix=norm_pix, backend="torch")
    assert loss.dim() == 0
    expected = loss_by_definition(pred, imgs, mask, shape.patch_size, norm_pix).item()
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_masked_patch_loss_fp32_output_and_bool_mask():
    imgs = torch.randn(2, 3, 8, 8).bfloat16()
    pred = torch.randn(2, 4, 48).bfloat16()
    mask = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0]], dtype=torch.bool)
    loss = masked_patch_loss(pred, imgs, mask, 4)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(masked_patch_loss(pred, imgs, mask.float(), 4).item())


def test_masked_patch_loss_nothing_masked_is_zero_with_finite_gradients():
    pred = torch.randn(2, 4, 48, requires_grad=True)
    loss = masked_patch_loss(pred, torch.randn(2, 3, 8, 8), torch.zeros(2, 4), 4)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(pred.grad == 0)


def test_masked_patch_loss_gradients_in_pred_and_imgs():
    pred = torch.randn(2, 4, 12, dtype=torch.float64, requires_grad=True)
    imgs = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 0, 0]], requires_grad=True)
    for norm_pix in (True, False):
        assert torch.autograd.gradcheck(lambda a, b: masked_patch_loss(a, b, mask, 2, norm_pix=norm_pix), (pred, imgs))
    masked_patch_loss(pred, imgs, mask, 2).backward()
    assert mask.grad is None  # the mask is a constant


def test_masked_patch_loss_errors():
    imgs, pred, mask = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 48), torch.ones(2, 4)
    with pytest.raises(ValueError, match=r"pred must have shape \[2, 4, 48\]"):
        masked_patch_loss(pred[:, :3], imgs, mask, 4)
    with pytest.raises(ValueError, match=r"mask must have shape \[2, 4\]"):
        masked_patch_loss(pred, imgs, mask[:, :3], 4)
    with pytest.raises(TypeError, match="mask must be a float or bool"):
        masked_patch_loss(pred, imgs, mask.long(), 4)
    with pytest.raises(ValueError, match="norm_pix needs at least 2 values per patch"):
        masked_patch_loss(torch.randn(1, 4, 1), torch.randn(1, 1, 2, 2), torch.ones(1, 4), 1)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        masked_patch_loss(pred, imgs, mask, 4, eps=-1.0)
    with pytest.raises(ValueError, match="patch_size=3 does not divide"):
        masked_patch_loss(pred, imgs, mask, 3)


def test_norm_pix_uses_the_unbiased_variance():
    # One patch with values 0..3: unbiased variance 5/3, so the target is (t - 1.5) / sqrt(5/3 + eps).
    imgs = torch.arange(4.0, dtype=torch.float64).view(1, 1, 2, 2)
    target = (torch.tensor([0.0, 1, 2, 3], dtype=torch.float64) - 1.5) / (5 / 3 + 1e-6) ** 0.5
    loss = masked_patch_loss(target.view(1, 1, 4), imgs, torch.ones(1, 1), 2)
    assert loss.item() == pytest.approx(0.0, abs=1e-20)
    biased = (torch.tensor([0.0, 1, 2, 3], dtype=torch.float64) - 1.5) / (1.25 + 1e-6) ** 0.5
    assert masked_patch_loss(biased.view(1, 1, 4), imgs, torch.ones(1, 1), 2).item() > 1e-3


# --------------------------------------------------------------------------- kernel backends

def loss_args(shape, mask_ratio=None):
    _, _, mask = sample_mask(shape.batch, shape.num_patches, shape.mask_ratio if mask_ratio is None else mask_ratio)
    return dict(pred=torch.randn(shape.batch, shape.num_patches, shape.patch_dim),
                imgs=torch.randn(shape.batch, shape.channels, shape.height, shape.width), mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", TEST_SHAPES, ids=SHAPE_IDS)
def test_backend_matches_reference(backend, shape, dtype, layout, norm_pix):
    # keep_all masks nothing: the loss and its gradients are exactly zero.
    check_backend(masked_patch_loss, backend, loss_args(shape), ["pred", "imgs"], dtype, layout, keep_dtype=("mask",),
                  patch_size=shape.patch_size, norm_pix=norm_pix)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_pred_gradient_only_and_no_gradient(backend):
    shape = TEST_SHAPES[0]
    check_backend(masked_patch_loss, backend, loss_args(shape), ["pred"], torch.bfloat16, keep_dtype=("mask",),
                  patch_size=shape.patch_size)
    args = {k: v.to(device()) for k, v in loss_args(shape).items()}
    with torch.no_grad():
        got = masked_patch_loss(**args, patch_size=shape.patch_size, backend=backend)
    torch.testing.assert_close(got, masked_patch_loss(**args, patch_size=shape.patch_size, backend="torch"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_bool_mask_and_nothing_masked(backend):
    shape = TEST_SHAPES[1]
    args = {k: v.to(device()) for k, v in loss_args(shape).items()}
    got = masked_patch_loss(args["pred"], args["imgs"], args["mask"].bool(), shape.patch_size, backend=backend)
    torch.testing.assert_close(got, masked_patch_loss(**args, patch_size=shape.patch_size, backend="torch"))
    pred = args["pred"].requires_grad_()
    zero = masked_patch_loss(pred, args["imgs"], torch.zeros_like(args["mask"]), shape.patch_size, backend=backend)
    zero.backward()
    assert zero.item() == 0.0 and torch.all(pred.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_scales_by_the_incoming_gradient(backend):
    shape = TEST_SHAPES[0]
    args = {k: v.to(device()) for k, v in loss_args(shape).items()}
    grads = []
    for b in (backend, "torch"):
        pred = args["pred"].clone().requires_grad_()
        (masked_patch_loss(pred, args["imgs"], args["mask"], shape.patch_size, backend=b) * 1024.0).backward()
        grads.append(pred.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_gradients_are_deterministic(backend):
    args = loss_args(TEST_SHAPES[1])
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        runs.append(check_backend(masked_patch_loss, backend, args, ["pred", "imgs"], torch.bfloat16,
                                  keep_dtype=("mask",), patch_size=8)[1])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_registered_ops_pass_opcheck(backend):
    pred = torch.randn(2, 4, 12, device=device(), requires_grad=True)
    imgs = torch.randn(2, 3, 4, 4, device=device(), requires_grad=True)
    mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 0, 0]], device=device())
    op = getattr(torch.ops.mae_fast, f"masked_patch_loss_{backend}").default
    for norm_pix in (True, False):
        torch.library.opcheck(op, (pred, imgs, None, mask, 2, 0, norm_pix, 1e-6))
    with_cls = torch.randn(2, 5, 12, device=device(), requires_grad=True)
    torch.library.opcheck(op, (with_cls, imgs, None, mask, 2, 1, True, 1e-6))
    pixels = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8, device=device())
    stats = torch.tensor([[120.0, 110, 100], [60, 55, 58]], device=device())
    torch.library.opcheck(op, (pred, pixels, stats, mask, 2, 0, True, 1e-6))
    backward = getattr(torch.ops.mae_fast, f"masked_patch_loss_{backend}_backward").default
    for grads in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(backward, (with_cls.detach().bfloat16(), imgs.detach(), None, mask,
                                         torch.tensor(2.0, device=device()), 2, 1, True, 1e-6, *grads))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_without_graph_breaks(backend):
    pred = torch.randn(2, 4, 12, device=device(), requires_grad=True)
    imgs = torch.randn(2, 3, 4, 4, device=device())
    mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 0, 0]], device=device())

    def f(p):
        return masked_patch_loss(p, imgs, mask, 2, backend=backend) * 3

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    expected, = torch.autograd.grad(f(pred), pred)
    got, = torch.autograd.grad(compiled(pred), pred)
    torch.testing.assert_close(got, expected)


# --------------------------------------------------------------------------- offset, uint8 images, rounding, bytes

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape", TEST_SHAPES[:3], ids=SHAPE_IDS[:3])
def test_uint8_images_and_offset_match_normalizing_first_and_slicing(backend, shape, layout):
    # The loss and gradient of every backend, the reference included, against pixels normalized in float64 and a
    # loss written out patch by patch here; the tolerance is the float32 reference's own error on float images
    # normalized here too (not with normalize_images, which the torch backend's uint8 path uses).
    from mae_fast.ops import normalize_images
    MEAN_, STD_ = MEAN[:shape.channels], STD[:shape.channels]
    pixels = torch.randint(0, 256, (shape.batch, shape.channels, shape.height, shape.width), dtype=torch.uint8)
    if layout == "nhwc":
        pixels = pixels.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    pixels = pixels.to(device())
    _, _, mask = sample_mask(shape.batch, shape.num_patches, shape.mask_ratio, device=device())
    full = torch.randn(shape.batch, 1 + shape.num_patches, shape.patch_dim, device=device(), requires_grad=True)
    loss = masked_patch_loss(full, pixels, mask, shape.patch_size, backend=backend, pred_offset=1, mean=MEAN_, std=STD_)
    grad, = torch.autograd.grad(loss * 0.3, full)
    assert torch.all(grad[:, 0] == 0)

    exact_pred = full.detach()[:, 1:].cpu().double().requires_grad_()
    exact = loss_by_definition(exact_pred, normalized_by_definition(pixels, MEAN_, STD_, torch.float64), mask.cpu(),
                               shape.patch_size, norm_pix=True)
    exact_grad, = torch.autograd.grad(exact * 0.3, exact_pred)
    single_pred = full.detach()[:, 1:].cpu().clone().requires_grad_()
    single = masked_patch_loss(single_pred, normalized_by_definition(pixels, MEAN_, STD_, torch.float32), mask.cpu(),
                               shape.patch_size, backend="torch")
    single_grad, = torch.autograd.grad(single * 0.3, single_pred)
    assert_close_to_reference(loss.detach().cpu(), exact.detach(), single.detach(), name="loss")
    assert_close_to_reference(grad[:, 1:].cpu(), exact_grad, single_grad, name="pred gradient")

    if backend != "torch":  # the kernels: bit for bit what normalizing first and slicing give
        sliced = full.detach()[:, 1:].clone().requires_grad_()
        expected = masked_patch_loss(sliced, normalize_images(pixels, MEAN_, STD_), mask, shape.patch_size,
                                     backend=backend)
        assert torch.equal(loss, expected)  # the same kernel on the same float32 values
        expected_grad, = torch.autograd.grad(expected * 0.3, sliced)
        assert torch.equal(grad[:, 1:], expected_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_gradient_is_rounded_once_for_any_incoming_gradient(backend):
    # loss / accum_iter: the float32 gradient scaled by 1/3, then rounded to bf16 once. The backward
    # recomputes in float32, so it rounds at most half a bf16 step away from the float64 gradient.
    shape = TEST_SHAPES[0]
    args = {k: v.to(device()) for k, v in loss_args(shape).items()}
    pred = args["pred"].bfloat16().requires_grad_()
    grad, = torch.autograd.grad(masked_patch_loss(pred, args["imgs"], args["mask"], shape.patch_size,
                                                  backend=backend) / 3, pred)
    hi = pred.detach().double().requires_grad_()
    exact, = torch.autograd.grad(masked_patch_loss(hi, args["imgs"].double(), args["mask"], shape.patch_size,
                                                   backend="torch") / 3, hi)
    step = torch.where(exact != 0, 2.0 ** (torch.floor(torch.log2(exact.abs())) - 7), torch.ones_like(exact))
    assert ((grad.double() - exact).abs() <= 0.5 * step + 1e-12).all()


def test_pred_offset_errors():
    imgs, mask = torch.randn(2, 3, 8, 8), torch.ones(2, 4)
    with pytest.raises(ValueError, match=r"pred must have shape \[2, 5, 48\].*pred_offset=1"):
        masked_patch_loss(torch.randn(2, 4, 48), imgs, mask, 4, pred_offset=1)
    with pytest.raises(ValueError, match="pred_offset must be an int >= 0"):
        masked_patch_loss(torch.randn(2, 4, 48), imgs, mask, 4, pred_offset=-1)
    with pytest.raises(ValueError, match="uint8 imgs need mean and std"):
        masked_patch_loss(torch.randn(2, 4, 48), imgs.to(torch.uint8), mask, 4)


def test_bytes_moved_at_vit_b16():
    from mae_fast.ops.masked_patch_loss import bytes_moved
    from mae_fast.ops.shapes import MAE_SHAPES
    s = MAE_SHAPES[0]
    masked = s.num_patches - s.num_kept
    bf16_fp32 = bytes_moved(s.batch, s.num_patches, s.patch_dim, masked, torch.bfloat16, torch.float32, 1)
    bf16_u8 = bytes_moved(s.batch, s.num_patches, s.patch_dim, masked, torch.bfloat16, torch.uint8, 1)
    reads = s.batch * masked * s.patch_dim
    assert bf16_fp32["forward"] == reads * 6 + s.batch * s.num_patches * 8
    assert bf16_u8["floor"] == reads * 3 + s.batch * (1 + s.num_patches) * s.patch_dim * 2
    # No float32 gradient of the whole [B, L, N] tensor any more: forward writes 4 bytes per patch.
    total = bf16_u8["forward"] + bf16_u8["backward"]
    assert 250e6 < total < 260e6, total
