"""MAEViT against an independent implementation of the official MAE formulas, in float64."""

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F

import mae_fast
from mae_fast import MAEViT, create_model
from mae_fast.attention import flash_attn_unavailable_reason


def small_model(**kwargs) -> MAEViT:
    cfg = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=4, decoder_embed_dim=24,
               decoder_depth=2, decoder_num_heads=3, mlp_ratio=2.0, attn_backend="math", kernel_backend="torch")
    cfg.update(kwargs)
    return MAEViT(**cfg)


# --------------------------------------------------------------------------- the independent reference

def sincos_table(dim: int, gh: int, gw: int) -> torch.Tensor:
    """[1 + gh*gw, dim] float64 from the formula: first half encodes the column, second the row."""
    quarter = dim // 4
    omega = [1.0 / 10000 ** (k / quarter) for k in range(quarter)]
    table = torch.zeros(1 + gh * gw, dim, dtype=torch.float64)
    for i in range(gh):
        for j in range(gw):
            row = 1 + i * gw + j
            for k in range(quarter):
                table[row, k] = math.sin(j * omega[k])
                table[row, quarter + k] = math.cos(j * omega[k])
                table[row, 2 * quarter + k] = math.sin(i * omega[k])
                table[row, 3 * quarter + k] = math.cos(i * omega[k])
    return table


