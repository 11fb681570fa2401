"""``torchrun -m mae_fast.finetune``: fine-tune a pretrained MAE encoder for classification with the official recipe.

The command: the official ``main_finetune.py`` flags, then mae_fast's own. It checks its flags before torch loads,
so a mistake answers in a second. The run itself is :class:`mae_fast.finetuner.FineTuner`; the recipe's parts
(:func:`~mae_fast.finetuner.param_groups_lrd`, :func:`~mae_fast.finetuner.load_encoder`, ...) are importable from
here too (``from mae_fast.finetune import param_groups_lrd``), loaded from :mod:`mae_fast.finetuner` when first used.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("mae_fast")

#: The names this module gives from :mod:`mae_fast.finetuner` (which loads torch) when first used.
FINETUNER_NAMES = ("FineTuner", "build_criterion", "build_mixup", "evaluate_classifier", "layer_id_for_vit",
                   "load_encoder", "param_groups_lrd", "read_encoder_state")


def __getattr__(name: str):
    if name in FINETUNER_NAMES:
        from mae_fast import finetuner

        return getattr(finetuner, name)
    raise AttributeError(f"module 'mae_fast.finetune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *FINETUNER_NAMES])


# ---------------------------------------------------------------------------------------------- the command

PROG = "mae_fast.finetune"

# flag -> (config section, field name), the official main_finetune.py's flags first, then mae_fast's.
FLAGS = {
    "batch_size": ("data", "batch_size"), "epochs": ("run", "epochs"), "accum_iter": ("run", "accum_iter"),
    "model": ("model", "name"), "input_size": ("data", "input_size"), "drop_path": ("model", "drop_path"),
    "clip_grad": ("optim", "clip_grad"), "weight_decay": ("optim", "weight_decay"), "lr": ("optim", "lr"),
    "blr": ("optim", "blr"), "layer_decay": ("optim", "layer_decay"), "min_lr": ("optim", "min_lr"),
    "warmup_epochs": ("optim", "warmup_epochs"), "color_jitter": ("aug", "color_jitter"), "aa": ("aug", "aa"),
    "smoothing": ("aug", "smoothing"), "reprob": ("aug", "reprob"), "remode": ("aug", "remode"),
    "recount": ("aug", "recount"), "resplit": ("aug", "resplit"), "mixup": ("aug", "mixup"),
    "cutmix": ("aug", "cutmix"), "cutmix_minmax": ("aug", "cutmix_minmax"), "mixup_prob": ("aug", "mixup_prob"),
    "mixup_switch_prob": ("aug", "mixup_switch_prob"), "mixup_mode": ("aug", "mixup_mode"),
    "finetune": ("model", "finetune"), "global_pool": ("model", "global_pool"), "data_path": ("data", "data_path"),
    "nb_classes": ("model", "nb_classes"), "output_dir": ("run", "output_dir"), "log_dir": ("run", "log_dir"),
    "device": ("run", "device"), "seed": ("run", "seed"), "resume": ("run", "resume"),
    "start_epoch": ("run", "start_epoch"), "eval": ("run", "eval"), "dist_eval": ("run", "dist_eval"),
    "num_workers": ("data", "num_workers"), "hflip": ("aug", "hflip"),
    "val_path": ("data", "val_path"), "data_backend": ("data", "backend"), "precision": ("run", "precision"),
    "fp8_recipe": ("run", "fp8_recipe"), "fp8_emulate": ("run", "fp8_emulate"), "compile": ("run", "compile"),
    "compile_scope": ("run", "compile_scope"), "fsdp": ("run", "fsdp"),
    "fsdp_replicate": ("run", "fsdp_replicate"), "checkpoint_format": ("run", "checkpoint_format"),
    "async_save": ("run", "async_save"), "global_batch": ("run", "global_batch"),
    "attn_backend": ("model", "attn_backend"), "grad_checkpointing": ("model", "grad_checkpointing"),
    "optimizer": ("optim", "optimizer"), "save_every": ("run", "save_every"),
    "save_last_every": ("run", "save_last_every"), "loss_spike_factor": ("run", "loss_spike_factor"),
    "dist_timeout": ("run", "dist_timeout"), "log_every": ("run", "log_every"), "val_every": ("run", "val_every"),
    "max_steps": ("run", "max_steps"), "verify_images": ("data", "verify_images"),
    "shard_timeout": ("data", "shard_timeout"),
}
BOOL_FLAGS = {"resplit", "eval", "dist_eval", "fp8_emulate", "compile", "fsdp", "async_save",
              "grad_checkpointing"}
FLOAT_FLAGS = {"drop_path", "clip_grad", "weight_decay", "lr", "blr", "layer_decay", "min_lr", "warmup_epochs",
               "hflip", "color_jitter", "smoothing", "reprob", "mixup", "cutmix", "mixup_prob", "mixup_switch_prob",
               "loss_spike_factor", "dist_timeout", "shard_timeout"}
INT_FLAGS = {"batch_size", "epochs", "accum_iter", "input_size", "recount", "nb_classes", "seed", "start_epoch",
             "num_workers", "global_batch", "save_every", "save_last_every", "log_every", "val_every", "max_steps",
             "fsdp_replicate"}
METAVARS = {"data_path": "PATH", "val_path": "PATH", "output_dir": "PATH", "log_dir": "PATH", "resume": "PATH|auto",
            "finetune": "PATH", "model": "NAME", "aa": "POLICY", "remode": "{pixel,rand,const}",
            "mixup_mode": "{batch,pair,elem}", "data_backend": "{auto,dali,torch}",
            "attn_backend": "{auto,flash_attn,sdpa,math}", "precision": "{auto,bf16,fp16,fp32,fp8}",
            "fp8_recipe": "{tensorwise,rowwise}", "compile_scope": "{model,blocks}",
            "checkpoint_format": "{full,dcp}", "optimizer": "{adamw,apex}",
            "device": "{auto,cuda,cpu}", "verify_images": "{header,decode}"}


#: --data_backend's help here: the field's own text is pretraining's (where auto means dali when it is installed).
DATA_BACKEND_HELP = ("torch (timm's transforms on PIL in DataLoader workers: the official recipe's images; what auto "
                     "means here) or dali (JPEG decoding on the GPU, DALI's CPU pipeline without one; the recipe in "
                     "DALI's operations, RandAugment and random erasing included, whose images differ from timm's in "
                     "detail: resampling, warp interpolation and fill; --aa must be a rand-... policy or none)")


def _sections():
    from mae_fast.config import AugConfig, DataConfig, FinetuneConfig, FinetuneModelConfig, FinetuneOptimConfig

    return {"data": DataConfig, "model": FinetuneModelConfig, "optim": FinetuneOptimConfig, "aug": AugConfig,
            "run": FinetuneConfig}


def _epilog() -> str:
    from mae_fast.presets import VIT_PRESETS

    presets = "\n".join(f"  {name:24s} {description}" for name, (description, _) in VIT_PRESETS.items())
    return (f"models (--model):\n{presets}\n\n"
            "Evaluate an official fine-tuned checkpoint (ViT-B/16: 83.664 top-1 on ImageNet-1k val):\n"
            f"  python -m {PROG} --eval --resume mae_finetuned_vit_base.pth --model vit_base_patch16 \\\n"
            "      --batch_size 16 --data_path ${IMAGENET_DIR}\n\n"
            f"A mistake in the flags or inputs ends with one line '{PROG}: error: ...' and exit code 2; a run that\n"
            "stops on its own (NaN loss, full disk, stalled rank) or ends diverged exits 1, Ctrl-C exits 130. Set\n"
            "MAE_FAST_DEBUG=1 or pass --debug for the traceback.")


def build_parser():
    """The command line of ``torchrun -m mae_fast.finetune``: the official ``main_finetune.py`` flags with their
    names, defaults and meaning, then mae_fast's own, each documented from the configuration dataclasses."""
    import argparse

    from mae_fast.cli import CommandParser
    from mae_fast.config import OptimConfig, RunConfig, field_docs, fields
    from mae_fast.pretrain import _default_text_of

    sections = _sections()
    # A subclass's docs cover the fields it declares; the others come from the class it extends.
    docs = {name: {**(field_docs(RunConfig) if name == "run" else field_docs(OptimConfig) if name == "optim" else {}),
                   **field_docs(cls)} for name, cls in sections.items()}
    parser = CommandParser(PROG, epilog=_epilog(),
                           description="Fine-tune a pretrained MAE encoder for classification with the "
                           "official recipe. With no flags: the quick start's checkpoint "
                           "(./output_dir/checkpoint-last.pth) on the built-in set's classes.")
    for flag, (section, name) in FLAGS.items():
        text = DATA_BACKEND_HELP if flag == "data_backend" else " ".join(docs[section][name].split(": ", 1)[-1].split())
        default = next(f.default for f in fields(sections[section]) if f.name == name)
        text = _default_text_of(default, text)
        if flag == "global_pool":
            parser.add_argument("--global_pool", action="store_true", dest="global_pool", default=argparse.SUPPRESS,
                                help=text)
            parser.add_argument("--cls_token", action="store_false", dest="global_pool", default=argparse.SUPPRESS,
                                help="classify the cls token (after norm) instead of the global pool")
        elif flag in BOOL_FLAGS:
            parser.add_argument(f"--{flag}", action="store_true", default=argparse.SUPPRESS, help=text)
        elif flag == "cutmix_minmax":
            parser.add_argument("--cutmix_minmax", type=float, nargs=2, default=argparse.SUPPRESS, help=text,
                                metavar=("MIN", "MAX"))
        else:
            kind = float if flag in FLOAT_FLAGS else int if flag in INT_FLAGS else str
            metavar = METAVARS.get(flag, "X" if kind is float else "N" if kind is int else flag.upper())
            parser.add_argument(f"--{flag}", type=kind, default=argparse.SUPPRESS, help=text, metavar=metavar)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of errors that are otherwise one line (or set MAE_FAST_DEBUG=1)")
    parser.add_argument("--local_rank", type=int, default=argparse.SUPPRESS, metavar="N",
                        help="ignored: torchrun passes the rank in the environment")
    return parser


