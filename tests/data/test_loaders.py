"""The dali and torch loaders on real files: values, augmentation ranges, sharding, repeatability, bad files."""

import math

import numpy as np
import pytest
import torch

from mae_fast.config import DataConfig
from mae_fast.data import build_loader, dali_unavailable_reason
from mae_fast.data.files import open_rgb
from mae_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mae_fast.errors import DataError
from image_files import (color_index, index_color, write_coordinate_image, write_mixed_folder, write_png16,
                         write_solid_images)

BACKENDS = [pytest.param("torch", id="torch"),
            pytest.param("dali", id="dali", marks=pytest.mark.skipif(dali_unavailable_reason() is not None,
                                                                    reason=str(dali_unavailable_reason())))]


def loader(path, backend, rank=0, world=1, batch=4, size=16, seed=0, train=True, num_workers=0, dtype=torch.float32):
    cfg = DataConfig(data_path=str(path), val_path=str(path) if not train else None, backend=backend, input_size=size,
                     batch_size=batch, num_workers=num_workers)
    return build_loader(cfg, rank, world, "cpu", seed, train=train, dtype=dtype)


def denormalize(images):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return images.float() * std + mean


@pytest.mark.parametrize("backend", BACKENDS)
def test_shape_dtype_and_normalization(tmp_path, backend):
    write_solid_images(tmp_path, 6)
    ld = loader(tmp_path, backend, batch=3, size=16)
    assert len(ld) == 2 and ld.backend == backend
    for images, indices in ld.epoch(0):
        assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
        for image, index in zip(denormalize(images), indices.tolist()):
            expected = torch.tensor(index_color(index), dtype=torch.float32).view(3, 1, 1)
            assert (image - expected).abs().max() < 4  # JPEG of a solid color, then normalization undone


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_output(tmp_path, backend):
    write_solid_images(tmp_path, 2)
    images, _ = next(iter(loader(tmp_path, backend, batch=2, dtype=torch.bfloat16).epoch(0)))
    assert images.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
def test_augmentation_stays_in_the_official_ranges(tmp_path, backend):
    write_coordinate_image(tmp_path / "coords.png", 200, 160)
    ld = loader(tmp_path, backend, batch=1, size=32)
    flips = set()
    for epoch in range(40):
        images, _ = next(iter(ld.epoch(epoch)))
        rgb = denormalize(images)[0]
        r, g = rgb[0], rgb[1]
        width_frac = (r[:, -1].mean() - r[:, 0].mean()).abs().item() / 255 * 32 / 31
        height_frac = (g[-1].mean() - g[0].mean()).item() / 255 * 32 / 31
        area, aspect = width_frac * height_frac, (width_frac * 200) / (height_frac * 160)
        assert 0.2 - 0.06 <= area <= 1.0 + 0.06, area
        assert 3 / 4 - 0.12 <= aspect <= 4 / 3 + 0.12, aspect
        flips.add(bool(r[:, -1].mean() < r[:, 0].mean()))
    assert flips == {True, False}  # both orientations occur


def crop_statistics(images, width=200, height=160):
    """Area fraction and log aspect ratio of each crop of the coordinate image, read back from its pixels."""
    rgb = denormalize(images) if images.is_floating_point() else images.float()
    r, g = rgb[:, 0], rgb[:, 1]
    size = images.shape[-1]
    width_frac = (r[:, :, -1].mean(1) - r[:, :, 0].mean(1)).abs() / 255 * size / (size - 1)
    height_frac = (g[:, -1].mean(1) - g[:, 0].mean(1)) / 255 * size / (size - 1)
    return width_frac * height_frac, torch.log(width_frac * width / (height_frac * height))


