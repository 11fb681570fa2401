"""The fine-tuning recipe on DALI (mae_fast.data.dali_finetune): RandAugment's level rules, operations and draws, and
random erasing's draws, each against timm's."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mae_fast.data import dali_unavailable_reason
from mae_fast.data.dali_finetune import (BINS_PER_LEVEL, RAND_AUGMENT_OPS, DaliErasing, DaliRandAugment,
                                         FinetuneTrainPipeline)
from mae_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD

needs_dali = pytest.mark.skipif(dali_unavailable_reason() is not None, reason=str(dali_unavailable_reason()))
HPARAMS = dict(translate_const=14, img_mean=(124, 116, 104))


def policy(aa: str, size: int = 32):
    from timm.data.auto_augment import rand_augment_transform

    return rand_augment_transform(aa, dict(HPARAMS, translate_const=int(size * 0.45)))


def fixed_sign(monkeypatch, negated: bool):
    """timm negates a magnitude when random.random() > 0.5: make that draw come out as told."""
    import timm.data.auto_augment as auto_augment

    monkeypatch.setattr(auto_augment.random, "random", lambda: 1.0 if negated else 0.0)


def test_every_operations_level_rule_is_timms(monkeypatch):
    from timm.data.auto_augment import LEVEL_TO_ARG

    levels = [k * 0.25 for k in range(49)]  # 0 to 12: past 10 for mmax, and on the rules' integer steps
    for hparams in (HPARAMS, dict(HPARAMS, translate_pct=0.3)):
        for name, (_, negate, rule) in RAND_AUGMENT_OPS.items():
            if rule is None:
                assert LEVEL_TO_ARG[name] is None, name
                continue
            for negated in (False, True):
                fixed_sign(monkeypatch, negated)
                for level in levels:
                    (expected,) = LEVEL_TO_ARG[name](level, hparams)
                    got = rule(-level if negate and negated else level, hparams)
                    assert got == expected, (name, level, negated, got, expected)


def test_rand_augment_draws_follow_timms_policy():
    seeds = np.arange(40_000, dtype=np.int64) * 7 + 3
    ra = DaliRandAugment(policy("rand-m9-mstd0.5-inc1"), 32)
    draws = ra.draw(seeds)
    op, row = draws["ra_op"], draws["ra_param"]
    assert op.shape == row.shape == (len(seeds), 2)  # n=2 layers
    assert ra.names == [o.name for o in policy("rand-m9-mstd0.5-inc1").ops] and len(ra.names) == 15
    applied = op != ra.identity
    samples = op.size

    def close(value, expected, p):  # within 4 standard errors of a proportion
        assert abs(value - expected) < 4 * math.sqrt(p * (1 - p) / samples), (value, expected)

    close(applied.mean(), 0.5, 0.5)  # each layer applied with timm's probability 0.5
    counts = np.bincount(op[applied], minlength=15) / applied.sum()
    assert np.abs(counts - 1 / 15).max() < 4 * math.sqrt(1 / 15 * 14 / 15 / applied.sum())  # uniform, replaced
    level = (row[applied] // 2) / BINS_PER_LEVEL
    # N(9, 0.5) clipped to [0, 10], rounded to 1/100: mean 8.9958, std 0.4888
    assert abs(level.mean() - 8.9958) < 0.02 and abs(level.std() - 0.4888) < 0.02 and level.max() == 10
    close((row[applied] % 2).mean(), 0.5, 0.5)  # negated half of the time
    # A slot's draws are its own: the same in any batch (a resumed epoch's batches are cut elsewhere).
    again = ra.draw(seeds[5:9])
    assert np.array_equal(again["ra_op"], op[5:9]) and np.array_equal(again["ra_param"], row[5:9])

    uniform = DaliRandAugment(policy("rand-m9-mstd101-n1"), 32).draw(seeds)  # mstd above 100: uniform in [0, m]
    level = (uniform["ra_param"] // 2) / BINS_PER_LEVEL
    assert abs(level.mean() - 4.5) < 0.05 and level.min() == 0 and level.max() == 9
    weighted = DaliRandAugment(policy("rand-m9-n3-tweights"), 32)
    ops = weighted.draw(seeds)["ra_op"]
    for k in range(3):  # weighted choices without replacement: no operation twice in an image
        for j in range(k + 1, 3):
            both = (ops[:, k] != weighted.identity) & (ops[:, j] != weighted.identity)
            assert not (ops[both, k] == ops[both, j]).any()


def textured(size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    rgb = np.stack([xx * 255 / (size - 1), yy * 255 / (size - 1), 127.5 + 100 * np.sin(xx / 4 + yy / 5)], axis=-1)
    return rgb.round().astype(np.uint8)


@needs_dali
def test_each_rand_augment_operation_on_dali_is_timms_within_its_stated_difference(monkeypatch):
    # Every operation of the official policy at level 7, both signs, on an image the crop and resize leave as it is.
    from mae_fast.config import AugConfig
    from mae_fast.data.transforms import official_train_transform

    size = 48
    primary, secondary, _ = official_train_transform(size, AugConfig(reprob=0))
    recipe = FinetuneTrainPipeline(primary, secondary, None, size, seed=0)
    ra = recipe.rand_augment
    count = 2 * len(ra.names)
    pipeline = recipe.build(count, None, 1)
    buffer = io.BytesIO()
    Image.fromarray(textured(size)).save(buffer, "PNG")
    encoded = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
    level = 7
    ops = np.full((count, ra.num_layers), ra.identity, dtype=np.int32)
    ops[:, 0] = np.repeat(np.arange(len(ra.names)), 2)
    rows = np.full((count, ra.num_layers), 2 * level * BINS_PER_LEVEL, dtype=np.int32)
    rows[1::2, 0] += 1  # the odd slots negated
    pipeline.feed_input("encoded", [encoded] * count)
    pipeline.feed_input("anchor", np.zeros((count, 2), np.float32))
    pipeline.feed_input("shape", np.full((count, 2), size, np.float32))
    pipeline.feed_input("mirror", np.zeros(count, np.int32))
    pipeline.feed_input("ra_op", ops)
    pipeline.feed_input("ra_param", rows)
    (out,) = pipeline.run()
    std, mean = np.array(IMAGENET_STD) * 255, np.array(IMAGENET_MEAN) * 255
    pixels = out.as_array().transpose(0, 2, 3, 1) * std + mean
    image = Image.fromarray(textured(size))
    # (mean, max) absolute difference allowed, in levels (measured: the allowance's first digit): exact where DALI
    # computes what Pillow does; a level or two for the enhance operations; the warps interpolate bilinearly and fill
    # with one gray (see the module), the edges differ; equalize follows OpenCV's formula (14 levels on average on
    # this image); sharpness leaves a border. A move the wrong way, or another magnitude, is tens of levels on average.
    allowed = {"Invert": (0, 0), "PosterizeIncreasing": (0, 0), "SolarizeIncreasing": (0, 0), "SolarizeAdd": (0, 0),
               "AutoContrast": (0.5, 1), "ColorIncreasing": (0.6, 2), "ContrastIncreasing": (0.6, 1),
               "BrightnessIncreasing": (0.5, 1), "SharpnessIncreasing": (0.4, 16), "Equalize": (16, 32),
               "Rotate": (3, 80), "ShearX": (3, 80), "ShearY": (3, 80), "TranslateXRel": (4, 25),
               "TranslateYRel": (4, 25)}
    assert set(allowed) == set(ra.names)
    for slot in range(count):
        op = policy("rand-m9-mstd0.5-inc1", size).ops[slot // 2]
        fixed_sign(monkeypatch, negated=bool(slot % 2))
        arguments = op.level_fn(level, op.hparams) if op.level_fn else ()
        expected = np.asarray(op.aug_fn(image, *arguments, **op.kwargs), dtype=np.float64)
        difference = np.abs(pixels[slot] - expected)
        mean_allowed, max_allowed = allowed[op.name]
        assert difference.mean() <= mean_allowed + 1e-3 and difference.max() <= max_allowed + 1e-3, \
            (op.name, slot % 2, difference.mean(), difference.max())


def test_erasing_draws_timms_boxes():
    from timm.data.random_erasing import RandomErasing

    size, seeds = 32, np.arange(20_000, dtype=np.int64) * 13 + 1
    erasing = DaliErasing(RandomErasing(0.4, mode="pixel", max_count=3, device="cpu"), size, seed=0)
    draws = erasing.draw(seeds)
    present = np.array([[len(draws[f"erase_anchor_{k}"][i]) > 0 for k in range(3)] for i in range(len(seeds))])
    erased = present.any(axis=1)
    assert abs(erased.mean() - 0.4) < 4 * math.sqrt(0.4 * 0.6 / len(seeds))  # timm's probability
    counts = present.sum(axis=1)[erased]  # 1 to --recount boxes, uniformly
    assert np.abs(np.bincount(counts, minlength=4)[1:] / len(counts) - 1 / 3).max() < 0.03
    for i in range(2000):
        for k in np.flatnonzero(present[i]):
            (top, left), (h, w) = draws[f"erase_anchor_{k}"][i], draws[f"erase_shape_{k}"][i]
            assert 0 < h < size and 0 < w < size and top + h <= size and left + w <= size  # inside, as timm's
    assert draws["erase_noise"].shape == (len(seeds), 2) and draws["erase_noise"].max() <= 256

    # One box per image: the erased area's distribution is timm's (its mean and spread, as timm draws it here).
    one = DaliErasing(RandomErasing(1.0, mode="const", device="cpu"), size, seed=0).draw(seeds[:4000])
    ours = np.array([np.prod(s) for s in one["erase_shape_0"] if len(s)]) / size**2
    import random

    random.seed(0)
    reference = RandomErasing(1.0, mode="const", device="cpu")
    theirs = []
    for _ in range(4000):
        image = torch.ones(1, size, size)
        reference(image)
        theirs.append(float((image == 0).float().mean()))
    theirs = np.array(theirs)
    standard_error = math.sqrt(ours.var() / len(ours) + theirs.var() / len(theirs))
    assert abs(ours.mean() - theirs.mean()) < 4 * standard_error and abs(ours.std() - theirs.std()) < 0.01


@pytest.mark.parametrize("hflip", [0.0, 0.25, 0.5])
def test_the_dali_flip_follows_hflip(hflip):
    # --hflip 0 (the demo's) makes timm leave the flip out: DALI then never mirrors; otherwise it mirrors a slot with
    # that probability, drawn from the slot's seed.
    from mae_fast.config import AugConfig
    from mae_fast.data.transforms import official_train_transform

    primary, secondary, _ = official_train_transform(32, AugConfig(hflip=hflip, aa="none", reprob=0))
    recipe = FinetuneTrainPipeline(primary, secondary, None, 32, seed=0)
    image = np.zeros((40, 40, 3), np.uint8)
    mirror = recipe.draws([image] * 4000, np.arange(4000))["mirror"]
    assert recipe.flip_p == hflip and mirror.mean() == pytest.approx(hflip, abs=0.025)
