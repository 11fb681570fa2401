"""The configuration tree of a pretraining run: one dataclass per concern, each field documented.

Every field is validated in ``__post_init__``; a bad value raises :class:`~mae_fast.errors.ConfigError`
(a ``ValueError``) naming the command-line flag, the value and what would work, before any work
starts. Each field's docstring is its ``--help`` text. Defaults follow the official MAE
``main_pretrain.py``, except that a run without ``--data_path`` is the built-in demo: a tiny
model on the built-in image set that finishes in minutes on a CPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields

from mae_fast.errors import CheckpointError, ConfigError
from mae_fast.presets import CPU_PRESETS, PRESETS, patch_size_of

# Nothing here imports torch, so that a mistake in the flags is one line before torch loads (seconds). The names the
# modules that run them define (mae_fast.attention.ATTN_BACKENDS, mae_fast.ops.dispatch.BACKENDS,
# mae_fast.fp8.FP8_RECIPES) are repeated here for that reason; a test checks that they agree.
ATTN_BACKENDS = ("auto", "flash_attn", "sdpa", "math")
KERNEL_BACKENDS = ("auto", "cuda", "triton", "torch")
FP8_RECIPES = ("tensorwise", "rowwise")
DATA_BACKENDS = ("auto", "dali", "torch", "synthetic")
PRECISIONS = ("auto", "bf16", "fp16", "fp32", "fp8")
OPTIMIZERS = ("adamw", "apex")
COMPILE_SCOPES = ("model", "blocks")
#: --checkpoint_format (mae_fast.checkpoint.CHECKPOINT_FORMATS; kept here so that checking flags needs no torch).
CHECKPOINT_FORMATS = ("full", "dcp")

# Values that depend on whether this is the demo (no --data_path) or a real run.
OFFICIAL_DEFAULTS = dict(model="mae_vit_large_patch16", input_size=224, batch_size=64, epochs=400, warmup_epochs=40)
DEMO_DEFAULTS = dict(model="mae_vit_tiny_patch16", input_size=64, batch_size=32, epochs=20, warmup_epochs=2)


def is_checkpoint_path(path: str) -> bool:
    """Whether ``path`` (``~`` expanded) is a checkpoint file or a DCP checkpoint folder (one with a ``.metadata``)."""
    path = os.path.expanduser(path)
    return os.path.isfile(path) or os.path.isfile(os.path.join(path, ".metadata"))


def _error(flag: str, value, why: str) -> ConfigError:
    return ConfigError(f"--{flag}: {why}, got {value!r}")


def _positive_int(flag: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _error(flag, value, "must be a positive integer")


def _non_negative(flag: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
        raise _error(flag, value, "must be a finite number >= 0")


def _non_negative_int(flag: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _error(flag, value, "must be an integer >= 0")


def default_num_workers() -> int:
    """Loader workers per process: the CPU cores this process may use, shared among the ranks of the node, at most 10
    (the official default)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, min(10, cores // local_ranks))


def _check_creatable(flag: str, path) -> None:
    """Refuse a folder that cannot be created: the nearest part of ``path`` that exists is a file, or a folder this
    process cannot write into. Nothing is created."""
    existing = os.path.abspath(os.path.expanduser(str(path)))
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise _error(flag, path, f"cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _error(flag, path, f"cannot be created: the folder {existing} is not writable")


def _check_patches_kept_and_masked(input_size: int, patch: int, mask_ratio: float) -> None:
    """Refuse an image size and mask ratio that leave no visible patch or no masked one (nothing to encode or nothing
    to reconstruct); the count is the masking's own, ``int(L * (1 - mask_ratio))``."""

    def num_kept(num_patches: int, ratio: float) -> int:  # mae_fast.ops.sample_mask.num_kept (a test checks it)
        return int(num_patches * (1 - ratio))

    patches = (input_size // patch) ** 2
    if patches < 2:
        raise _error("input_size", input_size, f"{input_size} px gives {patches} patch of {patch} px; MAE needs at "
                     f"least two (one kept, one masked): use {2 * patch} or more")
    kept = num_kept(patches, mask_ratio)
    if not 1 <= kept < patches:
        largest = math.floor((1 - 1 / patches) * 1000) / 1000
        while num_kept(patches, largest) < 1:  # 1 - 1/L itself can keep 0 (int(5 x 0.19999...))
            largest = round(largest - 0.001, 3)
        raise _error("mask_ratio", mask_ratio, f"keeps int({patches} x (1 - {mask_ratio:g})) = {kept} of the {patches} "
                     f"patches at --input_size {input_size}; at least one must stay visible: use at most "
                     f"{largest:g} here, or a larger --input_size")


def _choice(flag: str, value, choices) -> None:
    if value not in choices:
        raise _error(flag, value, f"must be one of {', '.join(map(str, choices))}")


def _check_attn_backend(value: str) -> None:
    """--attn_backend is a known backend, and flash_attn only where it can run."""
    _choice("attn_backend", value, ATTN_BACKENDS)
    if value == "flash_attn":
        from mae_fast.attention import flash_attn_unavailable_reason

        reason = flash_attn_unavailable_reason()
        if reason:
            raise _error("attn_backend", value, f"flash_attn cannot run: {reason}; or use --attn_backend auto or sdpa")


@dataclass
class DataConfig:
    """What to read and how."""

    data_path: str | None = None
    """--data_path: an ImageNet-style folder (train/<class>/*), a flat folder of images, or a WebDataset shard set (a
    folder of .tar files, a brace pattern in quotes, which keep the shell from expanding it, such as
    'train-{000000..000127}.tar', a text file listing shards, or pipe:/http(s) URLs; see python -m mae_fast.prepare);
    unset: the built-in set."""
    val_path: str | None = None
    """--val_path: held-out images for the validation loss and reconstruction images (optional)."""
    backend: str = "auto"
    """--data_backend: auto (dali if installed, else torch), dali, torch or synthetic."""
    input_size: int | None = None
    """--input_size: crop size in pixels, a multiple of the model's patch size (default 224; 64 for the built-in
    demo)."""
    batch_size: int | None = None
    """--batch_size: images per GPU per step (default 64; 32 for the demo)."""
    num_workers: int | None = None
    """--num_workers: DataLoader workers (torch backend) or DALI threads per process (default: the cores this
    process may use, shared among the node's ranks, at most 10)."""
    verify_images: str = "header"
    """--verify_images: check an image folder's files before training by a cheap header check ("header") or a full
    decode ("decode"). Shard members are checked as they are read: by their header, or with "decode" (DALI backend)
    by a full CPU decode before DALI gets them; the torch backend decodes every member anyway and marks those that
    fail, and DALI, when it fails on a batch, decodes its members on the CPU and leaves out those that fail."""
    shard_timeout: float = 600.0
    """--shard_timeout: seconds a pipe: command or URL shard may send nothing, at its start or mid-shard, before
    its read counts as failed (it is tried again a few times, with waits, then the run stops with a checkpoint)."""
    synthetic_samples: int = 12800
    """--synthetic_samples: images per epoch for the synthetic backend."""
    builtin_count: int = 1024
    """Images in the built-in set."""
    builtin_size: int = 96
    """Side of the built-in images in pixels."""

    def __post_init__(self):
        _choice("data_backend", self.backend, DATA_BACKENDS)
        _choice("verify_images", self.verify_images, ("header", "decode"))
        if self.input_size is not None:
            _positive_int("input_size", self.input_size)
        if self.batch_size is not None:
            _positive_int("batch_size", self.batch_size)
        if self.num_workers is None:
            self.num_workers = default_num_workers()
        _non_negative_int("num_workers", self.num_workers)
        _positive_int("synthetic_samples", self.synthetic_samples)
        _non_negative("shard_timeout", self.shard_timeout)
        if self.shard_timeout <= 0:
            raise _error("shard_timeout", self.shard_timeout, "must be a positive number of seconds")
        from mae_fast.data.shards import MAX_PATTERN_NAMES, _has_braces, brace_count, is_shard_spec
        from mae_fast.errors import DataError

        for flag, path in (("data_path", self.data_path), ("val_path", self.val_path)):
            if path is None:
                continue
            if _has_braces(str(path)):
                try:
                    count = brace_count(str(path))
                except DataError as exc:
                    raise _error(flag, path, str(exc)) from None
                if count > MAX_PATTERN_NAMES:
                    raise _error(flag, path, f"the brace pattern names {count:,} shards, more than the "
                                 f"{MAX_PATTERN_NAMES:,} a shard set may have; check the range")
            if os.path.isfile(os.path.expanduser(path)) and not is_shard_spec(path):
                raise _error(flag, path, "is a file that is neither a .tar shard nor a text list of shards (one path "
                             "or URL per line); for image files give the folder that holds them")
            if not os.path.isdir(os.path.expanduser(path)) and not is_shard_spec(path):
                raise _error(flag, path, "is neither an existing folder nor a shard set (.tar files, a brace pattern, "
                             "a list file, or pipe:/http(s) URLs)")


@dataclass
class ModelConfig:
    """Which MAE and which kernels."""

    name: str | None = None
    """--model: a preset (listed below; default mae_vit_large_patch16; mae_vit_tiny_patch16 for the demo)."""
    mask_ratio: float = 0.75
    """--mask_ratio: fraction of patches removed, in (0, 1); the loss is computed on the removed ones."""
    norm_pix_loss: bool = False
    """--norm_pix_loss: normalize each target patch by its mean and variance."""
    attn_backend: str = "auto"
    """--attn_backend: auto, flash_attn, sdpa or math."""
    kernel_backend: str = "auto"
    """--kernel_backend: auto, cuda, triton or torch for the fused ops."""
    grad_checkpointing: bool = False
    """--grad_checkpointing: recompute blocks in backward to save activation memory."""

    def __post_init__(self):
        if self.name is not None:
            _choice("model", self.name, tuple(PRESETS))
        if isinstance(self.mask_ratio, bool) or not isinstance(self.mask_ratio, (int, float)) \
                or not 0 < self.mask_ratio < 1:
            raise _error("mask_ratio", self.mask_ratio, "must be in (0, 1): with no patch removed the loss is 0 and "
                         "nothing trains; the official value is 0.75")
        _check_attn_backend(self.attn_backend)
        _choice("kernel_backend", self.kernel_backend, KERNEL_BACKENDS)


@dataclass
class OptimConfig:
    """AdamW and its schedule, the official recipe."""

    lr: float | None = None
    """--lr: absolute (peak) learning rate; unset: blr * effective batch / 256."""
    blr: float = 1e-3
    """--blr: base learning rate for an effective batch of 256."""
    min_lr: float = 0.0
    """--min_lr: the floor the cosine schedule decays to; at most the peak learning rate."""
    weight_decay: float = 0.05
    """--weight_decay: AdamW weight decay (not applied to biases and 1-D parameters)."""
    warmup_epochs: float | None = None
    """--warmup_epochs: linear warmup length in epochs (default 40; 2 for the demo)."""
    optimizer: str = "adamw"
    """--optimizer: adamw (torch.optim.AdamW, fused on GPUs) or apex (NVIDIA apex FusedAdam)."""

    def __post_init__(self):
        if self.lr is not None:
            _non_negative("lr", self.lr)
        _non_negative("blr", self.blr)
        _non_negative("min_lr", self.min_lr)
        _non_negative("weight_decay", self.weight_decay)
        if self.warmup_epochs is not None:
            _non_negative("warmup_epochs", self.warmup_epochs)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.lr is not None and self.min_lr > self.lr:
            raise _error("min_lr", self.min_lr, f"must not exceed the peak learning rate --lr {self.lr:g}")

    def peak_lr(self, effective_batch: int) -> float:
        """The peak learning rate: ``--lr``, or ``blr * effective_batch / 256`` (the official rule)."""
        return self.lr if self.lr is not None else self.blr * effective_batch / 256

    def check_schedule(self, effective_batch: int) -> None:
        """Refuse a ``--min_lr`` above the peak learning rate, which is known once the world size is.

        Raises:
            ConfigError: naming --min_lr, its value and the peak with how it was computed.
        """
        peak = self.peak_lr(effective_batch)
        if self.min_lr > peak:
            how = f"--lr {self.lr:g}" if self.lr is not None else \
                f"--blr {self.blr:g} x effective batch {effective_batch} / 256"
            raise _error("min_lr", self.min_lr, f"must not exceed the peak learning rate {peak:g} ({how})")


@dataclass
class RunConfig:
    """A whole pretraining run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int | None = None
    """--epochs: epochs to train (default 400; 20 for the demo)."""
    start_epoch: int = 0
    """--start_epoch: first epoch, 0-based as in the official script (1 skips the first), below --epochs (a checkpoint
    given by --resume overrides it)."""
    accum_iter: int = 1
    """--accum_iter: gradient accumulation steps per optimizer step (derived from --global_batch when that is
    given)."""
    global_batch: int | None = None
    """--global_batch: the effective batch per optimizer step that a recipe names (4096 in the official ViT-L
    recipe); --accum_iter is then derived as global_batch / (batch_size x world size)."""
    output_dir: str = "./output_dir"
    """--output_dir: checkpoints, log.txt and reconstruction images."""
    log_dir: str | None = None
    """--log_dir: TensorBoard logs (default: output_dir)."""
    resume: str = ""
    """--resume: a checkpoint path, or "auto" for the newest in --output_dir; unset: start fresh."""
    seed: int = 0
    """--seed: base seed; each rank adds its rank."""
    precision: str = "auto"
    """--precision: auto (bf16 on a GPU, fp32 on a CPU), bf16, fp16 (GPU only, with a gradient scaler), fp32, or
    fp8: bf16 with the blocks' linear layers in FP8 through torchao (GPUs with FP8 tensor cores; use it with
    --compile, which its speed needs)."""
    fp8_recipe: str = "tensorwise"
    """--fp8_recipe: with --precision fp8, tensorwise (one scale per tensor: the cheapest scales, float8
    all-gather under --fsdp) or rowwise (one scale per row: more robust to outliers, more scaling work)."""
    fp8_emulate: bool = False
    """--fp8_emulate: with --precision fp8, emulate the FP8 matmuls where there are no FP8 tensor cores (CPUs, older
    GPUs): same casts and scales, slow; for checking numerics."""
    compile: bool = False
    """--compile: torch.compile the model (see --compile_scope)."""
    compile_scope: str = "model"
    """--compile_scope: with --compile, "model" (one graph for the whole model: the most fusion, the longest
    compile) or "blocks" (each transformer block on its own; identical blocks share one compiled graph)."""
    fsdp: bool = False
    """--fsdp: shard parameters, gradients and optimizer state (FSDP2) instead of DDP."""
    fsdp_replicate: int = 1
    """--fsdp_replicate: with --fsdp, R groups of ranks each hold a replica, sharded within the group (HSDP: a 2-D
    device mesh of R x world_size/R; across nodes, R = the number of nodes keeps the all-gathers on NVLink); must
    divide the number of ranks (1: shard over all ranks)."""
    checkpoint_format: str | None = None
    """--checkpoint_format: full (one file, model and optimizer gathered to rank 0, the official keys) or dcp (a
    folder, each rank writing its shard in parallel through torch.distributed.checkpoint; it resumes on any number
    of ranks) (default: dcp under --fsdp, full otherwise)."""
    async_save: bool = False
    """--async_save: write DCP checkpoints in the background (from a copy in CPU memory) while training goes on; a
    save waits for the previous one, and the run ends only once the last is written."""
    save_every: int = 20
    """--save_every: write checkpoint-<epoch>.pth every N epochs (and at the end); <epoch> is 0-based, as in the
    official names: checkpoint-19.pth is the 20th epoch's."""
    save_last_every: int = 500
    """--save_last_every: write the rolling checkpoint-last.pth every N optimizer steps (0: only at epoch ends); the
    one before it is kept as checkpoint-prev.pth while the loss was in its normal range."""
    loss_spike_factor: float = 3.0
    """--loss_spike_factor: a step loss above this many times its normal level (the median of the recent in-range
    losses, at most the loss the run started at) counts as having left the normal range (as NaN and inf do):
    checkpoints from then on are not named good, and a run that ends out of range exits 1 (0: only NaN and inf
    count)."""
    dist_timeout: float = 900.0
    """--dist_timeout: seconds a collective may wait for the other ranks before the job stops with an error (a
    stalled or dead rank); above a first compile and a large checkpoint write."""
    log_every: int = 20
    """--log_every: steps between log lines (the only steps that synchronize with the device)."""
    val_every: int = 1
    """--val_every: validate every N epochs when --val_path is given."""
    knn_every: int | None = None
    """--knn_every: every N epochs (and before the first), the weighted kNN top-1 of the frozen encoder's features
    on --val_path, which needs class sub-folders (0: off; default 0, 5 for the built-in demo)."""
    knn_train_path: str | None = None
    """--knn_train_path: the labeled memory bank for the kNN monitor, ImageNet layout (default: --data_path)."""
    knn_train_size: int = 10000
    """--knn_train_size: at most this many memory-bank images, a fixed subset."""
    knn_pool: str = "mean"
    """--knn_pool: the kNN monitor's features: mean of the patch tokens, or the cls token."""
    max_steps: int | None = None
    """--max_steps: stop after this many optimizer steps in total (for smoke tests and benchmarks)."""
    device: str = "auto"
    """--device: auto (cuda when a GPU is available), cuda or cpu."""

    def __post_init__(self):
        demo = self.data.data_path is None and self.data.backend != "synthetic"
        self._apply_defaults(DEMO_DEFAULTS if demo else OFFICIAL_DEFAULTS)
        self._check_input_size(patch_size_of(self.model.name))
        _check_patches_kept_and_masked(self.data.input_size, patch_size_of(self.model.name), self.model.mask_ratio)
        self._check_run()
        if self.knn_every is None:
            self.knn_every = 5 if demo else 0
        _non_negative_int("knn_every", self.knn_every)
        _positive_int("knn_train_size", self.knn_train_size)
        _choice("knn_pool", self.knn_pool, ("mean", "cls"))
        if self.knn_every and not demo and self.data.val_path is None:
            raise _error("knn_every", self.knn_every, "needs --val_path, a labeled validation folder (class "
                         "sub-folders)")
        if self.knn_train_path is not None and not os.path.isdir(os.path.expanduser(self.knn_train_path)):
            raise _error("knn_train_path", self.knn_train_path, "is not an existing folder")

    def _apply_defaults(self, defaults: dict) -> None:
        """Fill the unset model, input size, batch size, epochs and warmup from ``defaults``."""
        if self.model.name is None:
            self.model.name = defaults["model"]
        if self.data.input_size is None:
            self.data.input_size = defaults["input_size"]
        if self.data.batch_size is None:
            self.data.batch_size = defaults["batch_size"]
        if self.epochs is None:
            self.epochs = defaults["epochs"]
        if self.optim.warmup_epochs is None:
            self.optim.warmup_epochs = defaults["warmup_epochs"]

    def _check_input_size(self, patch: int) -> None:
        if self.data.input_size % patch:
            below, above = self.data.input_size // patch * patch, (self.data.input_size // patch + 1) * patch
            valid = f"{below} or {above}" if below else str(above)
            raise _error("input_size", self.data.input_size, f"must be a multiple of the patch size {patch} of "
                         f"--model {self.model.name}, for example {valid}")

    def _check_run(self) -> None:
        """The checks of the settings every run has (the engine's), whatever its task."""
        _positive_int("epochs", self.epochs)
        _non_negative_int("start_epoch", self.start_epoch)
        if self.start_epoch >= self.epochs:
            raise _error("start_epoch", self.start_epoch, f"must be below --epochs {self.epochs} (nothing would train)")
        _positive_int("accum_iter", self.accum_iter)
        _choice("precision", self.precision, PRECISIONS)
        _choice("fp8_recipe", self.fp8_recipe, FP8_RECIPES)
        if self.global_batch is not None:
            _positive_int("global_batch", self.global_batch)
        _choice("compile_scope", self.compile_scope, COMPILE_SCOPES)
        _positive_int("save_every", self.save_every)
        _non_negative_int("save_last_every", self.save_last_every)
        _non_negative("loss_spike_factor", self.loss_spike_factor)
        if self.loss_spike_factor and self.loss_spike_factor <= 1:
            raise _error("loss_spike_factor", self.loss_spike_factor, "must be above 1 (or 0 to turn it off)")
        _non_negative("dist_timeout", self.dist_timeout)
        if self.dist_timeout <= 0:
            raise _error("dist_timeout", self.dist_timeout, "must be a positive number of seconds")
        _positive_int("log_every", self.log_every)
        _positive_int("val_every", self.val_every)
        if self.max_steps is not None:
            _positive_int("max_steps", self.max_steps)
        _choice("device", self.device, ("auto", "cuda", "cpu"))
        _positive_int("fsdp_replicate", self.fsdp_replicate)
        if self.fsdp_replicate > 1 and not self.fsdp:
            raise _error("fsdp_replicate", self.fsdp_replicate, "needs --fsdp (it replicates FSDP's shards over "
                         "groups of ranks)")
        if self.checkpoint_format is None:
            self.checkpoint_format = "dcp" if self.fsdp else "full"
        _choice("checkpoint_format", self.checkpoint_format, CHECKPOINT_FORMATS)
        if self.async_save and self.checkpoint_format != "dcp":
            raise _error("async_save", True, "writes DCP checkpoints in the background; add --checkpoint_format dcp")
        resume = os.path.expanduser(self.resume)
        if self.resume not in ("", "auto") and not is_checkpoint_path(resume):
            what = "is a folder, not a checkpoint file or a DCP checkpoint folder (it has no .metadata)" \
                if os.path.isdir(resume) else "does not exist"
            raise CheckpointError(f"--resume: checkpoint {self.resume!r} {what}; give a checkpoint, or auto for "
                                  "the newest in --output_dir")
        if self.log_dir is None:
            self.log_dir = self.output_dir
        else:
            _check_creatable("log_dir", self.log_dir)

    def derive_accumulation(self, world_size: int) -> None:
        """With --global_batch, set --accum_iter to global_batch / (batch_size x world_size).

        Raises:
            ConfigError: the global batch is not a whole number of steps' batches (naming the three numbers), is
                smaller than one step's batch, or disagrees with an explicit --accum_iter.
        """
        if self.global_batch is None:
            return
        per_step = self.data.batch_size * world_size
        if self.global_batch < per_step:
            raise _error("global_batch", self.global_batch, f"must be at least one step's batch, --batch_size "
                         f"{self.data.batch_size} x {world_size} ranks = {per_step}")
        if self.global_batch % per_step:
            raise _error("global_batch", self.global_batch,
                         f"must be a multiple of --batch_size {self.data.batch_size} "
                         f"x {world_size} ranks = {per_step}")
        accum = self.global_batch // per_step
        if self.accum_iter not in (1, accum):
            raise _error("accum_iter", self.accum_iter, f"disagrees with --global_batch {self.global_batch} = "
                         f"--batch_size {self.data.batch_size} x {world_size} ranks x {accum}; give one of the two")
        self.accum_iter = accum

    @property
    def is_demo(self) -> bool:
        """True for the built-in demo: no --data_path and not the synthetic backend."""
        return self.data.data_path is None and self.data.backend != "synthetic"

    def warnings(self, device=None) -> list[str]:
        """Settings that run but are likely mistakes, one sentence each (the trainer logs them once).

        Args:
            device: the ``torch.device`` the run trains on (a preset meant for GPUs on a CPU is named), or None.
        """
        found = []
        if self.optim.warmup_epochs >= self.epochs:
            found.append(f"--warmup_epochs {self.optim.warmup_epochs:g} is not below --epochs {self.epochs}: the "
                         "learning rate never reaches its peak and the cosine decay never starts")
        if device is not None and device.type == "cpu" and self.model.name not in CPU_PRESETS:
            official = "" if self.is_demo else " (with --data_path, each flag left out takes the official recipe's " \
                f"value: --model {OFFICIAL_DEFAULTS['model']}, --input_size {OFFICIAL_DEFAULTS['input_size']}, " \
                f"--batch_size {OFFICIAL_DEFAULTS['batch_size']}, --epochs {OFFICIAL_DEFAULTS['epochs']})"
            found.append(f"--model {self.model.name} at {self.data.input_size} px, batch {self.data.batch_size}, runs "
                         f"on a CPU: it is meant for GPUs and trains very slowly here{official}; the presets for CPUs "
                         f"are {' and '.join(CPU_PRESETS)}, as in the built-in demo (--model {DEMO_DEFAULTS['model']} "
                         f"--input_size {DEMO_DEFAULTS['input_size']} --batch_size {DEMO_DEFAULTS['batch_size']})")
        return found


def field_docs(cls) -> dict[str, str]:
    """Field name -> its docstring (the string literal under it), for --help."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = nxt.value.value
    return docs


# ---------------------------------------------------------------------------------------------- fine-tuning

#: Fine-tuning's defaults where they differ from pretraining's or from one another: the official main_finetune.py's,
#: and the built-in demo's (no --data_path: ViT-Ti/16 from the quick start's checkpoint, on the built-in set's
#: classes). The demo's classes are the direction in which an image brightens, which a horizontal flip (east becomes
#: west) and RandAugment's rotations, shears and inversions change, so its augmentation keeps directions: no flip,
#: no RandAugment.
FINETUNE_DEFAULTS = dict(model="vit_large_patch16", input_size=224, batch_size=64, epochs=50, warmup_epochs=5,
                         hflip=0.5, aa="rand-m9-mstd0.5-inc1")
FINETUNE_DEMO_DEFAULTS = dict(model="vit_tiny_patch16", input_size=64, batch_size=32, epochs=10, warmup_epochs=1,
                              hflip=0.0, aa="none")
#: The AugConfig fields whose default is the recipe's: the official one unless the demo gives its own.
RECIPE_AUG_FIELDS = ("hflip", "aa")


@dataclass
class AugConfig:
    """The fine-tuning augmentation, the official recipe's (timm's RandAugment, random erasing, mixup and cutmix); the
    built-in demo keeps directions (FINETUNE_DEMO_DEFAULTS)."""

    hflip: float | None = None
    """--hflip: probability of a horizontal flip (default 0.5, timm's create_transform's, which the official script
    keeps; 0 for the demo)."""
    aa: str | None = None
    """--aa: the AutoAugment policy, as timm names it, or none (default rand-m9-mstd0.5-inc1, the official one; none
    for the demo)."""
    color_jitter: float | None = None
    """--color_jitter: color jitter factor (used only when --aa is off, as in timm)."""
    smoothing: float = 0.1
    """--smoothing: label smoothing."""
    reprob: float = 0.25
    """--reprob: random erasing probability."""
    remode: str = "pixel"
    """--remode: random erasing fill: pixel (per-pixel normal values), rand (per-channel) or const (zeros)."""
    recount: int = 1
    """--recount: random erasing count."""
    resplit: bool = False
    """--resplit: do not erase the first (clean) augmentation split."""
    mixup: float = 0.0
    """--mixup: mixup alpha; mixup is on when > 0."""
    cutmix: float = 0.0
    """--cutmix: cutmix alpha; cutmix is on when > 0."""
    cutmix_minmax: list[float] | None = None
    """--cutmix_minmax: cutmix min/max area ratio (overrides --cutmix's alpha when set)."""
    mixup_prob: float = 1.0
    """--mixup_prob: probability of mixup or cutmix per batch."""
    mixup_switch_prob: float = 0.5
    """--mixup_switch_prob: probability of cutmix instead of mixup when both are on."""
    mixup_mode: str = "batch"
    """--mixup_mode: how mixup/cutmix parameters are drawn: batch, pair or elem."""

    unset: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)
    """The fields of RECIPE_AUG_FIELDS left unset (None): they take the official value, which a FinetuneConfig without
    --data_path (the demo) replaces with the demo's."""

    def __post_init__(self):
        self.unset = tuple(name for name in RECIPE_AUG_FIELDS if getattr(self, name) is None)
        for name in self.unset:
            setattr(self, name, FINETUNE_DEFAULTS[name])
        self._check()

    def _check(self) -> None:
        if not isinstance(self.aa, str):
            raise _error("aa", self.aa, "must be a policy name as timm writes it, or none")
        if self.aa.lower() in ("", "none"):
            self.aa = "none"  # a string, so that None keeps meaning unset (dataclasses.replace keeps it off)
        for flag in ("hflip", "smoothing", "reprob", "mixup_prob", "mixup_switch_prob"):
            value = getattr(self, flag)
            _non_negative(flag, value)
            if value > 1:
                raise _error(flag, value, "must be in [0, 1]")
        if self.smoothing >= 1:
            raise _error("smoothing", self.smoothing, "must be below 1")
        _non_negative("mixup", self.mixup)
        _non_negative("cutmix", self.cutmix)
        if self.color_jitter is not None:
            _non_negative("color_jitter", self.color_jitter)
        _choice("remode", self.remode, ("pixel", "rand", "const"))
        _positive_int("recount", self.recount)
        _choice("mixup_mode", self.mixup_mode, ("batch", "pair", "elem"))
        if self.cutmix_minmax is not None:
            low_high = self.cutmix_minmax
            if len(low_high) != 2 or not 0 < low_high[0] < low_high[1] <= 1:
                raise _error("cutmix_minmax", self.cutmix_minmax, "must be two numbers 0 < min < max <= 1")

    @property
    def auto_augment(self) -> str | None:
        """The policy as timm's create_transform takes it: None when --aa is none."""
        return None if self.aa == "none" else self.aa

    @property
    def mixup_active(self) -> bool:
        """Mixup or cutmix is on (as the official script decides it)."""
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None



#: The quick start's checkpoint, which the fine-tuning demo starts from, and where the demo writes.
DEMO_PRETRAINED = "./output_dir/checkpoint-last.pth"
FINETUNE_DEMO_OUTPUT = "./output_dir/finetune"


@dataclass
class FinetuneModelConfig:
    """The classifier: a ViT whose encoder comes from a pretraining checkpoint."""

    name: str | None = None
    """--model: vit_base_patch16, vit_large_patch16 (default) or vit_huge_patch14 (the official sizes), or
    vit_tiny_patch16 / vit_small_patch16 (for CPUs and demos; vit_tiny_patch16 for the demo)."""
    nb_classes: int | None = None
    """--nb_classes: classes of the head (default: the number of class folders in the training data)."""
    global_pool: bool = True
    """--global_pool / --cls_token: classify the mean of the patch tokens (after fc_norm; the official default), or the
    cls token (after norm)."""
    drop_path: float = 0.1
    """--drop_path: stochastic depth rate, in [0, 1)."""
    attn_backend: str = "auto"
    """--attn_backend: auto, flash_attn, sdpa or math."""
    grad_checkpointing: bool = False
    """--grad_checkpointing: recompute blocks in backward to save activation memory."""
    finetune: str | None = None
    """--finetune: the pretraining checkpoint whose encoder starts the run (mae_fast's, an official one, or
    .safetensors; the decoder is left out, positions resized, the head initialized); unset: random initialization
    (the demo: the quick start's ./output_dir/checkpoint-last.pth; --finetune '' starts it from random
    initialization)."""

    def __post_init__(self):
        from mae_fast.presets import VIT_PRESETS

        if self.name is not None:
            _choice("model", self.name, tuple(VIT_PRESETS))
        if self.nb_classes is not None:
            _positive_int("nb_classes", self.nb_classes)
        _non_negative("drop_path", self.drop_path)
        if self.drop_path >= 1:
            raise _error("drop_path", self.drop_path, "must be in [0, 1)")
        _check_attn_backend(self.attn_backend)
        if self.finetune and not is_checkpoint_path(self.finetune):
            raise _error("finetune", self.finetune, "is not an existing checkpoint file (or DCP checkpoint folder)")


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """AdamW with layer-wise learning-rate decay and its schedule, the official fine-tuning recipe."""

    min_lr: float = 1e-6
    """--min_lr: the floor the cosine schedule decays to; at most the peak learning rate."""
    layer_decay: float = 0.75
    """--layer_decay: layer-wise learning-rate decay, in (0, 1]: block i of L learns at layer_decay^(L + 1 - i) times
    the rate, the head at the full rate."""
    clip_grad: float | None = None
    """--clip_grad: clip the gradient norm to this (unset: no clipping)."""

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.layer_decay, bool) or not isinstance(self.layer_decay, (int, float)) \
                or not 0 < self.layer_decay <= 1:
            raise _error("layer_decay", self.layer_decay, "must be in (0, 1] (1: no decay; the official value is "
                         "0.75, 0.65 for ViT-B)")
        if self.clip_grad is not None:
            _non_negative("clip_grad", self.clip_grad)
            if self.clip_grad <= 0:
                raise _error("clip_grad", self.clip_grad, "must be a positive norm (leave it unset for no clipping)")