@pytest.mark.parametrize("crop_decode", [True, False])
def test_dali_crops_follow_the_official_distribution(tmp_path, crop_decode):
    # DALI decodes only the crop (decoders.image_slice, the box drawn by train_crops) by default: its crops must be
    # distributed as the official RandomResizedCrop's, whose statistics the torch loader's implementation gives by
    # sampling.
    if dali_unavailable_reason():
        pytest.skip(dali_unavailable_reason())
    import math as m

    from mae_fast.data.dali_loader import DaliLoader
    from mae_fast.data.transforms import random_resized_crop_box
    write_coordinate_image(tmp_path / "coords.png", 200, 160)
    files = [str(tmp_path / "coords.png")] * 128
    ld = DaliLoader(files, 32, 128, 0, 1, torch.device("cpu"), 0, 2, dtype=torch.uint8, crop_decode=crop_decode)
    areas, aspects = [], []
    for epoch in range(3):
        for images, _ in ld.epoch(epoch):
            a, r = crop_statistics(images)
            areas.append(a)
            aspects.append(r)
    area, log_aspect = torch.cat(areas), torch.cat(aspects)
    rng = np.random.default_rng(0)
    boxes = [random_resized_crop_box(200, 160, rng) for _ in range(20000)]
    ref_area = np.array([w * h / (200 * 160) for _, _, w, h in boxes])
    ref_aspect = np.array([m.log(w / h) for _, _, w, h in boxes])
    n = len(area)
    assert n == 384
    # Means within four standard errors (plus the read-back's own error), spreads within 15 %.
    assert abs(area.mean().item() - ref_area.mean()) < 4 * ref_area.std() / m.sqrt(n) + 0.01
    assert abs(log_aspect.mean().item() - ref_aspect.mean()) < 4 * ref_aspect.std() / m.sqrt(n) + 0.01
    assert abs(area.std().item() / ref_area.std() - 1) < 0.15
    assert abs(log_aspect.std().item() / ref_aspect.std() - 1) < 0.15
    assert area.min() > 0.2 - 0.03 and log_aspect.abs().max() < m.log(4 / 3) + 0.05


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("count", [10, 11])
def test_two_ranks_cover_the_set_exactly_once(tmp_path, backend, count):
    write_solid_images(tmp_path, count)
    seen = []
    steps = set()
    for rank in range(2):
        ld = loader(tmp_path, backend, rank=rank, world=2, batch=3)
        steps.add(len(ld))
        for images, indices in ld.epoch(1):
            colors = denormalize(images).mean(dim=(2, 3))
            for color, index in zip(colors, indices.tolist()):
                if index >= 0:
                    assert color_index(color.tolist()) == index  # the pixels are the image the index names
                    seen.append(index)
    assert len(steps) == 1  # every rank runs the same number of steps
    assert sorted(seen) == list(range(count))


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_batches_and_a_new_order_each_epoch(tmp_path, backend):
    write_solid_images(tmp_path, 8)
    write_coordinate_image(tmp_path / "coords.png")

    def run(seed, epoch):
        return [(images, indices) for images, indices in loader(tmp_path, backend, batch=3, seed=seed).epoch(epoch)]

    a, b = run(3, 0), run(3, 0)
    for (ia, xa), (ib, xb) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(xa, xb)
    assert not all(torch.equal(xa, xc) for (_, xa), (_, xc) in zip(a, run(3, 1)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_resuming_mid_epoch_gives_the_remaining_batches(tmp_path, backend):
    write_solid_images(tmp_path, 9)
    ld = loader(tmp_path, backend, batch=2)
    full = [indices for _, indices in ld.epoch(2)]
    rest = [indices for _, indices in ld.epoch(2, start=2)]
    assert len(rest) == len(full) - 2 and all(torch.equal(a, b) for a, b in zip(full[2:], rest))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_loader_built_anew_resumes_mid_epoch_with_the_same_augmented_pixels(tmp_path, backend):
    # A resumed run builds its loader anew: the crops and flips of the remaining batches must be the ones the
    # uninterrupted run drew, on DALI as on the torch loader.
    for i, (width, height) in enumerate([(200, 160), (120, 180), (90, 90), (160, 100), (150, 150), (110, 70)]):
        write_coordinate_image(tmp_path / f"coords{i}.png", width, height)
    full = [images for images, _ in loader(tmp_path, backend, batch=2, size=32, dtype=torch.uint8).epoch(1)]
    rest = [images for images, _ in loader(tmp_path, backend, batch=2, size=32, dtype=torch.uint8).epoch(1, start=1)]
    assert len(rest) == len(full) - 1
    assert all(torch.equal(a, b) for a, b in zip(full[1:], rest))


@pytest.mark.parametrize("verify", ["header", "decode"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_folder_with_broken_and_odd_files_loads(tmp_path, backend, verify):
    kinds = write_mixed_folder(tmp_path)
    cfg = DataConfig(data_path=str(tmp_path), backend=backend, input_size=16, batch_size=2, num_workers=0,
                     verify_images=verify)
    ld = build_loader(cfg, 0, 1, "cpu", 0)
    assert ld.num_samples == sum(v in ("good", backend) for v in kinds.values())  # the GIF only on torch
    batches = list(ld.epoch(0))
    assert len(batches) == math.ceil(ld.num_samples / 2)
    assert all(torch.isfinite(images).all() and images.shape == (2, 3, 16, 16) for images, _ in batches)


@pytest.mark.parametrize("backend", BACKENDS)
def test_validation_loader_is_fixed_and_centered(tmp_path, backend):
    write_coordinate_image(tmp_path / "coords.png", 200, 160)
    ld = loader(tmp_path, backend, batch=1, size=32, train=False)
    first, second = (next(iter(ld.epoch(e)))[0] for e in (0, 1))
    assert torch.equal(first, second)
    r = denormalize(first)[0, 0]
    assert r[:, 0].mean() < r[:, -1].mean()  # no flip


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_file_broken_after_the_scan_ends_the_epoch_with_the_reason(tmp_path, backend):
    write_solid_images(tmp_path, 4)
    ld = loader(tmp_path, backend, batch=2, num_workers=2)
    (tmp_path / "img_001.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 64 + b"\xff\xd9")  # broken after the scan
    with pytest.raises(DataError, match="img_001.jpg"):
        for _ in ld.epoch(0):
            pass


@pytest.mark.parametrize("backend", BACKENDS)
def test_16_bit_pngs_are_scaled_to_8_bits_alike_on_every_backend(tmp_path, backend):
    write_png16(tmp_path / "gray.png", np.full((30, 40), 30000, dtype=np.uint16))
    write_png16(tmp_path / "rgb.png", np.tile(np.array([60000, 20000, 45000], dtype=np.uint16), (30, 40, 1)))
    expected = {"gray.png": [117.0] * 3, "rgb.png": [233.0, 78.0, 175.0]}  # round(v * 255 / 65535)
    ld = loader(tmp_path, backend, batch=2, size=16, train=False)
    images, indices = next(iter(ld.epoch(0)))
    for image, index in zip(denormalize(images), indices.tolist()):
        name = ld.files[index].rsplit("/", 1)[-1]
        got = image.mean(dim=(1, 2))
        # Pillow keeps the high byte of 16-bit color, DALI rounds: one level apart at most.
        assert (got - torch.tensor(expected[name])).abs().max() <= 1.5, (name, got)
        assert (image.amax(dim=(1, 2)) - image.amin(dim=(1, 2))).max() < 1.5  # a flat image stays flat


def test_open_rgb_scales_16_bit_gray_exactly_as_dali_does(tmp_path):
    values = np.arange(0, 65536, 64, dtype=np.uint16).reshape(32, 32)
    write_png16(tmp_path / "ramp.png", values)
    got = np.asarray(open_rgb(str(tmp_path / "ramp.png")))
    assert got.shape == (32, 32, 3)
    assert np.array_equal(got[..., 0], np.round(values * (255 / 65535)).astype(np.uint8))
    if dali_unavailable_reason() is None:
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def decode():
            encoded, _ = fn.readers.file(files=[str(tmp_path / "ramp.png")])
            return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

        pipe = decode()
        pipe.build()
        (out,) = pipe.run()
        assert np.array_equal(out.as_array()[0], got)


def test_synthetic_loader_resumes_mid_epoch_exactly():
    cfg = DataConfig(backend="synthetic", input_size=8, batch_size=2, synthetic_samples=20)
    ld = build_loader(cfg, 1, 2, "cpu", 0)
    full = list(ld.epoch(1))
    rest = list(ld.epoch(1, start=3))
    assert len(rest) == len(full) - 3
    for (a, ia), (b, ib) in zip(full[3:], rest):
        assert torch.equal(a, b) and torch.equal(ia, ib)
    assert not torch.equal(full[0][0], list(ld.epoch(2))[0][0])  # a new epoch, new images


def test_synthetic_loader_and_missing_paths(tmp_path):
    cfg = DataConfig(backend="synthetic", input_size=8, batch_size=4, synthetic_samples=16)
    ld = build_loader(cfg, 0, 2, "cpu", 0)
    batches = list(ld.epoch(0))
    assert len(batches) == 2 and batches[0][0].shape == (4, 3, 8, 8)
    with pytest.raises(ValueError, match="--data_path: is neither an existing folder nor a shard set"):
        DataConfig(data_path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="--data_backend: must be one of"):
        DataConfig(backend="ffcv")


@pytest.mark.gpu
def test_dali_mixed_decoding_on_the_gpu(tmp_path):
    if dali_unavailable_reason():
        pytest.skip(dali_unavailable_reason())
    write_solid_images(tmp_path, 6)
    cfg = DataConfig(data_path=str(tmp_path), backend="dali", input_size=16, batch_size=3, num_workers=2)
    ld = build_loader(cfg, 0, 1, "cuda", 0)
    for images, indices in ld.epoch(0):
        assert images.is_cuda and images.shape == (3, 3, 16, 16)
        for image, index in zip(denormalize(images.cpu()), indices.tolist()):
            expected = torch.tensor(index_color(index), dtype=torch.float32).view(3, 1, 1)
            assert (image - expected).abs().max() < 4
