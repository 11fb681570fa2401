"""Decoded images per second for each loader backend on real JPEGs the benchmark writes.

GPU: 512 JPEGs of 500x375 (ImageNet's typical size) at 224 px, DALI decoding with ``mixed``.
CPU: 64 JPEGs of 160x120 at 64 px.
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from mae_fast.config import DataConfig
from mae_fast.data import build_loader, dali_unavailable_reason
from bench_env import DEVICE, ON_GPU, median_seconds, sync

COUNT, WIDTH, HEIGHT, SIZE, BATCH = (512, 500, 375, 224, 128) if ON_GPU else (64, 160, 120, 64, 16)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (HEIGHT // 8, WIDTH // 8, 3), dtype=np.uint8)
    for i in range(COUNT):  # smooth content compresses like photographs, unlike pure noise
        img = Image.fromarray(np.roll(base, i, axis=1)).resize((WIDTH, HEIGHT), Image.BICUBIC)
        img.save(folder / f"{i:05d}.jpg", quality=90)
    return folder


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_loader_throughput(benchmark, record, jpeg_folder, backend):
    if backend == "dali" and dali_unavailable_reason():
        pytest.skip(dali_unavailable_reason())
    workers = min(8, os.cpu_count() or 1)
    cfg = DataConfig(data_path=str(jpeg_folder), backend=backend, input_size=SIZE, batch_size=BATCH, num_workers=workers)
    loader = build_loader(cfg, 0, 1, DEVICE, seed=0)
    epoch = {"n": 0}

    def one_epoch():
        for images, _ in loader.epoch(epoch["n"]):
            pass
        epoch["n"] += 1
        sync()

    one_epoch()  # warm-up: workers start, pipelines build
    benchmark.pedantic(one_epoch, rounds=3, iterations=1)
    figures = {"backend": backend, "images": COUNT, "image_size": SIZE, "workers": workers}
    seconds = median_seconds(benchmark)
    if seconds:
        figures["images_per_sec"] = len(loader) * BATCH / seconds
    record(**figures)
