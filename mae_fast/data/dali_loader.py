"""The DALI loader: JPEG decoding on the GPU (nvJPEG / the hardware decoder) with the official augmentation.

One pipeline per epoch reads this rank's file list in the order :mod:`mae_fast.data.sampler`
deals it (DALI's own reader threads, no Python per file), decodes with ``device="mixed"`` on a
GPU (CPU-only with ``device_id=None`` elsewhere), then ``random_resized_crop`` (area 0.2-1.0,
aspect 3/4-4/3, bicubic), a random flip and ImageNet normalization to CHW (or, for ``dtype=torch.uint8``,
the raw pixels in CHW, which the model's fused ops normalize). Seeded by (seed, rank, epoch), so a
resumed run sees the same augmentation.
"""

from __future__ import annotations

import torch

from mae_fast.data.sampler import batches_per_epoch, epoch_indices
from mae_fast.errors import BackendUnavailableError, DataError
from mae_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RATIO, SCALE


def dali_unavailable_reason() -> str | None:
    """Why DALI cannot be used here, or None."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception as exc:
        return f"NVIDIA DALI is not importable ({type(exc).__name__}: {exc}); install mae_fast[dali]"
    return None


def build_pipeline(files: list[str], batch_size: int, size: int, seed: int, device_id: int | None, num_threads: int,
                   train: bool, raw: bool = False):
    """A built DALI pipeline that yields [B, 3, size, size] images from ``files`` in order.

    float32 ImageNet-normalized images, or with ``raw`` the uint8 pixels (the fused ops normalize
    them on the device as they read them: a quarter of the bytes to write and read back).
    """
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id, seed=seed,
                  prefetch_queue_depth=2)
    def pipe():
        encoded, _ = fn.readers.file(files=files, random_shuffle=False, pad_last_batch=True, name="reader")
        decoded = fn.decoders.image(encoded, device="mixed" if device_id is not None else "cpu",
                                    output_type=types.RGB)
        if train:
            images = fn.random_resized_crop(decoded, size=[size, size], random_area=list(SCALE),
                                            random_aspect_ratio=list(RATIO), interp_type=types.INTERP_CUBIC)
            mirror = fn.random.coin_flip(probability=0.5)
            crop = None
        else:
            images = fn.resize(decoded, resize_shorter=size, interp_type=types.INTERP_CUBIC)
            mirror, crop = 0, (size, size)
        if raw:
            return fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW", crop=crop, mirror=mirror)
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", crop=crop, mirror=mirror,
                                        mean=[m * 255 for m in IMAGENET_MEAN], std=[s * 255 for s in IMAGENET_STD])

    pipeline = pipe()
    pipeline.build()
    return pipeline


class DaliLoader:
    """Iterates one rank's batches of normalized images on ``device`` through DALI."""

    backend = "dali"

    def __init__(self, files: list[str], size: int, batch_size: int, rank: int, world_size: int, device: torch.device,
                 seed: int, num_workers: int, train: bool = True, dtype: torch.dtype = torch.float32):
        reason = dali_unavailable_reason()
        if reason:
            raise BackendUnavailableError(f"data backend 'dali' cannot run: {reason}")
        self.files, self.size, self.batch_size = files, size, batch_size
        self.rank, self.world_size, self.seed, self.train = rank, world_size, seed, train
        self.device, self.dtype, self.num_threads = torch.device(device), dtype, num_workers
        self.num_samples = len(files)

    def __len__(self) -> int:
        return batches_per_epoch(self.num_samples, self.batch_size, self.world_size)

    def epoch(self, epoch: int, start: int = 0):
        """Yield ``(images [B, 3, S, S] on device in dtype, indices [B] int64 with -1 for padding)``,
        from batch ``start`` of ``epoch`` on.

        DALI draws augmentation from its own generators, seeded per (seed, rank, epoch) rather than
        per slot as the torch loader does; to resume mid-epoch with the same augmentation it runs
        the epoch's first ``start`` batches again and drops them.
        """
        indices, valid, _ = epoch_indices(self.num_samples, self.batch_size, self.rank, self.world_size, epoch,
                                          self.seed, shuffle=self.train)
        device_id = (self.device.index or 0) if self.device.type == "cuda" else None
        seed = (self.seed * 1_000_003 + self.rank * 7919 + epoch * 31) % (2**31 - 1)
        B = self.batch_size
        pipeline = build_pipeline([self.files[i] for i in indices], self.batch_size, self.size, seed, device_id,
                                  self.num_threads, self.train, raw=self.dtype == torch.uint8)
        try:
            for step in range(len(self)):
                try:
                    (out,) = pipeline.run()
                except RuntimeError as exc:
                    # The pipeline reads ahead, so the culprit is in this batch or the prefetched one.
                    batch_files = [self.files[i] for i in indices[step * B:(step + 2) * B]]
                    first_line = next((line for line in str(exc).splitlines() if line.strip()), "")
                    raise DataError(f"DALI failed at batch {step} of epoch {epoch}: one of {batch_files} could not be "
                                    f"read or decoded ({first_line.strip()}); remove or replace it, or check the "
                                    "folder with --verify_images decode") from exc
                if step < start:
                    continue
                images = self._to_torch(out)
                idx = torch.from_numpy(indices[step * B:(step + 1) * B].copy())
                idx[~torch.from_numpy(valid[step * B:(step + 1) * B].copy())] = -1
                yield images.to(self.dtype), idx
        finally:
            del pipeline

    def _to_torch(self, out) -> torch.Tensor:
        if self.device.type != "cuda":
            return torch.from_numpy(out.as_array()).to(self.device)
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = out.as_tensor()
        images = torch.empty(dense.shape(), dtype=torch.uint8 if self.dtype == torch.uint8 else torch.float32,
                             device=self.device)
        feed_ndarray(dense, images, cuda_stream=torch.cuda.current_stream(self.device))
        return images
