"""Named op shapes, defined once and shared by ``tests/ops`` and ``bench/``.

``TEST_SHAPES`` are small and odd on purpose (non-square grids, D and p*p*C not powers of two,
batch 1, a single kept patch, nothing masked) so that interpreted Triton stays fast on a CPU.
``MAE_SHAPES`` are the real MAE training shapes (batch 256, 224 px, mask ratio 0.75).
"""

from __future__ import annotations

from dataclasses import dataclass

from mae_fast.ops.sample_mask import num_kept


@dataclass(frozen=True)
class OpShape:
    """One MAE configuration as the fused ops see it."""

    name: str
    batch: int
    channels: int
    height: int
    width: int
    patch_size: int
    mask_ratio: float
    dim: int  # encoder width: gather_tokens
    decoder_dim: int  # decoder width: restore_tokens

    @property
    def grid(self) -> tuple[int, int]:
        return self.height // self.patch_size, self.width // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_kept(self) -> int:
        return num_kept(self.num_patches, self.mask_ratio)

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_size**2


TEST_SHAPES = (
    OpShape("square", 2, 3, 32, 32, 8, 0.75, 40, 24),
    OpShape("nonsquare", 3, 3, 24, 40, 8, 0.6, 24, 36),
    OpShape("batch1_keep1", 1, 2, 12, 12, 4, 0.85, 33, 17),
    OpShape("keep_all", 2, 3, 16, 16, 4, 0.0, 20, 12),
    OpShape("odd_patch", 2, 3, 15, 15, 5, 0.5, 17, 9),
)

MAE_SHAPES = (
    OpShape("vit_b16", 256, 3, 224, 224, 16, 0.75, 768, 512),
    OpShape("vit_l16", 256, 3, 224, 224, 16, 0.75, 1024, 512),
    OpShape("vit_h14", 256, 3, 224, 224, 14, 0.75, 1280, 512),
)
