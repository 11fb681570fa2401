"""python -m mae_fast.export: timm, Hugging Face and safetensors, loaded by the real libraries, compared at float64."""

import pytest
import torch

from mae_fast import create_model
from mae_fast.export import TIMM_MODELS, main, timm_call

PRESET = "mae_vit_tiny_patch16"


def trained_like(img_size=32, preset=PRESET, seed=0):
    """A model whose weights are not at their initialization (random everywhere, positions kept)."""
    torch.manual_seed(seed)
    model = create_model(preset, img_size=img_size, kernel_backend="torch", attn_backend="math")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "pos_embed" not in name:
                param.normal_(0, 0.05)
    return model


def save_official(model, path):
    torch.save({"model": model.state_dict(), "epoch": 399}, path)  # the layout of the official releases
    return path


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("pool", ["mean", "cls"])
@pytest.mark.parametrize("img_size", [(32, 32), (32, 48)])
def test_timm_loads_the_encoder_strictly_and_gives_extract_features(tmp_path, capsys, pool, img_size):
    timm = pytest.importorskip("timm")
    model = trained_like(img_size)
    out = tmp_path / "encoder.pth"
    code, printed, err = run([save_official(model, tmp_path / "ckpt.pth"), out, "--to", "timm",
                              "--img_size", *img_size], capsys)
    assert code == 0, err
    assert timm_call(PRESET, img_size, "mean") in printed
    vit = timm.create_model(TIMM_MODELS[PRESET], num_classes=0, global_pool="avg" if pool == "mean" else "token",
                            fc_norm=False, img_size=img_size)
    vit.load_state_dict(torch.load(out, weights_only=True), strict=True)
    images = torch.randn(3, 3, *img_size, dtype=torch.float64)
    vit, model = vit.double().eval(), model.double().eval()
    with torch.no_grad():
        torch.testing.assert_close(vit(images), model.extract_features(images, pool=pool), rtol=1e-10, atol=1e-10)


