"""The fine-tuning recipe's parts: mixup/cutmix, criterion and evaluation as the official script makes them."""

import contextlib

import pytest
import torch

from mae_fast.config import AugConfig
from mae_fast.finetune import build_criterion, build_mixup, evaluate_classifier

timm = pytest.importorskip("timm")
from timm.data import Mixup  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy  # noqa: E402


def official_mixup(args, num_classes):
    """The official main_finetune.py's construction, written out from its flags."""
    mixup_active = args.mixup > 0 or args.cutmix > 0.0 or args.cutmix_minmax is not None
    if not mixup_active:
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=num_classes)


@pytest.mark.parametrize("flags", [dict(mixup=0.8, cutmix=1.0), dict(mixup=0.8), dict(cutmix=1.0, mixup_mode="elem"),
                                   dict(cutmix_minmax=[0.2, 0.8], mixup_prob=0.5, smoothing=0.2),
                                   dict(mixup=0.8, cutmix=1.0, mixup_switch_prob=1.0, mixup_mode="pair")])
def test_mixup_and_cutmix_equal_the_official_construction_for_the_same_seed(flags):
    aug = AugConfig(**flags)
    ours, theirs = build_mixup(aug, 10), official_mixup(aug, 10)
    images = torch.randn(8, 3, 32, 32)
    labels = torch.randint(0, 10, (8,))
    for seed in range(4):
        torch.manual_seed(seed)
        __import__("numpy").random.seed(seed)
        got = ours(images.clone(), labels.clone())
        torch.manual_seed(seed)
        __import__("numpy").random.seed(seed)
        want = theirs(images.clone(), labels.clone())
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    def settings(m):
        return (m.mixup_alpha, m.cutmix_alpha, m.cutmix_minmax, m.mix_prob, m.switch_prob, m.mode, m.label_smoothing,
                m.num_classes)

    assert settings(ours) == settings(theirs)
    assert (ours.mix_prob, ours.switch_prob, ours.mode) == (aug.mixup_prob, aug.mixup_switch_prob, aug.mixup_mode)


def test_the_criterion_is_the_official_choice():
    assert build_mixup(AugConfig(), 10) is None
    assert isinstance(build_criterion(AugConfig(mixup=0.8)), SoftTargetCrossEntropy)
    smoothing = build_criterion(AugConfig(smoothing=0.1))
    assert isinstance(smoothing, LabelSmoothingCrossEntropy) and smoothing.smoothing == 0.1
    assert isinstance(build_criterion(AugConfig(smoothing=0.0)), torch.nn.CrossEntropyLoss)


class Batches:
    """A loader of fixed batches ``(images, labels, indices)``."""

    def __init__(self, batches):
        self.batches = batches

    def epoch(self, epoch, start=0):
        return iter(self.batches)


class Lookup(torch.nn.Module):
    """Logits looked up by the image's first pixel (the image's id)."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, images):
        return self.table[images[:, 0, 0, 0].long()]


def test_evaluation_counts_each_image_once_whatever_the_batches():
    torch.manual_seed(0)
    n, classes = 11, 7
    table = torch.randn(n, classes)
    labels = torch.randint(0, classes, (n,))
    images = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, 2, 2).clone()
    model = Lookup(table)
    # Written out: top-1, top-5 and the mean cross-entropy over the 11 images.
    top5 = table.topk(5, dim=1).indices
    want = {"acc1": 100 * (top5[:, 0] == labels).double().mean().item(),
            "acc5": 100 * (top5 == labels[:, None]).any(dim=1).double().mean().item(),
            "loss": torch.nn.functional.cross_entropy(table.double(), labels).item()}

    def batched(size):  # the last batch padded with marked slots (index -1, any label)
        out = []
        for start in range(0, n, size):
            idx = torch.arange(start, min(start + size, n))
            pad = size - len(idx)
            x = torch.cat([images[idx], images[:pad]])
            y = torch.cat([labels[idx], torch.full((pad,), -1)])
            out.append((x, y, torch.cat([idx, torch.full((pad,), -1)])))
        return Batches(out)

    for size in (1, 4, 11, 16):
        got = evaluate_classifier(model, batched(size), torch.device("cpu"), contextlib.nullcontext(), False)
        assert got["count"] == n
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-12), (size, key)
