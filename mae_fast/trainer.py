"""MAETrainer: MAE pretraining, a task of the run engine (:mod:`mae_fast.engine`).

It supplies what is pretraining's own: the MAE model (its fused ops' backends verified on this
device before they are trusted), the loaders of uint8 images, AdamW's two groups (no weight decay
on biases and 1-D parameters, the frozen position tables left out), the step's loss (masks drawn
for the global batch from one generator shared by the ranks, so a run on N ranks masks each
image as a run on one rank with the same global batch would), the validation loss and the
reconstruction image at each epoch's end, and the kNN monitor. The loop, the recipe, checkpoints
and faults are the engine's.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from mae_fast.config import RunConfig
from mae_fast.data import build_eval_loader, build_loader
from mae_fast.data.builtin import builtin_image_dir
from mae_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, normalize
from mae_fast.distributed import all_reduce_sum
from mae_fast.engine import (PEAK_FLOPS, Engine, build_optimizer, lr_at, peak_flops, peak_flops_for,
                             resolve_precision)
from mae_fast.errors import NonFiniteLossError, OutputDirError
from mae_fast.knn import KnnMonitor
from mae_fast.model import MAEViT, create_model
from mae_fast.ops import IMPLEMENTATIONS, dispatch, patchify, unpatchify
from mae_fast.selfcheck import verify_kernel_backends

logger = logging.getLogger("mae_fast")

__all__ = ["MAETrainer", "param_groups", "lr_at", "peak_flops", "peak_flops_for", "PEAK_FLOPS", "build_optimizer",
           "resolve_precision", "reconstruction_grid", "NonFiniteLossError", "RECONSTRUCTION_COLUMNS"]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay for weight matrices and tokens, none for biases and 1-D parameters.

    Frozen parameters (the sin-cos position tables) are left out.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]



class MAETrainer(Engine):
    """Pretrains an MAE as ``config`` (a :class:`~mae_fast.config.RunConfig`) describes; ``fit()`` runs it.

    Attributes (besides the engine's):
        model: the unwrapped :class:`MAEViT` (its ``state_dict()`` has the official keys).
        knn: the kNN monitor, or None.
        noise_generator: the mask noise's generator, shared by the ranks.
    """

    model: MAEViT

    def __init__(self, config: RunConfig):
        super().__init__(config)

    # ------------------------------------------------------------------ what pretraining supplies

    def build_model(self) -> MAEViT:
        mcfg, dcfg = self.config.model, self.config.data
        model = create_model(mcfg.name, img_size=dcfg.input_size, norm_pix_loss=mcfg.norm_pix_loss,
                             attn_backend=mcfg.attn_backend, kernel_backend=mcfg.kernel_backend,
                             grad_checkpointing=mcfg.grad_checkpointing).to(self.device)
        # Verify before trusting: each fused op's backend is checked against its reference on a small probe on
        # this device (milliseconds); one that does not match is named in a warning and the next one is used.
        model.set_kernel_backends(verify_kernel_backends(self.device, self.autocast_dtype or torch.float32,
                                                         mcfg.kernel_backend, warn=logger.warning))
        return model

    def build_loaders(self):
        # Batches cross to the device and live there as uint8 pixels (a quarter of float32's bytes); the model's
        # fused ops normalize them as they read them, bit for bit as the loaders would.
        dcfg, rank, world, seed = self.config.data, self.dist.rank, self.dist.world_size, self.config.seed
        if self.config.is_demo and dcfg.val_path is None:  # the built-in set's held-out split, with its classes
            dcfg.val_path = str(builtin_image_dir(dcfg.builtin_count, dcfg.builtin_size) / "val")
        loader = build_loader(dcfg, rank, world, self.device, seed, train=True, dtype=torch.uint8)
        val_loader = (build_loader(dcfg, rank, world, self.device, seed, train=False, dtype=torch.uint8)
                      if dcfg.val_path else None)
        return loader, val_loader

    def setup_task(self) -> None:
        config, dcfg = self.config, self.config.data
        self.knn = None
        if config.knn_every:
            bank = config.knn_train_path or dcfg.data_path or str(Path(dcfg.val_path).parent)
            self.knn = KnnMonitor(dcfg.val_path, bank, config.knn_train_size, pool=config.knn_pool,
                                  verify=dcfg.verify_images,
                                  backend="dali" if self.loader.backend == "dali" else "torch",
                                  make_loader=lambda files: build_eval_loader(dcfg, files, self.dist.rank,
                                                                              self.dist.world_size, self.device,
                                                                              config.seed))
        # Mask noise is drawn for the global batch from one generator shared by all ranks, so a run
        # on N ranks masks each image as a run on one rank with the same global batch would.
        self.noise_generator = torch.Generator(device=self.device).manual_seed(config.seed)

    def param_groups(self, model: MAEViT) -> list[dict]:
        return param_groups(model, self.config.optim.weight_decay)

    def shard_units(self, model: MAEViT) -> list:
        return list(model.blocks) + list(model.decoder_blocks)

    def step_loss(self, images: torch.Tensor, weights: torch.Tensor, all_valid: bool) -> torch.Tensor:
        world, rank = self.dist.world_size, self.dist.rank
        noise = torch.rand(world * self.config.data.batch_size, self.model.num_patches, device=self.device,
                           generator=self.noise_generator)[rank::world]
        loss, _, _ = self.train_model(images, mask_ratio=self.config.model.mask_ratio, noise=noise, return_pred=False,
                                      valid=weights)
        return loss

    def flops_per_image(self) -> float:
        return self.model.flops_per_image(self.config.model.mask_ratio)

    def describe_model(self) -> str:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return (f"model {self.config.model.name} ({trainable:,} trainable parameters, {self.config.data.input_size}px, "
                f"mask ratio {self.config.model.mask_ratio})")

    def describe_compute(self) -> str:
        dtype = self.autocast_dtype or torch.float32
        probe = [torch.empty(1, device=self.device, dtype=dtype)]
        kernels = ", ".join(f"{op}={dispatch.choose(op, self.model.op_backend(op), impls, probe)}"
                            for op, impls in IMPLEMENTATIONS.items())
        return f"{super().describe_compute()}, kernels: {kernels}"

    def on_start(self) -> None:
        if self.knn is not None:
            self.run_knn(label="at initialization")

    def end_of_epoch(self, epoch: int) -> dict:
        cfg = self.config
        if self.knn is not None and ((epoch + 1) % cfg.knn_every == 0 or epoch + 1 == cfg.epochs):
            return self.run_knn()
        return {}

    def task_rng_state(self) -> dict:
        return {"noise": self.noise_generator.get_state()}

    def load_task_rng_state(self, rng: dict) -> None:
        if "noise" in rng:
            self.noise_generator.set_state(rng["noise"])

    def run_knn(self, label: str | None = None) -> dict:
        """The kNN monitor on the frozen encoder (every rank takes part); returns ``knn_top1`` and ``knn_top5``."""
        started = time.perf_counter()
        stats = self.knn.evaluate(self.model, self.device, self._autocast())
        if self.dist.is_main:
            if self.writer is not None:
                self.writer.add_scalar("val/knn_top1", stats["knn_top1"], self.step)
                self.writer.add_scalar("val/knn_top5", stats["knn_top5"], self.step)
            if label:
                logger.info("kNN top-1 %s: %.1f%% (top-5 %.1f%%; %d bank and %d validation images, %.1f s)",
                            label, 100 * stats["knn_top1"], 100 * stats["knn_top5"], self.knn.num_bank,
                            self.knn.num_val, time.perf_counter() - started)
        return stats

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss (with ``--val_path``) and a reconstruction image, written by rank 0."""
        self.model.eval()
        stats = {}
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed + 1)
        mask_ratio = self.config.model.mask_ratio
        if self.val_loader is not None:
            total = torch.zeros(2, device=self.device)
            for images, indices in self.val_loader.epoch(0):
                noise = torch.rand(images.shape[0], self.model.num_patches, device=self.device, generator=generator)
                valid = indices >= 0
                with self._autocast():
                    loss, _, _ = self.train_model(images, mask_ratio=mask_ratio, noise=noise, return_pred=False,
                                                  valid=self._image_weights(valid, images.shape[0]))
                count = valid.sum().to(self.device)
                total += torch.stack([loss.float() * count, count.float()])
            loss_sum, count = all_reduce_sum(total).tolist()
            stats["val_loss"] = loss_sum / max(count, 1)
            if self.writer is not None:
                self.writer.add_scalar("val/loss", stats["val_loss"], self.epoch)
        # Every rank runs the preview forward (a sharded model needs them all), so all skip it if any rank has no
        # image that decodes; rank 0 writes it.
        images = self._preview_images()
        missing = all_reduce_sum(torch.tensor(float(images is None), device=self.device)).item()
        if missing:
            if self.dist.is_main:
                logger.warning("no reconstruction preview this epoch: none of the first images decodes")
            self.model.train()
            return stats
        noise = torch.rand(images.shape[0], self.model.num_patches, device=self.device, generator=generator)
        with self._autocast():
            _, pred, mask = self.model(images, mask_ratio=mask_ratio, noise=noise)
        if self.dist.is_main:
            grid = reconstruction_grid(self.model, images, pred.float(), mask)
            path = self.output_dir / f"reconstruction-epoch{self.epoch}.png"
            try:
                save_png(grid, path)
            except OSError as exc:
                raise OutputDirError(f"cannot write {path.name} in {str(self.output_dir)!r}: "
                                     f"{exc.strerror or exc}") from exc
            if self.writer is not None:
                self.writer.add_image("val/reconstruction", grid, self.epoch)
        self.model.train()
        return stats

    def _preview_images(self, count: int = 8) -> torch.Tensor | None:
        """The first ``count`` images of the validation (else training) data that decode, resized and centre-cropped,
        normalized; None when none does (no preview then). Images that do not decode, or a shard that cannot be
        read, are passed over: the preview never stops a run."""
        import io
        import itertools

        from mae_fast.data import files as image_files

        loader = self.val_loader or self.loader
        size = self.config.data.input_size
        paths = getattr(loader, "files", None)
        shard_set = getattr(loader, "shard_set", None)
        if not paths and shard_set is None:  # synthetic data
            return torch.randn(count, 3, size, size, device=self.device)
        tries = count * PREVIEW_TRIES
        if paths:
            sources = iter(paths[:tries])
        else:
            from mae_fast.data.shards import stream_images

            def shard_members():
                for path in shard_set.paths:
                    images = stream_images(path)
                    try:
                        for image in images:
                            yield io.BytesIO(image.data)
                    except Exception as exc:  # a shard that breaks: the preview reads on in the next one
                        logger.warning("the reconstruction preview passes over %s: %s", path, exc)
                    finally:
                        images.close()

            sources = itertools.islice(shard_members(), tries)
        batch, skipped = [], 0
        for source in sources:
            try:
                batch.append(eval_transform(image_files.open_rgb(source), size))
            except Exception:
                skipped += 1
                continue
            if len(batch) == count:
                break
        if skipped and self.dist.is_main:
            logger.warning("the reconstruction preview passed over %d image(s) that do not decode", skipped)
        if not batch:
            return None
        return normalize(torch.stack(batch).to(self.device), torch.float32)


