"""LossWatch: whether the training loss is in its normal range, tracked on the device without host syncs.

A run can go bad before its loss is NaN: after a learning-rate blow-up the loss first jumps far
above where it was, and only a few steps later overflows, or it never overflows and stays far
above where it started. Checkpoints written in between hold finite but useless parameters, so
"the last checkpoint" is not "the last good checkpoint".

What is normal is judged from the first step on, by statistics that a few bad losses cannot move:
the median of the recent in-range losses (up to :data:`WINDOW`), capped by the loss the run
started at (the median of its first :data:`START_STEPS` in-range losses; an MAE's loss falls from
its start, so a loss that stays far above it has diverged however slowly it got there). A loss
that is NaN, inf, or above ``spike_factor`` times that level is out of range, and starts an
excursion (``excursion_start``, the first step of it). Losses of an excursion never enter the
statistics, and an excursion ends only once :data:`RECOVERY_STEPS` losses in a row are back in
range.

The parameters saved after optimizer step ``s`` produce the loss of step ``s + 1``, so a
checkpoint of step ``s`` is known good when step ``s + 1`` came before the current excursion and
was not part of the last one that ended, and when no excursion was under way as it was written
(:meth:`LossStats.checkpoint_is_good`). The whole state is saved in each checkpoint (``loss_stats``)
and restored on resume, so a resumed run judges as the uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

#: In-range losses whose median is the recent normal level.
WINDOW = 100
#: The first in-range losses whose median is the level the run started at (a cap on what is normal).
START_STEPS = 5
#: In-range losses in a row that end an excursion.
RECOVERY_STEPS = 10

_NONE = torch.iinfo(torch.int64).max  # "no step" in reductions over ranks


@dataclass
class LossStats:
    """The host-side view of a :class:`LossWatch`, as saved in checkpoints (``as_dict``)."""

    normal: float  # the normal level: a loss above spike_factor x this is out of range (inf before any loss)
    count: int  # in-range losses folded into the statistics
    excursion_start: int  # first step of the current out-of-range stretch, -1 when in range
    first_nonfinite: int  # first step with a NaN/inf loss, -1 when none
    last_excursion: tuple[int, int] = (-1, -1)  # first and last out-of-range step of the newest ended excursion
    state: dict = field(default_factory=dict, repr=False)  # what LossWatch.load needs to resume

    def in_range(self) -> bool:
        return self.excursion_start < 0

    def known_good(self, step: int) -> bool:
        """Whether the parameters after optimizer step ``step`` gave an in-range loss at the step after it."""
        after = step + 1
        first, last = self.last_excursion
        if 0 <= first <= after <= last:
            return False
        return self.excursion_start < 0 or after < self.excursion_start

    def checkpoint_is_good(self, summary: dict) -> bool:
        """Whether a checkpoint (its :func:`mae_fast.checkpoint.read_summary`) holds known-good parameters: no
        excursion was under way when it was written, and the loss after its step was in range."""
        saved = summary.get("loss_stats") or {}
        return saved.get("excursion_start", -1) < 0 and self.known_good(summary["step"])

    def as_dict(self) -> dict:
        return {"normal": self.normal, "count": self.count, "excursion_start": self.excursion_start,
                "first_nonfinite": self.first_nonfinite, "last_excursion": list(self.last_excursion), **self.state}


class LossWatch:
    """Device-side loss-range tracking for one rank; ``observe`` never synchronizes with the host.

    Args:
        device: where the losses live.
        spike_factor: a loss above ``spike_factor`` times the normal level is out of range; 0 counts only
            NaN and inf.
    """

    def __init__(self, device: torch.device, spike_factor: float = 3.0):
        self.device, self.spike_factor = device, float(spike_factor)

        def step_mark():
            return torch.full((), -1, dtype=torch.int64, device=device)

        self.window = torch.full((WINDOW,), float("nan"), dtype=torch.float32, device=device)
        self.start_level = torch.full((), float("inf"), dtype=torch.float32, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.in_range_run = torch.zeros((), dtype=torch.int64, device=device)
        self.excursion_start, self.first_nonfinite = step_mark(), step_mark()
        self.last_out, self.last_first, self.last_last = step_mark(), step_mark(), step_mark()

    def _normal(self) -> torch.Tensor:
        recent = torch.where(self.count > 0, torch.nanmedian(self.window), torch.full_like(self.start_level,
                                                                                          float("inf")))
        return torch.minimum(recent, self.start_level)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        """Fold in the loss of (a micro-batch of) optimizer step ``step`` (1-based: the step it leads to)."""
        loss = loss.detach().float()
        finite = torch.isfinite(loss)
        out = ~finite
        if self.spike_factor:
            out = out | (loss > self.spike_factor * self._normal())
        step_t = torch.full((), step, dtype=torch.int64, device=self.device)
        none = torch.full_like(self.excursion_start, -1)
        self.first_nonfinite = torch.where((self.first_nonfinite < 0) & ~finite, step_t, self.first_nonfinite)
        in_excursion = self.excursion_start >= 0
        self.in_range_run = torch.where(out, torch.zeros_like(self.in_range_run), self.in_range_run + 1)
        ends = in_excursion & ~out & (self.in_range_run >= RECOVERY_STEPS)
        self.last_first = torch.where(ends, self.excursion_start, self.last_first)
        self.last_last = torch.where(ends, self.last_out, self.last_last)
        self.last_out = torch.where(out, step_t, self.last_out)
        started = torch.where(in_excursion, self.excursion_start, step_t)
        self.excursion_start = torch.where(out, started, torch.where(ends, none, self.excursion_start))
        # Only losses outside any excursion (including its last in-range ones) enter the statistics.
        record = ~out & (self.excursion_start < 0) & ~ends
        slot = torch.arange(WINDOW, device=self.device) == self.count % WINDOW
        self.window = torch.where(slot & record, loss, self.window)
        self.count = self.count + record.long()
        settling = record & (self.count <= START_STEPS)
        self.start_level = torch.where(settling, torch.nanmedian(self.window), self.start_level)

    def stats(self, reduce: bool = True) -> LossStats:
        """The state on the host (one synchronization). With ``reduce`` and several ranks, the earliest
        out-of-range step of any rank and the normal level averaged over ranks, so every rank judges alike."""
        normal = self._normal()
        marks = torch.stack([self.excursion_start, self.first_nonfinite, self.last_first, self.last_last])
        # -1 means "none": map it above every step for a MIN over ranks (the last step of an excursion negated,
        # so that the MIN takes the latest).
        signed = torch.where(marks < 0, torch.full_like(marks, _NONE),
                             marks * torch.tensor([1, 1, 1, -1], device=marks.device))
        if reduce and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(signed, op=dist.ReduceOp.MIN)
            normal = normal.clone()
            dist.all_reduce(normal)
            normal = normal / dist.get_world_size()
        excursion, nonfinite, last_first, last_last = (abs(int(v)) if v != _NONE else -1 for v in signed.tolist())
        # The ring's filled slots in slot order, so a resumed run overwrites the same slot next.
        state = {"window": self.window[:min(int(self.count), WINDOW)].tolist(),
                 "start_level": float(self.start_level), "in_range_run": int(self.in_range_run),
                 "last_out": int(self.last_out)}
        return LossStats(float(normal), int(self.count), excursion, nonfinite, (last_first, last_last), state)

    def load(self, saved: dict | None) -> None:
        """Restore the state from a checkpoint's ``loss_stats`` (one written by this version, or an older one's
        ``recent_mean``, which then stands for the whole window)."""
        if not saved:
            return
        values = saved.get("window")
        count = int(saved.get("count", 0))
        if values is None:  # an older checkpoint: its running mean is all there is
            values = [float(saved["recent_mean"])] if count and "recent_mean" in saved else []
            count = len(values)
        window = torch.full((WINDOW,), float("nan"))
        window[:len(values)] = torch.tensor(values[:WINDOW], dtype=torch.float32)
        self.window = window.to(self.device)
        self.count.fill_(count)
        self.start_level.fill_(float(saved.get("start_level", values[0] if values else float("inf"))))
        self.in_range_run.fill_(int(saved.get("in_range_run", 0)))
        self.excursion_start.fill_(int(saved.get("excursion_start", -1)))
        self.last_out.fill_(int(saved.get("last_out", -1)))
        first, last = saved.get("last_excursion", (-1, -1))
        self.last_first.fill_(int(first))
        self.last_last.fill_(int(last))