def config_from_args(argv: list[str] | None = None):
    """Parse flags into a validated :class:`~mae_fast.config.FinetuneConfig`.

    Raises:
        ConfigError: a value that cannot work (naming the flag and the value).
        SystemExit: argparse's own errors (unknown flag, a value of the wrong type), exit code 2.
    """
    args = vars(build_parser().parse_args(argv))
    args.pop("local_rank", None)
    args.pop("debug", None)
    sections = _sections()
    values = {name: {} for name in sections}
    for flag, value in args.items():
        section, name = FLAGS[flag]
        values[section][name] = value
    run = values.pop("run")
    return sections["run"](**{name: sections[name](**values[name]) for name in ("data", "model", "optim", "aug")},
                           **run)


def _finetune(config, started) -> None:
    from mae_fast.finetuner import FineTuner

    tuner = FineTuner(config)
    if config.eval:
        # No step to stop after and nothing to save: the first Ctrl-C stops the evaluation at once.
        try:
            tuner.run_eval()
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"{PROG}: interrupted during the evaluation of {config.resume}; nothing was "
                                    "written") from None
        return
    with started(tuner):
        tuner.fit()
    if tuner.dist.is_main:
        logger.info("done: max accuracy %.2f%%; checkpoints and log.txt in %s", tuner.max_accuracy, config.output_dir)


def main(argv: list[str] | None = None) -> int:
    """``torchrun -m mae_fast.finetune``: parse, build the run, fine-tune (or evaluate, with ``--eval``). Returns the
    process exit code (0, 1, 2, or 130 on Ctrl-C)."""
    from mae_fast.pretrain import run_command

    return run_command(PROG, argv, config_from_args, _finetune)


if __name__ == "__main__":
    import sys

    sys.exit(main())
