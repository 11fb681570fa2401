"""The PyTorch loader: PIL decoding in DataLoader workers, uint8 batches normalized on the device."""

from __future__ import annotations

import logging

import torch

from mae_fast.data.files import open_rgb
from mae_fast.data.sampler import batches_per_epoch, epoch_indices
from mae_fast.errors import DataError
from mae_fast.data.transforms import eval_transform, normalize, train_transform

logger = logging.getLogger("mae_fast")


def _ignore_ctrl_c(worker_id: int) -> None:
    """A loader worker leaves Ctrl-C to the main process, which stops the run after the step (a terminal's Ctrl-C
    reaches the workers too, and a worker it killed would end the run with an error instead)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ImageFiles(torch.utils.data.Dataset):
    """Decodes ``files[index]`` to 8-bit RGB (grayscale, CMYK, palette, 16-bit alike; see ``open_rgb``) and augments it.

    Items are addressed by ``(index, seed)`` so that augmentation depends on the sample's slot in
    the epoch, never on which worker decodes it.
    """

    def __init__(self, files: list[str], size: int, train: bool):
        self.files, self.size, self.train = files, size, train

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> torch.Tensor:
        index, seed = item
        path = self.files[index]
        try:
            img = open_rgb(path)
        except Exception as exc:
            raise DataError(f"cannot decode {path}: {type(exc).__name__}: {exc}") from exc
        return train_transform(img, self.size, seed) if self.train else eval_transform(img, self.size)


class EpochBatches(torch.utils.data.Sampler):
    """Batches of ``(index, seed)`` for one rank; ``set_epoch`` reshuffles (see :mod:`mae_fast.data.sampler`)."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.epoch = self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Deal the batches of ``epoch``, beginning at batch ``start`` (to resume mid-epoch)."""
        self.epoch, self.start = epoch, start

    def indices(self):
        return epoch_indices(self.num_samples, self.batch_size, self.rank, self.world_size, self.epoch, self.seed,
                             self.shuffle)

    def __len__(self) -> int:
        return batches_per_epoch(self.num_samples, self.batch_size, self.world_size)

    def __iter__(self):
        indices, _, seeds = self.indices()
        for start in range(self.start * self.batch_size, len(indices), self.batch_size):
            yield [(int(i), int(s)) for i, s in zip(indices[start:start + self.batch_size],
                                                    seeds[start:start + self.batch_size])]


class TorchLoader:
    """Iterates one rank's batches of normalized images on ``device``."""

    backend = "torch"

    def __init__(self, files: list[str], size: int, batch_size: int, rank: int, world_size: int, device: torch.device,
                 seed: int, num_workers: int, train: bool = True, dtype: torch.dtype = torch.float32,
                 pin_memory: bool = True):
        self.files, self.num_samples, self.device, self.dtype = files, len(files), torch.device(device), dtype
        self.batches = EpochBatches(len(files), batch_size, rank, world_size, seed, shuffle=train)
        self.loader = torch.utils.data.DataLoader(
            ImageFiles(files, size, train), batch_sampler=self.batches, num_workers=num_workers,
            pin_memory=pin_memory and self.device.type == "cuda", persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None, timeout=600 if num_workers > 0 else 0,
            worker_init_fn=_ignore_ctrl_c)

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int, start: int = 0):
        """Yield ``(images [B, 3, S, S] on device in dtype, indices [B] int64 with -1 for padding)``,
        from batch ``start`` of ``epoch`` on."""
        self.batches.set_epoch(epoch, start)
        indices, valid, _ = self.batches.indices()
        B = self.batches.batch_size
        for step, images in enumerate(_one_line_errors(self.loader), start=start):
            images = images.to(self.device, non_blocking=True)
            if self.dtype != torch.uint8:  # uint8: the pixels as they are, for the model's fused ops to normalize
                images = normalize(images, self.dtype)
            idx = torch.from_numpy(indices[step * B:(step + 1) * B].copy())
            idx[~torch.from_numpy(valid[step * B:(step + 1) * B].copy())] = -1
            yield images, idx


def _one_line_errors(batches):
    """Re-raise a worker's DataError with its own message: DataLoader wraps it in the worker's whole traceback."""
    try:
        yield from batches
    except DataError as exc:
        last = [line for line in str(exc).splitlines() if line.strip()][-1]
        raise DataError(last.split("DataError: ", 1)[-1]) from exc


# ---------------------------------------------------------------------------------------------- shard sets


