"""The kNN monitor: is the encoder learning features that separate classes?

The reconstruction loss says little about the encoder, which is what MAE is for. With a labeled
validation folder (ImageNet layout, one sub-folder per class), the monitor extracts frozen encoder
features (``MAEViT.extract_features``, no masking; ``mean`` or ``cls`` pooling) of a labeled memory
bank and of the validation images, and reports the weighted kNN top-1 accuracy of the protocol
DINO and solo-learn use: cosine similarity, the k = 20 nearest bank images vote for their class
with weight ``exp(similarity / 0.07)``.

Every rank extracts the features of its share of the images (the loaders' sharding), and the
features are gathered so that each rank holds them all; the vote itself is a few matrix products.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mae_fast.data.files import class_folder_images, class_root, scan_images
from mae_fast.errors import DataError

K = 20
TEMPERATURE = 0.07


def labeled_images(path: str | os.PathLike, split: str, user: str = "the kNN monitor"
                   ) -> tuple[list[str], np.ndarray, list[str]]:
    """``(files, labels, classes)`` of an ImageNet-layout folder: ``path/split/<class>/*`` or ``path/<class>/*``
    (:func:`mae_fast.data.files.class_folder_images`).

    ``user``: what needs the classes, as the error names it (the kNN monitor, the linear probe).

    Raises:
        DataError: the folder is missing, or holds no class sub-folders with images (a flat folder), naming the
            folder.
    """
    files, labels, classes = class_folder_images(path, split)
    if not classes:
        raise DataError(f"{user} needs classes: {str(class_root(path, split))!r} has no class sub-folders with "
                        "images (ImageNet layout: <folder>/<class>/*.JPEG)")
    return files, np.asarray(labels, dtype=np.int64), classes


def weighted_knn(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                 k: int = K, temperature: float = TEMPERATURE, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN class scores [Q, num_classes] of ``queries`` [Q, D] against ``bank`` [N, D] with labels [N].

    Features are L2-normalized here; each query's ``k`` most similar bank entries vote for their class with
    weight ``exp(cosine / temperature)``.
    """
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, queries.shape[0], chunk):
        similarity = queries[start:start + chunk] @ bank.T
        top, index = similarity.topk(k, dim=1)
        votes = torch.zeros(top.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[index], (top / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def top_k_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """The share of rows whose label is among the ``k`` highest scores."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1).float().mean().item()


@torch.no_grad()
def extract_features(model, loader, num_samples: int, device: torch.device, autocast,
                     pool: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every image ``loader`` deals to the ranks, on every rank.

    ``loader`` is one rank's evaluation loader (``epoch(0)`` yields ``(images, indices)``, -1 for a marked slot:
    padding, or an image that did not decode).

    Returns:
        ``features`` [num_samples, D] float32 in dataset order, and ``present`` [num_samples] bool: False for the
        images no slot delivered (their rows are zeros; leave them out).
    """
    chunks, indices = [], []
    for images, index in loader.epoch(0):
        with autocast:
            chunks.append(model.extract_features(images, pool=pool).float())
        indices.append(index.to(device))
    local = torch.cat(chunks) if chunks else torch.zeros(0, 1, device=device)
    local_index = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:  # every rank deals the same number of slots
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        gathered_index = [torch.empty_like(local_index) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local.contiguous())
        dist.all_gather(gathered_index, local_index.contiguous())
        local, local_index = torch.cat(gathered), torch.cat(gathered_index)
    valid = local_index >= 0
    features = torch.zeros(num_samples, local.shape[1], device=device)
    features[local_index[valid]] = local[valid]
    present = torch.zeros(num_samples, dtype=torch.bool, device=device)
    present[local_index[valid]] = True
    return features, present


class KnnMonitor:
    """Weighted kNN top-1 of the encoder's features, from a memory bank to a validation set (both labeled).

    Args:
        val_path: ImageNet-layout validation folder (``val/<class>/`` or ``<class>/``).
        bank_path: ImageNet-layout folder of the memory bank (its ``train/`` split when there is one).
        bank_size: at most this many bank images: a fixed subset (the same in every run), all classes kept.
        make_loader: ``make_loader(files) -> loader`` building one rank's evaluation loader over ``files``.
        pool: "mean" or "cls" (see ``MAEViT.extract_features``).
        verify: the scan of the files ("header" or "decode"), as for training data.
        backend: the data backend that will read them (formats it cannot read are left out).

    Raises:
        DataError: a folder without classes, no readable images, or validation classes the bank lacks.
    """

    def __init__(self, val_path, bank_path, bank_size: int, make_loader, pool: str = "mean", verify: str = "header",
                 backend: str = "torch"):
        self.pool = pool
        val_files, val_labels, val_classes = self._readable(*labeled_images(val_path, "val"), verify, backend)
        bank_files, bank_labels, bank_classes = self._readable(*labeled_images(bank_path, "train"), verify, backend)
        missing = sorted(set(val_classes) - set(bank_classes))
        if missing:
            raise DataError(f"the kNN memory bank ({bank_path}) lacks classes of the validation set ({val_path}): "
                            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if len(bank_files) > bank_size:  # a fixed subset: the same whatever the run's seed
            keep = np.sort(np.random.default_rng(0).permutation(len(bank_files))[:bank_size])
            bank_files, bank_labels = [bank_files[i] for i in keep], bank_labels[keep]
        remap = {name: bank_classes.index(name) for name in val_classes}
        self.classes = bank_classes
        self.val_labels = torch.as_tensor([remap[val_classes[i]] for i in val_labels])
        self.bank_labels = torch.as_tensor(bank_labels)
        self.val_loader, self.bank_loader = make_loader(val_files), make_loader(bank_files)
        self.num_val, self.num_bank = len(val_files), len(bank_files)

    @staticmethod
    def _readable(files, labels, classes, verify, backend):
        good, _ = scan_images(files, verify=verify, backend=backend)
        if not good:
            raise DataError(f"none of the {len(files)} labeled images (e.g. {files[0]}) can be read")
        keep = set(good)
        chosen = [i for i, f in enumerate(files) if f in keep]
        return [files[i] for i in chosen], labels[chosen], classes

    def evaluate(self, model, device: torch.device, autocast) -> dict:
        """``{"knn_top1": float, "knn_top5": float}`` for ``model`` (an MAEViT, switched to eval and back)."""
        was_training = model.training
        model.eval()
        try:
            bank, in_bank = extract_features(model, self.bank_loader, self.num_bank, device, autocast, self.pool)
            queries, asked = extract_features(model, self.val_loader, self.num_val, device, autocast, self.pool)
        finally:
            model.train(was_training)
        # Images no slot delivered (marked slots only) are neither in the bank nor asked about.
        scores = weighted_knn(bank[in_bank], self.bank_labels.to(device)[in_bank], queries[asked], len(self.classes))
        labels = self.val_labels.to(device)[asked]
        return {"knn_top1": top_k_accuracy(scores, labels, 1), "knn_top5": top_k_accuracy(scores, labels, 5)}