def _check_aa(policy: str) -> None:
    """Refuse an --aa policy timm cannot parse, naming it."""
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    hparams = dict(translate_const=100, img_mean=(124, 116, 104))
    build = rand_augment_transform if policy.startswith("rand") else \
        augment_and_mix_transform if policy.startswith("augmix") else auto_augment_transform
    try:
        build(policy, hparams)
    except Exception as exc:  # timm raises AssertionError, KeyError or ValueError for a policy it cannot read
        raise _error("aa", policy, f"is not a policy timm can read ({type(exc).__name__}: {exc}); for example "
                     "rand-m9-mstd0.5-inc1 (the official), original, or none") from None


@dataclass
class FinetuneConfig(RunConfig):
    """A whole fine-tuning run (the official main_finetune.py's settings, and the engine's)."""

    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    eval: bool = False
    """--eval: evaluate the --resume checkpoint (a fine-tuned one: mae_fast's or official) and stop."""
    dist_eval: bool = False
    """--dist_eval: split the validation set over the ranks (the figures are the same; it is faster)."""
    output_dir: str | None = None
    """--output_dir: checkpoints and log.txt (default ./output_dir; ./output_dir/finetune for the demo)."""

    def __post_init__(self):
        if self.data.backend == "synthetic":
            raise _error("data_backend", self.data.backend, "has no labels; fine-tuning reads labeled images (class "
                         "folders, or shards written by mae_fast.prepare)")
        demo = self.data.data_path is None
        self._apply_defaults(FINETUNE_DEMO_DEFAULTS if demo else FINETUNE_DEFAULTS)
        for name in self.aug.unset:
            setattr(self.aug, name, (FINETUNE_DEMO_DEFAULTS if demo else FINETUNE_DEFAULTS)[name])
        self.aug._check()
        if self.output_dir is None:
            self.output_dir = FINETUNE_DEMO_OUTPUT if demo else "./output_dir"
        if demo and self.model.finetune is None and not self.eval:
            if not os.path.isfile(DEMO_PRETRAINED):
                raise _error("finetune", DEMO_PRETRAINED, "the demo fine-tunes the quick start's checkpoint, which "
                             "does not exist here; make it first with: python -m mae_fast.pretrain (a few minutes on a "
                             "CPU), or give --finetune (--finetune '' starts from random initialization)")
            self.model.finetune = DEMO_PRETRAINED
        if self.model.finetune is None:
            self.model.finetune = ""
        from mae_fast.presets import VIT_PRESETS

        self._check_input_size(VIT_PRESETS[self.model.name][1]["patch_size"])
        self._check_run()
        self.knn_every = 0
        if self.eval and not self.resume:
            raise _error("eval", True, "needs --resume, the fine-tuned checkpoint to evaluate")
        if self.eval and self.resume == "auto":
            raise _error("resume", self.resume, "--eval needs the path of the checkpoint to evaluate")
        if self.aug.auto_augment is not None:
            _check_aa(self.aug.auto_augment)
            if self.data.backend == "dali" and not self.aug.auto_augment.startswith("rand"):
                raise _error("aa", self.aug.aa, "the dali backend runs RandAugment policies (rand-..., such as the "
                             "official rand-m9-mstd0.5-inc1) or none; use --data_backend torch for this one")
        if self.aug.mixup_active:
            if self.model.nb_classes == 1:
                raise _error("nb_classes", 1, "mixup and cutmix need at least two classes")
            if self.data.batch_size % 2:
                raise _error("batch_size", self.data.batch_size, "must be even with --mixup/--cutmix (timm's Mixup "
                             "mixes each image with the batch's mirror image)")

    @property
    def is_demo(self) -> bool:
        """True for the built-in demo: no --data_path."""
        return self.data.data_path is None

    def warnings(self, device=None) -> list[str]:
        """Settings that run but are likely mistakes, one sentence each (the engine logs them once).

        Args:
            device: the ``torch.device`` the run trains on (a model meant for GPUs on a CPU is named), or None.
        """
        found = []
        if self.optim.warmup_epochs >= self.epochs and not self.eval:
            found.append(f"--warmup_epochs {self.optim.warmup_epochs:g} is not below --epochs {self.epochs}: the "
                         "learning rate never reaches its peak and the cosine decay never starts")
        cpu_models = ("vit_tiny_patch16", "vit_small_patch16")
        if device is not None and device.type == "cpu" and self.model.name not in cpu_models:
            found.append(f"--model {self.model.name} at {self.data.input_size} px, batch {self.data.batch_size}, runs "
                         f"on a CPU: it is meant for GPUs and trains very slowly here; the models for CPUs are "
                         f"{' and '.join(cpu_models)}")
        if not self.model.finetune and not self.eval:
            found.append("no --finetune checkpoint: the model starts from random initialization")
        return found


__all__ = ["AugConfig", "DataConfig", "FinetuneConfig", "FinetuneModelConfig", "FinetuneOptimConfig", "ModelConfig",
           "OptimConfig", "RunConfig", "field_docs", "fields"]