def test_timm_export_at_another_size_interpolates_positions_as_load_pretrained_does(tmp_path, capsys):
    timm = pytest.importorskip("timm")
    pytest.importorskip("safetensors")
    model = trained_like(32)
    out = tmp_path / "encoder.safetensors"
    code, _, err = run([save_official(model, tmp_path / "ckpt.pth"), out, "--to", "timm", "--img_size", "48", "64"],
                       capsys)
    assert code == 0, err
    from safetensors.torch import load_file

    vit = timm.create_model(TIMM_MODELS[PRESET], num_classes=0, global_pool="avg", fc_norm=False, img_size=(48, 64))
    vit.load_state_dict(load_file(str(out)), strict=True)
    resized = create_model(PRESET, img_size=(48, 64), kernel_backend="torch", attn_backend="math")
    resized.load_pretrained(model.state_dict())
    images = torch.randn(2, 3, 48, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(vit.double().eval()(images), resized.double().extract_features(images),
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_hugging_face_loads_the_folder_and_gives_the_same_outputs_for_the_same_noise(tmp_path, capsys, norm_pix):
    transformers = pytest.importorskip("transformers")
    model = trained_like(48)
    model.norm_pix_loss = norm_pix
    model.config["norm_pix_loss"] = norm_pix
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "format": "mae_fast-checkpoint-v1", "optimizer": {}, "epoch": 0,
                "step": 1, "config": {"model": {"name": PRESET, "norm_pix_loss": norm_pix}}}, ckpt)
    out = tmp_path / "hf"
    code, printed, err = run([ckpt, out, "--to", "hf"], capsys)
    assert code == 0, err
    assert f"ViTMAEForPreTraining.from_pretrained({str(out)!r})" in printed
    # SDPA: Hugging Face's eager attention takes its softmax in float32, which a float64 comparison would measure.
    hf = transformers.ViTMAEForPreTraining.from_pretrained(out, attn_implementation="sdpa").double().eval()
    hf.config.norm_pix_loss = norm_pix
    model = model.double().eval()
    images = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    noise = torch.rand(2, model.num_patches, dtype=torch.float64)
    with torch.no_grad():
        ours = model(images, mask_ratio=0.75, noise=noise)
        theirs = hf(pixel_values=images, noise=noise)
    torch.testing.assert_close(theirs.mask, ours[2].to(theirs.mask.dtype))
    torch.testing.assert_close(theirs.logits, ours[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(theirs.loss, ours[0].to(theirs.loss.dtype), rtol=1e-10, atol=1e-10)


def test_safetensors_holds_the_official_keys_and_load_pretrained_reads_it(tmp_path, capsys):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    model = trained_like(32)
    out = tmp_path / "weights.safetensors"
    code, _, err = run([save_official(model, tmp_path / "ckpt.pth"), out, "--to", "safetensors"], capsys)
    assert code == 0, err
    assert not out.read_bytes().startswith(b"PK")  # not a zip of pickles
    tensors = load_file(str(out))
    assert set(tensors) == set(model.state_dict())  # every official key, encoder and decoder
    fresh = create_model(PRESET, img_size=32)
    fresh.load_pretrained(out)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_bad_input_is_one_line_and_nothing_is_overwritten(tmp_path, capsys):
    pytest.importorskip("safetensors")
    model = trained_like(32)
    ckpt = save_official(model, tmp_path / "ckpt.pth")
    code, _, err = run([ckpt, tmp_path / "x.pth", "--to", "timm", "--model", "mae_vit_base_patch16"], capsys)
    assert code == 2 and "192-wide, 12-block encoder with 16-px patches (mae_vit_tiny_patch16), not " \
                          "mae_vit_base_patch16" in err
    existing = tmp_path / "taken.pth"
    existing.write_text("keep me")
    code, _, err = run([ckpt, existing, "--to", "safetensors"], capsys)
    assert code == 2 and "exists; nothing was overwritten (pass --force" in err and existing.read_text() == "keep me"
    code, _, err = run([ckpt, existing, "--to", "safetensors", "--force"], capsys)
    assert code == 2 and "is not an export of mae_fast" in err and existing.read_text() == "keep me"
    code, _, err = run([tmp_path / "missing.pth", tmp_path / "y.pth", "--to", "timm"], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = run([ckpt, tmp_path / "hf", "--to", "hf", "--img_size", "32", "48"], capsys)
    assert code == 2 and "square" in err and not (tmp_path / "hf").exists()
    encoder_only = tmp_path / "encoder_only.pth"
    torch.save({"model": {k: v for k, v in model.state_dict().items() if not k.startswith(("decoder", "mask"))}},
               encoder_only)
    code, _, err = run([encoder_only, tmp_path / "hf", "--to", "hf"], capsys)
    assert code == 2 and "has no decoder" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_missing_library_names_the_extra(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    code, _, err = run([save_official(trained_like(32), tmp_path / "ckpt.pth"), tmp_path / "hf", "--to", "hf"], capsys)
    assert code == 2 and 'pip install -e ".[export]"' in err


def folder_state(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else None) for p in folder.rglob("*"))


def test_force_never_replaces_the_working_folder_a_folder_above_the_checkpoint_or_other_files(tmp_path, capsys,
                                                                                            monkeypatch):
    pytest.importorskip("transformers")
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    (tmp_path / "runs" / "a").mkdir(parents=True)
    ckpt = save_official(trained_like(32), tmp_path / "runs" / "a" / "ckpt.pth")
    others = tmp_path / "others"
    others.mkdir()
    (others / "config.json").write_text("{}")
    (others / "notes.txt").write_text("keep me too")
    monkeypatch.chdir(work)
    before = folder_state(tmp_path)
    for out, to, expected in ((".", "hf", "the working folder"), (tmp_path, "hf", "a folder above it"),
                              (tmp_path / "runs", "hf", "holds the checkpoint"),
                              (others, "hf", "holds files an export did not write"),
                              (others, "timm", "is a folder; --to timm writes a file"),
                              (ckpt, "timm", "is the checkpoint"), (work / "notes.txt", "safetensors",
                                                                     "is not an export of mae_fast"),
                              (work / "notes.txt", "hf", "is a file; --to hf writes a folder")):
        code, _, err = run([ckpt, out, "--to", to, "--force"], capsys)
        assert code == 2 and expected in err, (out, to, err)
        assert err.count("\n") == 1 and "Traceback" not in err
        assert folder_state(tmp_path) == before  # nothing removed, nothing written


def test_force_swaps_a_previous_export_for_the_new_one(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    first, second = trained_like(32, seed=0), trained_like(32, seed=1)
    for target, name in (("hf", "hf"), ("timm", "encoder.pth"), ("safetensors", "weights.safetensors"),
                         ("timm", "encoder.safetensors")):
        out = tmp_path / name
        assert run([save_official(first, tmp_path / "a.pth"), out, "--to", target], capsys)[0] == 0
        code, _, err = run([save_official(second, tmp_path / "b.pth"), out, "--to", target, "--force"], capsys)
        assert code == 0, err
        if target == "hf":
            loaded = transformers.ViTMAEForPreTraining.from_pretrained(out).state_dict()
            weight = loaded["vit.embeddings.patch_embeddings.projection.weight"]
        elif out.suffix == ".safetensors":
            from safetensors.torch import load_file

            weight = load_file(str(out))["patch_embed.proj.weight"]
        else:
            weight = torch.load(out, weights_only=True)["patch_embed.proj.weight"]
        assert torch.equal(weight, second.state_dict()["patch_embed.proj.weight"]), target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth", "b.pth", "encoder.pth", "encoder.safetensors",
                                                          "hf", "weights.safetensors"]  # no temporaries left


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_get_the_mode_the_umask_gives_a_new_file(tmp_path, capsys, umask):
    import os

    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    ckpt = save_official(trained_like(32), tmp_path / "ckpt.pth")
    previous = os.umask(umask)
    try:
        for target, name in (("hf", "hf"), ("timm", "encoder.pth"), ("timm", "encoder.safetensors"),
                             ("safetensors", "weights.safetensors")):
            assert run([ckpt, tmp_path / "out" / name, "--to", target], capsys)[0] == 0
            assert run([ckpt, tmp_path / "out" / name, "--to", target, "--force"], capsys)[0] == 0
    finally:
        os.umask(previous)
    written = [tmp_path / "out", *(tmp_path / "out").rglob("*")]
    assert len(written) >= 6
    for path in written:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == expected, (path, oct(path.stat().st_mode & 0o777))


@pytest.mark.parametrize("target", ["timm", "hf"])
def test_an_out_that_cannot_be_written_is_one_line(tmp_path, capsys, target):
    if target == "hf":
        pytest.importorskip("transformers")
    ckpt = save_official(trained_like(32), tmp_path / "ckpt.pth")
    (tmp_path / "a_file").write_text("not a folder")
    code, _, err = run([ckpt, tmp_path / "a_file" / "out", "--to", target], capsys)
    [line] = [line for line in err.splitlines() if "error:" in line]
    assert code == 1 and "cannot write" in line and str(tmp_path / "a_file") in line and "Traceback" not in err
