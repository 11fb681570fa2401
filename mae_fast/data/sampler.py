"""Which images each rank reads in each epoch.

The same rule serves every loader backend, so sharding and shuffling mean the same thing whatever
decodes the images: a permutation seeded by (seed, epoch), padded by wrapping around to a whole
number of global batches (as ``pad_last_batch`` does), then dealt out round-robin to the ranks
(as ``DistributedSampler`` does). Every image is read exactly once per epoch across the ranks;
the few padding slots repeat images and are flagged invalid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


#: Shards each rank reads at once, interleaving their images, so a batch mixes several shards.
SHARD_LANES = 4


@dataclass
class ShardPlan:
    """One rank's epoch over a shard set (see :func:`shard_epoch_plan`)."""

    positions: np.ndarray
    """int64 [batches * batch_size]: the global position of each slot (in the epoch's shard order)."""
    valid: np.ndarray
    """bool, same length: False for padding slots (which repeat the rank's first images)."""
    seeds: np.ndarray
    """int64, same length: the augmentation seed of each slot."""
    lanes: list[tuple[int, int]]
    """The rank's ``[first, end)`` runs of global positions, one per lane, each read front to back."""
    lane_of: np.ndarray
    """int64 [real slots]: the lane each real (non-padding) slot's image comes from, in slot order."""
    shard_order: np.ndarray
    """int64: the epoch's order of the shards; global positions count images in this order."""
    counts: np.ndarray
    """int64: images per shard, in ``shard_order``."""


def shard_epoch_plan(counts, batch_size: int, rank: int, world_size: int, epoch: int, seed: int,
                     shuffle: bool = True, lanes: int = SHARD_LANES) -> ShardPlan:
    """This rank's images of a shard set for one epoch, in the order it reads them.

    Shards are read front to back only (they may stream from object storage), so an epoch is
    planned by shard: the shards in an order seeded by (seed, epoch), their images counted in that
    order, and each rank given a contiguous run of about N / world_size of them (so a rank opens
    about 1 / world_size of the shards). A rank reads its run as ``lanes`` contiguous parts at
    once and interleaves them image by image. Every image is read exactly once per epoch across
    the ranks; ranks whose run is shorter are padded, by repeating their first images flagged
    invalid, to the same number of batches. Images within a shard keep the shard's order (write
    shards in a random order, as ``python -m mae_fast.prepare`` does).

    Raises:
        ValueError: no images, or a rank outside [0, world_size).
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total < 1:
        raise ValueError(f"the shard set must hold images, got counts {counts.tolist()[:8]}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    order = np.random.default_rng([seed, epoch]).permutation(len(counts)) if shuffle else np.arange(len(counts))
    first, end = total * rank // world_size, total * (rank + 1) // world_size
    mine = end - first
    slots = shard_batches_per_epoch(total, batch_size, world_size) * batch_size
    parts = max(1, min(lanes, mine))
    bounds = [first + mine * k // parts for k in range(parts + 1)]
    runs = [(bounds[k], bounds[k + 1]) for k in range(parts)]
    # Interleave: item i of every lane in turn, skipping lanes that have run out.
    longest = max(b - a for a, b in runs)
    grid = np.full((longest, parts), -1, dtype=np.int64)
    for k, (a, b) in enumerate(runs):
        grid[:b - a, k] = np.arange(a, b)
    taken = grid.reshape(-1) >= 0
    positions = grid.reshape(-1)[taken]
    lane_of = np.tile(np.arange(parts), longest)[taken]
    valid = np.arange(slots) < mine
    padded = np.resize(positions, slots) if mine else np.full(slots, first, dtype=np.int64)
    seeds = np.random.default_rng([seed, epoch, 2]).integers(0, 2**31 - 1, size=total, dtype=np.int64)
    return ShardPlan(padded.astype(np.int64), valid, seeds[np.minimum(padded, total - 1)], runs, lane_of,
                     order, counts[order])


def shard_batches_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Batches each rank runs per epoch over a shard set: ceil(ceil(N / world_size) / batch_size)."""
    return -(-(-(-num_samples // world_size)) // batch_size)
