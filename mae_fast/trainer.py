"""MAETrainer: the pretraining loop, read top to bottom like the algorithm.

build (process group, model, data, optimizer, resume) -> for each step: data, forward, backward,
optimizer step, learning-rate schedule, log, checkpoint -> validate and checkpoint each epoch.

The recipe is the official one: ``lr = blr * effective_batch / 256`` unless ``--lr`` is given,
linear warmup then a half-cycle cosine to ``min_lr`` set every iteration from the fractional
epoch, AdamW with betas (0.9, 0.95), no weight decay on biases and 1-D parameters, frozen position
embeddings left out of the optimizer. The step makes no host synchronization except on logging
and checkpoint steps: the loss stays on the device in between.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mae_fast.checkpoint import LAST, CheckpointError, find_latest, load_checkpoint, save_checkpoint
from mae_fast.config import RunConfig
from mae_fast.data import build_loader
from mae_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, normalize
from mae_fast.distributed import all_reduce_sum, setup_distributed
from mae_fast.model import MAEViT, create_model
from mae_fast.ops import IMPLEMENTATIONS, dispatch, patchify, unpatchify

logger = logging.getLogger("mae_fast")

# Dense bf16/fp16 tensor-core peaks (FLOP/s) for model FLOP utilization; unknown devices report none.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
              "RTX 4090": 165e12, "V100": 125e12}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without saving the broken state."""


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None when unknown (CPUs included)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def lr_at(epoch: float, base_lr: float, min_lr: float, warmup_epochs: float, epochs: int) -> float:
    """The official schedule at a fractional epoch: linear warmup, then half-cycle cosine to ``min_lr``."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


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


def build_optimizer(model: torch.nn.Module, config: RunConfig, lr: float, device: torch.device):
    """AdamW (fused on GPUs) or apex FusedAdam, with the official betas.

    Raises:
        RuntimeError: ``--optimizer apex`` without NVIDIA apex installed.
    """
    groups = param_groups(model, config.optim.weight_decay)
    if config.optim.optimizer == "apex":
        try:
            from apex.optimizers import FusedAdam
        except ImportError as exc:
            raise RuntimeError("--optimizer apex needs NVIDIA apex (apex.optimizers.FusedAdam), which is not "
                               "installed; use --optimizer adamw") from exc
        return FusedAdam(groups, lr=lr, betas=(0.9, 0.95), adam_w_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on GPUs, fp32 on CPUs.

    Raises:
        ValueError: fp16 asked for on a CPU.
    """
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a GPU; use bf16 or fp32 on a CPU")
    return precision


