"""python -m mae_fast.pretrain (or torchrun -m mae_fast.pretrain): MAE pretraining with the official script's flags.

With no flags it pretrains a tiny MAE on the built-in image set, sized for a CPU (the README gives
a measured time), and writes checkpoints, log.txt and reconstruction images to ./output_dir.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
import time

from mae_fast.cli import CommandParser, first_missing_folder, remove_empty_folders
from mae_fast.config import DataConfig, ModelConfig, OptimConfig, RunConfig, field_docs, fields
from mae_fast.errors import CollectiveTimeoutError, MaeFastError, TrainingStopped
from mae_fast.presets import PRESETS

PROG = "mae_fast.pretrain"

# flag -> (config section, field name); the sections are the dataclasses of mae_fast.config.
FLAGS = {
    "batch_size": ("data", "batch_size"), "epochs": ("run", "epochs"), "accum_iter": ("run", "accum_iter"),
    "model": ("model", "name"), "input_size": ("data", "input_size"), "mask_ratio": ("model", "mask_ratio"),
    "norm_pix_loss": ("model", "norm_pix_loss"), "weight_decay": ("optim", "weight_decay"), "lr": ("optim", "lr"),
    "blr": ("optim", "blr"), "min_lr": ("optim", "min_lr"), "warmup_epochs": ("optim", "warmup_epochs"),
    "data_path": ("data", "data_path"), "val_path": ("data", "val_path"), "output_dir": ("run", "output_dir"),
    "log_dir": ("run", "log_dir"), "resume": ("run", "resume"), "start_epoch": ("run", "start_epoch"),
    "num_workers": ("data", "num_workers"), "seed": ("run", "seed"), "data_backend": ("data", "backend"),
    "attn_backend": ("model", "attn_backend"), "kernel_backend": ("model", "kernel_backend"),
    "precision": ("run", "precision"), "fp8_recipe": ("run", "fp8_recipe"), "fp8_emulate": ("run", "fp8_emulate"),
    "global_batch": ("run", "global_batch"), "compile": ("run", "compile"),
    "compile_scope": ("run", "compile_scope"), "fsdp": ("run", "fsdp"),
    "fsdp_replicate": ("run", "fsdp_replicate"), "checkpoint_format": ("run", "checkpoint_format"),
    "async_save": ("run", "async_save"),
    "grad_checkpointing": ("model", "grad_checkpointing"), "optimizer": ("optim", "optimizer"),
    "save_every": ("run", "save_every"), "save_last_every": ("run", "save_last_every"),
    "loss_spike_factor": ("run", "loss_spike_factor"), "dist_timeout": ("run", "dist_timeout"),
    "log_every": ("run", "log_every"), "val_every": ("run", "val_every"), "max_steps": ("run", "max_steps"),
    "knn_every": ("run", "knn_every"), "knn_train_path": ("run", "knn_train_path"),
    "knn_train_size": ("run", "knn_train_size"), "knn_pool": ("run", "knn_pool"),
    "device": ("run", "device"), "verify_images": ("data", "verify_images"),
    "synthetic_samples": ("data", "synthetic_samples"), "shard_timeout": ("data", "shard_timeout"),
}
SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "run": RunConfig}
BOOL_FLAGS = {"norm_pix_loss", "compile", "fsdp", "async_save", "grad_checkpointing", "fp8_emulate"}
FLOAT_FLAGS = {"mask_ratio", "weight_decay", "lr", "blr", "min_lr", "warmup_epochs", "loss_spike_factor",
               "dist_timeout", "shard_timeout"}
STR_FLAGS = {"model", "data_path", "val_path", "output_dir", "log_dir", "resume", "data_backend", "attn_backend",
             "kernel_backend", "precision", "fp8_recipe", "compile_scope", "optimizer", "device", "verify_images",
             "knn_train_path", "knn_pool", "checkpoint_format"}
METAVARS = {"data_path": "PATH", "val_path": "PATH", "output_dir": "PATH", "log_dir": "PATH", "resume": "PATH|auto",
            "model": "NAME", "data_backend": "{auto,dali,torch,synthetic}",
            "attn_backend": "{auto,flash_attn,sdpa,math}",
            "kernel_backend": "{auto,cuda,triton,torch}", "precision": "{auto,bf16,fp16,fp32,fp8}",
            "fp8_recipe": "{tensorwise,rowwise}",
            "compile_scope": "{model,blocks}", "checkpoint_format": "{full,dcp}", "optimizer": "{adamw,apex}",
            "device": "{auto,cuda,cpu}",
            "verify_images": "{header,decode}", "knn_train_path": "PATH", "knn_pool": "{mean,cls}"}


def _epilog() -> str:
    presets = "\n".join(f"  {name:24s} {description}" for name, (description, _) in PRESETS.items())
    return (f"model presets (--model):\n{presets}\n\n"
            "A mistake in the flags or inputs ends with one line 'mae_fast.pretrain: error: ...' and exit code 2; a\n"
            "run that stops on its own (NaN loss, full disk, stalled rank) or ends diverged exits 1, Ctrl-C exits\n"
            "130. Set MAE_FAST_DEBUG=1 or pass --debug for the traceback.")


def _default_text(section: str, name: str, doc: str) -> str:
    """The help text of a field with its default, unless the text already says what unset means."""
    return _default_text_of(next(f.default for f in fields(SECTIONS[section]) if f.name == name), doc)


def _default_text_of(default, doc: str) -> str:
    """``doc`` with ``default`` stated, unless the text already says what unset means."""
    doc = doc.rstrip(".")
    if isinstance(default, bool):
        return f"{doc} (default: {'on' if default else 'off'})"
    if default is None or default == "":
        return doc if ("default" in doc or "unset" in doc) else f"{doc} (default: unset)"
    return f"{doc} (default: {default:g})" if isinstance(default, float) else f"{doc} (default: {default})"


def build_parser() -> argparse.ArgumentParser:
    """The command line: every flag documented from the configuration dataclasses, with its default."""
    parser = CommandParser(PROG, description=__doc__.split(": ", 1)[1].strip(), epilog=_epilog())
    docs = {name: field_docs(cls) for name, cls in SECTIONS.items()}
    for flag, (section, name) in FLAGS.items():
        text = " ".join(docs[section][name].split(": ", 1)[-1].split())
        text = _default_text(section, name, text)
        if flag in BOOL_FLAGS:
            parser.add_argument(f"--{flag}", action="store_true", default=argparse.SUPPRESS, help=text)
        else:
            kind = str if flag in STR_FLAGS else float if flag in FLOAT_FLAGS else int
            metavar = METAVARS.get(flag, "X" if kind is float else "N" if kind is int else flag.upper())
            parser.add_argument(f"--{flag}", type=kind, default=argparse.SUPPRESS, help=text, metavar=metavar)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of errors that are otherwise one line (or set MAE_FAST_DEBUG=1)")
    parser.add_argument("--local_rank", type=int, default=argparse.SUPPRESS, metavar="N",
                        help="ignored: torchrun passes the rank in the environment")
    return parser


def config_from_args(argv: list[str] | None = None) -> RunConfig:
    """Parse flags into a validated :class:`RunConfig`.

    Raises:
        ConfigError: a value that cannot work (naming the flag and the value).
        SystemExit: argparse's own errors (unknown flag, a value of the wrong type), exit code 2.
    """
    args = vars(build_parser().parse_args(argv))
    args.pop("local_rank", None)
    args.pop("debug", None)
    sections = {name: {} for name in SECTIONS}
    for flag, value in args.items():
        section, name = FLAGS[flag]
        sections[section][name] = value
    run = sections.pop("run")
    return RunConfig(data=DataConfig(**sections["data"]), model=ModelConfig(**sections["model"]),
                     optim=OptimConfig(**sections["optim"]), **run)


def resume_command(argv: list[str], checkpoint, prog: str = PROG) -> str:
    """The command that continues this run of ``prog`` from ``checkpoint`` ("auto" or a path): the same flags, the
    same launcher, ``--resume`` replaced."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--resume", "--local_rank"):
            skip = True
            continue
        if arg.startswith(("--resume=", "--local_rank=")):
            continue
        kept.append(arg)
    if "LOCAL_WORLD_SIZE" in os.environ:  # under torchrun
        local, world = os.environ["LOCAL_WORLD_SIZE"], os.environ.get("WORLD_SIZE", "1")
        launcher = (f"torchrun --standalone --nproc_per_node={local} -m" if local == world
                    else "torchrun <the same torchrun flags> -m")
    else:
        launcher = "python -m"
    return f"{launcher} {prog} {shlex.join([*kept, '--resume', str(checkpoint)])}"


