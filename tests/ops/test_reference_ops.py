"""The pure-PyTorch reference ops against their definitions, written as loops, and their input checks."""

import pytest
import torch

from mae_fast.ops import (
    BackendUnavailableError,
    gather_patches,
    gather_tokens,
    masked_patch_loss,
    patchify,
    restore_tokens,
    sample_mask,
    unpatchify,
)
from op_testing import TEST_SHAPES, noncontiguous

SHAPE_IDS = [s.name for s in TEST_SHAPES]


# --------------------------------------------------------------------------- patchify

@pytest.mark.parametrize("shape", TEST_SHAPES, ids=SHAPE_IDS)
def test_patchify_order_and_round_trip(shape):
    imgs = torch.randn(shape.batch, shape.channels, shape.height, shape.width)
    x = patchify(imgs, shape.patch_size)
    p, (gh, gw) = shape.patch_size, shape.grid
    assert x.shape == (shape.batch, gh * gw, shape.patch_dim)
    b, h, w, i, j, c = shape.batch - 1, gh - 1, gw - 1, p - 1, 0, shape.channels - 1
    assert x[b, h * gw + w, (i * p + j) * shape.channels + c] == imgs[b, c, h * p + i, w * p + j]
    assert torch.equal(unpatchify(x, p, shape.grid), imgs)


def test_unpatchify_errors():
    with pytest.raises(ValueError, match="not a square grid; pass grid"):
        unpatchify(torch.randn(1, 15, 48), 4)
    with pytest.raises(ValueError, match=r"grid=\(3, 4\) holds 12 patches but x has 15"):
        unpatchify(torch.randn(1, 15, 48), 4, (3, 4))
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        unpatchify(torch.randn(1, 16, 50), 4)
    with pytest.raises(ValueError, match="patch_size=5 does not divide the imgs size 16x16"):
        patchify(torch.randn(1, 3, 16, 16), 5)


# --------------------------------------------------------------------------- sample_mask

def official_masking(noise, mask_ratio):
    B, L = noise.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(B, L)
    mask[:, :len_keep] = 0
    return ids_shuffle[:, :len_keep], ids_restore, torch.gather(mask, 1, ids_restore)


@pytest.mark.parametrize("L,ratio,expected_keep", [(196, 0.75, 49), (10, 0.9, 0), (16, 0.0, 16), (9, 0.85, 1),
                                                   (7, 0.5, 3)])
def test_sample_mask_is_the_official_masking(L, ratio, expected_keep):
    noise = torch.rand(3, L)
    ids_keep, ids_restore, mask = sample_mask(3, L, ratio, noise=noise)
    ref_keep, ref_restore, ref_mask = official_masking(noise, ratio)
    assert ids_keep.shape == (3, expected_keep)  # int(L * (1 - ratio)), truncated
    assert ids_keep.dtype == ids_restore.dtype == torch.int64 and mask.dtype == torch.float32
    assert torch.equal(ids_keep, ref_keep) and torch.equal(ids_restore, ref_restore) and torch.equal(mask, ref_mask)
    # kept tokens come in noise-sorted order and have the smallest noise
    kept_noise = torch.gather(noise, 1, ids_keep)
    assert torch.all(kept_noise[:, 1:] >= kept_noise[:, :-1])
    if 0 < expected_keep < L:
        assert torch.all(kept_noise.max(1).values < noise.masked_fill(mask == 0, 2).min(1).values)


def test_sample_mask_random_draw_and_generator():
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = sample_mask(4, 49, 0.75, generator=g1)
    b = sample_mask(4, 49, 0.75, generator=g2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.all(a[2].sum(1) == 49 - 12)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(batch_size=0, num_patches=4, mask_ratio=0.5), ValueError, "batch_size must be a positive int, got 0"),
    (dict(batch_size=2, num_patches=-1, mask_ratio=0.5), ValueError, "num_patches must be a positive int, got -1"),
    (dict(batch_size=2, num_patches=4, mask_ratio=1.0), ValueError, r"mask_ratio must be in \[0, 1\), got 1.0"),
    (dict(batch_size=2, num_patches=4, mask_ratio=-0.1), ValueError, "mask_ratio must be in"),
    (dict(batch_size=2, num_patches=4, mask_ratio="0.5"), TypeError, "mask_ratio must be a number"),
    (dict(batch_size=2, num_patches=4, mask_ratio=0.5, noise=torch.rand(2, 5)), ValueError, r"noise must have shape \[2, 4\]"),
    (dict(batch_size=2, num_patches=4, mask_ratio=0.5, noise=torch.zeros(2, 4, dtype=torch.long)), TypeError, "noise must be float"),
])
def test_sample_mask_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        sample_mask(**kwargs)


# --------------------------------------------------------------------------- gather_patches

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


# --------------------------------------------------------------------------- gather_tokens

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


# --------------------------------------------------------------------------- restore_tokens

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


# --------------------------------------------------------------------------- masked_patch_loss

def loss_by_definition(pred, imgs, mask, p, norm_pix, eps=1e-6):
    B, C, H, W = imgs.shape
    gw = W // p
    total, count = 0.0, 0.0
    for b in range(B):
        for l in range(pred.shape[1]):
            if mask[b, l] == 0:
                continue
            h, w = divmod(l, gw)
            t = imgs[b, :, h * p:(h + 1) * p, w * p:(w + 1) * p].permute(1, 2, 0).reshape(-1).double()
            if norm_pix:
                t = (t - t.mean()) / (t.var(unbiased=True) + eps).sqrt()
            total += float(mask[b, l]) * ((pred[b, l].double() - t) ** 2).mean().item()
            count += float(mask[b, l])
    return total / count if count else 0.0


@pytest.mark.parametrize("shape", TEST_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_patch_loss_definition(shape, norm_pix):
    imgs = torch.randn(shape.batch, shape.channels, shape.height, shape.width, dtype=torch.float64)
    pred = torch.randn(shape.batch, shape.num_patches, shape.patch_dim, dtype=torch.float64)
    _, _, mask = sample_mask(shape.batch, shape.num_patches, shape.mask_ratio)
    loss = masked_patch_loss(pred, imgs, mask, shape.patch_size, norm_pix=norm_pix, backend="torch")
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(loss_by_definition(pred, imgs, mask, shape.patch_size, norm_pix), rel=1e-12, abs=1e-12)


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
