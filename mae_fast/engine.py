"""The run engine: one training loop, read top to bottom like the algorithm, for every task mae_fast trains.

build (process group, model, data, optimizer, resume) -> for each batch: learning rate, forward,
backward, optimizer step (:meth:`Engine.train_step`) -> log and checkpoint at their cadence -> at
each epoch's end: evaluate, checkpoint, one summary line.

A task is a subclass that supplies only what is its own: its model (:meth:`Engine.build_model`),
its loaders (:meth:`Engine.build_loaders`), its parameter groups (:meth:`Engine.param_groups`),
the loss of a step (:meth:`Engine.step_loss`), its evaluation (:meth:`Engine.evaluate`) and what
it says about itself (:meth:`Engine.describe_model`). Pretraining is
:class:`mae_fast.trainer.MAETrainer`, fine-tuning :class:`mae_fast.finetuner.FineTuner`. Everything
else is the engine's, once: the process group, precision and FP8, compilation, the DDP/FSDP2 wrap,
the optimizer and the official schedule (``lr = blr * effective_batch / 256`` unless ``--lr`` is
given, linear warmup then a half-cycle cosine to ``min_lr``, set every iteration from the
fractional epoch; a group's ``lr_scale`` multiplies it, as layer-wise decay needs), gradient
accumulation and clipping, the loss watch and good-checkpoint tracking, atomic checkpoints and
resume, progress lines and TensorBoard, Ctrl-C and faults. The step makes no host
synchronization except on logging and checkpoint steps: the loss stays on the device in between.

Checkpoints (``--checkpoint_format``, :mod:`mae_fast.checkpoint`) are one file gathered to rank 0 (``full``), or a
folder each rank writes its shard of in parallel (``dcp``, optionally in the background: ``--async_save``), which
resumes on any number of ranks. Checkpoints and faults: the rolling ``checkpoint-last.pth`` keeps the one before it as
``checkpoint-prev.pth`` while the loss was in its normal range (:mod:`mae_fast.monitor`); every
checkpoint records the loss statistics at save time. When the run stops (a NaN/inf loss, Ctrl-C),
or ends with its loss still out of its normal range (a diverged run), it names the newest checkpoint
written before the loss left its normal range; when a remote shard keeps failing, it writes
``checkpoint-last.pth`` where it stood (one rank) and names it.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mae_fast.checkpoint import (LAST, PREV, PendingSave, check_writable, checkpoint_name, checkpoints_newest_first,
                                 find_checkpoints, load_checkpoint, load_dcp_tensors, read_summary,
                                 remove_stale_temporaries, save_checkpoint, save_dcp_checkpoint)
from mae_fast.data.shards import ShardReadError
from mae_fast.distributed import all_reduce_sum, setup_distributed
from mae_fast.errors import (CheckpointError, ConfigError, DivergedError, NonFiniteLossError, OutputDirError,
                             TrainingStopped)
from mae_fast.fp8 import convert_to_fp8, fp8_unavailable_reason, precompute_fsdp_scales
from mae_fast.monitor import RECOVERY_STEPS, LossStats, LossWatch
from mae_fast.progress import Progress

logger = logging.getLogger("mae_fast")

# Dense bf16/fp16 tensor-core peaks (FLOP/s) from NVIDIA's data sheets, for model FLOP utilization, by the part of
# the name the driver reports: the first entry the name contains wins, so each variant comes before its family.
# H100 SXM ("NVIDIA H100 80GB HBM3") and H200: 989; H100 PCIe: 756; H100 NVL and H200 NVL: 835 (1,671 with
# sparsity). Unknown devices report none.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H200": 989e12, "H100": 989e12,
              "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12, "V100": 125e12}


def peak_flops_for(name: str) -> float | None:
    """The dense bf16 peak of the GPU the driver names ``name``, or None when unknown."""
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None when unknown (CPUs included)."""
    if device.type != "cuda":
        return None
    return peak_flops_for(torch.cuda.get_device_name(device))


def lr_at(epoch: float, base_lr: float, min_lr: float, warmup_epochs: float, epochs: int) -> float:
    """The official schedule at a fractional epoch: linear warmup, then half-cycle cosine to ``min_lr``."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(groups: list[dict], optimizer: str, lr: float, device: torch.device,
                    betas: tuple[float, float] = (0.9, 0.95)):
    """AdamW (fused on GPUs) or apex FusedAdam over parameter ``groups``.

    Raises:
        ConfigError: ``--optimizer apex`` without NVIDIA apex installed.
    """
    if optimizer == "apex":
        try:
            from apex.optimizers import FusedAdam
        except ImportError as exc:
            raise ConfigError("--optimizer: apex needs NVIDIA apex (apex.optimizers.FusedAdam), which is not "
                              "installed, got 'apex'; use --optimizer adamw") from exc
        return FusedAdam(groups, lr=lr, betas=betas, adam_w_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")


def resolve_precision(precision: str, device: torch.device, fp8_emulate: bool = False) -> str:
    """``auto`` -> bf16 on GPUs, fp32 on CPUs; checks that fp16 and fp8 can run on ``device``.

    Raises:
        ConfigError: fp16 on a CPU; fp8 without torchao, or on a device without FP8 tensor cores and
            without ``fp8_emulate``.
    """
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision: fp16 needs a GPU, got 'fp16'; use bf16 or fp32 on a CPU")
    if precision == "fp8":
        reason = fp8_unavailable_reason(device, fp8_emulate)
        if reason:
            raise ConfigError(f"--precision: fp8 cannot run here: {reason}, got 'fp8'; use bf16 (--fp8_emulate "
                              "emulates it, slowly, to check numerics)")
    return precision



def rng_state_for_rank(state: dict, rank: int, world_size: int) -> dict:
    """The generator states a checkpoint gives ``rank``: its own when the checkpoint kept every rank's for this many
    ranks (``rng_ranks``), else rank 0's (``rng``; another world size cannot resume the random streams exactly)."""
    ranks = state.get("rng_ranks")
    return ranks[rank] if ranks and len(ranks) == world_size else state.get("rng", {})


