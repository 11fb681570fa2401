"""Decoded images per second for each loader: folder vs prepared shards, DALI vs torch, crop vs full decode.

ImageNet-like JPEGs cropped to 224 px, as training reads them: 500x375 at quality 90, with the 1/f
spectrum of natural images, which gives ImageNet's mean file size (about 110 KB; smooth synthetic
content compresses to half that and decodes in half the time): the original folder, and the shard set ``python -m
mae_fast.prepare`` makes of it (shorter side 256). GPU: 2048 images, batch 256, DALI decoding with
``mixed``. CPU: 128 images, batch 32, DALI's CPU pipeline. Every case delivers uint8 batches (what
the trainer asks for) with all the process's cores.

Targets (``bench/summarize.py``): on a CPU, DALI reading the prepared shards delivers at least 2x
the torch loader reading the original folder, measured side by side in one run; on a GPU, DALI
from prepared shards with ``mixed`` decoding aims at 8,000 images/s, what a ViT-B MAE step needs.
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from mae_fast.config import DataConfig
from mae_fast.data import build_loader, dali_unavailable_reason
from mae_fast.data.dali_loader import DaliLoader
from mae_fast.data.files import find_images
from mae_fast.prepare import prepare
from bench_env import DEVICE, ON_GPU, median_seconds, sync

COUNT, BATCH = (2048, 256) if ON_GPU else (512, 64)
WIDTH, HEIGHT, SIZE = 500, 375, 224
WORKERS = min(16, os.cpu_count() or 1)
#: (backend, source, decode), the torch loader on the original folder first: the baseline the targets name.
CASES = [("torch", "folder", "full"), ("torch", "shards", "full"), ("dali", "folder", "full"),
         ("dali", "folder", "crop"), ("dali", "shards", "full"), ("dali", "shards", "crop")]


def natural_image(rng) -> np.ndarray:
    """[HEIGHT, WIDTH, 3] uint8 noise with a 1/f amplitude spectrum (the statistics of photographs)."""
    fy, fx = np.fft.fftfreq(HEIGHT)[:, None], np.fft.rfftfreq(WIDTH)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    channels = []
    for _ in range(3):
        spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f
        x = np.fft.irfft2(spectrum, s=(HEIGHT, WIDTH))
        channels.append((x - x.mean()) / x.std())
    x = np.stack(channels, axis=-1)
    x = 0.6 * x + 0.4 * x.mean(axis=-1, keepdims=True)  # correlated channels, as in photographs
    return np.clip(128 + 50 * x, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    bases = [natural_image(rng) for _ in range(32)]
    for i in range(COUNT):  # 32 distinct images, shifted so every file differs
        img = np.roll(bases[i % 32], 7 * (i // 32), axis=1)
        Image.fromarray(img).save(folder / f"{i:05d}.jpg", quality=90)
    shards = tmp_path_factory.mktemp("shards")
    prepare(str(folder), str(shards), max_side=256, quality=90, shard_size=16 << 20, workers=WORKERS)
    return {"folder": folder, "shards": shards}


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_loader_throughput(benchmark, record, datasets, case):
    backend, source, decode = case
    if backend == "dali" and dali_unavailable_reason():
        pytest.skip(dali_unavailable_reason())
    path = datasets[source]
    if backend == "dali":
        from mae_fast.data.shards import load_shard_set
        files = load_shard_set(str(path)) if source == "shards" else find_images(path)
        loader = DaliLoader(files, SIZE, BATCH, 0, 1, DEVICE, 0, WORKERS, dtype=torch.uint8,
                            crop_decode=decode == "crop")
    else:
        cfg = DataConfig(data_path=str(path), backend=backend, input_size=SIZE, batch_size=BATCH,
                         num_workers=WORKERS)
        loader = build_loader(cfg, 0, 1, DEVICE, seed=0, dtype=torch.uint8)
    epoch = {"n": 0}

    def one_epoch():
        for images, _ in loader.epoch(epoch["n"]):
            pass
        epoch["n"] += 1
        sync()

    one_epoch()  # warm-up: workers start, the pipeline builds
    benchmark.pedantic(one_epoch, rounds=3, iterations=1)
    figures = {"backend": backend, "source": source, "decode": decode, "images": COUNT, "image_size": SIZE,
               "source_image": f"{WIDTH}x{HEIGHT}", "workers": WORKERS}
    seconds = median_seconds(benchmark)
    if seconds:
        figures["images_per_sec"] = len(loader) * BATCH / seconds
    record(**figures)
