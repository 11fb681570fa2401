"""The fine-tuning model: timm's layout and numbers, the official lr-decay groups, and loading a pretrained encoder."""

import logging

import pytest
import torch

from mae_fast import create_model
from mae_fast.errors import ConfigError
from mae_fast.finetune import layer_id_for_vit, load_encoder, param_groups_lrd
from mae_fast.vit import TIMM_NAMES, VIT_PRESETS, create_vit

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("global_pool", [True, False], ids=["global_pool", "cls_token"])
def test_loads_strictly_into_timm_and_computes_the_same(global_pool):
    model = create_vit("vit_tiny_patch16", num_classes=7, img_size=32, global_pool=global_pool).eval()
    reference = timm.create_model(TIMM_NAMES["vit_tiny_patch16"], num_classes=7, img_size=32,
                                  global_pool="avg" if global_pool else "token", fc_norm=global_pool).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    assert ("fc_norm.weight" in model.state_dict()) == global_pool and ("norm.weight" in model.state_dict()) != global_pool
    imgs = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(model(imgs), reference(imgs), rtol=1e-5, atol=1e-5)
    # And the other way: a timm model's weights (an official fine-tuned checkpoint's layout) load strictly here.
    other = create_vit("vit_tiny_patch16", num_classes=7, img_size=32, global_pool=global_pool).eval()
    other.load_state_dict(reference.state_dict(), strict=True)
    torch.testing.assert_close(other(imgs), reference(imgs), rtol=1e-5, atol=1e-5)


def official_rule(model, weight_decay, no_weight_decay, layer_decay):
    """Each parameter's (lr scale, weight decay) by the official rule, written out independently."""
    n = len(model.blocks) + 1
    expected = {}
    for name, param in model.named_parameters():
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = n
        decay = 0.0 if (param.ndim == 1 or name in no_weight_decay) else weight_decay
        expected[name] = (layer_decay ** (n - layer), decay)
    return expected


def as_rule(model, groups):
    names = {id(p): name for name, p in model.named_parameters()}
    return {names[id(p)]: (group["lr_scale"], group["weight_decay"]) for group in groups for p in group["params"]}


@pytest.mark.parametrize("name", ["vit_base_patch16", "vit_large_patch16", "vit_huge_patch14"])
def test_layer_decay_groups_follow_the_official_rule(name):
    with torch.device("meta"):
        model = create_vit(name)
    groups = param_groups_lrd(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=0.75)
    assert as_rule(model, groups) == official_rule(model, 0.05, model.no_weight_decay(), 0.75)
    depth = VIT_PRESETS[name][1]["depth"]
    # Embeddings (with and without decay), each block (decay, no decay), and the head/fc_norm layer.
    assert len(groups) == 2 * (depth + 2)
    assert groups[0]["lr_scale"] == 0.75 ** (depth + 1)
    assert layer_id_for_vit("head.weight", depth + 1) == depth + 1


def test_layer_decay_groups_on_a_timm_model():
    with torch.device("meta"):
        model = timm.create_model("vit_small_patch16_224", num_classes=10, global_pool="avg", fc_norm=True)
    groups = param_groups_lrd(model, 0.1, model.no_weight_decay(), 0.65)
    assert as_rule(model, groups) == official_rule(model, 0.1, model.no_weight_decay(), 0.65)


def test_layer_decay_leaves_frozen_parameters_out():
    model = create_vit("vit_tiny_patch16", num_classes=3, img_size=32)
    model.pos_embed.requires_grad_(False)
    assert "pos_embed" not in as_rule(model, param_groups_lrd(model))


def pretrained(tmp_path, name="mae_vit_tiny_patch16", img_size=32, suffix=".pth"):
    torch.manual_seed(1)
    mae = create_model(name, img_size=img_size)
    path = tmp_path / f"pretrained{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in mae.state_dict().items()}, str(path))
    else:
        torch.save({"model": mae.state_dict(), "epoch": 3}, path)
    return mae, path