def layer_norm(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def block(x, sd, prefix, heads):
    B, N, D = x.shape
    h = layer_norm(x, sd[prefix + "norm1.weight"], sd[prefix + "norm1.bias"])
    qkv = h @ sd[prefix + "attn.qkv.weight"].T + sd[prefix + "attn.qkv.bias"]
    q, k, v = qkv.split(D, dim=-1)
    dh = D // heads
    q, k, v = (t.reshape(B, N, heads, dh).transpose(1, 2) for t in (q, k, v))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
    a = (att @ v).transpose(1, 2).reshape(B, N, D)
    x = x + a @ sd[prefix + "attn.proj.weight"].T + sd[prefix + "attn.proj.bias"]
    h = layer_norm(x, sd[prefix + "norm2.weight"], sd[prefix + "norm2.bias"])
    h = h @ sd[prefix + "mlp.fc1.weight"].T + sd[prefix + "mlp.fc1.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return x + h @ sd[prefix + "mlp.fc2.weight"].T + sd[prefix + "mlp.fc2.bias"]


def reference_mae(sd, cfg, imgs, noise, mask_ratio, norm_pix):
    """The official MaskedAutoencoderViT.forward, written from its formulas."""
    B, C, H, W = imgs.shape
    p = cfg["patch_size"]
    gh, gw = H // p, W // p
    L = gh * gw
    x = F.conv2d(imgs, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"][:, 1:]
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x = torch.stack([x[b, ids_keep[b]] for b in range(B)])
    mask = torch.ones(B, L, dtype=torch.float64)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = sd["cls_token"] + sd["pos_embed"][:, :1]
    x = torch.cat([cls.expand(B, -1, -1), x], dim=1)
    for i in range(cfg["depth"]):
        x = block(x, sd, f"blocks.{i}.", cfg["num_heads"])
    x = layer_norm(x, sd["norm.weight"], sd["norm.bias"])

    x = x @ sd["decoder_embed.weight"].T + sd["decoder_embed.bias"]
    Dd = x.shape[-1]
    seq = torch.cat([x[:, 1:], sd["mask_token"].expand(B, L - len_keep, Dd)], dim=1)
    seq = torch.stack([seq[b, ids_restore[b]] for b in range(B)])
    x = torch.cat([x[:, :1], seq], dim=1) + sd["decoder_pos_embed"]
    for i in range(cfg["decoder_depth"]):
        x = block(x, sd, f"decoder_blocks.{i}.", cfg["decoder_num_heads"])
    x = layer_norm(x, sd["decoder_norm.weight"], sd["decoder_norm.bias"])
    pred = (x @ sd["decoder_pred.weight"].T + sd["decoder_pred.bias"])[:, 1:]

    target = torch.zeros(B, L, p * p * C, dtype=torch.float64)
    for i in range(gh):
        for j in range(gw):
            patch = imgs[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p]  # [B, C, p, p]
            target[:, i * gw + j] = patch.permute(0, 2, 3, 1).reshape(B, -1)  # row, column, channel
    if norm_pix:
        mean = target.mean(-1, keepdim=True)
        var = ((target - mean) ** 2).sum(-1, keepdim=True) / (target.shape[-1] - 1)
        target = (target - mean) / torch.sqrt(var + 1e-6)
    per_patch = ((pred - target) ** 2).mean(-1)
    loss = (per_patch * mask).sum() / mask.sum()
    return loss, pred, mask, ids_restore


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("img_size,mask_ratio", [(32, 0.75), ((24, 40), 0.6), (32, 0.95)])
def test_model_matches_official_formulas(img_size, mask_ratio, norm_pix):
    model = small_model(img_size=img_size, norm_pix_loss=norm_pix).double()
    B = 3
    H, W = (img_size, img_size) if isinstance(img_size, int) else img_size
    imgs = torch.randn(B, 3, H, W, dtype=torch.float64)
    noise = torch.rand(B, model.num_patches, dtype=torch.float64)
    loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    _, _, ids_restore = model.forward_encoder(imgs, mask_ratio, noise)

    sd = {k: v.double() for k, v in model.state_dict().items()}
    ref_loss, ref_pred, ref_mask, ref_ids = reference_mae(sd, model.config, imgs, noise, mask_ratio, norm_pix)
    assert torch.equal(mask, ref_mask.float())
    assert torch.equal(ids_restore, ref_ids)
    torch.testing.assert_close(pred, ref_pred, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)


def test_pos_embed_matches_formula_and_is_frozen():
    model = small_model(img_size=(24, 40))
    gh, gw = model.patch_embed.grid_size
    for name, width in (("pos_embed", 32), ("decoder_pos_embed", 24)):
        table = getattr(model, name)
        assert table.dtype == torch.float32 and not table.requires_grad
        assert table.shape == (1, 1 + gh * gw, width)
        assert torch.all(table[0, 0] == 0)
        torch.testing.assert_close(table[0].double(), sincos_table(width, gh, gw), atol=1e-7, rtol=0)
    # A known coordinate: patch (row 2, column 3); channel 0 is sin(column), channel D/2 is sin(row).
    row = 1 + 2 * gw + 3
    assert model.pos_embed[0, row, 0].item() == pytest.approx(math.sin(3), abs=1e-7)
    assert model.pos_embed[0, row, 16].item() == pytest.approx(math.sin(2), abs=1e-7)
    assert model.pos_embed[0, row, 8].item() == pytest.approx(math.cos(3), abs=1e-7)


def expected_keys(depth, decoder_depth):
    block_keys = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                  "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                  "mlp.fc2.weight", "mlp.fc2.bias"]
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    keys += [f"blocks.{i}.{k}" for i in range(depth) for k in block_keys]
    keys += ["norm.weight", "norm.bias", "decoder_embed.weight", "decoder_embed.bias", "mask_token",
             "decoder_pos_embed"]
    keys += [f"decoder_blocks.{i}.{k}" for i in range(decoder_depth) for k in block_keys]
    keys += ["decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"]
    return keys


def test_state_dict_keys_are_official():
    model = small_model()
    assert sorted(model.state_dict()) == sorted(expected_keys(2, 2))


def trainable_formula(D, depth, Dd, ddepth, p, C=3, L=196, mlp=4):
    blk = lambda d: 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * mlp * d + mlp * d) + (mlp * d * d + d)
    enc = D * C * p * p + D + D + depth * blk(D) + 2 * D
    dec = D * Dd + Dd + Dd + ddepth * blk(Dd) + 2 * Dd + Dd * p * p * C + p * p * C
    return enc + dec


@pytest.mark.parametrize("name,expected", [
    ("mae_vit_base_patch16", 111_655_680),
    ("mae_vit_large_patch16", trainable_formula(1024, 24, 512, 8, 16)),
    ("mae_vit_huge_patch14", trainable_formula(1280, 32, 512, 8, 14, L=256)),
])
def test_official_parameter_counts(name, expected):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["pos_embed", "decoder_pos_embed"]


def test_presets_importable_and_unknown_name():
    for name in mae_fast.MODELS:
        assert hasattr(mae_fast, name)
    with pytest.raises(ValueError, match="unknown model 'vit_b'"):
        create_model("vit_b")


def test_init_statistics():
    torch.manual_seed(1)
    model = small_model(embed_dim=64, decoder_embed_dim=48, mlp_ratio=4.0)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            fan_out, fan_in = module.weight.shape
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert module.weight.abs().max() <= bound, name
            assert module.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15), name
            assert torch.all(module.bias == 0), name
        elif isinstance(module, torch.nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0), name
            assert module.eps == 1e-6
    w = model.patch_embed.proj.weight.view(64, -1)
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    assert w.abs().max() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    # The official code leaves the conv bias at PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bias = model.patch_embed.proj.bias
    assert bias.abs().max() <= 1 / math.sqrt(w.shape[1]) and bias.abs().max() > 0
    big = small_model(embed_dim=4096, decoder_embed_dim=4096, depth=0, decoder_depth=0)
    for token in (big.cls_token, big.mask_token):
        assert token.std().item() == pytest.approx(0.02, rel=0.1)
        assert token.mean().abs().item() < 0.002


def test_gradients_reach_every_trainable_parameter():
    model = small_model(norm_pix_loss=True)
    imgs = torch.randn(2, 3, 32, 32)
    loss, _, _ = model(imgs)
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.count_nonzero(param.grad) > 0, name
        else:
            assert param.grad is None, name


def test_grad_checkpointing_gives_the_same_gradients():
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(3)
        model = small_model(grad_checkpointing=ckpt)
        model(imgs, noise=noise)[0].backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_nothing_masked_gives_zero_loss_not_nan():
    model = small_model()
    loss, pred, mask = model(torch.randn(2, 3, 32, 32), mask_ratio=0.0)
    assert loss.item() == 0.0 and mask.sum() == 0 and pred.shape == (2, 16, 192)


def test_extract_features_matches_a_manual_encoder_pass():
    model = small_model().eval()
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x = model.patch_embed.proj(imgs).flatten(2).transpose(1, 2) + model.pos_embed[:, 1:]
        x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1), x], dim=1)
        for blk in model.blocks:
            x = blk(x)
        x = model.norm(x)
        assert torch.allclose(model.forward_features(imgs), x, atol=1e-6)
        assert torch.allclose(model.extract_features(imgs, pool="mean"), x[:, 1:].mean(1), atol=1e-6)
        assert torch.allclose(model.extract_features(imgs, pool="cls"), x[:, 0], atol=1e-6)
    with pytest.raises(ValueError, match="pool must be"):
        model.extract_features(imgs, pool="max")


