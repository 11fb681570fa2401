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

A shard set cannot be checked up front, so its members are checked as they are read (by their
header, or with ``verify="decode"`` by a full decode on the CPU), and a member that still fails in
DALI does not stop the run: when the pipeline raises, the members of the batches in flight are
decoded on the CPU, the ones that fail are left out (their slots hold a copy of another image and
are marked -1, as the torch loader marks them) and named in one warning, and the batches run again
on a new pipeline. Image folders are checked before training instead (``--verify_images``).
"""

from __future__ import annotations

import itertools
import logging

import torch

from mae_fast.data import files as image_checks
from mae_fast.data.files import image_size
from mae_fast.data.sampler import batches_per_epoch, epoch_indices, shard_batches_per_epoch
from mae_fast.errors import BackendUnavailableError, DataError, install_hint
from mae_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, train_crops

logger = logging.getLogger("mae_fast")


def dali_unavailable_reason() -> str | None:
    """Why DALI cannot be used here, or None."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception as exc:
        return f"NVIDIA DALI is not importable ({type(exc).__name__}: {exc}); install it with {install_hint('dali')}"
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


class PretrainingPipeline:
    """Pretraining's pipeline (:func:`build_pipeline`) and how each batch is fed (:func:`feed_training_batch`, or
    the encoded images alone for evaluation): what a :class:`DaliLoader` runs unless given another recipe.

    A recipe has ``build(batch_size, device_id, num_threads)``, the built pipeline, and ``feed(pipeline, arrays,
    seeds)``, which feeds one batch's encoded images and whatever its slots' seeds draw; see
    :mod:`mae_fast.data.dali_finetune` for fine-tuning's.
    """

    def __init__(self, size: int, seed: int, train: bool, raw: bool, crop_decode: bool = True):
        self.size, self.seed, self.train, self.raw, self.crop_decode = size, seed, train, raw, crop_decode

    def build(self, batch_size: int, device_id: int | None, num_threads: int):
        return build_pipeline(batch_size, self.size, self.seed, device_id, num_threads, self.train, raw=self.raw,
                              crop_decode=self.crop_decode)

    def feed(self, pipeline, arrays: list, seeds) -> None:
        if self.train:
            feed_training_batch(pipeline, arrays, seeds)
        else:
            pipeline.feed_input("encoded", arrays)


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

    ``recipe``: what the pipeline does (default: pretraining's, :class:`PretrainingPipeline`); ``labels``: yield each
    image's class too, from int64 [len(files)] (a folder) or, with True, the samples' ``cls`` members (a shard set).
    """

    backend = "dali"

    def __init__(self, files, size: int, batch_size: int, rank: int, world_size: int, device: torch.device,
                 seed: int, num_workers: int, train: bool = True, dtype: torch.dtype = torch.float32,
                 crop_decode: bool = True, verify: str = "header", recipe=None, labels=None):
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
        if verify not in ("header", "decode"):
            raise ValueError(f"verify must be 'header' or 'decode', got {verify!r}")
        self.verify = verify  # how shard members are checked as they are read
        self.num_samples = self.shard_set.num_samples if self.shard_set else len(files)
        if labels is not None and labels is not True:
            labels = torch.as_tensor(labels, dtype=torch.int64)
        self.labels = labels  # None, True (a shard set's cls members) or a tensor of each file's class
        seed_of_rank = (seed * 1_000_003 + rank * 7919) % (2**31 - 1)
        self.recipe = recipe or PretrainingPipeline(size, seed_of_rank, train, raw=dtype == torch.uint8,
                                                    crop_decode=crop_decode)
        self.pipeline, self.primed = None, False
        self.builds = 0  # pipelines built (one per run)

    def __len__(self) -> int:
        if self.shard_set:
            return shard_batches_per_epoch(self.num_samples, self.batch_size, self.world_size)
        return batches_per_epoch(self.num_samples, self.batch_size, self.world_size)

    def _build(self):
        if self.pipeline is None:
            device_id = (self.device.index or 0) if self.device.type == "cuda" else None
            self.pipeline = self.recipe.build(self.batch_size, device_id, self.num_threads)
            self.builds += 1
        return self.pipeline

    def _batches(self, epoch: int, start: int):
        """Yield ``(encoded arrays, names, indices, seeds, labels)`` per batch of ``epoch`` from batch ``start`` on
        (the slots' augmentation seeds, as the sampler deals them; labels int64 [B], or None without labels)."""
        import numpy as np

        B = self.batch_size
        if self.shard_set:
            from mae_fast.data.torch_loader import ShardBatches

            batches = ShardBatches(self.shard_set, B, self.rank, self.world_size, self.seed, shuffle=self.train,
                                   labels=self.labels is True)
            batches.set_epoch(epoch, start)
            check = image_checks.encoded_problem if self.verify == "header" else image_checks.decoded_problem
            for step, items in enumerate(batches):
                indices, valid, classes = batches.issued[step]
                problems = {}  # each member checked once: padding slots repeat another slot's bytes
                for data, _, name in items:
                    if name not in problems:
                        problems[name] = check(data, "dali")
                arrays = [np.frombuffer(data, dtype=np.uint8) for data, _, _ in items]
                names = [name for _, _, name in items]
                seeds = [seed for _, seed, _ in items]
                idx = torch.tensor(indices, dtype=torch.int64)
                labels = torch.tensor(classes, dtype=torch.int64) if self.labels is True else None
                bad = {slot: problems[name] for slot, name in enumerate(names) if problems[name] is not None}
                if bad:
                    self._leave_out(arrays, names, idx, labels, bad, f"batch {start + step + 1} of epoch {epoch + 1}")
                yield arrays, names, idx, seeds, labels
            return
        indices, valid, seeds = epoch_indices(self.num_samples, B, self.rank, self.world_size, epoch, self.seed,
                                              shuffle=self.train)
        for step in range(start, len(self)):
            chosen = indices[step * B:(step + 1) * B]
            names = [self.files[i] for i in chosen]
            idx = torch.from_numpy(chosen.copy())
            labels = self.labels[idx] if self.labels is not None else None  # padding: the class of the image repeated
            idx[~torch.from_numpy(valid[step * B:(step + 1) * B].copy())] = -1
            yield ([np.fromfile(name, dtype=np.uint8) for name in names], names, idx, seeds[step * B:(step + 1) * B],
                   labels)

    def _feed_one(self, pipeline, batch) -> None:
        """Feed one batch ``(arrays, names, indices, seeds, labels)`` as the recipe feeds it (training batches with
        their crops, and whatever else the recipe draws, drawn from the seeds)."""
        arrays, _, _, seeds, _ = batch
        self.recipe.feed(pipeline, arrays, seeds)

    @staticmethod
    def _leave_out(arrays, names, idx, labels, bad: dict[int, str], where: str) -> None:
        """Replace the members of ``bad`` (slot -> why) by a copy of a good one of the batch (and its label, when
        ``labels`` is a tensor), mark them -1, name them.

        Raises:
            DataError: no member of the batch decodes.
        """
        good = next((slot for slot in range(len(arrays)) if slot not in bad), None)
        first = min(bad)
        if good is None:
            raise DataError(f"no image of {where} decodes ({names[first]}: {bad[first]})")
        named = {names[slot]: why for slot, why in bad.items() if idx[slot] >= 0}
        for slot in bad:  # DALI cannot skip an image mid-batch: replace it, mark it
            arrays[slot], idx[slot] = arrays[good], -1
            if labels is not None:
                labels[slot] = labels[good]
        if named:
            logger.warning("left out %d image(s) that do not decode (their slots are marked invalid): %s", len(named),
                           "; ".join(f"{name} ({why})" for name, why in list(named.items())[:5]))

    def _without_undecodable(self, batch, where: str):
        """``batch`` with the members that fail a CPU decode left out (see :meth:`_leave_out`), and whether any did."""
        arrays, names, idx, seeds = list(batch[0]), list(batch[1]), batch[2].clone(), batch[3]
        labels = batch[4].clone() if batch[4] is not None else None
        problems = {}
        for array, name in zip(arrays, names):
            if name not in problems:
                problems[name] = image_checks.decoded_problem(array.tobytes(), "dali")
        bad = {slot: problems[name] for slot, name in enumerate(names) if problems[name] is not None}
        if bad:
            self._leave_out(arrays, names, idx, labels, bad, where)
        return (arrays, names, idx, seeds, labels), bool(bad)

    def _feed(self, pipeline, batches, pending: list) -> None:
        """Keep ``PREFETCH_DEPTH`` batches in flight; ``pending`` lists them, oldest first (None: a filler to drop)."""
        if not self.primed:
            # DALI's first schedule_run runs PREFETCH_DEPTH iterations at once: feed that many batches first
            # (repeating the last one as fillers whose outputs are dropped when the epoch has fewer).
            fed = [b for b in (next(batches, None) for _ in range(PREFETCH_DEPTH)) if b is not None]
            if not fed:
                return
            for k in range(PREFETCH_DEPTH):
                batch = fed[min(k, len(fed) - 1)]
                self._feed_one(pipeline, batch)
                pending.append(batch if k < len(fed) else None)
            pipeline.schedule_run()
            self.primed = True
            return
        while len(pending) < PREFETCH_DEPTH:
            batch = next(batches, None)
            if batch is None:
                return
            self._feed_one(pipeline, batch)
            pipeline.schedule_run()
            pending.append(batch)

    def epoch(self, epoch: int, start: int = 0):
        """Yield ``(images [B, 3, S, S] on device in dtype, indices [B] int64 with -1 for padding and left-out
        images)``, from batch ``start`` of ``epoch`` on; with ``labels``, ``(images, labels [B] int64 on the CPU,
        indices)`` (a marked slot's label is that of the image it repeats).

        Raises:
            DataError: DALI failed on a file of an image folder, or on a batch of shard members that all decode on
                the CPU; or no member of a batch decodes.
        """
        pipeline = self._build()
        batches = self._batches(epoch, start)
        pending = []  # the batches fed, (arrays, names, indices, seeds, labels), oldest first; None: a filler
        self._feed(pipeline, batches, pending)
        step = start
        while pending:
            entry = pending.pop(0)
            try:
                (out,) = pipeline.outputs()
            except RuntimeError as exc:
                self.pipeline, self.primed = None, False  # a failed pipeline is not reused
                in_flight = [b for b in [entry, *pending] if b is not None]
                checked = [self._without_undecodable(b, f"batch {step + k + 1} of epoch {epoch + 1}")
                           for k, b in enumerate(in_flight)] if self.shard_set else []
                if not any(changed for _, changed in checked):  # an image folder is checked before training
                    first_line = next((line for line in str(exc).splitlines() if line.strip()), "")
                    names = entry[1] if entry else []
                    how = ("though each decodes on the CPU; remove or replace it" if self.shard_set else
                           "remove or replace it, or check the data with --verify_images decode")
                    raise DataError(f"DALI failed at batch {step + 1} of epoch {epoch + 1}: one of {names} could not "
                                    f"be decoded ({first_line.strip()}); {how}") from exc
                # The batches in flight again, without the members that fail, on a new pipeline.
                batches = itertools.chain([batch for batch, _ in checked], batches)
                pending.clear()
                pipeline = self._build()
                self._feed(pipeline, batches, pending)
                continue
            if entry is None:  # a filler
                pipeline.release_outputs()
                continue
            images = self._to_torch(out)
            pipeline.release_outputs()
            self._feed(pipeline, batches, pending)
            step += 1
            images = images.to(self.dtype) if self.dtype != torch.uint8 else images
            if self.labels is None:
                yield images, entry[2]
            else:
                yield images, entry[4], entry[2]

    def _to_torch(self, out) -> torch.Tensor:
        if self.device.type != "cuda":
            return torch.from_numpy(out.as_array()).to(self.device)
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = out.as_tensor()
        images = torch.empty(dense.shape(), dtype=torch.uint8 if self.dtype == torch.uint8 else torch.float32,
                             device=self.device)
        feed_ndarray(dense, images, cuda_stream=torch.cuda.current_stream(self.device))
        return images