@pytest.mark.parametrize("global_pool", [True, False], ids=["global_pool", "cls_token"])
def test_the_encoder_loads_and_the_head_starts_small(tmp_path, caplog, global_pool):
    mae, path = pretrained(tmp_path)
    model = create_vit("vit_tiny_patch16", num_classes=5, img_size=32, global_pool=global_pool)
    with caplog.at_level(logging.INFO, logger="mae_fast"):
        keys = load_encoder(model, path)
    state = model.state_dict()
    for key, value in mae.state_dict().items():
        if not key.startswith(("decoder_", "mask_token")) and key in state:
            assert torch.equal(state[key], value), key
    head_missing = {"head.weight", "head.bias"} | ({"fc_norm.weight", "fc_norm.bias"} if global_pool else set())
    assert set(keys["missing_keys"]) == head_missing
    assert set(keys["unexpected_keys"]) == ({"norm.weight", "norm.bias"} if global_pool else set())
    # trunc_normal(std=2e-5) with the default bounds (+-2, in absolute units, as the official script has them).
    assert 1.5e-5 < model.head.weight.std() < 2.5e-5 and not model.head.bias.any()
    assert any(r.getMessage().startswith("_IncompatibleKeys(missing_keys=[") for r in caplog.records)


def test_positions_are_resized_and_safetensors_load(tmp_path):
    mae, path = pretrained(tmp_path, img_size=32, suffix=".safetensors")
    model = create_vit("vit_tiny_patch16", num_classes=2, img_size=48)
    load_encoder(model, path)
    assert model.pos_embed.shape == (1, 1 + 9, 192)
    torch.testing.assert_close(model.pos_embed[:, :1], mae.pos_embed[:, :1])  # the cls position kept as it is
    assert torch.equal(model.blocks[3].mlp.fc1.weight, mae.blocks[3].mlp.fc1.weight)


def test_a_fine_tuned_checkpoint_with_other_classes_drops_its_head(tmp_path, caplog):
    source = create_vit("vit_tiny_patch16", num_classes=10, img_size=32)
    torch.save({"model": source.state_dict()}, tmp_path / "ft.pth")
    model = create_vit("vit_tiny_patch16", num_classes=4, img_size=32)
    with caplog.at_level(logging.INFO, logger="mae_fast"):
        keys = load_encoder(model, tmp_path / "ft.pth")
    assert set(keys["missing_keys"]) == {"head.weight", "head.bias"}
    assert "Removing key head.weight from pretrained checkpoint" in caplog.text
    assert torch.equal(model.fc_norm.weight, source.fc_norm.weight)


def test_a_head_that_fits_is_loaded_and_its_weight_started_again_as_the_official_script_does(tmp_path):
    source = create_vit("vit_tiny_patch16", num_classes=4, img_size=32)
    with torch.no_grad():
        source.head.weight.fill_(0.5)
        source.head.bias.fill_(0.25)
    torch.save({"model": source.state_dict()}, tmp_path / "ft.pth")
    model = create_vit("vit_tiny_patch16", num_classes=4, img_size=32)
    load_encoder(model, tmp_path / "ft.pth")
    assert 1.5e-5 < model.head.weight.std() < 2.5e-5  # trunc_normal(std=2e-5) after the load, unconditionally
    assert torch.equal(model.head.bias, source.head.bias)  # the bias stays as loaded


def test_an_encoder_of_another_size_is_named_with_both_sizes(tmp_path):
    _, path = pretrained(tmp_path, name="mae_vit_small_patch16")
    model = create_vit("vit_tiny_patch16", num_classes=2, img_size=32)
    with pytest.raises(ConfigError, match=r"--finetune: the checkpoint holds a 384-wide, 12-block encoder with 16-px "
                                          r"patches, but --model is a 192-wide, 12-block encoder with 16-px patches"):
        load_encoder(model, path)


def test_drop_path_drops_whole_samples_in_training_only():
    model = create_vit("vit_tiny_patch16", num_classes=0, img_size=32, drop_path_rate=0.5)
    rates = [block.drop_path.drop_prob if hasattr(block.drop_path, "drop_prob") else 0.0 for block in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.5) and rates == sorted(rates)
    block = model.blocks[-1].drop_path
    x = torch.ones(4000, 2, 3)
    kept = block.train()(x)
    per_sample = kept[:, 0, 0]
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0} and 0.4 < (per_sample == 0).float().mean() < 0.6
    assert torch.equal(kept[:, :, :], per_sample[:, None, None].expand_as(x))  # a sample's branch goes whole
    assert torch.equal(block.eval()(x), x)
