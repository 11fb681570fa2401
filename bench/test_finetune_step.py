"""The fine-tuning step: mae_fast's ViT against timm's VisionTransformer, with the official recipe for both.

One optimizer step as ``mae_fast.finetune`` runs it: mixup/cutmix on the batch (timm's ``Mixup``),
forward, soft-target cross-entropy, backward, AdamW over the layer-decay groups
(``param_groups_lrd``). mae_fast runs eager (``mae_fast``), compiled as one graph
(``mae_fast-compile``, as ``--compile``) and with FP8 block linears on top (``mae_fast-fp8``,
``--precision fp8 --compile``); timm's model runs eager (``timm``), as the official script runs it.
Records images/s, model FLOP utilization (every provider credited with the same analytic FLOPs per
image over the device's dense bf16 peak) and peak memory. GPU: ViT-B/16 and ViT-L/16 at 224,
batch 128, bf16. CPU: ViT-Ti/16 at 32 px, batch 4, float32, compiled with ``aot_eager`` (a check of
the wiring, not of speed).
"""

import pytest
import torch

from mae_fast.finetune import param_groups_lrd
from mae_fast.fp8 import convert_to_fp8, fp8_unavailable_reason
from mae_fast.trainer import peak_flops
from mae_fast.vit import TIMM_NAMES, create_vit
from bench_env import DEVICE, ON_GPU, median_seconds, sync

timm = pytest.importorskip("timm", reason="timm is not installed (the fine-tuning recipe's mixup and criterion)")
from timm.data import Mixup  # noqa: E402
from timm.loss import SoftTargetCrossEntropy  # noqa: E402

PRESETS = ["vit_base_patch16", "vit_large_patch16"] if ON_GPU else ["vit_tiny_patch16"]
SIZE, BATCH, CLASSES = (224, 128, 1000) if ON_GPU else (32, 4, 10)
DTYPE = torch.bfloat16 if ON_GPU else None
COMPILE_BACKEND = "inductor" if ON_GPU else "aot_eager"
PROVIDERS = ["mae_fast-compile", "timm", "mae_fast-fp8", "mae_fast"]
# What the fine-tuning targets name first: compiled bf16 and timm on ViT-B/16, then FP8 and compiled bf16 on ViT-L/16.
FIRST = [("vit_base_patch16", "mae_fast-compile"), ("vit_base_patch16", "timm"),
         ("vit_large_patch16", "mae_fast-compile"), ("vit_large_patch16", "mae_fast-fp8")]
CASES = sorted(((preset, provider) for preset in PRESETS for provider in PROVIDERS),
               key=lambda case: FIRST.index(case) if case in FIRST else len(FIRST))


@pytest.mark.parametrize("preset,provider", CASES, ids=[f"{preset}-{provider}" for preset, provider in CASES])
def test_finetune_step(benchmark, record, preset, provider):
    if provider == "mae_fast-fp8" and fp8_unavailable_reason(DEVICE):
        pytest.skip(f"--precision fp8 cannot run here: {fp8_unavailable_reason(DEVICE)}")
    torch.manual_seed(0)
    ours = create_vit(preset, num_classes=CLASSES, img_size=SIZE, drop_path_rate=0.1)
    flops = ours.flops_per_image()
    if provider == "timm":
        model = timm.create_model(TIMM_NAMES[preset], num_classes=CLASSES, img_size=SIZE, global_pool="avg",
                                  fc_norm=True, drop_path_rate=0.1)
    else:
        model = ours
    model = model.to(DEVICE)
    call = model
    if provider == "mae_fast-fp8":
        convert_to_fp8(model, "tensorwise")
    if provider in ("mae_fast-compile", "mae_fast-fp8"):
        call = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)
    groups = param_groups_lrd(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=0.65)
    optimizer = torch.optim.AdamW(groups, lr=1e-4, fused=ON_GPU)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=CLASSES)
    criterion = SoftTargetCrossEntropy()
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    batches = [(torch.randn(BATCH, 3, SIZE, SIZE, device=DEVICE, generator=generator),
                torch.randint(0, CLASSES, (BATCH,), device=DEVICE, generator=generator)) for _ in range(2)]
    counter = {"i": 0}

    def step():
        imgs, labels = batches[counter["i"] % 2]
        counter["i"] += 1
        samples, targets = mixup(imgs, labels)
        with torch.autocast(DEVICE.type, dtype=DTYPE, enabled=DTYPE is not None):
            loss = criterion(call(samples), targets)
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
    figures = {"task": "finetune", "provider": provider, "preset": preset, "batch": BATCH, "image_size": SIZE,
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
