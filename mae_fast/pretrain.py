"""``torchrun -m mae_fast.pretrain``: MAE pretraining with the official script's flags.

With no flags it pretrains a tiny MAE on the built-in image set (a few minutes on a CPU) and
writes checkpoints, log.txt and reconstruction images to ./output_dir.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mae_fast.config import DataConfig, ModelConfig, OptimConfig, RunConfig, field_docs

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
    "precision": ("run", "precision"), "compile": ("run", "compile"),
    "compile_scope": ("run", "compile_scope"), "fsdp": ("run", "fsdp"),
    "grad_checkpointing": ("model", "grad_checkpointing"), "optimizer": ("optim", "optimizer"),
    "save_every": ("run", "save_every"), "save_last_every": ("run", "save_last_every"),
    "log_every": ("run", "log_every"), "val_every": ("run", "val_every"), "max_steps": ("run", "max_steps"),
    "device": ("run", "device"), "verify_images": ("data", "verify_images"),
    "synthetic_samples": ("data", "synthetic_samples"),
}
SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "run": RunConfig}
BOOL_FLAGS = {"norm_pix_loss", "compile", "fsdp", "grad_checkpointing"}
FLOAT_FLAGS = {"mask_ratio", "weight_decay", "lr", "blr", "min_lr", "warmup_epochs"}
STR_FLAGS = {"model", "data_path", "val_path", "output_dir", "log_dir", "resume", "data_backend", "attn_backend",
             "kernel_backend", "precision", "compile_scope", "optimizer", "device", "verify_images"}


def build_parser() -> argparse.ArgumentParser:
    """The command line: every flag documented from the configuration dataclasses."""
    parser = argparse.ArgumentParser(
        prog="torchrun -m mae_fast.pretrain", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    docs = {name: field_docs(cls) for name, cls in SECTIONS.items()}
    for flag, (section, name) in FLAGS.items():
        text = docs[section][name].split(": ", 1)[-1]
        if flag in BOOL_FLAGS:
            parser.add_argument(f"--{flag}", action="store_true", default=argparse.SUPPRESS, help=text)
        else:
            kind = str if flag in STR_FLAGS else float if flag in FLOAT_FLAGS else int
            parser.add_argument(f"--{flag}", type=kind, default=argparse.SUPPRESS, help=text)
    parser.add_argument("--local_rank", type=int, default=argparse.SUPPRESS,
                        help="ignored: torchrun passes the rank in the environment")
    return parser


def config_from_args(argv: list[str] | None = None) -> RunConfig:
    """Parse flags into a validated :class:`RunConfig` (errors name the flag and the value)."""
    args = vars(build_parser().parse_args(argv))
    args.pop("local_rank", None)
    sections = {name: {} for name in SECTIONS}
    for flag, value in args.items():
        section, name = FLAGS[flag]
        sections[section][name] = value
    run = sections.pop("run")
    return RunConfig(data=DataConfig(**sections["data"]), model=ModelConfig(**sections["model"]),
                     optim=OptimConfig(**sections["optim"]), **run)


def main(argv: list[str] | None = None) -> int:
    """Parse, build the trainer, train. Returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        config = config_from_args(argv)
    except ValueError as exc:
        print(f"mae_fast.pretrain: error: {exc}", file=sys.stderr)
        return 2
    from mae_fast.distributed import teardown_distributed
    from mae_fast.trainer import MAETrainer

    try:
        trainer = MAETrainer(config)
        trainer.fit()
        if trainer.dist.is_main:
            logging.getLogger("mae_fast").info("done: checkpoints and reconstructions in %s", config.output_dir)
    finally:
        teardown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