class MAETrainer:
    """Pretrains an MAE as ``config`` describes; ``fit()`` runs it.

    Attributes:
        model: the unwrapped :class:`MAEViT` (its ``state_dict()`` has the official keys).
        epoch, step_in_epoch, step: where the run stands (epoch, batches done in it, optimizer steps).
    """

    def __init__(self, config: RunConfig):
        self.config = config
        self.dist = setup_distributed(config.device)
        self.device = self.dist.device
        self.precision = resolve_precision(config.precision, self.device)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        # The same initial weights on every rank (FSDP shards them as they are; it broadcasts nothing).
        torch.manual_seed(config.seed)
        self.output_dir = Path(config.output_dir)
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)

        mcfg, dcfg = config.model, config.data
        self.model: MAEViT = create_model(mcfg.name, img_size=dcfg.input_size, norm_pix_loss=mcfg.norm_pix_loss,
                                          attn_backend=mcfg.attn_backend, kernel_backend=mcfg.kernel_backend,
                                          grad_checkpointing=mcfg.grad_checkpointing).to(self.device)
        self.loader = build_loader(dcfg, self.dist.rank, self.dist.world_size, self.device, config.seed, train=True)
        self.val_loader = (build_loader(dcfg, self.dist.rank, self.dist.world_size, self.device, config.seed,
                                        train=False) if dcfg.val_path else None)

        self.effective_batch = dcfg.batch_size * config.accum_iter * self.dist.world_size
        self.base_lr = config.optim.lr if config.optim.lr is not None else config.optim.blr * self.effective_batch / 256
        torch.manual_seed(config.seed + self.dist.rank)
        self.train_model = self._wrap(self.model)  # before the optimizer: FSDP replaces the parameters
        self.optimizer = build_optimizer(self.model, config, self.base_lr, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        # Mask noise is drawn for the global batch from one generator shared by all ranks, so a run
        # on N ranks masks each image as a run on one rank with the same global batch would.
        self.noise_generator = torch.Generator(device=self.device).manual_seed(config.seed)

        self.epoch, self.step_in_epoch, self.step = config.start_epoch, 0, 0
        self.last_good: Path | None = None
        self.history: list[tuple[int, float]] = []  # (step, mean loss since the last log line), rank 0
        self._resume()
        self.writer = None
        if self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=config.log_dir)

    # ------------------------------------------------------------------ build

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.config.compile and self.config.compile_scope == "blocks":
            model.compile_blocks()  # in place, before DDP or FSDP wrap the model
        if self.config.fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            if not dist.is_initialized():
                dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
            policy = MixedPrecisionPolicy(param_dtype=self.autocast_dtype, reduce_dtype=torch.float32) \
                if self.autocast_dtype else MixedPrecisionPolicy()
            for block in list(model.blocks) + list(model.decoder_blocks):
                fully_shard(block, mp_policy=policy)
            fully_shard(model, mp_policy=policy)
        elif self.dist.distributed:
            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.config.compile and self.config.compile_scope == "model":
            model = torch.compile(model)
        return model

    def _no_sync(self, update: bool):
        """Skip the gradient all-reduce on accumulation steps that do not update."""
        if update:
            return contextlib.nullcontext()
        if self.config.fsdp:
            self.model.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        ddp = getattr(self.train_model, "_orig_mod", self.train_model)
        return ddp.no_sync() if isinstance(ddp, DistributedDataParallel) else contextlib.nullcontext()

    def describe(self) -> str:
        """One paragraph on what runs: model, kernels, attention, data, precision, recipe."""
        dtype = self.autocast_dtype or torch.float32
        probe = [torch.empty(1, device=self.device, dtype=dtype)]
        kernels = ", ".join(f"{op}={dispatch.choose(op, self.model.kernel_backend, impls, probe)}"
                            for op, impls in IMPLEMENTATIONS.items())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return (f"model {self.config.model.name} ({trainable:,} trainable parameters, {self.config.data.input_size}px, "
                f"mask ratio {self.config.model.mask_ratio}) on {self.device} x{self.dist.world_size}, "
                f"precision {self.precision}, attention {self.model.attn_backend_for(self.device, dtype)}, "
                f"{'compiled (' + self.config.compile_scope + '), ' if self.config.compile else ''}"
                f"kernels: {kernels}; data {self.loader.backend} ({self.loader.num_samples} images, "
                f"{len(self.loader)} steps per epoch); effective batch {self.effective_batch}, lr {self.base_lr:.3g} "
                f"(blr {self.config.optim.blr:g}), {self.config.epochs} epochs, warmup {self.config.optim.warmup_epochs}")

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_state(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "noise": self.noise_generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.config.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state, optim_state = get_state_dict(self.model, self.optimizer, options=options)
        else:
            model_state, optim_state = self.model.state_dict(), self.optimizer.state_dict()
        return {"model": model_state, "optimizer": optim_state, "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "step": self.step,
                "config": dataclasses.asdict(self.config), "rng": rng}

    def _state_is_finite(self) -> bool:
        finite = torch.ones((), device=self.device)
        for param in self.model.parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            finite = finite * torch.isfinite(local).all()
        return bool(all_reduce_sum(finite) == self.dist.world_size)

    def save(self, name: str) -> Path | None:
        """Write ``output_dir/name`` (rank 0) unless the state is broken; returns the path."""
        if not self._state_is_finite():
            raise NonFiniteLossError(f"the model has non-finite parameters at step {self.step}; not saving {name}. "
                                     f"The last good checkpoint is {self.last_good or 'none (none was written)'}")
        state = self._checkpoint_state()  # every rank takes part when the state is sharded
        path = self.output_dir / name
        if self.dist.is_main:
            save_checkpoint(state, path)
        if dist.is_initialized():
            dist.barrier()
        self.last_good = path
        return path

    def _resume(self) -> None:
        resume = self.config.resume
        if not resume:
            return
        path = find_latest(self.output_dir) if resume == "auto" else Path(resume)
        if path is None:
            if self.dist.is_main:
                logger.info("--resume auto: no checkpoint in %s, starting fresh", self.output_dir)
            return
        state = load_checkpoint(path)
        try:
            if self.config.fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

                set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                               optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
            else:
                self.model.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {str(path)!r} does not fit this run's model/optimizer "
                                  f"(--model {self.config.model.name}): {str(exc).splitlines()[0]}") from exc
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        rng = state.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "noise" in rng:
            self.noise_generator.set_state(rng["noise"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.epoch, self.step_in_epoch, self.step = state["epoch"], state.get("step_in_epoch", 0), state["step"]
        if self.step_in_epoch >= len(self.loader):
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.last_good = path
        if self.dist.is_main:
            logger.info("resumed from %s at epoch %d, batch %d, step %d", path, self.epoch, self.step_in_epoch,
                        self.step)

    # ------------------------------------------------------------------ the loop

    def _check_finite(self, first_bad: torch.Tensor) -> None:
        """Raise if any rank saw a non-finite loss (one device sync)."""
        bad = first_bad.clone()
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() >= 0:
            raise NonFiniteLossError(f"the loss became non-finite at step {int(bad.item())} (epoch {self.epoch}); "
                                     f"stopping without saving. The last good checkpoint is "
                                     f"{self.last_good or 'none (none was written)'}")

    def fit(self) -> dict:
        """Train to ``config.epochs`` (or ``--max_steps``); returns the last epoch's statistics."""
        cfg = self.config
        if self.dist.is_main:
            logger.info("%s", self.describe())
        stats: dict = {}
        while self.epoch < cfg.epochs:
            stats = self.train_one_epoch()
            finished_epoch = self.step_in_epoch >= len(self.loader)
            if not finished_epoch:  # stopped by --max_steps
                self.save(LAST)
                break
            epoch = self.epoch
            if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
                stats.update(self.evaluate())
            if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
                self.save(f"checkpoint-{epoch}.pth")
            self.save(LAST)
            if self.dist.is_main:
                with open(self.output_dir / "log.txt", "a") as f:
                    f.write(json.dumps({**stats, "epoch": epoch}) + "\n")
            self.epoch, self.step_in_epoch = epoch + 1, 0
            if cfg.max_steps is not None and self.step >= cfg.max_steps:
                break
        if self.writer is not None:
            self.writer.flush()
        return stats

    def train_one_epoch(self) -> dict:
        """One epoch from ``step_in_epoch`` on; returns ``train_loss``, ``train_lr`` and throughput."""
        cfg, model = self.config, self.train_model
        model.train()
        n_batches, accum = len(self.loader), cfg.accum_iter
        world, rank, B = self.dist.world_size, self.dist.rank, cfg.data.batch_size
        L, mask_ratio = self.model.num_patches, cfg.model.mask_ratio
        flops_per_image = self.model.flops_per_image(mask_ratio)
        peak = peak_flops(self.device)

        loss_sum = torch.zeros((), device=self.device)
        first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
        logged_sum = torch.zeros((), device=self.device)
        seen, logged_seen, window_images, data_wait, window_wait = 0, 0, 0, 0.0, 0.0
        lr = self.optimizer.param_groups[0]["lr"]
        stats = {}
        from tqdm import tqdm

        # The bar on rank 0 in a terminal; None: tqdm leaves it out when stderr is a file, so logs hold plain lines.
        bar = tqdm(total=n_batches, initial=self.step_in_epoch, desc=f"epoch {self.epoch}",
                   disable=None if self.dist.is_main else True, dynamic_ncols=True, leave=True)
        window_start = fetch_start = time.perf_counter()
        for data_step, (images, _) in enumerate(self.loader.epoch(self.epoch, start=self.step_in_epoch),
                                                start=self.step_in_epoch):
            wait = time.perf_counter() - fetch_start
            data_wait += wait
            window_wait += wait
            update = (data_step + 1) % accum == 0 or data_step + 1 == n_batches
            if data_step % accum == 0:
                lr = lr_at(data_step / n_batches + self.epoch, self.base_lr, cfg.optim.min_lr,
                           cfg.optim.warmup_epochs, cfg.epochs)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr

            noise = torch.rand(world * B, L, device=self.device, generator=self.noise_generator)[rank::world]
            with self._no_sync(update), torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                                       enabled=self.autocast_dtype is not None):
                loss, _, _ = model(images, mask_ratio=mask_ratio, noise=noise)
            self.scaler.scale(loss / accum).backward()
            loss = loss.detach()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss),
                                    torch.full_like(first_bad, self.step + 1), first_bad)
            loss_sum += loss
            if update:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                if cfg.fsdp:
                    self.model.set_requires_gradient_sync(True)
                self.step += 1
            self.step_in_epoch = data_step + 1
            seen += 1
            window_images += B * world
            bar.update(1)

            last = self.step_in_epoch == n_batches or (cfg.max_steps is not None and self.step >= cfg.max_steps)
            if (update and self.step % cfg.log_every == 0) or last:
                self._check_finite(first_bad)
                mean_loss = all_reduce_sum(loss_sum.clone()).item() / (seen * world)
                window_loss = all_reduce_sum(loss_sum - logged_sum).item() / ((seen - logged_seen) * world)
                logged_sum, logged_seen = loss_sum.clone(), seen
                self.history.append((self.step, window_loss))
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                elapsed = time.perf_counter() - window_start
                images_per_s = window_images / max(elapsed, 1e-9)
                stats = {"train_loss": mean_loss, "train_lr": lr, "images_per_sec": images_per_s,
                         "data_wait_s": data_wait}
                line = (f"step {self.step}: loss {mean_loss:.4f}, lr {lr:.3g}, {images_per_s:,.0f} images/s, "
                        f"data wait {window_wait / max(elapsed, 1e-9):.0%}")
                if peak:
                    stats["mfu"] = images_per_s / world * flops_per_image / peak
                    line += f", MFU {stats['mfu']:.1%}"
                if self.device.type == "cuda":
                    stats["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    line += f", peak memory {stats['peak_memory_gb']:.1f} GiB"
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:,.0f}")
                if self.dist.is_main:
                    bar.write(line)
                    if self.writer is not None:
                        self.writer.add_scalar("train/loss", mean_loss, self.step)
                        self.writer.add_scalar("train/lr", lr, self.step)
                        self.writer.add_scalar("train/images_per_sec", images_per_s, self.step)
                window_images, window_wait, window_start = 0, 0.0, time.perf_counter()
            if update and cfg.save_last_every and self.step % cfg.save_last_every == 0 and not last:
                self._check_finite(first_bad)
                self.save(LAST)
            if cfg.max_steps is not None and self.step >= cfg.max_steps:
                break
            fetch_start = time.perf_counter()
        bar.close()
        self._check_finite(first_bad)
        return stats

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss (with ``--val_path``) and a reconstruction image, written by rank 0."""
        self.model.eval()
        stats = {}
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed + 1)
        mask_ratio = self.config.model.mask_ratio
        autocast = torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)
        if self.val_loader is not None:
            total = torch.zeros(2, device=self.device)
            for images, indices in self.val_loader.epoch(0):
                noise = torch.rand(images.shape[0], self.model.num_patches, device=self.device, generator=generator)
                with autocast:
                    loss, _, _ = self.train_model(images, mask_ratio=mask_ratio, noise=noise)
                valid = (indices >= 0).sum().to(self.device)
                total += torch.stack([loss.float() * valid, valid.float()])
            loss_sum, count = all_reduce_sum(total).tolist()
            stats["val_loss"] = loss_sum / max(count, 1)
            if self.dist.is_main:
                logger.info("epoch %d: validation loss %.4f on %d images", self.epoch, stats["val_loss"], int(count))
                if self.writer is not None:
                    self.writer.add_scalar("val/loss", stats["val_loss"], self.epoch)
        # Every rank runs the preview forward (a sharded model needs them all); rank 0 writes it.
        images = self._preview_images()
        noise = torch.rand(images.shape[0], self.model.num_patches, device=self.device, generator=generator)
        with autocast:
            _, pred, mask = self.model(images, mask_ratio=mask_ratio, noise=noise)
        if self.dist.is_main:
            grid = reconstruction_grid(self.model, images, pred.float(), mask)
            path = self.output_dir / f"reconstruction-epoch{self.epoch}.png"
            save_png(grid, path)
            if self.writer is not None:
                self.writer.add_image("val/reconstruction", grid, self.epoch)
        self.model.train()
        return stats

    def _preview_images(self, count: int = 8) -> torch.Tensor:
        loader = self.val_loader or self.loader
        files = getattr(loader, "files", None)
        size = self.config.data.input_size
        if not files:
            return torch.randn(count, 3, size, size, device=self.device)
        from PIL import Image

        batch = []
        for path in files[:count]:
            with Image.open(path) as img:
                batch.append(eval_transform(img.convert("RGB"), size))
        return normalize(torch.stack(batch).to(self.device), torch.float32)


def reconstruction_grid(model: MAEViT, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[3, rows*H, 4*W] in [0, 1]: per image, the original, the masked input, the reconstruction, and the
    reconstruction with the visible patches pasted back (as the official visualization shows them)."""
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
    return torch.cat(list(rows), dim=1).cpu()  # [3, N*H, 4W]


def save_png(image: torch.Tensor, path: Path) -> None:
    """[3, H, W] in [0, 1] -> PNG file."""
    from PIL import Image

    array = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    Image.fromarray(array).save(path)
