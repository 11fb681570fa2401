"""LossWatch: whether the training loss is in its normal range, tracked on the device without host syncs.

A run can go bad before its loss is NaN: after a learning-rate blow-up the loss first jumps far
above where it was, and only a few steps later overflows. Checkpoints written in between hold
finite but useless parameters, so "the last checkpoint" is not "the last good checkpoint".

Each step's loss is compared with the mean of the recent in-range losses. A loss that is NaN, inf,
or above ``spike_factor`` times that mean is out of range; the first step of the current
out-of-range stretch is kept (``excursion_start``), and a loss back in range ends the stretch. The
parameters saved after optimizer step ``s`` produce the loss of step ``s + 1``, so a checkpoint of
step ``s`` is known good when step ``s + 1`` came before the current stretch:
``s + 1 < excursion_start`` (or no stretch is under way). The state is saved in each checkpoint
(``loss_stats``) and restored on resume, so the recent mean carries over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

#: In-range losses averaged into the recent mean (a running mean over about this many steps).
WINDOW = 100
#: In-range losses needed before a spike can be judged (NaN and inf count from the first step).
WARMUP = 5


@dataclass
class LossStats:
    """The host-side view of a :class:`LossWatch`, as saved in checkpoints (``as_dict``)."""

    recent_mean: float
    count: int
    excursion_start: int  # first step of the current out-of-range stretch, -1 when in range
    first_nonfinite: int  # first step with a NaN/inf loss, -1 when none

    def in_range(self) -> bool:
        return self.excursion_start < 0

    def known_good(self, step: int) -> bool:
        """Whether the parameters after optimizer step ``step`` gave an in-range loss at the step after it."""
        return self.excursion_start < 0 or step + 1 < self.excursion_start

    def as_dict(self) -> dict:
        return {"recent_mean": self.recent_mean, "count": self.count, "excursion_start": self.excursion_start,
                "first_nonfinite": self.first_nonfinite}


class LossWatch:
    """Device-side loss-range tracking for one rank; ``observe`` never synchronizes with the host.

    Args:
        device: where the losses live.
        spike_factor: a loss above ``spike_factor * recent mean`` is out of range; 0 counts only NaN and inf.
    """

    def __init__(self, device: torch.device, spike_factor: float = 3.0):
        self.device, self.spike_factor = device, float(spike_factor)
        self.mean = torch.zeros((), dtype=torch.float32, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.excursion_start = torch.full((), -1, dtype=torch.int64, device=device)
        self.first_nonfinite = torch.full((), -1, dtype=torch.int64, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        """Fold in the loss of (a micro-batch of) optimizer step ``step`` (1-based: the step it leads to)."""
        loss = loss.detach().float()
        finite = torch.isfinite(loss)
        out = ~finite
        if self.spike_factor:
            out = out | ((self.count >= WARMUP) & (loss > self.spike_factor * self.mean))
        step_t = torch.full((), step, dtype=torch.int64, device=self.device)
        self.first_nonfinite = torch.where((self.first_nonfinite < 0) & ~finite, step_t, self.first_nonfinite)
        started = torch.where(self.excursion_start < 0, step_t, self.excursion_start)
        self.excursion_start = torch.where(out, started, torch.full_like(self.excursion_start, -1))
        weight = 1.0 / torch.clamp(self.count + 1, max=WINDOW).float()
        self.mean = torch.where(out, self.mean, self.mean + (torch.where(finite, loss, 0.0) - self.mean) * weight)
        self.count = self.count + (~out).long()

    def stats(self, reduce: bool = True) -> LossStats:
        """The state on the host (one synchronization). With ``reduce`` and several ranks, the earliest
        out-of-range step of any rank and the mean over ranks, so every rank judges alike."""
        mean, count = self.mean.clone(), self.count.clone()
        # -1 means "none": map it above every step for a MIN over ranks.
        none = torch.iinfo(torch.int64).max
        marks = torch.stack([self.excursion_start, self.first_nonfinite])
        marks = torch.where(marks < 0, torch.full_like(marks, none), marks)
        if reduce and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(marks, op=dist.ReduceOp.MIN)
            dist.all_reduce(mean)
            mean = mean / dist.get_world_size()
        excursion, nonfinite = (int(v) if v != none else -1 for v in marks.tolist())
        return LossStats(float(mean), int(count), excursion, nonfinite)

    def load(self, saved: dict | None) -> None:
        """Restore the recent mean from a checkpoint's ``loss_stats`` (the out-of-range marks start afresh)."""
        if not saved:
            return
        self.mean.fill_(float(saved["recent_mean"]))
        self.count.fill_(int(saved["count"]))