class Engine(abc.ABC):
    """One run of a task: ``fit()`` trains it. A task subclasses it and supplies the abstract methods.

    ``config`` is the task's configuration dataclass; the engine reads the fields every run has:
    ``seed``, ``device``, ``dist_timeout``, ``precision``, ``fp8_recipe``, ``fp8_emulate``,
    ``accum_iter``, ``global_batch``, ``epochs``, ``max_steps``, ``start_epoch``, ``output_dir``,
    ``log_dir``, ``resume``, ``log_every``, ``save_every``, ``save_last_every``, ``val_every``,
    ``loss_spike_factor``, ``compile``, ``compile_scope``, ``fsdp``, ``data.batch_size``,
    ``data.num_workers``, ``model.name``, ``data.input_size`` and ``optim`` (``blr``, ``min_lr``,
    ``warmup_epochs``, ``weight_decay``, ``optimizer``, optionally ``clip_grad``).

    Attributes:
        model: the unwrapped model (its ``state_dict()`` has the official keys).
        train_model: the model as the step calls it (FP8, compiled, DDP or FSDP2 as configured).
        loader, val_loader: the task's loaders; each batch is a tuple whose last entry is the
            images' dataset indices (-1 for marked slots).
        epoch, step_in_epoch, step: where the run stands (epoch, batches done in it, optimizer steps).
        history: ``(step, mean loss since the previous log line)`` at each log line.
        last_saved: the newest checkpoint this run wrote or resumed from.

    Raises (from the constructor and ``fit``):
        ConfigError, DataError, CheckpointError, BackendUnavailableError: a mistake in the flags or inputs,
            found before training starts where it can be.
        OutputDirError: the output folder cannot be written.
        NonFiniteLossError: the loss became NaN or inf; names the checkpoint to resume from.
        DivergedError: the run ended with its loss out of its normal range.
    """

    #: AdamW's betas: MAE pretraining's (0.9, 0.95); fine-tuning keeps PyTorch's (0.9, 0.999).
    betas: tuple[float, float] = (0.9, 0.95)

    def __init__(self, config):
        self.config = config
        self.dist = setup_distributed(config.device, config.dist_timeout)
        self.device = self.dist.device
        self.precision = resolve_precision(config.precision, self.device, config.fp8_emulate)
        # fp8: bf16 autocast around the FP8 block linears (mae_fast.fp8).
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp8": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        if config.fsdp_replicate > 1 and self.dist.world_size % config.fsdp_replicate:
            raise ConfigError(f"--fsdp_replicate: {config.fsdp_replicate} groups do not divide the "
                              f"{self.dist.world_size} ranks of this run; give a divisor of {self.dist.world_size}")
        self.checkpoint_format = config.checkpoint_format
        self._pending_save: PendingSave | None = None  # a DCP checkpoint being written in the background
        self._save_group = None  # the process group background saves coordinate over
        config.derive_accumulation(self.dist.world_size)
        self.effective_batch = config.data.batch_size * config.accum_iter * self.dist.world_size
        config.optim.check_schedule(self.effective_batch)
        self.base_lr = config.optim.peak_lr(self.effective_batch)
        self.output_dir = Path(config.output_dir)
        if self.dist.is_main:
            check_writable(self.output_dir)
            for path in remove_stale_temporaries(self.output_dir):
                logger.info("removed %s, left by a save that was interrupted", path)
            for warning in config.warnings(self.device):
                logger.warning("%s", warning)
            if config.global_batch is not None:
                logger.info("--global_batch %d = --batch_size %d x %d ranks x --accum_iter %d (derived)",
                            config.global_batch, config.data.batch_size, self.dist.world_size, config.accum_iter)
            if self.precision == "fp8" and not config.compile:
                logger.warning("--precision fp8 without --compile: the FP8 casts are not fused, so the step is "
                               "slower than bf16; add --compile")

        # The loaders first (a task's model may depend on its data: the number of classes), then the same initial
        # weights on every rank (FSDP shards them as they are; it broadcasts nothing).
        self.loader, self.val_loader = self.build_loaders()
        torch.manual_seed(config.seed)
        self.model = self.build_model().to(self.device)
        self.setup_task()

        torch.manual_seed(config.seed + self.dist.rank)
        self.train_model = self._wrap(self.model)  # before the optimizer: FSDP replaces the parameters
        self.optimizer = build_optimizer(self.param_groups(self.model), config.optim.optimizer, self.base_lr,
                                         self.device, self.betas)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.loss_watch = LossWatch(self.device, config.loss_spike_factor)

        self.epoch, self.step_in_epoch, self.step = config.start_epoch, 0, 0
        self.lr = self.base_lr
        self.last_saved: Path | None = None
        self.last_log_line: dict | None = None  # the newest epoch line of log.txt, also kept in checkpoints
        self.history: list[tuple[int, float]] = []
        self._warned_excursion = -1
        self._all_valid: dict[int, torch.Tensor] = {}
        self._resumed_sums: dict | None = None  # the epoch sums a mid-epoch resume carries on with
        self.stop_requested = False  # set by request_stop (the first Ctrl-C)
        self.interrupt_checkpoint: Path | None = None  # what the stop wrote
        self._step_on_disk = 0  # the step of the newest checkpoint this run wrote or resumed from
        self._resume()
        self.writer = None
        if self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter
            try:
                self.writer = SummaryWriter(log_dir=config.log_dir)
            except OSError as exc:
                raise OutputDirError(f"--log_dir {config.log_dir!r} cannot be written: {exc.strerror or exc}") from exc

    # ------------------------------------------------------------------ what a task supplies

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """The task's model, unwrapped, with its initial (or pretrained) weights; the engine moves it to the device."""

    @abc.abstractmethod
    def build_loaders(self):
        """``(train_loader, val_loader or None)``: objects with ``len()`` (batches per epoch), ``num_samples``,
        ``backend`` and ``epoch(e, start=0)`` yielding tuples whose last entry is the dataset indices (-1: a marked
        slot, which takes no part in the loss)."""

    @abc.abstractmethod
    def param_groups(self, model: nn.Module) -> list[dict]:
        """The optimizer's parameter groups (``params``, ``weight_decay``, optionally ``lr_scale``)."""

    @abc.abstractmethod
    def step_loss(self, inputs, weights: torch.Tensor, all_valid: bool) -> torch.Tensor:
        """The loss of one batch (a float32 scalar on the device), computed with :attr:`train_model` under the
        run's autocast. ``inputs`` is the batch without its indices (a tensor when that leaves one entry);
        ``weights`` [B] float32 on the device is 1 for the images that count and 0 for marked slots, and
        ``all_valid`` (known on the host, no synchronization) says whether every slot counts."""

    @abc.abstractmethod
    def evaluate(self) -> dict:
        """The end-of-epoch evaluation (every rank takes part); returns the figures for the epoch's log line."""

    @abc.abstractmethod
    def describe_model(self) -> str:
        """The start of the run's description: the model, its size and settings."""

    @abc.abstractmethod
    def flops_per_image(self) -> float:
        """Training FLOPs per image, for MFU."""

    def setup_task(self) -> None:
        """Anything else the task builds once model and loaders exist (before the wrap and the optimizer)."""

    def describe_compute(self) -> str:
        """What computes: the attention backend (and the task's kernels)."""
        dtype = self.autocast_dtype or torch.float32
        return f"attention {self.model.attn_backend_for(self.device, dtype)}"

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """The modules FSDP2 shards one by one (then the whole model): the transformer blocks."""
        return list(model.blocks)

    def split_batch(self, batch) -> tuple:
        """``(inputs, indices)`` of a loader's batch: the indices are its last entry."""
        *inputs, indices = batch
        return (inputs[0] if len(inputs) == 1 else tuple(inputs)), indices

    def on_start(self) -> None:
        """Called once before the first epoch of a run that starts at step 0."""

    def end_of_epoch(self, epoch: int) -> dict:
        """The task's other end-of-epoch figures (after :meth:`evaluate`), for the epoch's log line."""
        return {}

    def task_rng_state(self) -> dict:
        """Random-generator states of the task that a checkpoint keeps (for an exact resume)."""
        return {}

    def load_task_rng_state(self, rng: dict) -> None:
        """Restore what :meth:`task_rng_state` gave."""

    def log_line(self, stats: dict, epoch: int) -> dict:
        """The epoch's line in ``log.txt`` (one JSON object) from the epoch's figures."""
        return {**stats, "epoch": epoch}

    def check_resume_state(self, path: Path, state: dict) -> None:
        """Refuse a ``--resume`` checkpoint that is not one of this task's (before its parameters are compared)."""

    def evaluation_due(self, epoch: int) -> bool:
        """Whether :meth:`evaluate` runs at the end of ``epoch`` (0-based): every ``val_every`` epochs and the last."""
        return (epoch + 1) % self.config.val_every == 0 or epoch + 1 == self.config.epochs

    # ------------------------------------------------------------------ build

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """FP8 conversion, regional compilation, FSDP2 or DDP, whole-model compilation: in that order."""
        self.fp8_fsdp_all_gather = (self.precision == "fp8" and self.config.fsdp and self.device.type == "cuda"
                                    and self.config.fp8_recipe == "tensorwise")
        if self.precision == "fp8":
            convert_to_fp8(model, self.config.fp8_recipe, emulate=self.config.fp8_emulate,
                           fsdp_float8_all_gather=self.fp8_fsdp_all_gather)
        if self.config.compile and self.config.compile_scope == "blocks":
            model.compile_blocks()  # in place, before DDP or FSDP wrap the model
        if self.config.fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            if not dist.is_initialized():
                dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
            policy = MixedPrecisionPolicy(param_dtype=self.autocast_dtype, reduce_dtype=torch.float32) \
                if self.autocast_dtype else MixedPrecisionPolicy()
            mesh = None
            if self.config.fsdp_replicate > 1:  # HSDP: replicate over dim 0, shard over dim 1
                from torch.distributed.device_mesh import init_device_mesh

                replicas = self.config.fsdp_replicate
                mesh = init_device_mesh(self.device.type, (replicas, self.dist.world_size // replicas),
                                        mesh_dim_names=("replicate", "shard"))
            for block in self.shard_units(model):
                fully_shard(block, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)
        elif self.dist.distributed:
            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.config.compile and self.config.compile_scope == "model":
            # One graph for forward and loss (tested: no graph break, no recompilation across steps). Wrapped in DDP
            # or FSDP2, the graph is split where the wrapper needs it (DDP's optimizer splits it at the gradient
            # buckets, so the all-reduce overlaps the backward).
            model = torch.compile(model, fullgraph=not (self.config.fsdp or self.dist.distributed))
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

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (the last accumulation group of an epoch may be short)."""
        return math.ceil(len(self.loader) / self.config.accum_iter)

    @property
    def total_steps(self) -> int:
        """Optimizer steps the whole run takes: all epochs, or ``--max_steps`` when that is sooner."""
        total = self.config.epochs * self.steps_per_epoch
        return min(total, self.config.max_steps) if self.config.max_steps is not None else total

    def describe(self) -> str:
        """One paragraph on what runs: model, device, precision, compute, data, recipe."""
        fp8 = f" ({self.config.fp8_recipe})" if self.precision == "fp8" else ""
        compiled = f"compiled ({self.config.compile_scope}), " if self.config.compile else ""
        return (f"{self.describe_model()} on {self.device} x{self.dist.world_size}, precision {self.precision}{fp8}, "
                f"{compiled}{self.describe_compute()}; data {self.loader.backend} ({self.loader.num_samples} images, "
                f"{len(self.loader)} batches per epoch, {self.config.data.num_workers} workers); effective batch "
                f"{self.effective_batch}, lr {self.base_lr:.3g} (blr {self.config.optim.blr:g}), "
                f"{self.config.epochs} epochs ({self.total_steps} steps), warmup {self.config.optim.warmup_epochs}")

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Train to ``config.epochs`` (or ``--max_steps``); returns the last epoch's statistics."""
        cfg = self.config
        if self.dist.is_main:
            logger.info("%s", self.describe())
        self.progress = Progress(self.total_steps, self.step, cfg.epochs, self.device, self.dist.is_main, self.writer,
                                 self.flops_per_image(), peak_flops(self.device),
                                 self.dist.world_size, mfu_note=" of the bf16 peak" if self.precision == "fp8" else "")
        stats: dict = {}
        try:
            if self.step == 0:
                self.on_start()
            while self.epoch < cfg.epochs and not self.reached_max_steps():
                self.stop_if_requested()  # a Ctrl-C during the epoch's end (validation, kNN, saves) lands here
                stats = self.train_one_epoch()
                if self.step_in_epoch < len(self.loader):  # stopped by --max_steps in the middle of an epoch
                    self.progress.close()
                    self.save(LAST)
                    break
                stats = self.end_epoch(stats)
            self.wait_for_saves()
            self.check_finished_in_range()
        except ShardReadError as exc:
            raise self._stopped_by_data(exc) from exc
        finally:
            self.progress.close()
            self._finish_saves_on_the_way_out()
            if self.writer is not None:
                self.writer.flush()
        return stats

    def _stopped_by_data(self, exc: ShardReadError) -> TrainingStopped:
        """A remote shard that kept failing stops the run as other faults do: with a checkpoint of where it stood (one
        rank writes it now; with several, the others are not at a save, so the newest good one is named)."""
        self.progress.close()
        if self.step_in_epoch < len(self.loader):  # a partial accumulation group is replayed on resume
            self.step_in_epoch -= self.step_in_epoch % self.config.accum_iter
        checkpoint = self.save(LAST) if self.dist.world_size == 1 else self.good_checkpoint()
        return TrainingStopped(f"{exc}; stopped at step {self.step} (epoch {self.epoch + 1}/{self.config.epochs}); "
                               f"{'saved' if self.dist.world_size == 1 else 'the newest good checkpoint is'} "
                               f"{checkpoint or 'none'}", checkpoint=checkpoint)

    def train_one_epoch(self) -> dict:
        """One epoch from ``step_in_epoch`` on; returns the statistics of its last log line."""
        cfg, num_batches = self.config, len(self.loader)
        self.train_model.train()
        self.progress.start_epoch(self.epoch, self.step_in_epoch, num_batches, saved=self._resumed_sums)
        self._resumed_sums = None
        stats: dict = {}
        batches = self.loader.epoch(self.epoch, start=self.step_in_epoch)
        for batch_index, batch in enumerate(batches, start=self.step_in_epoch):
            inputs, indices = self.split_batch(batch)
            self.progress.data_ready()
            update = (batch_index + 1) % cfg.accum_iter == 0 or batch_index + 1 == num_batches
            if batch_index % cfg.accum_iter == 0:
                self.set_lr(self.epoch + batch_index / num_batches)
            valid = indices >= 0  # on the CPU, as the loaders deliver them: counting costs no synchronization
            num_valid = int(valid.sum())
            loss = self.train_step(inputs, update, valid)
            if num_valid:  # a batch of marked slots only has loss 0, which says nothing of the run's health
                self.loss_watch.observe(loss, self.step + 1)
            self.step += int(update)
            self.step_in_epoch = batch_index + 1
            self.progress.batch_done(loss, num_valid)
            if self._pending_save is not None:
                self._pending_save.publish_if_done()  # a background save's folder goes into place once written

            finished = self.step_in_epoch == num_batches or self.reached_max_steps()
            if (update and self.progress.line_due(self.step, cfg.log_every)) or finished:
                stats = self.log_step()
            if update and cfg.save_last_every and self.step % cfg.save_last_every == 0 and not finished:
                self.save(LAST)
            if self.reached_max_steps():
                break
            if update and not finished:  # at an epoch's last batch the epoch's end comes first
                self.stop_if_requested()
        self.check_loss()
        return stats

    def train_step(self, inputs, update: bool, valid: torch.Tensor | None = None) -> torch.Tensor:
        """One batch: forward (:meth:`step_loss`), backward, and with ``update`` the optimizer step (after clipping
        the gradient norm to ``optim.clip_grad`` when set). Returns the detached loss.

        ``valid`` ([B] bool on the CPU, None: all) marks the images that count: the others (a loader's padding
        slots and images that did not decode, index -1) take no part in the loss.
        """
        images = inputs if isinstance(inputs, torch.Tensor) else inputs[0]
        weights = self._image_weights(valid, images.shape[0])
        all_valid = valid is None or bool(valid.all())
        with self._no_sync(update), self._autocast():
            loss = self.step_loss(inputs, weights, all_valid)
        self.scaler.scale(loss / self.config.accum_iter).backward()
        if update:
            clip = getattr(self.config.optim, "clip_grad", None)
            if clip is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.config.fsdp:
                self.model.set_requires_gradient_sync(True)
            if self.fp8_fsdp_all_gather:
                precompute_fsdp_scales(self.model)
        return loss.detach()

    def _image_weights(self, valid: torch.Tensor | None, batch: int) -> torch.Tensor:
        """[B] float32 on the device: 1 for the images that count, 0 for marked slots. A batch with every image valid
        (nearly all of them) reuses one tensor of ones; the others copy theirs from pinned memory, without waiting."""
        if valid is None or bool(valid.all()):
            ones = self._all_valid.get(batch)
            if ones is None:
                ones = self._all_valid[batch] = torch.ones(batch, device=self.device)
            return ones
        weights = valid.to(torch.float32)
        if self.device.type == "cuda":
            weights = weights.pin_memory()
        return weights.to(self.device, non_blocking=True)

    def request_stop(self) -> None:
        """Ask the run to stop after the current optimizer step (or the epoch's end, when it is under way): it then
        writes ``checkpoint-last.pth`` there and raises KeyboardInterrupt. Safe to call from a signal handler; one
        rank only (the ranks of a distributed run would have to agree on the step)."""
        self.stop_requested = True

    def stop_if_requested(self) -> None:
        """With a stop requested: write ``checkpoint-last.pth`` at the current step unless a checkpoint of it is on
        disk, then raise KeyboardInterrupt.

        Raises:
            KeyboardInterrupt: a stop was requested (:attr:`interrupt_checkpoint` names what was written).
            NonFiniteLossError, OutputDirError: as :meth:`save`.
        """
        if not self.stop_requested:
            return
        if self.step != self._step_on_disk:
            self.progress.close()
            self.interrupt_checkpoint = self.save(LAST)
        raise KeyboardInterrupt

    def set_lr(self, epoch: float) -> None:
        """The official schedule at a fractional epoch, set on every parameter group (times its ``lr_scale``)."""
        optim = self.config.optim
        self.lr = lr_at(epoch, self.base_lr, optim.min_lr, optim.warmup_epochs, self.config.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * group.get("lr_scale", 1.0)

    def epoch_mean_lr(self, epoch: int) -> float:
        """The learning rate of ``epoch`` averaged over its batches, each at the rate it ran with: the official logs'
        ``train_lr`` (their metric logger averages the rate it records at every batch). Computed from the schedule,
        so a run resumed in the middle of the epoch logs the same value."""
        num_batches, accum, optim = len(self.loader), self.config.accum_iter, self.config.optim
        rates = (lr_at(epoch + (batch - batch % accum) / num_batches, self.base_lr, optim.min_lr, optim.warmup_epochs,
                       self.config.epochs) for batch in range(num_batches))
        return sum(rates) / num_batches

    def where(self) -> str:
        """Where the run stands, counted from 1 as every message counts: ``epoch 3/20, batch 5/32`` (the last batch
        done), or ``epoch 3/20 done`` at an epoch's end. (Files keep the official 0-based names: the third
        epoch's are ``checkpoint-2.pth`` and ``reconstruction-epoch2.png``.)"""
        if self.step_in_epoch == 0 and self.epoch > 0:
            return f"epoch {self.epoch}/{self.config.epochs} done"
        return f"epoch {self.epoch + 1}/{self.config.epochs}, batch {self.step_in_epoch}/{len(self.loader)}"

    def reached_max_steps(self) -> bool:
        return self.config.max_steps is not None and self.step >= self.config.max_steps

    def log_step(self) -> dict:
        """A log line (one synchronization): stop on a non-finite loss first, then print and record."""
        self.check_loss()
        stats = self.progress.log_step(self.step, self.step_in_epoch, self.lr)
        self.history.append((self.step, stats.pop("window_loss")))
        stats.pop("eta_s")
        return stats

    def end_epoch(self, stats: dict) -> dict:
        """Validate, checkpoint and write the epoch's line to log.txt; move to the next epoch."""
        cfg, epoch = self.config, self.epoch
        stats["train_lr"] = self.epoch_mean_lr(epoch)
        if self.evaluation_due(epoch):
            stats.update(self.evaluate())
        stats.update(self.end_of_epoch(epoch))
        self.last_log_line = self.log_line(stats, epoch)
        saved = []
        if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
            saved.append(self.save(f"checkpoint-{epoch}.pth"))
        saved.append(self.save(LAST))
        if self.dist.is_main:
            self._append_log_line(self.last_log_line)
        self.progress.end_epoch(stats, saved)
        self.epoch, self.step_in_epoch = epoch + 1, 0
        return stats

    # ------------------------------------------------------------------ the loss's health

    def check_loss(self) -> LossStats:
        """Stop on a NaN/inf loss seen on any rank, warn once when the loss leaves its normal range (one sync).

        Raises:
            NonFiniteLossError: naming the step, and the checkpoint to resume from.
        """
        stats = self.loss_watch.stats()
        if stats.first_nonfinite >= 0:
            good = self.good_checkpoint(stats)
            left = (f"; it had left its normal range at step {stats.excursion_start}"
                    if 0 <= stats.excursion_start < stats.first_nonfinite else "")
            raise NonFiniteLossError(
                f"the loss became non-finite at step {stats.first_nonfinite} ({self.where()}){left}; stopping "
                f"without saving. The newest checkpoint written before the loss left its normal range is "
                f"{good or 'none (none was written)'}", checkpoint=good)
        if stats.excursion_start >= 0 and stats.excursion_start != self._warned_excursion and self.dist.is_main:
            logger.warning("the loss left its normal range at step %d (above %g x its normal level %.4g); checkpoints "
                           "from step %d on are not named good until it has been back in range for %d steps",
                           stats.excursion_start, self.config.loss_spike_factor, stats.normal,
                           stats.excursion_start - 1, RECOVERY_STEPS)
        self._warned_excursion = stats.excursion_start
        return stats

    def check_finished_in_range(self) -> None:
        """At the end of a run: a loss still out of its normal range means the run diverged.

        Raises:
            DivergedError: naming where the loss left its range and the checkpoint from before that.
        """
        stats = self.check_loss()
        if stats.in_range():
            return
        good = self.good_checkpoint(stats)
        raise DivergedError(
            f"the loss left its normal range at step {stats.excursion_start} (above {self.config.loss_spike_factor:g} "
            f"x its normal level {stats.normal:.4g}) and was still out of it when the run ended at step {self.step} "
            f"({self.where()}): the run diverged; lower the learning rate (--lr, or --blr "
            f"{self.config.optim.blr:g}) or lengthen --warmup_epochs. The newest checkpoint written before the loss "
            f"left its normal range is {good or 'none (none was written)'}", checkpoint=good)

    def good_checkpoint(self, stats: LossStats | None = None) -> Path | None:
        """The newest checkpoint in the output folder whose parameters gave an in-range loss afterwards, written
        while no excursion was under way.

        Args:
            stats: the loss statistics to judge by (default: this rank's, without synchronizing).
        """
        stats = stats or self.loss_watch.stats(reduce=False)
        rank_of_name = {"checkpoint-last": 1, "checkpoint-prev": 0}  # at equal steps prefer a numbered checkpoint:
        best, best_key = None, None                                   # it is never rotated away
        for path in find_checkpoints(self.output_dir):
            summary = read_summary(path)
            if summary is None or summary["step"] > self.step or not stats.checkpoint_is_good(summary):
                continue
            key = (summary["step"], rank_of_name.get(path.stem, 2))
            if best_key is None or key > best_key:
                best, best_key = path, key
        return best

    # ------------------------------------------------------------------ checkpoints

    def _rng_states(self) -> list[dict]:
        """Every rank's generator states, in rank order (a collective when there are several ranks): drop path and
        mixup draw per rank, so a resume gives each rank its own."""
        rng = {"torch": torch.get_rng_state(), **self.task_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        if not self.dist.distributed:
            return [rng]
        gathered = [None] * self.dist.world_size
        dist.all_gather_object(gathered, rng)
        return gathered

    def _checkpoint_state(self, loss_stats: LossStats) -> dict:
        rng_ranks = self._rng_states()
        if self.checkpoint_format == "dcp":  # each rank's own shards (the whole tensors without FSDP)
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_state, optim_state = get_state_dict(self.model, self.optimizer)
        elif self.config.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state, optim_state = get_state_dict(self.model, self.optimizer, options=options)
        else:
            model_state, optim_state = self.model.state_dict(), self.optimizer.state_dict()
        return {"model": model_state, "optimizer": optim_state, "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "step": self.step,
                "world_size": self.dist.world_size,
                "config": dataclasses.asdict(self.config), "rng": rng_ranks[0], "loss_stats": loss_stats.as_dict(),
                "log_line": self.last_log_line, "epoch_sums": self._epoch_sums(),
                **({"rng_ranks": rng_ranks} if len(rng_ranks) > 1 else {})}

    #: The per-rank sums of an epoch in progress that a checkpoint keeps (see :meth:`Progress.state`).
    EPOCH_SUMS = ("loss_sum", "logged_sum", "images", "logged_images", "data_wait")

    def _epoch_sums(self) -> dict | None:
        """Every rank's running sums of the epoch in progress (a collective), so a run resumed mid-epoch logs the
        epoch mean of the uninterrupted run; None at an epoch's end or before training."""
        progress = getattr(self, "progress", None)
        if progress is None or getattr(progress, "epoch", None) != self.epoch or self.step_in_epoch >= len(self.loader):
            return None
        mine = progress.state()
        rows = torch.zeros(self.dist.world_size, len(self.EPOCH_SUMS), dtype=torch.float64, device=self.device)
        rows[self.dist.rank] = torch.tensor([float(mine[k]) for k in self.EPOCH_SUMS], dtype=torch.float64)
        return {"epoch": self.epoch, "ranks": all_reduce_sum(rows).cpu().tolist()}

    def _restored_epoch_sums(self, saved: dict | None) -> dict | None:
        """This rank's share of a checkpoint's epoch sums: its own row when the world size is the same, else the
        totals on rank 0 (the epoch mean is the same either way)."""
        if not saved or saved.get("epoch") != self.epoch or not self.step_in_epoch:
            return None
        rows = saved["ranks"]
        if len(rows) == self.dist.world_size:
            row = rows[self.dist.rank]
        else:
            row = [sum(column) if self.dist.is_main else 0.0 for column in zip(*rows)]
        return dict(zip(self.EPOCH_SUMS, row))

    def _state_is_finite(self) -> bool:
        finite = torch.ones((), device=self.device)
        for param in self.model.parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            finite = finite * torch.isfinite(local).all()
        return bool(all_reduce_sum(finite) == self.dist.world_size)

    def save(self, name: str) -> Path:
        """Write ``output_dir/name`` (rank 0; every rank takes part) unless the state is broken; returns the path.

        Saving ``checkpoint-last.pth`` first moves the previous one to ``checkpoint-prev.pth`` when its
        parameters are known good (see :mod:`mae_fast.monitor`); otherwise the older ``checkpoint-prev.pth`` stays.

        Raises:
            NonFiniteLossError: a NaN/inf loss was seen or a parameter is not finite; nothing is written.
            OutputDirError: the file cannot be written (every rank raises it); earlier checkpoints are intact.
        """
        self.wait_for_saves()  # a save never starts before the previous one is written
        loss_stats = self.check_loss()
        if not self._state_is_finite():
            good = self.good_checkpoint(loss_stats)
            raise NonFiniteLossError(f"the model has non-finite parameters at step {self.step}; not saving {name}. "
                                     f"The newest good checkpoint is {good or 'none (none was written)'}",
                                     checkpoint=good)
        state = self._checkpoint_state(loss_stats)  # every rank takes part when the state is sharded
        path = self.output_dir / checkpoint_name(name, self.checkpoint_format)
        keep = self._previous_last_name(loss_stats) if name == LAST and self.dist.is_main else None
        error, pending = None, None
        try:
            if self.checkpoint_format == "dcp":  # every rank writes its shard; rank 0 the rest and the rename
                tensors = {"model": state.pop("model"), "optimizer": state.pop("optimizer")}
                pending = save_dcp_checkpoint(tensors, state, path, keep, publishes=self.dist.is_main,
                                              background=self.config.async_save, process_group=self._save_pg())
                if not self.config.async_save:
                    pending.wait()
                    pending = None
            elif self.dist.is_main:
                save_checkpoint(state, path, keep_previous_as=keep)
        except OutputDirError as exc:
            error = exc
        # Every rank learns whether rank 0 could write, so none waits for a rank that stopped.
        failed = all_reduce_sum(torch.tensor(float(error is not None), device=self.device)).item()
        if failed:
            raise error or OutputDirError(f"rank 0 could not write {path}; see its error")
        self._pending_save = pending
        self.last_saved, self._step_on_disk = path, self.step
        return path

    def _save_pg(self):
        """The process group DCP saves coordinate over: the default one, or for background saves a gloo group of their
        own (their collectives run in another thread, beside the training's)."""
        if not self.config.async_save or not dist.is_initialized():
            return None
        if self._save_group is None:
            self._save_group = dist.new_group(backend="gloo")
        return self._save_group

    def wait_for_saves(self) -> None:
        """Wait until a background save is written and in place (every rank calls it at the same point).

        Raises:
            OutputDirError: the background write failed (every rank raises it); the checkpoints already there are
                intact.
        """
        pending, self._pending_save = self._pending_save, None
        if pending is not None:
            pending.wait()

    def _finish_saves_on_the_way_out(self) -> None:
        """On any exit from :meth:`fit`: the last background save is written before the process ends; on an error
        path, a failure of that write is logged rather than raised over the error under way."""
        try:
            self.wait_for_saves()
        except OutputDirError as exc:
            logger.error("%s", exc)

    def _previous_last_name(self, loss_stats: LossStats) -> Path | None:
        """Where the current checkpoint-last.pth goes when a new one is written: checkpoint-prev.pth if its
        parameters are known good, else nowhere (it is replaced and the older checkpoint-prev.pth stays)."""
        last = self.output_dir / checkpoint_name(LAST, self.checkpoint_format)
        summary = read_summary(last) if last.exists() else None
        good = summary is not None and loss_stats.checkpoint_is_good(summary)
        return self.output_dir / checkpoint_name(PREV, self.checkpoint_format) if good else None

    def _append_log_line(self, entry: dict) -> None:
        try:
            with open(self.output_dir / "log.txt", "a") as f:
                f.write(json.dumps(entry) + "\n")
        except OSError as exc:
            raise OutputDirError(f"cannot write log.txt in {str(self.output_dir)!r}: {exc.strerror or exc}") from exc

    def _restore_log_line(self, entry: dict | None) -> None:
        """Append the checkpoint's newest epoch line to log.txt if a run killed after saving never wrote it."""
        if not entry:
            return
        log = self.output_dir / "log.txt"
        epochs = set()
        if log.is_file():
            for line in log.read_text().splitlines():
                with contextlib.suppress(ValueError, AttributeError):
                    epochs.add(json.loads(line).get("epoch"))
        if entry.get("epoch") not in epochs:
            self._append_log_line(entry)

    def _resume(self) -> None:
        resume = self.config.resume
        if not resume:
            return
        path, state = self._read_resume_checkpoint()
        if path is None:
            if self.dist.is_main:
                logger.info("--resume auto: no checkpoint in %s, starting fresh", self.output_dir)
            return
        self.check_resume_state(path, state)
        self._check_fits(path, state["model"], state.get("config"))
        try:
            if state.get("dcp"):  # each rank reads its own shards, cut for this run's ranks
                from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

                model_state, optim_state = get_state_dict(self.model, self.optimizer)
                load_dcp_tensors(path, {"model": model_state, "optimizer": optim_state})
                set_state_dict(self.model, self.optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
            elif self.config.fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

                set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                               optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
            else:
                self.model.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {str(path)!r} does not fit this run's model/optimizer "
                                  f"(--model {self.config.model.name}): {str(exc).splitlines()[0]}") from exc
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        rng = rng_state_for_rank(state, self.dist.rank, self.dist.world_size)
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        self.load_task_rng_state(rng)
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.loss_watch.load(state.get("loss_stats"))
        self.last_log_line = state.get("log_line")
        if self.dist.is_main:
            self._restore_log_line(self.last_log_line)
        self.epoch, self.step, self.step_in_epoch = state["epoch"], state["step"], self._resumed_position(path, state)
        if self.step_in_epoch >= len(self.loader):
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self._resumed_sums = self._restored_epoch_sums(state.get("epoch_sums"))
        self.last_saved, self._step_on_disk = path, self.step
        if self.dist.is_main:
            logger.info("resumed from %s at step %d (%s)", path, self.step, self.where())
            if self.epoch >= self.config.epochs:
                logger.info("the run in %s already finished its %d epochs; raise --epochs to train longer", path,
                            self.config.epochs)

    def _resumed_position(self, path: Path, state: dict) -> int:
        """The batch to resume at in the checkpoint's epoch, in this run's batches: a checkpoint written by another
        number of ranks (or batch size) resumes at the same image of the epoch's order.

        Raises:
            CheckpointError: that image does not begin one of this run's global batches.
        """
        done = state.get("step_in_epoch", 0)
        saved_world = state.get("world_size", len(state.get("rng_ranks") or [None]))
        saved_batch = ((state.get("config") or {}).get("data") or {}).get("batch_size", self.config.data.batch_size)
        images, per_batch = done * saved_world * saved_batch, self.dist.world_size * self.config.data.batch_size
        if images % per_batch:
            raise CheckpointError(f"checkpoint {str(path)!r} stopped {images} images into epoch {self.epoch + 1} "
                                  f"({saved_world} ranks x --batch_size {saved_batch}), which is not a whole number of "
                                  f"this run's batches ({self.dist.world_size} ranks x --batch_size "
                                  f"{self.config.data.batch_size}); resume with a batch that divides it, or from an "
                                  f"epoch's end (checkpoint-<epoch>)")
        return images // per_batch

    def _read_resume_checkpoint(self) -> tuple[Path | None, dict | None]:
        """``--resume``'s checkpoint and its state. With ``auto``, the newest in the output folder that can be read:
        one cut short or damaged (a copy interrupted, a full disk) is passed over with one warning, so the run
        resumes from ``checkpoint-prev.pth`` when ``checkpoint-last.pth`` is broken.

        Raises:
            CheckpointError: the named checkpoint (or, with ``auto``, every one there) cannot be read.
        """
        if self.config.resume != "auto":
            path = Path(self.config.resume)
            return path, load_checkpoint(path)
        unreadable = []
        for path in checkpoints_newest_first(self.output_dir):
            try:
                state = load_checkpoint(path)
            except CheckpointError as exc:
                unreadable.append((path, exc))
                continue
            if unreadable and self.dist.is_main:
                logger.warning("--resume auto: %s cannot be read (%s); resuming from %s, the newest checkpoint that "
                               "can", ", ".join(p.name for p, _ in unreadable), unreadable[0][1], path.name)
            return path, state
        if unreadable:
            raise unreadable[0][1]
        return None, None

    def _check_fits(self, path: Path, saved: dict, saved_config: dict | None) -> None:
        """Refuse a checkpoint whose parameters this run's model does not have, naming the first differences.

        Raises:
            CheckpointError: naming up to three mismatched keys with both shapes, and the ``--model`` and
                ``--input_size`` the checkpoint was written with.
        """
        own = self.model.state_dict()
        problems = [f"{key} is missing from the checkpoint" if key not in saved else
                    f"{key} is {list(saved[key].shape)} in the checkpoint, {list(value.shape)} here"
                    for key, value in own.items() if key not in saved or tuple(saved[key].shape) != tuple(value.shape)]
        problems += [f"{key} is in the checkpoint, not in this model" for key in saved if key not in own]
        if not problems:
            return
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        written = ""
        if isinstance(saved_config, dict):
            name = (saved_config.get("model") or {}).get("name")
            size = (saved_config.get("data") or {}).get("input_size")
            if name and size:
                written = f"; it was written with --model {name} --input_size {size}: resume with those"
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this run's model (--model "
                              f"{self.config.model.name} --input_size {self.config.data.input_size}): "
                              f"{'; '.join(problems[:3])}{more}{written}")

