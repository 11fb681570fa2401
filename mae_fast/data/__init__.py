"""Data for MAE pretraining: ``build_loader`` and its three backends.

- ``dali``: NVIDIA DALI, JPEG decoding on the GPU (the default when DALI is installed);
- ``torch``: PIL decoding in DataLoader workers (the fallback);
- ``synthetic``: random images made on the device, for pure compute throughput.

``dali`` and ``torch`` read a folder of images or a WebDataset shard set (:mod:`mae_fast.data.shards`).

Every backend shards and shuffles by :mod:`mae_fast.data.sampler` and yields
``(images, indices)``: normalized float images [B, 3, S, S] on the training device (or, with
``dtype=torch.uint8``, the pixels as uint8, which the trainer asks for: the model's fused ops
normalize them as they read them) and the dataset index of each on the CPU (-1 for a marked
slot: padding, or an image that did not decode; the trainer gives those weight 0 in the loss).

The loaders (and torch) are imported when a loader is built, so that the command line can check
``--data_path`` with :mod:`mae_fast.data.shards` before torch loads.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mae_fast.errors import BackendUnavailableError, ConfigError
from mae_fast.data.builtin import builtin_image_dir
from mae_fast.data.files import usable_images
from mae_fast.data.shards import is_shard_spec, load_shard_set

if TYPE_CHECKING:
    import torch

    from mae_fast.config import DataConfig

logger = logging.getLogger("mae_fast")

__all__ = ["build_loader", "build_eval_loader", "resolve_data_backend", "builtin_image_dir", "usable_images",
           "dali_unavailable_reason"]


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
