"""Labeled data for fine-tuning: the classes of a folder or shard set, and the loader of labeled batches.

A folder is labeled by ImageNet layout (``train/<class>/*``, ``val/<class>/*``, or ``<class>/*``
directly), its classes sorted as torchvision's ``ImageFolder`` sorts them
(:func:`mae_fast.data.files.class_folder_images`). A shard set is labeled by each sample's ``cls``
member (the class index as text, as ``python -m mae_fast.prepare`` writes it from the folders); its
class names are the manifest's ``classes``, or ``"0" .. "n-1"`` from the ``cls`` values when the
manifest records none (read once, from the members alone where index files locate them).

:class:`ClassificationLoader` wraps a loader built with labels (one of the ``torch`` backend's, with a per-sample
transform, or a :class:`~mae_fast.data.dali_loader.DaliLoader` with the fine-tuning recipe) and yields
``(images, labels, indices)``; see :func:`mae_fast.data.build_classification_loader`.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mae_fast.data.files import IMAGE_EXTENSIONS, class_folder_images, class_root, readable_images
from mae_fast.data.shards import ShardSet, read_labels
from mae_fast.data.torch_loader import class_index
from mae_fast.data.transforms import normalize
from mae_fast.errors import DataError

logger = logging.getLogger("mae_fast")

LAYOUT = "ImageNet layout: <folder>/train/<class>/*.JPEG, or <folder>/<class>/*.JPEG"


@dataclass
class LabeledFolder:
    """The readable images of a labeled folder, each one's class index, and the class names."""

    files: list[str]
    labels: np.ndarray
    classes: list[str]


def labeled_folder(path: str | os.PathLike, split: str, flag: str, verify: str = "header", workers: int = 8,
                   backend: str = "torch") -> LabeledFolder:
    """The images of ``path/split/<class>/`` (or ``path/<class>/``) that ``backend`` reads, with their classes.

    Images directly in the folder belong to no class: they are left out, with a warning.

    Raises:
        DataError: the folder is missing, has no class sub-folders with images (naming ``flag`` and the path), or
            holds nothing ``backend`` can read.
    """
    root = class_root(path, split)
    if not root.is_dir():
        raise DataError(f"{flag} {path}: no such folder ({LAYOUT})")
    files, labels, classes = class_folder_images(path, split)
    if not classes:
        raise no_class_folders(path, split, flag)
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        logger.warning("%s %s: %d image(s) directly in %s belong to no class and are left out (e.g. %s)", flag, path,
                       len(loose), root, loose[0].name)
    good = set(readable_images(files, root, verify, workers, backend))
    kept = [i for i, f in enumerate(files) if f in good]
    return LabeledFolder([files[i] for i in kept], labels[kept], classes)


def no_class_folders(path: str | os.PathLike, split: str, flag: str) -> DataError:
    """The error for a folder without class sub-folders (naming ``flag``, the path and the layout)."""
    return DataError(f"{flag} {path}: {str(class_root(path, split))!r} has no class sub-folders with images, so its "
                     f"images have no labels ({LAYOUT})")


def shard_classes(shard_set: ShardSet, flag: str, spec: str, workers: int = 8) -> list[str]:
    """The class names of a shard set: the manifest's, else ``"0" .. "n-1"`` for the largest ``cls`` value n - 1
    (every shard's ``cls`` members read once).

    Raises:
        DataError: no sample carries a ``cls`` member that reads as a class index (naming ``flag`` and ``spec``).
        ShardReadError: a remote shard kept failing.
    """
    if shard_set.classes is not None:
        return list(shard_set.classes)
    logger.info("%s %s: its manifest names no classes; reading the cls members of its %d shard(s) to count them",
                flag, spec, len(shard_set.paths))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        values = [class_index(text) for texts in pool.map(lambda path: read_labels(path, shard_set.timeout),
                                                         shard_set.paths) for text in texts]
    labeled = [v for v in values if v >= 0]
    if not labeled:
        raise DataError(f"{flag} {spec}: its samples carry no cls member (the class index, as text), so its images "
                        "have no labels; prepare the set from an ImageNet-layout folder with python -m "
                        "mae_fast.prepare, which records each image's class")
    if len(labeled) < len(values):
        logger.warning("%s %s: %d of %d samples carry no class index (no cls member, or not a number); their slots "
                       "are marked and left out", flag, spec, len(values) - len(labeled), len(values))
    return [str(i) for i in range(max(labeled) + 1)]