def test_unmasked_encoder_equals_forward_features():
    """With nothing masked and the identity noise order, the masked path equals the plain encoder."""
    model = small_model().double()
    imgs = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    noise = torch.arange(16, dtype=torch.float64).expand(2, -1)
    latent, _, _ = model.forward_encoder(imgs, 0.0, noise)
    torch.testing.assert_close(latent, model.forward_features(imgs))


@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_attention_backends_agree_with_math(backend, monkeypatch):
    # Both backends must resolve to sdpa on the CPU and call it, once per block; otherwise a backend that fell back to
    # math would be compared with math and agree.
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    torch.manual_seed(5)
    ref = small_model(attn_backend="math")
    torch.manual_seed(5)
    other = small_model(attn_backend=backend)
    assert other.attn_backend_for("cpu", torch.float32) == "sdpa"
    sdpa, calls = F.scaled_dot_product_attention, []
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    expected = ref(imgs, noise=noise)[1]
    assert not calls  # the reference is the written-out softmax
    got = other(imgs, noise=noise)[1]
    num_blocks = len(other.blocks) + len(other.decoder_blocks)
    assert len(calls) == num_blocks, f"scaled_dot_product_attention ran {len(calls)} times for {num_blocks} blocks"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_explicit_flash_attn_explains_why_it_cannot_run():
    if flash_attn_unavailable_reason() is None:
        model = small_model(attn_backend="flash_attn")
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            model(torch.randn(1, 3, 32, 32))
    else:
        with pytest.raises(RuntimeError, match="attn_backend='flash_attn' cannot run: the flash_attn package"):
            small_model(attn_backend="flash_attn")
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        small_model(attn_backend="xformers")


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="kernel_backend must be one of"):
        small_model(kernel_backend="cudnn")
    with pytest.raises(ValueError, match="patch_size=7 does not divide img_size"):
        small_model(patch_size=7)
    model = small_model()
    with pytest.raises(ValueError, match=r"imgs must have shape \[B, 3, 32, 32\]"):
        model(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        model(torch.randn(2, 3, 32, 32), mask_ratio=1.0)
    with pytest.raises(ValueError, match="noise must have shape"):
        model(torch.randn(2, 3, 32, 32), noise=torch.rand(2, 15))


def test_official_checkpoint_round_trip(tmp_path):
    src = small_model()
    path = tmp_path / "official.pth"
    torch.save({"model": src.state_dict(), "epoch": 3}, path)
    dst = small_model()
    report = dst.load_pretrained(path)
    assert report == {"missing_keys": [], "unexpected_keys": [], "interpolated": []}
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key


def test_encoder_only_checkpoint_keeps_decoder_init_and_says_so(caplog):
    src = small_model()
    encoder_only = {k: v for k, v in src.state_dict().items() if not k.startswith(("decoder_", "mask_token"))}
    dst = small_model()
    before = dst.decoder_pred.weight.clone()
    with caplog.at_level(logging.WARNING, logger="mae_fast"):
        report = dst.load_pretrained(encoder_only)
    assert "checkpoint has no decoder" in caplog.text
    assert torch.equal(dst.decoder_pred.weight, before)
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert "mask_token" in report["missing_keys"]


def test_loading_weights_for_another_grid_interpolates_positions():
    src = small_model(img_size=32)  # 4x4 grid
    dst = small_model(img_size=48)  # 6x6 grid
    report = dst.load_pretrained(src.state_dict())
    assert report["interpolated"] == ["pos_embed", "decoder_pos_embed"]
    grid = src.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, -1)
    torch.testing.assert_close(dst.pos_embed[:, 1:], expected)
    assert torch.all(dst.pos_embed[:, 0] == 0)


