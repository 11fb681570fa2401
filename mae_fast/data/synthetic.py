"""Random images made on the device: measures pure compute throughput, no decoding."""

from __future__ import annotations

import torch


class SyntheticLoader:
    """``num_samples`` random normalized images per epoch, split over the ranks, generated on ``device``."""

    backend = "synthetic"

    def __init__(self, num_samples: int, size: int, batch_size: int, rank: int, world_size: int, device: torch.device,
                 seed: int, dtype: torch.dtype = torch.float32):
        self.num_samples, self.size, self.batch_size = num_samples, size, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device, self.dtype = torch.device(device), dtype

    def __len__(self) -> int:
        return max(1, self.num_samples // (self.batch_size * self.world_size))

    def epoch(self, epoch: int, start: int = 0):
        """Yield ``(images, indices)`` from batch ``start`` of ``epoch`` on."""
        generator = torch.Generator(device=self.device)
        for step in range(start, len(self)):
            # Seeded per batch, so batch k of an epoch is the same whether the epoch starts at 0 or resumes at k.
            generator.manual_seed((((self.seed * 1_000_003 + self.rank) * 7919 + epoch) * 100_003 + step) % 2**62)
            shape = (self.batch_size, 3, self.size, self.size)
            if self.dtype == torch.uint8:  # pixels, for the model's fused ops to normalize
                images = torch.randint(0, 256, shape, dtype=torch.uint8, device=self.device, generator=generator)
            else:
                images = torch.randn(shape, device=self.device, generator=generator)
            first = (step * self.world_size + self.rank) * self.batch_size
            yield images.to(self.dtype), torch.arange(first, first + self.batch_size)