def check_same_classes(train: list[str], val: list[str], train_where: str, val_where: str) -> None:
    """Refuse a validation set whose classes are not the training set's, index for index.

    Raises:
        DataError: the counts differ (both named), or the first class whose name differs (both names).
    """
    if len(train) != len(val):
        raise DataError(f"{val_where} has {len(val)} classes and the training set ({train_where}) {len(train)}: "
                        "validation needs the training set's classes")
    for i, (a, b) in enumerate(zip(train, val)):
        if a != b:
            raise DataError(f"{val_where}: class {i} is {b!r} where the training set ({train_where}) has {a!r}: "
                            "validation needs the training set's classes, in the same order")


class ClassificationLoader:
    """One rank's labeled batches: wraps a loader built with labels (``inner``, whose ``epoch`` yields ``(images,
    labels, indices)``: the ``torch`` backend's uint8 pixels, or DALI's normalized float32 images) and delivers,
    from ``epoch(e, start)``:

    - ``images`` float32 [B, 3, S, S] on the device, ImageNet-normalized (here, from uint8 pixels) and, in
      training with ``erasing`` (a :class:`~mae_fast.data.transforms.SeededErasing`), randomly erased here, on the
      device, each slot by its seed (the DALI pipeline erases on its own);
    - ``labels`` int64 [B] on the device, each in ``[0, num_classes)``: the image's class; a marked slot carries
      the class of the image it repeats (padding), or 0 where there is none, so that a loss or mixup never indexes
      out of range;
    - ``indices`` int64 [B] on the CPU: the dataset index, -1 for marked slots (padding, an image that does not
      decode, a sample without a class index in ``[0, num_classes)``), which the training weighs 0.

    Count only slots with ``indices >= 0``: over the ranks every image is delivered once per epoch.
    """

    def __init__(self, inner, classes: list[str], batch_size: int, erasing=None):
        self.inner, self.classes, self.batch_size, self.erasing = inner, list(classes), batch_size, erasing
        self.backend, self.num_samples, self.device = inner.backend, inner.num_samples, inner.device
        self.files = getattr(inner, "files", None)
        self.shard_set = getattr(inner, "shard_set", None)

    @property
    def num_classes(self) -> int:
        """The number of classes (``len(classes)``): the classifier head's width."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.inner)

    def epoch(self, epoch: int, start: int = 0):
        """Yield ``(images, labels, indices)`` (see the class) from batch ``start`` of ``epoch`` on: the batches an
        uninterrupted epoch gives from there, pixel for pixel."""
        seeds = self.inner.slot_seeds(epoch) if self.erasing is not None else None
        B = self.batch_size
        for step, (images, labels, indices) in enumerate(self.inner.epoch(epoch, start), start=start):
            labels, indices = self._checked(labels, indices, step, epoch)
            if images.dtype == torch.uint8:
                images = normalize(images, torch.float32)
            if seeds is not None:
                images = self.erasing(images, seeds[step * B:(step + 1) * B])
            yield images, labels.to(self.device, non_blocking=True), indices

    def _checked(self, labels: torch.Tensor, indices: torch.Tensor, step: int, epoch: int):
        """A slot whose label is no class index is marked (with one warning), and given label 0."""
        labels, indices = labels.clone(), indices.clone()
        stray = (labels < 0) | (labels >= len(self.classes))
        lost = stray & (indices >= 0)
        if lost.any():
            logger.warning("left out %d image(s) of batch %d of epoch %d without a class index in [0, %d) (dataset "
                           "indices %s)", int(lost.sum()), step + 1, epoch + 1, len(self.classes),
                           indices[lost].tolist()[:5])
            indices[lost] = -1
        labels[stray] = 0
        return labels, indices


def val_folder(data_path: str) -> Path:
    """``<data_path>/val``, the validation folder of an ImageNet-layout training folder.

    Raises:
        DataError: there is none.
    """
    folder = Path(data_path).expanduser() / "val"
    if not folder.is_dir():
        raise DataError(f"--data_path {data_path} has no val/ folder for validation ({LAYOUT}); give --val_path")
    return folder
