"""Data for MAE pretraining (``build_loader``, three backends) and fine-tuning (``build_classification_loader``).

- ``dali``: NVIDIA DALI, JPEG decoding on the GPU (the default when DALI is installed);
- ``torch``: PIL decoding in DataLoader workers (the fallback);
- ``synthetic``: random images made on the device, for pure compute throughput.

``dali`` and ``torch`` read a folder of images or a WebDataset shard set (:mod:`mae_fast.data.shards`).

Every backend shards and shuffles by :mod:`mae_fast.data.sampler` and yields
``(images, indices)``: normalized float images [B, 3, S, S] on the training device (or, with
``dtype=torch.uint8``, the pixels as uint8, which the trainer asks for: the model's fused ops
normalize them as they read them) and the dataset index of each on the CPU (-1 for a marked
slot: padding, or an image that did not decode; the trainer gives those weight 0 in the loss).

``build_classification_loader`` reads labeled images (ImageNet-layout folders, shard sets whose
samples carry ``cls``; :mod:`mae_fast.data.labeled`) through the same sampler, with the official fine-tuning
transforms (timm's, on the ``torch`` backend) or DALI's rendering of them (:mod:`mae_fast.data.dali_finetune`), and
yields ``(images, labels, indices)``.

The loaders (and torch) are imported when a loader is built, so that the command line can check
``--data_path`` with :mod:`mae_fast.data.shards` before torch loads.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mae_fast.errors import BackendUnavailableError, ConfigError
from mae_fast.data.builtin import builtin_image_dir
from mae_fast.data.files import class_folder_names, usable_images
from mae_fast.data.shards import is_shard_spec, load_shard_set

if TYPE_CHECKING:
    import torch

    from mae_fast.config import AugConfig, DataConfig

logger = logging.getLogger("mae_fast")

__all__ = ["build_loader", "build_eval_loader", "build_classification_loader", "resolve_data_backend",
           "builtin_image_dir", "usable_images", "dali_unavailable_reason"]


def dali_unavailable_reason() -> str | None:
    """Why DALI cannot be used here, or None (see :func:`mae_fast.data.dali_loader.dali_unavailable_reason`)."""
    from mae_fast.data import dali_loader

    return dali_loader.dali_unavailable_reason()


def resolve_data_backend(backend: str) -> str:
    """``auto`` -> ``dali`` when DALI is importable, else ``torch``; an explicit ``dali`` must be importable.

    Raises:
        BackendUnavailableError: ``dali`` asked for but not importable.
    """
    if backend == "auto":
        return "dali" if dali_unavailable_reason() is None else "torch"
    if backend == "dali":
        reason = dali_unavailable_reason()
        if reason:
            raise BackendUnavailableError(f"--data_backend dali cannot run: {reason}; or use --data_backend torch")
    return backend


def build_loader(config: DataConfig, rank: int, world_size: int, device: torch.device | str, seed: int,
                 train: bool = True, dtype: torch.dtype | None = None):
    """The loader of one rank.

    Args:
        config: what to read and how (see :class:`mae_fast.config.DataConfig`).
        rank, world_size: this process's place among the data-parallel ranks.
        device: where batches are delivered.
        seed: run seed; shuffling and augmentation follow (seed, epoch, rank).
        train: training (random augmentation, reshuffled) or validation (resize + center crop,
            fixed order) from ``config.val_path``.
        dtype: dtype of the delivered images: a float dtype for normalized images (None: float32),
            ``torch.uint8`` for the pixels (0-255, not normalized; the synthetic backend draws them uniformly).

    Returns:
        An object with ``len()`` (batches per epoch), ``num_samples``, ``backend`` and
        ``epoch(e)`` yielding ``(images, indices)``.

    Raises:
        DataError: missing or empty data folder, or none of its files readable by the backend.
        BackendUnavailableError: the backend cannot run here.
    """
    import torch

    from mae_fast.data.dali_loader import DaliLoader
    from mae_fast.data.synthetic import SyntheticLoader
    from mae_fast.data.torch_loader import TorchLoader, TorchShardLoader

    dtype = torch.float32 if dtype is None else dtype
    backend = resolve_data_backend(config.backend)
    device = torch.device(device)
    if backend == "synthetic":
        return SyntheticLoader(config.synthetic_samples, config.input_size, config.batch_size, rank, world_size, device,
                               seed, dtype)
    if train:
        path = config.data_path or builtin_image_dir(config.builtin_count, config.builtin_size)
    else:
        if not config.val_path:
            raise ConfigError("a validation loader needs --val_path")
        path = config.val_path
    if is_shard_spec(str(path)):
        shard_set = load_shard_set(str(path), workers=max(1, config.num_workers), timeout=config.shard_timeout)
        if backend == "dali":  # the torch backend decodes every member anyway: a bad one is marked then
            return DaliLoader(shard_set, config.input_size, config.batch_size, rank, world_size, device, seed,
                              config.num_workers, train=train, dtype=dtype, verify=config.verify_images)
        return TorchShardLoader(shard_set, config.input_size, config.batch_size, rank, world_size, device, seed,
                                config.num_workers, train=train, dtype=dtype)
    split = "train" if train else "val"
    files = usable_images(path, split=split, verify=config.verify_images, workers=max(1, config.num_workers),
                          backend=backend)
    cls = DaliLoader if backend == "dali" else TorchLoader
    return cls(files, config.input_size, config.batch_size, rank, world_size, device, seed, config.num_workers,
               train=train, dtype=dtype)


def build_eval_loader(config: DataConfig, files: list[str], rank: int, world_size: int, device: torch.device | str,
                      seed: int, dtype: torch.dtype | None = None):
    """One rank's evaluation loader (resize and center crop, fixed order) over ``files``, already checked; ``dtype``
    as for :func:`build_loader`.

    Raises:
        BackendUnavailableError: the backend cannot run here.
    """
    import torch

    from mae_fast.data.dali_loader import DaliLoader
    from mae_fast.data.torch_loader import TorchLoader

    dtype = torch.float32 if dtype is None else dtype
    backend = resolve_data_backend(config.backend)
    if backend == "synthetic":
        backend = "torch"  # labeled images are real files whatever the training data
    cls = DaliLoader if backend == "dali" else TorchLoader
    return cls(files, config.input_size, config.batch_size, rank, world_size, torch.device(device), seed,
               config.num_workers, train=False, dtype=dtype)


#: The official main_finetune.py defaults, for a DataConfig that leaves these unset.
FINETUNE_INPUT_SIZE, FINETUNE_BATCH_SIZE = 224, 64


def build_classification_loader(config: DataConfig, aug: AugConfig | None, rank: int, world_size: int,
                                device: torch.device | str, seed: int, train: bool):
    """The labeled loader of one rank, for fine-tuning and its evaluation (the official ``main_finetune.py`` data).

    Data: training reads ``config.data_path`` (an ImageNet-layout folder, ``train/<class>/*`` or ``<class>/*``,
    or a shard set whose samples carry ``cls``; unset: the built-in set); validation reads ``config.val_path``,
    else ``<data_path>/val/<class>/*`` (a shard set needs ``--val_path``), and its classes must be the training
    set's. Classes are numbered as torchvision's ``ImageFolder`` numbers them (sorted folder names). Sharding,
    shuffling and resuming follow :mod:`mae_fast.data.sampler`, as for pretraining: every image once per epoch over
    the ranks, the same number of steps on each, the validation set split in a fixed order with its padding marked,
    so counting only slots with ``indices >= 0`` gives the one-rank result exactly.

    Training transform: the official ``build_transform(is_train=True)``, timm's ``create_transform(input_size,
    is_training=True, hflip=aug.hflip, color_jitter=aug.color_jitter, auto_augment=aug.auto_augment,
    interpolation="bicubic", re_prob=aug.reprob, re_mode=aug.remode, re_count=aug.recount, mean, std)``, split at
    ToTensor (built with ``separate=True``): its PIL part (random resized crop at scale (0.08, 1), flip, RandAugment
    or color jitter) runs in the DataLoader workers, uint8 pixels cross to the device, and normalization and timm's
    ``RandomErasing`` (same parameters) run there on the batch. Every random draw follows the slot's seed, so the
    same seed gives the same batches and a resumed epoch the same pixels. ``aug`` None: the official defaults
    (:class:`~mae_fast.config.AugConfig`).

    Evaluation transform: the official ``build_transform(is_train=False)``: the shorter side resized (bicubic) to
    ``int(input_size / (224 / 256))`` (``input_size`` above 224: to ``input_size``), center crop ``input_size``,
    normalized.

    Backends: ``torch`` (``auto`` means ``torch`` here: the official recipe's images exactly) and ``dali``: JPEG
    decoding on the GPU (DALI's CPU pipeline without one), one pipeline per loader, with the same recipe rebuilt from
    the same timm objects in DALI's operations (:mod:`mae_fast.data.dali_finetune`: RandAugment's operations,
    random erasing by ``fn.erase``, DALI's resampling; the images differ from timm's in detail, as listed there),
    and the official evaluation transform (its geometry exactly, DALI's bicubic resampling). Both backends follow
    the same sampler and slot seeds and resume mid-epoch exactly; mixup and cutmix are applied to the device batch
    by the training step, whichever backend reads.

    Returns:
        A :class:`~mae_fast.data.labeled.ClassificationLoader`: ``len()`` (batches per epoch), ``num_samples``,
        ``num_classes``, ``classes`` (names; ``"0" .. "n-1"`` for a shard set whose manifest names none),
        ``backend``, ``files`` (a folder) or ``shard_set``, and ``epoch(e, start=0)`` yielding ``(images float32
        [B, 3, S, S] on device, labels int64 [B] on device, indices int64 [B] on the CPU)``; ``indices`` is -1 for
        marked slots (padding, images that do not decode, samples without a class index), whose labels are still
        class indices (the class of the image the slot repeats, else 0) so that losses and mixup never index out of
        range; weigh them 0.

    Raises:
        ConfigError: ``--data_backend synthetic``; a shard set without ``--val_path`` for validation; an ``--aa``
            policy timm cannot parse, or (``dali``) one that is not RandAugment or none.
        DataError: a missing folder, or one without class sub-folders (or without ``val/`` for validation); a shard
            set without ``cls`` members; a validation set whose classes are not the training set's; nothing readable.
        BackendUnavailableError: timm cannot run here, or ``--data_backend dali`` and DALI cannot.
    """
    import torch

    from mae_fast.config import AugConfig
    from mae_fast.data import labeled
    from mae_fast.data.dali_loader import DaliLoader
    from mae_fast.data.torch_loader import TorchLoader, TorchShardLoader
    from mae_fast.data.transforms import (FinetuneEvalTransform, FinetuneTrainTransform, SeededErasing,
                                          official_train_transform)

    if config.backend == "synthetic":
        raise ConfigError("--data_backend synthetic: its images have no labels; fine-tuning reads labeled data with "
                          "--data_backend torch")
    backend = "dali" if config.backend == "dali" else "torch"
    if backend == "dali":
        resolve_data_backend("dali")  # one line when DALI is not importable
    aug = aug if aug is not None else AugConfig()
    device = torch.device(device)
    size = config.input_size or FINETUNE_INPUT_SIZE
    batch_size = config.batch_size or FINETUNE_BATCH_SIZE
    workers = max(1, config.num_workers)
    train_path = config.data_path or str(builtin_image_dir(config.builtin_count, config.builtin_size))
    train_where = f"--data_path {train_path}"
    if train:
        path, flag, split = train_path, "--data_path", "train"
    elif config.val_path:
        path, flag, split = config.val_path, "--val_path", "val"
    elif is_shard_spec(str(train_path)):
        raise ConfigError(f"--val_path: validation of a shard set ({train_where}) needs its own labeled set, "
                          "a folder (val/<class>/*) or a shard set; none given")
    else:
        path, flag, split = str(labeled.val_folder(train_path)), "--data_path", "val"

    # The transforms first: a policy that cannot work is refused before any data is read.
    erasing = recipe = None
    if train:
        from timm.data.random_erasing import RandomErasing  # importable: official_train_transform needs timm

        primary, secondary, final = official_train_transform(size, aug)
        timm_erasing = next((t for t in final.transforms if isinstance(t, RandomErasing)), None)
        if backend == "dali":
            from mae_fast.data.dali_finetune import FinetuneTrainPipeline

            recipe = FinetuneTrainPipeline(primary, secondary, timm_erasing, size, seed)
        else:
            transform = FinetuneTrainTransform(primary, secondary)
            erasing = SeededErasing(timm_erasing) if timm_erasing is not None else None
    elif backend == "dali":
        from mae_fast.data.dali_finetune import FinetuneEvalPipeline

        recipe = FinetuneEvalPipeline(size)
    else:
        transform = FinetuneEvalTransform(size)

    where = f"{flag} {path}"
    common = dict(batch_size=batch_size, rank=rank, world_size=world_size, device=device, seed=seed,
                  num_workers=config.num_workers, train=train)
    if backend == "dali":  # the pipeline writes normalized (and erased) float32 images
        common.update(dtype=torch.float32, recipe=recipe, verify=config.verify_images)
    else:  # uint8 pixels cross to the device, where they are normalized (and erased)
        common.update(dtype=torch.uint8, transform=transform)
    if is_shard_spec(str(path)):
        source = load_shard_set(str(path), workers=workers, timeout=config.shard_timeout)
        classes = labeled.shard_classes(source, flag, str(path), workers)
        inner = (DaliLoader if backend == "dali" else TorchShardLoader)(source, size, **common, labels=True)
    else:
        folder = labeled.labeled_folder(path, split, flag, config.verify_images, workers, backend)
        classes = folder.classes
        inner = (DaliLoader if backend == "dali" else TorchLoader)(folder.files, size, **common, labels=folder.labels)
    if not train:
        if is_shard_spec(str(train_path)):
            train_set = load_shard_set(str(train_path), workers=workers, timeout=config.shard_timeout)
            train_classes = labeled.shard_classes(train_set, "--data_path", str(train_path), workers)
        else:
            train_classes = class_folder_names(train_path, "train")
            if not train_classes:
                raise labeled.no_class_folders(train_path, "train", "--data_path")
        labeled.check_same_classes(train_classes, classes, train_where, where)
    return labeled.ClassificationLoader(inner, classes, batch_size, erasing=erasing)
