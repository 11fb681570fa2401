"""The DALI loader: JPEG decoding on the GPU (nvJPEG / the hardware decoder) with the official augmentation.

One pipeline per run decodes the batches the main process feeds it: the encoded bytes of this
rank's images in the order :mod:`mae_fast.data.sampler` deals them (files of a folder, or members
of a shard set read front to back), with each training image's crop box and flip. The main process
draws those from the slot's augmentation seed alone (:func:`mae_fast.data.transforms.train_crops`:
the official area 0.2-1.0 and aspect 3/4-4/3, in pixels of the size its header gives), so a run
resumed mid-epoch, whose pipeline is new, augments every remaining image as the uninterrupted run
did. The pipeline decodes only that crop (``decoders.image_slice``) with ``device="mixed"`` on a
GPU (CPU-only with ``device_id=None`` elsewhere), resizes it (bicubic), flips it as told, and writes
CHW uint8 pixels (``dtype=torch.uint8``: the model's fused ops normalize them) or
ImageNet-normalized floats. Decoding runs ``PREFETCH_DEPTH`` batches ahead of the training step.
The nvJPEG hardware decoder's share (``hw_decoder_load``) is left at DALI's default: it has not
been measured here (no GPU); the GPU check's loader benchmark is where to tune it.
"""

from __future__ import annotations

import logging

import torch

from mae_fast.data.files import encoded_problem, image_size
from mae_fast.data.sampler import batches_per_epoch, epoch_indices, shard_batches_per_epoch
from mae_fast.errors import BackendUnavailableError, DataError
from mae_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, train_crops

logger = logging.getLogger("mae_fast")


