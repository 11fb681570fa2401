"""The training step: mae_fast against Hugging Face ViTMAE (SDPA) and the official code in plain PyTorch.

Same preset, batch and precision for all: forward, backward and a fused AdamW step. mae_fast runs
compiled as one graph (``mae_fast-compile``: ``torch.compile(model, fullgraph=True)``, as
``--compile`` does), with FP8 block linears on top of that (``mae_fast-fp8``: ``--precision fp8
--compile``, GPUs with FP8 tensor cores), eager, and with its blocks compiled
(``mae_fast-compile-blocks``, as ``--compile --compile_scope blocks`` does); the others run eager.
Records images/s, model FLOP utilization (all providers are credited with mae_fast's analytic
FLOPs per image and the device's bf16 peak, FP8 included, so MFU compares like with like) and peak
memory. GPU: ViT-B/16 and ViT-L/16 at 224, batch 256, bf16. CPU: the tiny preset at 64 px, batch
8, float32, the compiled providers with the ``aot_eager`` backend (a check of the wiring, not of
speed: inductor would spend minutes compiling on a CPU).
"""

import pytest
import torch

from mae_fast import create_model
from mae_fast.data.transforms import normalize
from mae_fast.fp8 import convert_to_fp8, fp8_unavailable_reason
from mae_fast.trainer import peak_flops
from bench_env import DEVICE, ON_GPU, median_seconds, sync
from official_mae import official_forward

PRESETS = ["mae_vit_base_patch16", "mae_vit_large_patch16"] if ON_GPU else ["mae_vit_tiny_patch16"]
SIZE, BATCH = (224, 256) if ON_GPU else (64, 8)
DTYPE = torch.bfloat16 if ON_GPU else None
COMPILE_BACKEND = "inductor" if ON_GPU else "aot_eager"
PROVIDERS = ["mae_fast-compile", "mae_fast-fp8", "mae_fast", "mae_fast-compile-blocks", "official-pytorch",
             "huggingface"]
# What the step targets name runs first, as the GPU check's time budget may stop the run before the rest: compiled
# bf16 on ViT-B/16 (MFU) and ViT-L/16, FP8 on ViT-L/16, and Hugging Face on both.
FIRST = [("mae_vit_base_patch16", "mae_fast-compile"), ("mae_vit_large_patch16", "mae_fast-compile"),
         ("mae_vit_large_patch16", "mae_fast-fp8"), ("mae_vit_base_patch16", "huggingface"),
         ("mae_vit_large_patch16", "huggingface")]
CASES = sorted(((preset, provider) for preset in PRESETS for provider in PROVIDERS),
               key=lambda case: FIRST.index(case) if case in FIRST else len(FIRST))


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


@pytest.mark.parametrize("preset,provider", CASES, ids=[f"{preset}-{provider}" for preset, provider in CASES])
def test_train_step(benchmark, record, preset, provider):
    if provider == "mae_fast-fp8" and fp8_unavailable_reason(DEVICE):
        pytest.skip(f"--precision fp8 cannot run here: {fp8_unavailable_reason(DEVICE)}")
    torch.manual_seed(0)
    model = create_model(preset, img_size=SIZE, norm_pix_loss=True).to(DEVICE)
    flops = model.flops_per_image(0.75)
    if provider.startswith("mae_fast"):
        step_model, call = model, model
        if provider == "mae_fast-compile-blocks":
            model.compile_blocks(backend=COMPILE_BACKEND)  # as --compile --compile_scope blocks; compiled in warm-up
        elif provider in ("mae_fast-compile", "mae_fast-fp8"):
            if provider == "mae_fast-fp8":
                convert_to_fp8(model, "tensorwise")  # as --precision fp8 --compile
            call = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)
        forward = (lambda imgs: call(imgs, mask_ratio=0.75)[0])
    elif provider == "official-pytorch":
        step_model, forward = model, (lambda imgs: official_forward(model, imgs, 0.75))
    else:
        step_model = hf_model(model)
        forward = (lambda imgs: step_model(pixel_values=imgs).loss)
    optimizer = torch.optim.AdamW([p for p in step_model.parameters() if p.requires_grad], lr=1e-4,
                                  betas=(0.9, 0.95), fused=ON_GPU)
    # mae_fast trains on uint8 batches (its ops normalize them as they read them, as the trainer's loaders
    # deliver them); the others take the normalized float32 images their own scripts feed.
    pixels = [torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8, device=DEVICE) for _ in range(2)]
    batches = pixels if provider.startswith("mae_fast") else [normalize(b, torch.float32) for b in pixels]
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

    if ON_GPU:
        torch.cuda.reset_peak_memory_stats(DEVICE)
    for _ in range(3):
        step()
    benchmark.pedantic(step, rounds=10 if ON_GPU else 2, iterations=1, warmup_rounds=1)
    precision = "fp8" if provider == "mae_fast-fp8" else "bf16" if DTYPE else "fp32"
    figures = {"provider": provider, "preset": preset, "batch": BATCH, "image_size": SIZE,
               "precision": precision, "flops_per_image": flops}
    if ON_GPU:
        figures["peak_memory_gb"] = torch.cuda.max_memory_allocated(DEVICE) / 2**30
    seconds = median_seconds(benchmark)
    if seconds:
        figures["images_per_sec"] = BATCH / seconds
        peak = peak_flops(DEVICE)
        if peak:
            figures["mfu"] = BATCH / seconds * flops / peak
    record(**figures)
