"""Which images each rank reads in each epoch.

The same rule serves every loader backend, so sharding and shuffling mean the same thing whatever
decodes the images: a permutation seeded by (seed, epoch), padded by wrapping around to a whole
number of global batches (as ``pad_last_batch`` does), then dealt out round-robin to the ranks
(as ``DistributedSampler`` does). Every image is read exactly once per epoch across the ranks;
the few padding slots repeat images and are flagged invalid.
"""

from __future__ import annotations

import math

import numpy as np


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Batches each rank runs per epoch: ceil(N / (batch_size * world_size))."""
    return math.ceil(num_samples / (batch_size * world_size))


def epoch_indices(num_samples: int, batch_size: int, rank: int, world_size: int, epoch: int, seed: int,
                  shuffle: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This rank's sample indices for one epoch.

    Slot ``j`` of this rank's batch ``k`` is slot ``j * world_size + rank`` of global batch ``k``;
    the augmentation seed belongs to the global slot, so a run on one rank with the global batch
    sees the same images, augmented the same way, as a run on many ranks.

    Returns:
        ``indices`` int64 [batches_per_epoch * batch_size] (consecutive runs of ``batch_size`` are
        the batches), ``valid`` bool of the same length (False for padding slots) and ``seeds``
        int64 (one augmentation seed per slot).

    Raises:
        ValueError: no samples, or a rank outside [0, world_size).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    order = (np.random.default_rng([seed, epoch]).permutation(num_samples) if shuffle
             else np.arange(num_samples))
    total = batches_per_epoch(num_samples, batch_size, world_size) * batch_size * world_size
    padded = np.resize(order, total)  # wraps around
    valid = np.arange(total) < num_samples
    seeds = np.random.default_rng([seed, epoch, 1]).integers(0, 2**31 - 1, size=total, dtype=np.int64)
    mine = slice(rank, None, world_size)
    return padded[mine].astype(np.int64), valid[mine], seeds[mine]