#: Images the preview reads, per image it shows, before it gives up looking for ones that decode.
PREVIEW_TRIES = 8
#: The reconstruction image's columns, left to right.
RECONSTRUCTION_COLUMNS = ("original", "masked input", "prediction", "prediction + visible")
#: Narrower images are enlarged by a whole factor in the reconstruction image, so the labels fit over them.
MIN_COLUMN_WIDTH = 96


def reconstruction_grid(model: MAEViT, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[3, header + rows*H*s, 4*W*s] in [0, 1]: a header naming the columns, then per image the original, the
    masked input, the reconstruction, and the reconstruction with the visible patches pasted back (as the official
    visualization shows them). ``s`` enlarges images narrower than :data:`MIN_COLUMN_WIDTH` (else 1)."""
    p = model.patch_size
    grid = model.patch_embed.grid_size
    if model.norm_pix_loss:  # predictions are per-patch normalized: undo with the target's statistics
        target = patchify(images.float(), p)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    recon = unpatchify(pred, p, grid)
    mask_img = unpatchify(mask[..., None].expand(-1, -1, pred.shape[-1]).float(), p, grid)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)

    def show(x):
        return (x.float() * std + mean).clamp(0, 1)

    panels = [show(images), show(images) * (1 - mask_img) + 0.5 * mask_img, show(recon),
              show(images * (1 - mask_img) + recon * mask_img)]
    rows = torch.cat(panels, dim=3)  # [N, 3, H, 4W]
    body = torch.cat(list(rows), dim=1).cpu()  # [3, N*H, 4W]
    scale = -(-MIN_COLUMN_WIDTH // images.shape[-1])  # small images are enlarged (nearest) to be seen and labelled
    if scale > 1:
        body = body.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return torch.cat([column_header(images.shape[-1] * scale, RECONSTRUCTION_COLUMNS), body], dim=1)


def column_header(column_width: int, labels) -> torch.Tensor:
    """[3, h, len(labels) * column_width] in [0, 1]: black labels on white, centered over each column, words
    wrapped onto more lines where a column is narrow."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = measure.textbbox((0, 0), "Ag", font=font)[3] + 2
    wrapped = []
    for label in labels:
        lines, current = [], ""
        for word in label.split():
            candidate = f"{current} {word}".strip()
            if current and measure.textlength(candidate, font=font) > column_width - 2:
                lines.append(current)
                current = word
            else:
                current = candidate
        wrapped.append(lines + [current])
    height = line_height * max(len(lines) for lines in wrapped) + 4
    header = Image.new("RGB", (column_width * len(labels), height), "white")
    draw = ImageDraw.Draw(header)
    for column, lines in enumerate(wrapped):
        for row, line in enumerate(lines):
            x = column * column_width + (column_width - measure.textlength(line, font=font)) / 2
            draw.text((max(x, column * column_width), 2 + row * line_height), line, fill="black", font=font)
    return torch.from_numpy(np.asarray(header, dtype=np.float32) / 255).permute(2, 0, 1)


def save_png(image: torch.Tensor, path: Path) -> None:
    """[3, H, W] in [0, 1] -> PNG file."""
    from PIL import Image

    array = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    Image.fromarray(array).save(path)