def test_bad_checkpoints_give_clear_errors(tmp_path):
    model = small_model()
    with pytest.raises(ValueError, match="state dict of tensors"):
        model.load_pretrained({"model": "nope"})
    with pytest.raises(ValueError, match="lacks encoder parameters"):
        model.load_pretrained({"cls_token": model.cls_token.detach()})
    bad = dict(model.state_dict())
    bad["norm.weight"] = torch.ones(7)
    with pytest.raises(ValueError, match=r"norm.weight has shape \(7,\)"):
        model.load_pretrained(bad)


def test_a_refused_checkpoint_changes_nothing():
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    donor = small_model()
    torch.nn.init.normal_(donor.cls_token)
    state = {k: v + 1 for k, v in donor.state_dict().items()}
    del state["blocks.1.mlp.fc2.bias"]  # one encoder key missing: refused only after the others loaded, before
    with pytest.raises(ValueError, match=r"lacks encoder parameters: \['blocks.1.mlp.fc2.bias'\]; nothing was loaded"):
        model.load_pretrained(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    bad_shape = {k: v + 1 for k, v in donor.state_dict().items()}
    bad_shape["decoder_pred.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="decoder_pred.weight has shape"):
        model.load_pretrained(bad_shape)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_flops_per_image_counts_vit_b():
    with torch.device("meta"):
        model = create_model("mae_vit_base_patch16")
    # Encoder on 49 kept + cls tokens, decoder on 197, kept-patch embedding, backward = 2x forward.
    enc = 12 * (24 * 50 * 768**2 + 4 * 50**2 * 768)
    dec = 8 * (24 * 197 * 512**2 + 4 * 197**2 * 512)
    forward = 2 * 49 * 768 * 768 + enc + 2 * 50 * 768 * 512 + dec + 2 * 197 * 512 * 768
    assert model.flops_per_image(0.75) == 3 * forward
    assert model.flops_per_image(0.75, training=False) == forward


def _twin_models(backend: str, **kwargs):
    ref = small_model(kernel_backend="torch", **kwargs)
    other = small_model(kernel_backend=backend, **kwargs)
    other.load_state_dict(ref.state_dict())
    return ref, other


def _triton_or_skip():
    from mae_fast.ops.dispatch import _why_not
    reason = _why_not("triton", [torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu")])
    if reason:
        pytest.skip(reason)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("norm_pix", [True, False])
def test_triton_kernel_path_equals_torch_path(norm_pix):
    dev = _triton_or_skip()
    ref, fused = (m.to(dev) for m in _twin_models("triton", img_size=(24, 40), norm_pix_loss=norm_pix))
    imgs, noise = torch.randn(3, 3, 24, 40, device=dev), torch.rand(3, 15, device=dev)
    outs = [m(imgs, mask_ratio=0.6, noise=noise) for m in (ref, fused)]
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for m, (loss, _, _) in zip((ref, fused), outs):
        loss.backward()
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_model_with_triton_kernels_compiles_as_one_graph():
    dev = _triton_or_skip()
    ref, fused = (m.to(dev) for m in _twin_models("triton"))
    imgs, noise = torch.randn(2, 3, 32, 32, device=dev), torch.rand(2, 16, device=dev)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    loss, pred, mask = compiled(imgs, noise=noise)
    ref_loss, ref_pred, ref_mask = ref(imgs, noise=noise)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert torch.equal(mask, ref_mask)
    loss.backward()
    assert fused.decoder_pred.weight.grad is not None


def test_compile_blocks_compiles_each_block_and_keeps_the_outputs():
    torch.manual_seed(0)
    ref = create_model("mae_vit_tiny_patch16", img_size=32, kernel_backend="torch")
    regional = copy.deepcopy(ref)
    regional.compile_blocks(backend="aot_eager")
    assert all(b._compiled_call_impl is not None for b in (*regional.blocks, *regional.decoder_blocks))
    assert all(b._compiled_call_impl is None for b in ref.blocks)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 4)
    (loss, pred, mask), (ref_loss, ref_pred, ref_mask) = regional(imgs, noise=noise), ref(imgs, noise=noise)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(pred, ref_pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(regional.blocks[0].attn.qkv.weight.grad, ref.blocks[0].attn.qkv.weight.grad,
                               atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["sdpa", "flash_attn"])
def test_gpu_bf16_attention_backends_match_math(attn):
    if attn == "flash_attn" and flash_attn_unavailable_reason() is not None:
        pytest.skip(flash_attn_unavailable_reason())
    torch.manual_seed(0)
    ref = small_model(attn_backend="math", kernel_backend="auto").cuda()
    fast = small_model(attn_backend=attn, kernel_backend="auto").cuda()
    fast.load_state_dict(ref.state_dict())
    imgs, noise = torch.randn(4, 3, 32, 32, device="cuda"), torch.rand(4, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = ref(imgs, noise=noise), fast(imgs, noise=noise)
    assert fast.attn_backend_for("cuda", torch.bfloat16) == attn
    torch.testing.assert_close(b[1].float(), a[1].float(), atol=3e-2, rtol=3e-2)
    b[0].backward()
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters() if p.requires_grad)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_uint8_pixels_equal_normalizing_first(backend):
    # A uint8 batch normalized inside the fused ops gives the same loss, predictions and gradients, bit for bit,
    # as the batch normalized by the loaders' arithmetic first.
    from mae_fast.data.transforms import normalize
    dev = _triton_or_skip() if backend == "triton" else "cpu"
    torch.manual_seed(0)
    a = MAEViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
               decoder_num_heads=2, norm_pix_loss=True, kernel_backend=backend).to(dev)
    b = copy.deepcopy(a)
    pixels = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8, device=dev).permute(0, 3, 1, 2)  # NHWC view
    noise = torch.rand(3, 16, device=dev)
    out_u8 = a(pixels, noise=noise)
    out_f = b(normalize(pixels, torch.float32), noise=noise)
    for x, y in zip(out_u8, out_f):
        assert torch.equal(x, y)
    out_u8[0].backward()
    out_f[0].backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if p.requires_grad:
            assert torch.equal(p.grad, q.grad), name
    assert "pixel_mean" not in a.state_dict()  # official keys only
    features = a.extract_features(pixels)
    assert torch.equal(features, b.extract_features(normalize(pixels, torch.float32)))


def _slices_of_width(loss, width):
    """Slice nodes in loss's backward graph over tensors whose last dimension is ``width``."""
    found, seen, todo = [], set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__.startswith("SliceBackward") and list(node._saved_self_sym_sizes)[-1] == width:
            found.append(tuple(node._saved_self_sym_sizes))
        todo.extend(next_node for next_node, _ in node.next_functions)
    return found


def test_loss_takes_the_decoder_output_without_a_slice():
    # A slice's backward zero-fills and copies the whole [B, 1 + L, N] gradient: the fused loss takes the
    # decoder output whole, with an offset. (The torch reference slices inside, which this check sees.)
    dev = _triton_or_skip()
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                  decoder_depth=1, decoder_num_heads=2)
    imgs = torch.randn(2, 3, 32, 32, device=dev)
    fused_loss, pred, _ = MAEViT(kernel_backend="triton", **kwargs).to(dev)(imgs)
    assert pred.shape == (2, 16, 192)
    assert _slices_of_width(fused_loss, 192) == []
    reference_loss, _, _ = MAEViT(kernel_backend="torch", **kwargs).to(dev)(imgs)
    assert _slices_of_width(reference_loss, 192) == [(2, 17, 192)]  # the check sees a slice where there is one