def _stop_line(trainer, argv: list[str], prog: str = PROG) -> str:
    """What Ctrl-C prints: where the run was, what it wrote, its last good checkpoint, and how to continue."""
    if trainer is None:
        return f"{prog}: interrupted before training started; nothing was saved"
    good = trainer.good_checkpoint()
    newest = trainer.last_saved
    where = f"interrupted at step {trainer.step}/{trainer.total_steps} ({trainer.where()})"
    if trainer.interrupt_checkpoint is not None:
        where += f"; wrote {trainer.interrupt_checkpoint} at this step"
    if good is None:
        return f"{prog}: {where}; no good checkpoint was written yet. Start again with: " \
               f"{resume_command(argv, 'auto', prog)}"
    target = "auto" if newest is not None and good.resolve() == newest.resolve() else good
    return f"{prog}: {where}; last good checkpoint {good}. Resume with: {resume_command(argv, target, prog)}"


def _is_collective_timeout(exc: RuntimeError) -> bool:
    from mae_fast.distributed import is_collective_timeout  # torch: only once the flags were good

    return is_collective_timeout(exc)


@contextlib.contextmanager
def _ctrl_c_stops_after_the_step(trainer, argv: list[str], prog: str = PROG):
    """The first Ctrl-C asks the run to stop after the current step, writing checkpoint-last there (so the
    resume is exact); a second one stops the process at once, with one line. Only on one rank: the ranks of a
    distributed run would have to agree on the step, so there Ctrl-C stops at once (the last checkpoint stays)."""
    if trainer.dist.world_size > 1 or threading.current_thread() is not threading.main_thread():
        yield
        return
    from mae_fast.checkpoint import LAST, checkpoint_name

    last = checkpoint_name(LAST, trainer.checkpoint_format)
    # torchrun passes the terminal's Ctrl-C on to its worker a moment after the terminal did: one press.
    relayed = "LOCAL_WORLD_SIZE" in os.environ
    pressed: list[float] = []

    def on_ctrl_c(signum, frame):
        now = time.monotonic()
        if not pressed:
            pressed.append(now)
            trainer.request_stop()
            # os.write, not print: a handler that prints while the main thread prints raises a reentrancy error.
            os.write(2, f"{prog}: Ctrl-C: stopping after this step, which is saved to {last} (Ctrl-C again to stop "
                        "at once)\n".encode())
            return
        if relayed and now - pressed[0] < 1.0:
            return
        os.write(2, f"{prog}: interrupted again at step {trainer.step}: stopped at once, without writing a "
                    f"checkpoint; the newest complete one stays. Resume with: {resume_command(argv, 'auto', prog)}\n"
                 .encode())
        os._exit(130)

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _rank_prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", 1))
    return f"[rank {os.environ.get('RANK', 0)}] " if world > 1 else ""


