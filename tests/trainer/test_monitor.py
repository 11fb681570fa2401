"""LossWatch: the loss's normal range, tracked on the device, and which checkpoints it calls good."""

import math

import pytest
import torch

from mae_fast.monitor import WARMUP, LossStats, LossWatch


def watch_over(losses, factor=3.0):
    watch = LossWatch(torch.device("cpu"), factor)
    for step, loss in enumerate(losses, start=1):
        watch.observe(torch.tensor(loss), step)
    return watch.stats()


def test_steady_losses_stay_in_range_and_their_mean_is_recent():
    stats = watch_over([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.5])
    assert stats.in_range() and stats.excursion_start == -1 and stats.first_nonfinite == -1
    assert stats.recent_mean == pytest.approx(sum([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.5]) / 8)
    assert stats.count == 8


def test_a_spike_far_above_the_recent_mean_starts_an_excursion_that_a_normal_loss_ends():
    losses = [1.0] * 6 + [5.0, 6.0]  # 5 > 3 x 1.0 at step 7
    stats = watch_over(losses)
    assert stats.excursion_start == 7 and stats.first_nonfinite == -1
    assert stats.recent_mean == pytest.approx(1.0)  # out-of-range losses do not move the mean
    assert watch_over(losses + [1.1]).excursion_start == -1  # back in range
    assert watch_over(losses, factor=0).in_range()  # factor 0: only NaN and inf count


def test_nan_and_inf_count_from_the_first_step_and_the_first_is_kept():
    stats = watch_over([1.0, math.nan, 1.0, math.inf])
    assert stats.first_nonfinite == 2 and stats.excursion_start == 4
    assert math.isfinite(stats.recent_mean) and stats.recent_mean == pytest.approx(1.0)


def test_no_spike_is_judged_before_the_mean_has_settled():
    assert watch_over([1.0] * (WARMUP - 1) + [10.0]).in_range()
    assert not watch_over([1.0] * WARMUP + [10.0]).in_range()


def test_a_checkpoint_is_good_only_if_the_loss_after_it_was_in_range():
    # Parameters saved after step s give the loss of step s + 1.
    stats = LossStats(recent_mean=1.0, count=10, excursion_start=10, first_nonfinite=12)
    assert stats.known_good(8) and not stats.known_good(9) and not stats.known_good(10)
    assert LossStats(1.0, 10, -1, -1).known_good(1000)


def test_the_recent_mean_survives_a_resume():
    watch = LossWatch(torch.device("cpu"))
    for step in range(1, 8):
        watch.observe(torch.tensor(2.0), step)
    resumed = LossWatch(torch.device("cpu"))
    resumed.load(watch.stats().as_dict())
    resumed.observe(torch.tensor(7.0), 8)  # a spike right after the resume is caught
    assert resumed.stats().excursion_start == 8


def test_observe_never_synchronizes():
    # The trainer calls observe on every batch: it must stay on the device (compiles without a graph break).
    watch = LossWatch(torch.device("cpu"))

    def step(loss):
        watch.observe(loss, 3)
        return watch.excursion_start

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    compiled(torch.tensor(1.0))
    assert int(watch.count) == 1
