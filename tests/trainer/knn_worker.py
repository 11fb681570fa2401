"""Run by test_knn.py under torchrun: the trainer's kNN monitor once, with the features it gathered saved per rank."""

import sys

import torch

import mae_fast.knn as knn
from mae_fast.distributed import teardown_distributed
from mae_fast.pretrain import config_from_args
from mae_fast.trainer import MAETrainer


def run_knn_recording_features(args: list[str]) -> dict:
    """``MAETrainer.run_knn`` on a fresh trainer, with what ``extract_features`` returned for the bank and the
    validation set: ``{"bank": [N, D], "val": [Q, D], "knn_top1", "knn_top5"}`` on the CPU."""
    extracted = []
    extract_features = knn.extract_features

    def recording(*a, **kw):
        result = extract_features(*a, **kw)
        extracted.append(result[0].cpu())  # (features, which rows hold an image)
        return result

    knn.extract_features = recording
    try:
        trainer = MAETrainer(config_from_args(args))
        stats = trainer.run_knn()
    finally:
        knn.extract_features = extract_features
    bank, val = extracted
    return {"bank": bank, "val": val, **stats, "rank": trainer.dist.rank, "world_size": trainer.dist.world_size}


if __name__ == "__main__":
    result_path, args = sys.argv[1], sys.argv[2:]
    result = run_knn_recording_features(args)
    torch.save(result, f"{result_path}.rank{result['rank']}")
    teardown_distributed()
