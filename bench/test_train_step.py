"""The training step: mae_fast against Hugging Face ViTMAE (SDPA) and the official code in plain PyTorch.

Same preset, batch and precision for all: forward, backward and a fused AdamW step. mae_fast runs
eager and with its blocks compiled (``MAEViT.compile_blocks``, as ``--compile --compile_scope
blocks`` does); the others run eager. Records
images/s and model FLOP utilization (all providers are credited with mae_fast's analytic FLOPs
per image, so MFU compares like with like). GPU: ViT-B/16 at 224, batch 256, bf16.
CPU: the tiny preset at 64 px, batch 8, float32.
"""

import pytest
import torch

from mae_fast import create_model
from mae_fast.trainer import peak_flops
from bench_env import DEVICE, ON_GPU, median_seconds, sync
from official_mae import official_forward

PRESET = "mae_vit_base_patch16" if ON_GPU else "mae_vit_tiny_patch16"
SIZE, BATCH = (224, 256) if ON_GPU else (64, 8)
DTYPE = torch.bfloat16 if ON_GPU else None


def hf_model(reference):
    transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")
    cfg = reference.config
    config = transformers.ViTMAEConfig(
        image_size=SIZE, patch_size=cfg["patch_size"], hidden_size=cfg["embed_dim"], num_hidden_layers=cfg["depth"],
        num_attention_heads=cfg["num_heads"], intermediate_size=int(cfg["embed_dim"] * cfg["mlp_ratio"]),
        decoder_hidden_size=cfg["decoder_embed_dim"], decoder_num_hidden_layers=cfg["decoder_depth"],
        decoder_num_attention_heads=cfg["decoder_num_heads"],
        decoder_intermediate_size=int(cfg["decoder_embed_dim"] * cfg["mlp_ratio"]), mask_ratio=0.75,
        norm_pix_loss=True, layer_norm_eps=1e-6, qkv_bias=True, attn_implementation="sdpa")
    return transformers.ViTMAEForPreTraining(config).to(DEVICE)


@pytest.mark.parametrize("provider", ["mae_fast", "mae_fast-compile-blocks", "official-pytorch", "huggingface"])
def test_train_step(benchmark, record, provider):
    torch.manual_seed(0)
    model = create_model(PRESET, img_size=SIZE, norm_pix_loss=True).to(DEVICE)
    flops = model.flops_per_image(0.75)
    if provider.startswith("mae_fast"):
        if provider == "mae_fast-compile-blocks":
            model.compile_blocks()  # what --compile --compile_scope blocks runs; compiled in the warm-up steps
        step_model, forward = model, (lambda imgs: model(imgs, mask_ratio=0.75)[0])
    elif provider == "official-pytorch":
        step_model, forward = model, (lambda imgs: official_forward(model, imgs, 0.75))
    else:
        step_model = hf_model(model)
        forward = (lambda imgs: step_model(pixel_values=imgs).loss)
    optimizer = torch.optim.AdamW([p for p in step_model.parameters() if p.requires_grad], lr=1e-4,
                                  betas=(0.9, 0.95), fused=ON_GPU)
    batches = [torch.randn(BATCH, 3, SIZE, SIZE, device=DEVICE) for _ in range(2)]
    counter = {"i": 0}

    def step():
        imgs = batches[counter["i"] % 2]
        counter["i"] += 1
        with torch.autocast(DEVICE.type, dtype=DTYPE, enabled=DTYPE is not None):
            loss = forward(imgs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()

    for _ in range(3):
        step()
    benchmark.pedantic(step, rounds=10 if ON_GPU else 2, iterations=1, warmup_rounds=1)
    figures = {"provider": provider, "preset": PRESET, "batch": BATCH, "image_size": SIZE,
               "precision": "bf16" if DTYPE else "fp32", "flops_per_image": flops}
    seconds = median_seconds(benchmark)
    if seconds:
        figures["images_per_sec"] = BATCH / seconds
        peak = peak_flops(DEVICE)
        if peak:
            figures["mfu"] = BATCH / seconds * flops / peak
    record(**figures)