def run_command(prog: str, argv: list[str] | None, parse, train) -> int:
    """A training command's life: ``parse(argv)`` (flags -> config, before torch loads), then ``train(config,
    started)``, which builds the run, enters ``started(run)`` (Ctrl-C handling) and trains. Every mistake and fault
    is one line ``<prog>: error: ...``; an early stop leaves no empty output folder behind. Returns the process exit
    code (0, 1, 2, or 130 on Ctrl-C)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MAE_FAST_DEBUG", "0") not in ("", "0")

    runs: list = []  # the run, once built (for the Ctrl-C line and the last good checkpoint)
    config = created = None
    try:
        config = parse(argv)  # a mistake in the flags is one line within a second
        created = first_missing_folder(config.output_dir)  # removed again if the run stops before writing to it

        @contextlib.contextmanager
        def started(trainer):
            runs.append(trainer)
            with _ctrl_c_stops_after_the_step(trainer, argv, prog):
                yield

        train(config, started)
        from mae_fast.distributed import teardown_distributed

        teardown_distributed(finished=True)
        return 0
    except KeyboardInterrupt as exc:  # a message of its own (an evaluation's), or where the run was
        if os.environ.get("RANK", "0") == "0":
            print(str(exc) or _stop_line(runs[0] if runs else None, argv, prog), file=sys.stderr, flush=True)
        return 130
    except Exception as exc:
        trainer = runs[0] if runs else None
        if isinstance(exc, RuntimeError) and not isinstance(exc, MaeFastError) and _is_collective_timeout(exc):
            good = trainer.good_checkpoint() if trainer is not None else None
            exc = CollectiveTimeoutError(
                f"a collective waited longer than --dist_timeout {config.dist_timeout:g} s for the other ranks (one "
                f"stalled or died); stopping. Last good checkpoint: {good or 'none'}", checkpoint=good)
        if debug or not isinstance(exc, MaeFastError):
            raise
        message = " ".join(str(exc).split())  # one line, whatever the message held
        if isinstance(exc, TrainingStopped) and exc.checkpoint is not None:
            message += f". Resume with: {resume_command(argv, exc.checkpoint, prog)}"
        print(f"{_rank_prefix()}{prog}: error: {message}", file=sys.stderr, flush=True)
        return exc.exit_code
    finally:
        if config is not None:  # the flags were good: torch is loaded, a process group may be up
            from mae_fast.distributed import teardown_distributed

            teardown_distributed()
            if os.environ.get("RANK", "0") == "0":
                remove_empty_folders(config.output_dir, up_to=created)


def _pretrain(config: RunConfig, started) -> None:
    from mae_fast.trainer import MAETrainer

    trainer = MAETrainer(config)
    with started(trainer):
        trainer.fit()
    if trainer.dist.is_main:
        logging.getLogger("mae_fast").info("done: checkpoints and reconstructions in %s", config.output_dir)


def main(argv: list[str] | None = None) -> int:
    """Parse, build the trainer, train. Returns the process exit code (0, 1, 2, or 130 on Ctrl-C)."""
    return run_command(PROG, argv, config_from_args, _pretrain)


if __name__ == "__main__":
    sys.exit(main())
