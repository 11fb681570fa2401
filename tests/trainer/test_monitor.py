"""LossWatch: the loss's normal range, tracked on the device, and which checkpoints it calls good."""

import math

import pytest
import torch

from mae_fast.monitor import LossStats, LossWatch


def watch_over(losses, factor=3.0):
    watch = LossWatch(torch.device("cpu"), factor)
    for step, loss in enumerate(losses, start=1):
        watch.observe(torch.tensor(loss), step)
    return watch.stats()


def test_steady_losses_stay_in_range_and_normal_is_their_median():
    losses = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.5]
    stats = watch_over(losses)
    assert stats.in_range() and stats.excursion_start == -1 and stats.first_nonfinite == -1
    assert stats.normal == pytest.approx(float(torch.tensor(losses).median()))
    assert stats.count == 8


def test_a_spike_far_above_normal_starts_an_excursion():
    losses = [1.0] * 6 + [5.0, 6.0]  # 5 > 3 x 1.0 at step 7
    stats = watch_over(losses)
    assert stats.excursion_start == 7 and stats.first_nonfinite == -1
    assert stats.normal == pytest.approx(1.0)  # out-of-range losses do not move it
    assert watch_over(losses, factor=0).in_range()  # factor 0: only NaN and inf count


def test_nan_and_inf_count_from_the_first_step_and_the_first_is_kept():
    stats = watch_over([1.0, math.nan, 1.0, math.inf])
    assert stats.first_nonfinite == 2 and stats.excursion_start == 2  # one in-range loss does not end it
    assert math.isfinite(stats.normal) and stats.normal == pytest.approx(1.0)
    assert watch_over([math.nan]).first_nonfinite == 1


def test_a_checkpoint_is_good_only_if_the_loss_after_it_was_in_range():
    # Parameters saved after step s give the loss of step s + 1.
    stats = LossStats(normal=1.0, count=10, excursion_start=10, first_nonfinite=12)
    assert stats.known_good(8) and not stats.known_good(9) and not stats.known_good(10)
    assert LossStats(1.0, 10, -1, -1).known_good(1000)
    # An excursion that ended (steps 10 to 14 out of range): the checkpoints whose next loss fell in it are not
    # good, the ones before and after it are.
    ended = LossStats(1.0, 30, -1, -1, last_excursion=(10, 14))
    assert ended.known_good(8) and not ended.known_good(9) and not ended.known_good(13) and ended.known_good(14)
    # A checkpoint written while an excursion was under way is never good, whatever came after.
    assert not ended.checkpoint_is_good({"step": 20, "loss_stats": {"excursion_start": 18}})
    assert ended.checkpoint_is_good({"step": 20, "loss_stats": {"excursion_start": -1}})


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


def test_a_jump_at_the_second_step_is_judged_from_the_first():
    # --lr 10 --warmup_epochs 0: 0.81 at step 1, then millions. The first step alone defines normal.
    stats = watch_over([0.81, 4.5e7, 1e3, 1e7, 2e4, 5e5])
    assert stats.excursion_start == 2


def test_an_excursion_never_defines_normal_and_ends_only_after_a_while_in_range():
    from mae_fast.monitor import RECOVERY_STEPS

    losses = [1.0] * 6 + [50.0, 40.0, 30.0, 20.0, 10.0, 5.0, 3.5]  # decaying, never back under 3 x 1.0
    stats = watch_over(losses)
    assert stats.excursion_start == 7 and stats.normal == pytest.approx(1.0)
    back = losses + [1.1] * (RECOVERY_STEPS - 1)
    assert watch_over(back).excursion_start == 7  # one step (or a few) back in range is not the end
    assert watch_over(back + [1.1]).in_range()


def test_a_slow_creep_far_above_the_start_leaves_the_normal_range():
    # Each step only 5 % above the one before: no single jump, but the loss ends far above where it started.
    losses = [1.0 * 1.05 ** k for k in range(120)]
    stats = watch_over(losses)
    assert not stats.in_range() and losses[stats.excursion_start - 1] > 3.0


def test_one_early_outlier_does_not_move_normal():
    stats = watch_over([1.0, 2.9, 1.0, 1.0, 1.0, 1.0])  # 2.9 is in range, but a mean would have moved to 1.3
    assert stats.normal == pytest.approx(1.0)
    assert not watch_over([1.0, 2.9, 1.0, 1.0, 1.0, 1.0, 3.5]).in_range()


def test_an_excursion_under_way_survives_a_resume():
    watch = LossWatch(torch.device("cpu"))
    for step, loss in enumerate([1.0, 1.0, 1.0, 9.0, 1.0], start=1):
        watch.observe(torch.tensor(loss), step)
    resumed = LossWatch(torch.device("cpu"))
    resumed.load(watch.stats().as_dict())
    for step in range(6, 9):
        watch.observe(torch.tensor(1.0), step)
        resumed.observe(torch.tensor(1.0), step)
    assert resumed.stats().as_dict() == watch.stats().as_dict()
    assert resumed.stats().excursion_start == 4