class EncodedImages(torch.utils.data.Dataset):
    """Decodes the encoded image an item carries (read from a shard by the sampler) and augments it.

    Items are ``(data, seed, name)``; the result is ``(uint8 [3, S, S], error)``, with a black
    image and the reason when the bytes do not decode (the loader marks that slot invalid).
    """

    def __init__(self, size: int, train: bool):
        self.size, self.train = size, train

    def __len__(self) -> int:  # items come from the sampler, not from indices
        return 0

    def __getitem__(self, item: tuple[bytes, int, str]):
        import io

        data, seed, name = item
        try:
            img = open_rgb(io.BytesIO(data))
            out = train_transform(img, self.size, seed) if self.train else eval_transform(img, self.size)
            return out, None
        except Exception as exc:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), f"{name}: {type(exc).__name__}: {exc}"


def _collate_encoded(items):
    return torch.stack([image for image, _ in items]), [error for _, error in items]


class ShardBatches(torch.utils.data.Sampler):
    """One rank's batches of a shard set as ``(data, seed, name)`` items, read front to back in the main process.

    The epoch follows :func:`mae_fast.data.sampler.shard_epoch_plan`; slots without an image
    (padding, or images a damaged shard no longer holds) carry a copy of another image of the
    batch, and :attr:`last_invalid` lists them for the loader.
    """

    def __init__(self, shard_set, batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool):
        self.shard_set, self.batch_size = shard_set, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.epoch = self.start = 0
        self.issued: list[tuple[list[int], list[bool]]] = []  # (dataset indices, valid) per batch issued

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def plan(self):
        from mae_fast.data.sampler import shard_epoch_plan

        return shard_epoch_plan(self.shard_set.counts, self.batch_size, self.rank, self.world_size, self.epoch,
                                self.seed, self.shuffle)

    def __len__(self) -> int:
        from mae_fast.data.sampler import shard_batches_per_epoch

        return shard_batches_per_epoch(self.shard_set.num_samples, self.batch_size, self.world_size)

    def __iter__(self):
        from mae_fast.data.shards import plan_images

        plan = self.plan()
        B = self.batch_size
        images = plan_images(self.shard_set, plan, self.start * B)
        fallback = None
        for batch in range(self.start, len(self)):
            items, indices, valid = [], [], []
            for slot in range(batch * B, (batch + 1) * B):
                image = index = None
                if plan.valid[slot]:
                    _, index, image = next(images)
                if image is None:
                    items.append(None)
                    indices.append(-1)
                    valid.append(False)
                    continue
                items.append((image.data, int(plan.seeds[slot]), image.name))
                indices.append(index)
                valid.append(True)
                fallback = fallback or items[-1]
            if fallback is None:  # a batch of padding only (a rank past, or without, images of its own): any image
                from mae_fast.data.shards import stream_images

                images_of_first = stream_images(self.shard_set.paths[0], timeout=self.shard_set.timeout)
                first = next(images_of_first)
                images_of_first.close()
                fallback = (first.data, int(plan.seeds[0]), first.name)
            items = [item if item is not None else fallback for item in items]
            self.issued.append((indices, valid))
            yield items


class TorchShardLoader:
    """Iterates one rank's batches of a shard set: shards read in the main process, images decoded in workers."""

    backend = "torch"
    files = None

    def __init__(self, shard_set, size: int, batch_size: int, rank: int, world_size: int, device: torch.device,
                 seed: int, num_workers: int, train: bool = True, dtype: torch.dtype = torch.float32,
                 pin_memory: bool = True):
        self.shard_set, self.num_samples = shard_set, shard_set.num_samples
        self.device, self.dtype = torch.device(device), dtype
        self.batches = ShardBatches(shard_set, batch_size, rank, world_size, seed, shuffle=train)
        self.loader = torch.utils.data.DataLoader(
            EncodedImages(size, train), batch_sampler=self.batches, num_workers=num_workers,
            collate_fn=_collate_encoded, pin_memory=pin_memory and self.device.type == "cuda",
            persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
            timeout=600 if num_workers > 0 else 0, worker_init_fn=_ignore_ctrl_c)

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int, start: int = 0):
        """Yield ``(images [B, 3, S, S] on device in dtype, indices [B] int64 with -1 for padding or bad images)``,
        from batch ``start`` of ``epoch`` on."""
        self.batches.set_epoch(epoch, start)
        self.batches.issued.clear()
        for step, (images, errors) in enumerate(self.loader):
            indices, valid = self.batches.issued[step]
            idx = torch.tensor(indices, dtype=torch.int64)
            bad = [error for slot, error in enumerate(errors) if error is not None and valid[slot]]
            for slot, error in enumerate(errors):
                if error is not None and valid[slot]:
                    idx[slot] = -1  # padding slots (copies of another image) are marked already, and not named
            if bad:
                logger.warning("left out %d image(s) that do not decode (the slots are marked invalid): %s", len(bad),
                               "; ".join(sorted(set(bad))[:3]))
            images = images.to(self.device, non_blocking=True)
            if self.dtype != torch.uint8:
                images = normalize(images, self.dtype)
            yield images, idx