def dali_unavailable_reason() -> str | None:
    """Why DALI cannot be used here, or None."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception as exc:
        return f"NVIDIA DALI is not importable ({type(exc).__name__}: {exc}); install mae_fast[dali]"
    return None


#: Batches decoded ahead of the one the training step takes (DALI's prefetch queue, its default of two). On the
#: 2-core CPU machine, depths 1 to 4 gave the same images/s within noise (939, 904, 785, 890 with a 20 ms step);
#: not measured on a GPU.
PREFETCH_DEPTH = 2


def build_pipeline(batch_size: int, size: int, seed: int, device_id: int | None, num_threads: int, train: bool,
                   raw: bool = False, crop_decode: bool = True):
    """A built DALI pipeline that decodes the encoded images fed to its input ``"encoded"``, one batch per run.

    Training: each image's crop comes in through the inputs ``"anchor"`` and ``"shape"`` (float32 [2] each, x and
    y in pixels of the image as stored) and its flip through ``"mirror"`` (int32 0 or 1), as
    :func:`feed_training_batch` draws them. ``decoders.image_slice`` decodes only the crop, then it is resized to
    ``size`` (bicubic) and flipped; ``crop_decode=False`` decodes whole images and crops after, for comparison.
    Evaluation: shorter side resized to ``size``, centre crop. Output [B, 3, size, size]: float32
    ImageNet-normalized, or with ``raw`` the uint8 pixels (the fused ops normalize them on the device). The
    pipeline draws no random numbers of its own.
    """
    from nvidia.dali import fn, pipeline_def, types

    decoder = "mixed" if device_id is not None else "cpu"

    @pipeline_def(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id, seed=seed,
                  prefetch_queue_depth=PREFETCH_DEPTH)
    def pipe():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        if train:
            anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)
            shape = fn.external_source(name="shape", dtype=types.FLOAT, ndim=1)
            mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
            # Boxes in pixels of the image as stored (EXIF orientation not applied, as the torch loader reads it),
            # whose size the box was drawn for.
            where = dict(normalized_anchor=False, normalized_shape=False)
            if crop_decode:
                cropped = fn.decoders.image_slice(encoded, anchor, shape, device=decoder, output_type=types.RGB,
                                                  adjust_orientation=False, **where)
            else:
                decoded = fn.decoders.image(encoded, device=decoder, output_type=types.RGB, adjust_orientation=False)
                cropped = fn.slice(decoded, anchor, shape, **where)
            images = fn.resize(cropped, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=False)
        else:
            decoded = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
            images = fn.resize(decoded, resize_shorter=size, interp_type=types.INTERP_CUBIC)
            mirror = 0
        crop = None if train else (size, size)
        if raw:
            return fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW", crop=crop, mirror=mirror)
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", crop=crop, mirror=mirror,
                                        mean=[m * 255 for m in IMAGENET_MEAN], std=[s * 255 for s in IMAGENET_STD])

    pipeline = pipe()
    pipeline.build()
    return pipeline


def feed_training_batch(pipeline, arrays: list, seeds) -> None:
    """Feed one training batch: the encoded images, and each one's crop (in pixels) and flip, drawn from its slot's
    seed by :func:`~mae_fast.data.transforms.train_crops` for the size its header gives. An image whose header
    tells no size gets its top-left pixel (DALI decodes it, or says why it cannot)."""
    import numpy as np

    sizes = [image_size(array) or (1, 1) for array in arrays]
    boxes, flips, _ = train_crops([w for w, _ in sizes], [h for _, h in sizes], np.asarray(seeds, dtype=np.int64))
    anchor, shape = boxes[:, :2].astype(np.float32), boxes[:, 2:].astype(np.float32)
    pipeline.feed_input("encoded", arrays)
    pipeline.feed_input("anchor", anchor)
    pipeline.feed_input("shape", shape)
    pipeline.feed_input("mirror", flips.astype(np.int32))


class DaliLoader:
    """Iterates one rank's batches through one DALI pipeline, built once per run and fed each batch's encoded images.

    The epoch's order comes from :mod:`mae_fast.data.sampler` (a folder: a permutation dealt
    round-robin; a shard set: shards read front to back); the main process reads the encoded bytes
    (files, or shard members) and feeds them with each image's crop and flip, drawn from its slot's
    seed, so resuming mid-epoch starts at the batch it left off at and gives the same pixels the
    uninterrupted run had.
    """

    backend = "dali"

    def __init__(self, files, size: int, batch_size: int, rank: int, world_size: int, device: torch.device,
                 seed: int, num_workers: int, train: bool = True, dtype: torch.dtype = torch.float32,
                 crop_decode: bool = True):
        reason = dali_unavailable_reason()
        if reason:
            raise BackendUnavailableError(f"data backend 'dali' cannot run: {reason}")
        from mae_fast.data.shards import ShardSet

        self.shard_set = files if isinstance(files, ShardSet) else None
        self.files = None if self.shard_set else files
        self.size, self.batch_size = size, batch_size
        self.rank, self.world_size, self.seed, self.train = rank, world_size, seed, train
        self.device, self.dtype, self.num_threads = torch.device(device), dtype, num_workers
        self.crop_decode = crop_decode
        self.num_samples = self.shard_set.num_samples if self.shard_set else len(files)
        self.pipeline, self.primed = None, False
        self.builds = 0  # pipelines built (one per run)

    def __len__(self) -> int:
        if self.shard_set:
            return shard_batches_per_epoch(self.num_samples, self.batch_size, self.world_size)
        return batches_per_epoch(self.num_samples, self.batch_size, self.world_size)

    def _build(self):
        if self.pipeline is None:
            device_id = (self.device.index or 0) if self.device.type == "cuda" else None
            seed = (self.seed * 1_000_003 + self.rank * 7919) % (2**31 - 1)
            self.pipeline = build_pipeline(self.batch_size, self.size, seed, device_id, self.num_threads, self.train,
                                           raw=self.dtype == torch.uint8, crop_decode=self.crop_decode)
            self.builds += 1
        return self.pipeline

    def _batches(self, epoch: int, start: int):
        """Yield ``(encoded arrays, names, indices, seeds)`` per batch of ``epoch`` from batch ``start`` on (the
        slots' augmentation seeds, as the sampler deals them)."""
        import numpy as np

        B = self.batch_size
        if self.shard_set:
            from mae_fast.data.torch_loader import ShardBatches

            batches = ShardBatches(self.shard_set, B, self.rank, self.world_size, self.seed, shuffle=self.train)
            batches.set_epoch(epoch, start)
            for step, items in enumerate(batches):
                indices, valid = batches.issued[step]
                arrays, names, idx = [], [], torch.tensor(indices, dtype=torch.int64)
                seeds = [seed for _, seed, _ in items]
                fallback = next((k for k, ok in enumerate(valid)
                                 if ok and encoded_problem(items[k][0], "dali") is None), None)
                for slot, (data, _, name) in enumerate(items):
                    problem = encoded_problem(data, "dali")
                    if problem is not None:  # DALI cannot skip an image mid-batch: replace it, mark it, name it
                        logger.warning("left out %s (%s); its slot is marked invalid", name, problem)
                        if fallback is None:
                            raise DataError(f"no image of batch {start + step + 1} of epoch {epoch + 1} decodes "
                                            f"({name}: {problem})")
                        data, idx[slot] = items[fallback][0], -1
                    arrays.append(np.frombuffer(data, dtype=np.uint8))
                    names.append(name)
                yield arrays, names, idx, seeds
            return
        indices, valid, seeds = epoch_indices(self.num_samples, B, self.rank, self.world_size, epoch, self.seed,
                                              shuffle=self.train)
        for step in range(start, len(self)):
            chosen = indices[step * B:(step + 1) * B]
            names = [self.files[i] for i in chosen]
            idx = torch.from_numpy(chosen.copy())
            idx[~torch.from_numpy(valid[step * B:(step + 1) * B].copy())] = -1
            yield [np.fromfile(name, dtype=np.uint8) for name in names], names, idx, seeds[step * B:(step + 1) * B]

    def _feed(self, pipeline, batch) -> None:
        arrays, _, _, seeds = batch
        if self.train:
            feed_training_batch(pipeline, arrays, seeds)
        else:
            pipeline.feed_input("encoded", arrays)

    def epoch(self, epoch: int, start: int = 0):
        """Yield ``(images [B, 3, S, S] on device in dtype, indices [B] int64 with -1 for padding)``,
        from batch ``start`` of ``epoch`` on."""
        pipeline = self._build()
        batches = self._batches(epoch, start)
        pending = []  # (names, indices) of the batches scheduled, oldest first; None: a filler to drop

        def schedule() -> None:
            if not self.primed:
                # DALI's first schedule_run runs PREFETCH_DEPTH iterations at once: feed that many batches first
                # (repeating the last one as fillers whose outputs are dropped when the epoch has fewer).
                fed = [b for b in (next(batches, None) for _ in range(PREFETCH_DEPTH)) if b is not None]
                if not fed:
                    return
                for k in range(PREFETCH_DEPTH):
                    batch = fed[min(k, len(fed) - 1)]
                    self._feed(pipeline, batch)
                    pending.append(batch[1:3] if k < len(fed) else None)
                pipeline.schedule_run()
                self.primed = True
                return
            batch = next(batches, None)
            if batch is not None:
                self._feed(pipeline, batch)
                pipeline.schedule_run()
                pending.append(batch[1:3])

        schedule()
        if self.primed:
            for _ in range(PREFETCH_DEPTH - len(pending)):
                schedule()
        step = start
        while pending:
            entry = pending.pop(0)
            try:
                (out,) = pipeline.outputs()
            except RuntimeError as exc:
                first_line = next((line for line in str(exc).splitlines() if line.strip()), "")
                self.pipeline, self.primed = None, False  # a failed pipeline is not reused
                names = entry[0] if entry else []
                raise DataError(f"DALI failed at batch {step + 1} of epoch {epoch + 1}: one of {names} could not be "
                                f"decoded ({first_line.strip()}); remove or replace it, or check the data with "
                                "--verify_images decode") from exc
            if entry is None:  # a filler
                pipeline.release_outputs()
                continue
            names, idx = entry
            images = self._to_torch(out)
            pipeline.release_outputs()
            schedule()
            step += 1
            yield images.to(self.dtype) if self.dtype != torch.uint8 else images, idx

    def _to_torch(self, out) -> torch.Tensor:
        if self.device.type != "cuda":
            return torch.from_numpy(out.as_array()).to(self.device)
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = out.as_tensor()
        images = torch.empty(dense.shape(), dtype=torch.uint8 if self.dtype == torch.uint8 else torch.float32,
                             device=self.device)
        feed_ndarray(dense, images, cuda_stream=torch.cuda.current_stream(self.device))
        return images

