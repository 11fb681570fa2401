"""What a run shows while it trains: step lines with an ETA, a progress bar, epoch summaries, TensorBoard.

Loss sums stay on the device between log steps; :meth:`Progress.log_step` is the one place that
reads them back (and all-reduces them over the ranks). Rank 0 prints; every rank takes part in
the reductions.

A step line::

    step 120/640 (epoch 4/20, batch 24/32): loss 0.4123, lr 1.5e-04, 812 images/s, data wait 2%, ETA 1m05s

and on GPUs also ``MFU 41.2%`` and ``peak memory 21.3 GiB``. An epoch ends with one summary line::

    epoch 4/20 done: mean loss 0.4310, 805 images/s, 41s; saved output_dir/checkpoint-last.pth

Epochs count from 1 in these lines; ``log.txt`` and checkpoint names keep the official 0-based
epoch index (``checkpoint-3.pth`` is the fourth epoch).

Step lines come every ``--log_every`` optimizer steps and, so that a slow run is not silent, by time: the run's
first line at the first step that ends :data:`FIRST_LINE_SECONDS` or more after its start, then one whenever
:data:`LINE_SECONDS` passed without one (:meth:`Progress.line_due`). :func:`report_progress` gives other long loops
(feature extraction) such lines.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable, Iterator

import torch

from mae_fast.distributed import all_reduce_sum

logger = logging.getLogger("mae_fast")

#: A run (or a loop under :func:`report_progress`) prints its first progress line at the first step that ends this
#: many seconds or more after its start.
FIRST_LINE_SECONDS = 5.0
#: Seconds without a line after which the next step prints one, even before ``--log_every`` steps have passed.
LINE_SECONDS = 60.0


def format_duration(seconds: float) -> str:
    """``3h05m``, ``4m07s`` or ``12s``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Progress:
    """Progress of one rank through a run.

    Args:
        total_steps: optimizer steps the whole run will take (for ``step N/total`` and the ETA).
        start_step: the optimizer step the run starts (or resumes) at.
        epochs: epochs of the run.
        device: where the losses live.
        is_main: rank 0, which prints and writes TensorBoard.
        writer: a TensorBoard SummaryWriter or None.
        flops_per_image: training FLOPs per image, for MFU.
        peak_flops: the device's dense peak (FLOP/s), or None where unknown (no MFU then).
        world_size: data-parallel ranks (MFU is per device).
        mfu_note: said after the MFU figure (" of the bf16 peak" for FP8 runs, which count against bf16's peak
            so runs stay comparable).
    """

    def __init__(self, total_steps: int, start_step: int, epochs: int, device: torch.device,
                 is_main: bool, writer=None, flops_per_image: float = 0.0, peak_flops: float | None = None,
                 world_size: int = 1, mfu_note: str = ""):
        self.total_steps, self.epochs = total_steps, epochs
        self.device, self.is_main, self.writer = device, is_main, writer
        self.flops_per_image, self.peak_flops, self.world_size = flops_per_image, peak_flops, world_size
        self.mfu_note = mfu_note
        self.run_start_step, self.run_start_time = start_step, time.perf_counter()
        self.lines, self.last_line_time = 0, self.run_start_time
        self.eta_step, self.eta_time = start_step, self.run_start_time  # where the ETA counts from
        self.bar = None

    # ------------------------------------------------------------------ an epoch

    def start_epoch(self, epoch: int, first_batch: int, num_batches: int, saved: dict | None = None) -> None:
        """Reset the epoch's sums (or restore them from ``saved``, a :meth:`state` of the same epoch at
        ``first_batch``) and open the progress bar (rank 0, only in a terminal)."""
        from tqdm import tqdm

        self.epoch, self.num_batches = epoch, num_batches
        if not self.lines:  # the run's clock starts with its training, not with the model's build or a first kNN
            self.run_start_time = self.last_line_time = self.eta_time = time.perf_counter()
        # This rank's loss sums (each batch's loss times its valid images) and valid images, over the epoch and
        # at the last log line; all-reduced only when a line is printed. A resumed epoch carries on with the
        # sums of the run it resumes, so its mean is the uninterrupted run's.
        saved = saved or {}
        self.loss_sum = torch.tensor(float(saved.get("loss_sum", 0.0)), device=self.device)
        self.logged_sum = torch.tensor(float(saved.get("logged_sum", 0.0)), device=self.device)
        self.images, self.logged_images = int(saved.get("images", 0)), int(saved.get("logged_images", 0))
        self.data_wait = float(saved.get("data_wait", 0.0))
        # Rates count only what this process did (since the epoch started or resumed here).
        self.images_here = self.logged_here = 0
        self.epoch_images_here, self.epoch_start = 0, time.perf_counter()  # all ranks', at the last line
        self.window_wait, self.window_start = 0.0, time.perf_counter()
        self.fetch_start = self.last_batch_end = time.perf_counter()
        # disable=None: tqdm leaves the bar out when stderr is not a terminal, so log files hold plain lines.
        self.bar = tqdm(total=num_batches, initial=first_batch, desc=f"epoch {epoch + 1}/{self.epochs}",
                        disable=None if self.is_main else True, dynamic_ncols=True, leave=False)

    def data_ready(self) -> None:
        """A batch arrived: count the time spent waiting for it."""
        wait = time.perf_counter() - self.fetch_start
        self.data_wait += wait
        self.window_wait += wait

    def batch_done(self, loss: torch.Tensor, images: int) -> None:
        """Add a batch's (detached) loss, the mean over its ``images`` valid images; no synchronization."""
        self.loss_sum += loss * images
        self.images += images
        self.images_here += images
        self.bar.update(1)
        self.fetch_start = self.last_batch_end = time.perf_counter()

    # ------------------------------------------------------------------ lines

    def line_due(self, step: int, log_every: int) -> bool:
        """Whether optimizer step ``step`` prints a line: every ``log_every`` steps, and besides, in one process, the
        run's first line once :data:`FIRST_LINE_SECONDS` have passed, then one whenever :data:`LINE_SECONDS` passed
        without a line. Several ranks must agree without a collective, so there the run's first step prints one."""
        if step % log_every == 0:
            return True
        if self.world_size > 1:
            return step == self.run_start_step + 1
        quiet = time.perf_counter() - self.last_line_time
        return quiet >= (LINE_SECONDS if self.lines else FIRST_LINE_SECONDS)

    def log_step(self, step: int, batch_in_epoch: int, lr: float) -> dict:
        """Reduce the loss sums over the ranks, print the step line (rank 0) and return the statistics.

        Returns:
            ``train_loss`` (mean over the epoch so far), ``window_loss`` (since the last line), ``train_lr``,
            ``images_per_sec``, ``data_wait_s``, ``eta_s`` and, on GPUs, ``mfu`` (where the peak is known) and
            ``peak_memory_gb``.
        """
        counts = torch.tensor([self.images, self.images - self.logged_images, self.images_here,
                               self.images_here - self.logged_here], dtype=torch.float32, device=self.device)
        sums = all_reduce_sum(torch.cat([torch.stack([self.loss_sum, self.loss_sum - self.logged_sum]), counts]))
        loss_sum, window_sum, images, window_images, images_here, window_here = sums.tolist()
        mean_loss = loss_sum / max(images, 1)
        window_loss = window_sum / max(window_images, 1)
        self.logged_sum, self.logged_images, self.logged_here = self.loss_sum.clone(), self.images, self.images_here
        self.epoch_images_here = int(images_here)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed = max(now - self.window_start, 1e-9)
        images_per_s = window_here / elapsed
        # From the second line on, the ETA counts from the first, so a slow first step (a compile) does not skew it.
        steps_done = step - self.eta_step
        eta = (now - self.eta_time) / steps_done * (self.total_steps - step) if steps_done > 0 else float("nan")
        stats = {"train_loss": mean_loss, "window_loss": window_loss, "train_lr": lr, "images_per_sec": images_per_s,
                 "data_wait_s": self.data_wait, "eta_s": eta}
        line = (f"step {step}/{self.total_steps} (epoch {self.epoch + 1}/{self.epochs}, batch {batch_in_epoch}/"
                f"{self.num_batches}): "
                f"loss {mean_loss:.4f}, lr {lr:.3g}, {images_per_s:,.0f} images/s, "
                f"data wait {self.window_wait / elapsed:.0%}")
        if self.peak_flops:
            stats["mfu"] = images_per_s / self.world_size * self.flops_per_image / self.peak_flops
            line += f", MFU {stats['mfu']:.1%}{self.mfu_note}"
        if self.device.type == "cuda":
            stats["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            line += f", peak memory {stats['peak_memory_gb']:.1f} GiB"
        line += f", ETA {format_duration(eta)}" if eta == eta else ""
        if self.is_main:
            self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:,.0f}")
            self.bar.write(line)
            if self.writer is not None:
                self.writer.add_scalar("train/loss", mean_loss, step)
                self.writer.add_scalar("train/lr", lr, step)
                self.writer.add_scalar("train/images_per_sec", images_per_s, step)
        self.window_wait, self.window_start = 0.0, time.perf_counter()
        self.lines, self.last_line_time = self.lines + 1, self.window_start
        if self.lines == 1:
            self.eta_step, self.eta_time = step, now
        return stats

    def end_epoch(self, stats: dict, saved: list) -> str:
        """Close the bar and print the epoch's summary line (rank 0); returns the line.

        Args:
            stats: the epoch's statistics (``train_loss``; ``val_loss`` when validated).
            saved: the checkpoint paths written at the end of the epoch.
        """
        self.close()
        seconds = self.last_batch_end - self.epoch_start  # the training, not the validation and saves after it
        line = (f"epoch {self.epoch + 1}/{self.epochs} done: mean loss {stats['train_loss']:.4f}, "
                f"{self.epoch_images_here / max(seconds, 1e-9):,.0f} images/s, {format_duration(seconds)}")
        if "val_loss" in stats:
            line += f", validation loss {stats['val_loss']:.4f}"
        if "knn_top1" in stats:
            line += f", kNN top-1 {stats['knn_top1']:.1%}"
        if saved:
            line += "; saved " + ", ".join(str(p) for p in saved)
        if self.is_main:
            print(line, flush=True)
        return line

    def state(self) -> dict:
        """This rank's sums of the epoch so far (host values, one synchronization), for a checkpoint."""
        return {"epoch": self.epoch, "loss_sum": float(self.loss_sum), "logged_sum": float(self.logged_sum),
                "images": self.images, "logged_images": self.logged_images, "data_wait": self.data_wait}

    def close(self) -> None:
        """Close the progress bar (idempotent)."""
        if self.bar is not None:
            self.bar.close()


def report_progress(batches: Iterable, total: int, label: str, world_size: int = 1,
                    is_main: bool = True) -> Iterator:
    """Yield ``batches`` (``(images, ...)`` tuples, ``total`` of them) and log, on the main rank, lines such as
    ``train features: batch 12/40, 310 images/s, ETA 9s``: the first at the first batch done
    :data:`FIRST_LINE_SECONDS` or more after the start, then one when :data:`LINE_SECONDS` passed without one, and
    one at the last batch. ``world_size`` ranks each take such batches (the rate counts them all)."""
    start = last_line = time.perf_counter()
    images = lines = 0
    for done, batch in enumerate(batches, start=1):
        yield batch
        images += len(batch[0]) * world_size
        now = time.perf_counter()
        if is_main and (now - last_line >= (LINE_SECONDS if lines else FIRST_LINE_SECONDS) or done == total):
            elapsed = max(now - start, 1e-9)
            logger.info("%s: batch %d/%d, %s images/s, ETA %s", label, done, total, f"{images / elapsed:,.0f}",
                        format_duration(elapsed / done * (total - done)))
            lines, last_line = lines + 1, now
