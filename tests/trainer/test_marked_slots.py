"""Marked slots (index -1: padding, or an image that does not decode) take no part in training or in features."""

import pytest
import torch

from mae_fast.data import dali_unavailable_reason
from mae_fast.knn import extract_features
from mae_fast.pretrain import config_from_args
from mae_fast.trainer import MAETrainer
from helpers import tiny_args, write_images

BACKENDS = [pytest.param("torch", id="torch"),
            pytest.param("dali", id="dali", marks=pytest.mark.skipif(dali_unavailable_reason() is not None,
                                                                    reason=str(dali_unavailable_reason())))]


def one_step_with_a_marked_slot(tmp_path, backend, fill):
    """One optimizer step over the first batch, its slot 1 marked (-1) and its pixels replaced by ``fill``."""
    data = write_images(tmp_path / "data", 8)
    trainer = MAETrainer(config_from_args(tiny_args(data, tmp_path / f"out-{fill}", "--data_backend", backend,
                                                    "--max_steps", "1", "--warmup_epochs", "0")))
    real_epoch = trainer.loader.epoch

    def marked(epoch, start=0):
        for images, indices in real_epoch(epoch, start):
            images, indices = images.clone(), indices.clone()
            images[1] = fill
            indices[1] = -1
            yield images, indices

    trainer.loader.epoch = marked
    trainer.fit()
    return trainer


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_marked_slot_takes_no_part_in_the_loss_nor_the_image_count(tmp_path, backend):
    black = one_step_with_a_marked_slot(tmp_path, backend, 0)
    white = one_step_with_a_marked_slot(tmp_path, backend, 255)
    assert black.history[0][1] == pytest.approx(white.history[0][1], rel=1e-6)  # the loss ignores its pixels
    for (name, a), b in zip(black.model.state_dict().items(), white.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)  # and so does the update
    assert black.progress.images == black.progress.epoch_images_here == 3  # of the batch's 4 slots


class MarkingLoader:
    """Two batches of two: image 2 never arrives valid (its slot is marked), image 0 arrives twice."""

    def epoch(self, epoch):
        images = torch.stack([torch.full((3, 32, 32), float(v)) for v in (0, 1, 2, 0)])
        yield images[:2], torch.tensor([0, 1])
        yield images[2:], torch.tensor([-1, -1])


def test_features_of_images_never_delivered_are_left_out():
    from mae_fast import create_model

    model = create_model("mae_vit_tiny_patch16", img_size=32).eval()
    features, present = extract_features(model, MarkingLoader(), 3, torch.device("cpu"), torch.no_grad(), "mean")
    assert present.tolist() == [True, True, False]
    assert features.shape == (3, 192) and bool(features[:2].abs().sum(1).gt(0).all())


def kernel_backends():
    from mae_fast.ops.dispatch import _why_not

    reason = _why_not("triton", [torch.zeros(1)])
    return ["torch", pytest.param("triton", marks=pytest.mark.skipif(bool(reason), reason=str(reason)))]


@pytest.mark.parametrize("kernel_backend", kernel_backends())
def test_the_model_weighs_marked_images_zero_as_if_they_were_not_in_the_batch(kernel_backend):
    from mae_fast import create_model

    model = create_model("mae_vit_tiny_patch16", img_size=32, kernel_backend=kernel_backend)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    noise = torch.rand(4, model.num_patches)
    kept = [0, 2, 3]
    loss, _, _ = model(images, noise=noise, valid=torch.tensor([True, False, True, True]))
    alone, _, _ = model(images[kept], noise=noise[kept])
    torch.testing.assert_close(loss, alone, rtol=1e-5, atol=1e-6)
    none, _, _ = model(images, noise=noise, valid=torch.zeros(4))
    assert none.item() == 0.0
