"""``python -m mae_fast.linprobe``: the linear probe on frozen encoder features.

    python -m mae_fast.linprobe --checkpoint output_dir/checkpoint-last.pth --data_path /data/imagenet \\
        --output_dir probe/

The features of the training and validation images (``--data_path`` in ImageNet layout:
``train/<class>/``, ``val/<class>/``; ``--val_path`` for a separate validation folder) are
extracted once, without masking (``MAEViT.extract_features``: the cls token after the encoder's norm
by default, as ``main_linprobe.py`` does, or ``--global_pool``, the mean of the patch tokens), resize
and center crop, with progress lines (``train features: batch 12/40, 310 images/s, ETA 9s``), and
cached in ``--output_dir``: a later run with the same checkpoint file, images and settings reuses
them. The cache is written atomically with its shapes and a SHA-256 of its
tensors; one that does not match them, the image counts, or holds non-finite values is extracted
again (with one warning), and one holding objects other than tensors is refused. Non-finite features
or a head that becomes non-finite stop the probe with one line naming the checkpoint. Then the
official probe head, BatchNorm without affine parameters followed by a Linear layer (weights
``trunc_normal(std=0.01)``), is trained on them with the official optimizer, LARS (timm's ``Lars``,
momentum 0.9, trust coefficient 0.001, the trust ratio on the weight matrix and not on the bias, as
the official LARS), ``--epochs`` (default 90) with linear warmup (10) and a cosine schedule,
``lr = blr x batch / 256`` (``--blr`` 0.1, ``--batch_size`` 1024, ``--weight_decay`` 0);
``--optimizer sgd`` trains it with SGD (momentum 0.9) instead. It reports top-1/top-5 on the
validation set and writes ``head.pth`` and ``results.json``.

Deliberate differences from the official ``main_linprobe.py``: the features are computed once on
center crops, so the head sees no random-crop augmentation (each epoch costs a pass over cached
features instead of a pass of the encoder); and ``--global_pool`` averages the patch tokens after
the encoder's norm (the features the kNN monitor uses), where the official probe normalizes the
mean of the un-normed tokens with a fresh LayerNorm (the default, the cls token, is the official's). Under ``torchrun`` every rank extracts its share of the
images; rank 0 trains the head.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from mae_fast.cli import CommandParser
from mae_fast.config import DataConfig, default_num_workers, is_checkpoint_path
from mae_fast.errors import CheckpointError, ConfigError, DataError, MaeFastError, NonFiniteLossError
from mae_fast.knn import top_k_accuracy
from mae_fast.progress import report_progress

logger = logging.getLogger("mae_fast")

#: The layout of the feature cache: ``train`` and ``val`` tensors, their ``shapes`` and ``checksum``.
CACHE_VERSION = 3  # 3: the indices of the images the rows are (some may be left out)


def probe_head(dim: int, num_classes: int) -> nn.Sequential:
    """The official linear-probe head: ``BatchNorm1d(dim, affine=False, eps=1e-6)``, then ``Linear(dim, classes)``."""
    linear = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def cache_key(checkpoint: Path, files: list[str], settings: dict) -> str:
    """A digest of what the features depend on: the checkpoint file (path, size, time), the images, the settings."""
    stat = checkpoint.stat()
    digest = hashlib.sha256(json.dumps([str(checkpoint.resolve()), stat.st_size, stat.st_mtime_ns, settings]).encode())
    for path in files:
        digest.update(path.encode())
    return digest.hexdigest()[:16]


def feature_checksum(features: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the ``train`` and ``val`` tensors' bytes and of the indices of the images they hold, in that order."""
    digest = hashlib.sha256()
    for key in ("train", "val", "train_kept", "val_kept"):
        digest.update(features[key].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_features(features: dict[str, torch.Tensor], cache: Path) -> None:
    """Write the feature cache atomically (a temporary file beside it, then a rename) with its shapes and checksum."""
    tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
    try:
        torch.save({"version": CACHE_VERSION, **{key: features[key] for key in ("train", "val", "train_kept", "val_kept")},
                    "shapes": {split: list(features[split].shape) for split in ("train", "val")},
                    "checksum": feature_checksum(features)}, tmp)
        os.replace(tmp, cache)
    finally:
        tmp.unlink(missing_ok=True)


def load_features(cache: Path, rows: dict[str, int]) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The cached features (and ``<split>_kept``, the images whose rows they are), or None and why they cannot be
    used: unreadable, another layout, shapes other than the recorded ones or than ``rows`` (images per split, some
    of which may have been left out), a checksum that does not match, non-finite values.

    Raises:
        CheckpointError: the file holds objects other than tensors (a pickle); it is refused, not loaded.
    """
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():  # torch warns about a pickle protocol before refusing the pickle
            warnings.simplefilter("ignore", UserWarning)
            stored = torch.load(cache, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        with open(cache, "rb") as f:
            head = f.read(2)
        if "GLOBAL" in str(exc) or head[:1] == b"\x80":  # a pickle (a torch cache is a zip archive)
            raise CheckpointError(f"the feature cache {str(cache)!r} holds a pickle of objects other than tensors; "
                                  "refusing to load it (nothing in it ran). Remove it to extract the features "
                                  "again") from None
        return None, f"it cannot be read ({type(exc).__name__})"
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        return None, f"it cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    if not isinstance(stored, dict) or stored.get("version") != CACHE_VERSION:
        return None, "it is of another layout"
    features = {split: stored.get(split) for split in ("train", "val")}
    if not all(isinstance(t, torch.Tensor) and t.ndim == 2 and t.is_floating_point() for t in features.values()):
        return None, "it does not hold two feature matrices"
    kept = {f"{split}_kept": stored.get(f"{split}_kept") for split in ("train", "val")}
    if not all(isinstance(t, torch.Tensor) and t.ndim == 1 and t.dtype == torch.int64 for t in kept.values()):
        return None, "it does not say which images its rows are"
    shapes = {split: list(t.shape) for split, t in features.items()}
    if stored.get("shapes") != shapes:
        return None, f"its shapes {shapes} are not the recorded {stored.get('shapes')}"
    fits = all(features[split].shape[0] == kept[f"{split}_kept"].shape[0] <= rows[split] and
               bool(((kept[f"{split}_kept"] >= 0) & (kept[f"{split}_kept"] < rows[split])).all()) for split in rows)
    if not fits or shapes["train"][1] != shapes["val"][1]:
        return None, f"its shapes {shapes} do not fit {rows['train']} training and {rows['val']} validation images"
    features.update(kept)
    if stored.get("checksum") != feature_checksum(features):
        return None, "its checksum does not match"
    if not all(bool(torch.isfinite(t).all()) for t in features.values()):
        return None, "it holds non-finite values"
    return features, ""


PROBE_OPTIMIZERS = ("lars", "sgd")


def probe_optimizer(head: nn.Module, name: str = "lars", lr: float = 0.1, weight_decay: float = 0.0):
    """The probe head's optimizer: ``lars``, the official one (timm's ``Lars``, momentum 0.9, trust coefficient
    0.001; the trust ratio and weight decay apply to matrices, not to 1-D parameters, as the official LARS
    excludes biases and norms; with ``weight_decay`` above 0, timm's trust ratio divides by ``|g| + wd |w|`` where the
    official divides by ``|g + wd w|``, its upper bound), or ``sgd`` (momentum 0.9, the weight decay on matrices
    alike)."""
    matrices = [p for p in head.parameters() if p.ndim > 1]
    vectors = [p for p in head.parameters() if p.ndim <= 1]
    if name == "sgd":
        return torch.optim.SGD([{"params": matrices, "weight_decay": weight_decay},
                                {"params": vectors, "weight_decay": 0.0}], lr=lr, momentum=0.9)
    from timm.optim import Lars

    return Lars([{"params": matrices, "weight_decay": weight_decay, "always_adapt": True},
                 {"params": vectors, "weight_decay": 0.0, "always_adapt": False}], lr=lr, momentum=0.9)


def train_head(train_x, train_y, val_x, val_y, num_classes: int, epochs: int = 90, warmup_epochs: int = 10,
               batch_size: int = 1024, blr: float = 0.1, seed: int = 0, optimizer: str = "lars",
               weight_decay: float = 0.0) -> tuple[nn.Sequential, dict]:
    """Train the probe head on features with ``optimizer`` (:func:`probe_optimizer`); returns the head (eval mode)
    and ``top1``, ``top5`` on the validation set.

    Raises:
        NonFiniteLossError: the loss or the head became NaN or infinite (the epoch is named).
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = probe_head(train_x.shape[1], num_classes)
    lr = blr * batch_size / 256
    optimizer = probe_optimizer(head, optimizer, lr, weight_decay)
    steps_per_epoch = max(1, math.ceil(train_x.shape[0] / batch_size))
    for epoch in range(epochs):
        head.train()
        order = torch.randperm(train_x.shape[0], generator=generator)
        for step in range(steps_per_epoch):
            t = epoch + step / steps_per_epoch
            scale = t / warmup_epochs if t < warmup_epochs else \
                0.5 * (1 + math.cos(math.pi * (t - warmup_epochs) / max(epochs - warmup_epochs, 1e-9)))
            for group in optimizer.param_groups:
                group["lr"] = lr * scale
            batch = order[step * batch_size:(step + 1) * batch_size]
            if batch.numel() < 2:  # BatchNorm needs two
                continue
            loss = nn.functional.cross_entropy(head(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"the probe head became non-finite (loss {loss.item()}) at epoch "
                                         f"{epoch + 1}/{epochs}, lr {lr * scale:g}; a lower --blr may train")
    head.eval()
    with torch.no_grad():
        logits = head(val_x)
    if not all(bool(torch.isfinite(t).all()) for t in (*head.state_dict().values(), logits)):
        raise NonFiniteLossError(f"the probe head became non-finite after {epochs} epochs; a lower --blr may train")
    return head, {"top1": top_k_accuracy(logits, val_y, 1), "top5": top_k_accuracy(logits, val_y, 5)}


class _Reported:
    """A loader whose epochs log their progress (:func:`mae_fast.progress.report_progress`)."""

    def __init__(self, loader, label: str, world_size: int, is_main: bool):
        self.loader, self.label, self.world_size, self.is_main = loader, label, world_size, is_main

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int):
        return report_progress(self.loader.epoch(epoch), len(self.loader), self.label, self.world_size, self.is_main)


def build_parser() -> CommandParser:
    """The command line of ``python -m mae_fast.linprobe``."""
    parser = CommandParser("mae_fast.linprobe", description=__doc__.split("\n\n")[0],
                           epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--checkpoint", required=True, help="a mae_fast or official MAE checkpoint (.pth/.safetensors, "
                        "or a .dcp checkpoint folder)")
    parser.add_argument("--data_path", required=True, help="ImageNet-layout folder: train/<class>/ (and val/<class>/)")
    parser.add_argument("--val_path", default=None, help="validation folder with class sub-folders (default: "
                                                         "--data_path's val/)")
    parser.add_argument("--output_dir", default="./linprobe", help="features cache, head.pth, results.json "
                                                                   "(default: %(default)s)")
    parser.add_argument("--model", default=None, help="the preset the checkpoint must hold (default: read from it)")
    parser.add_argument("--cls_token", dest="pool", action="store_const", const="cls", default="cls",
                        help="features: the cls token after the encoder's norm (the default, as main_linprobe.py)")
    parser.add_argument("--global_pool", dest="pool", action="store_const", const="mean",
                        help="features: the mean of the patch tokens instead of the cls token")
    parser.add_argument("--pool", dest="pool", choices=("mean", "cls"),
                        help="the same choice by name: mean (--global_pool) or cls (--cls_token)")
    parser.add_argument("--optimizer", default="lars", choices=PROBE_OPTIMIZERS,
                        help="the head's optimizer: lars (the official, timm's Lars) or sgd (default: %(default)s)")
    parser.add_argument("--weight_decay", type=float, default=0.0, help="weight decay of the head's weight matrix "
                                                                        "(default: %(default)s, the official)")
    parser.add_argument("--input_size", type=int, default=224, help="center crop in pixels (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=90, help="head training epochs (default: %(default)s)")
    parser.add_argument("--warmup_epochs", type=int, default=10, help="linear warmup epochs (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=1024, help="head training batch (default: %(default)s)")
    parser.add_argument("--blr", type=float, default=0.1, help="base lr for a batch of 256 (default: %(default)s)")
    parser.add_argument("--extract_batch_size", type=int, default=128, help="images per step and rank in feature "
                                                                            "extraction (default: %(default)s)")
    parser.add_argument("--num_workers", type=int, default=None, help="loader workers (default: the usable cores)")
    parser.add_argument("--data_backend", default="auto", choices=("auto", "dali", "torch"),
                        help="decoder (default: %(default)s: dali if installed)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    return parser


def run(args: argparse.Namespace) -> dict | None:
    """Extract (or reuse) the features, train the head (rank 0); returns the results on rank 0, else None.

    Raises:
        ConfigError, DataError, CheckpointError: bad flags, folders without classes, validation classes the
            training set lacks, a checkpoint that cannot be read or does not fit.
    """
    from mae_fast.data import build_eval_loader
    from mae_fast.distributed import setup_distributed
    from mae_fast.export import build_model, infer_preset, read_state
    from mae_fast.knn import extract_features, labeled_images
    from mae_fast.presets import patch_size_of

    for flag in ("epochs", "batch_size", "input_size", "extract_batch_size"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag}: must be a positive integer, got {getattr(args, flag)}")
    if args.warmup_epochs < 0:
        raise ConfigError(f"--warmup_epochs: must be an integer >= 0, got {args.warmup_epochs}")
    if not (math.isfinite(args.blr) and args.blr > 0):
        raise ConfigError(f"--blr: must be a finite number > 0 (the official value is 0.1), got {args.blr}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise ConfigError(f"--weight_decay: must be a finite number >= 0 (the official value is 0), got "
                          f"{args.weight_decay}")
    if not is_checkpoint_path(args.checkpoint):
        raise CheckpointError(f"--checkpoint {args.checkpoint!r} does not exist (or is not a checkpoint file or DCP "
                              "checkpoint folder)")
    if not Path(args.data_path).expanduser().is_dir():
        raise DataError(f"--data_path {args.data_path!r} does not exist or is not a folder; give one in ImageNet "
                        "layout, with a class folder per class under train and val")
    dist_info = setup_distributed(args.device)
    device = dist_info.device
    if args.val_path is None and not (Path(args.data_path).expanduser() / "val").is_dir():
        raise DataError(f"--data_path {args.data_path!r} has no val/ folder; give the validation images with "
                        "--val_path")
    train_files, train_labels, classes = labeled_images(args.data_path, "train", "the linear probe")
    val_files, val_labels, val_classes = labeled_images(args.val_path or args.data_path, "val", "the linear probe")
    missing = sorted(set(val_classes) - set(classes))
    if missing:
        raise DataError(f"the validation set has classes the training set lacks: {missing[:10]}")
    val_labels = torch.as_tensor([classes.index(val_classes[i]) for i in val_labels])
    train_labels = torch.as_tensor(train_labels)

    checkpoint = Path(args.checkpoint)
    state, named = read_state(checkpoint)
    preset = infer_preset(state, named, args.model)
    patch = patch_size_of(preset)
    if args.input_size % patch:
        below, above = args.input_size // patch * patch, (args.input_size // patch + 1) * patch
        raise ConfigError(f"--input_size: must be a multiple of the patch size {patch} of the checkpoint's {preset}, "
                          f"for example {f'{below} or {above}' if below else above}, got {args.input_size}")
    model, _ = build_model(state, preset, (args.input_size, args.input_size))
    model = model.to(device).eval()
    out = Path(args.output_dir)
    settings = {"preset": preset, "pool": args.pool, "input_size": args.input_size}
    cache = out / f"features-{cache_key(checkpoint, train_files + val_files, settings)}.pt"
    features = None
    if cache.is_file():
        features, why = load_features(cache, {"train": len(train_files), "val": len(val_files)})
        if dist_info.is_main:
            if features is not None:
                logger.info("reusing the features in %s", cache)
            else:
                logger.warning("the feature cache %s does not match (%s); extracting the features again", cache, why)
    if features is None:
        data = DataConfig(data_path=None, backend=args.data_backend, input_size=args.input_size,
                          batch_size=args.extract_batch_size,
                          num_workers=args.num_workers if args.num_workers is not None else default_num_workers())
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        started = time.perf_counter()
        features = {}
        for split, files in (("train", train_files), ("val", val_files)):
            loader = _Reported(build_eval_loader(data, files, dist_info.rank, dist_info.world_size, device, args.seed),
                               f"{split} features", dist_info.world_size, dist_info.is_main)
            rows, present = extract_features(model, loader, len(files), device, autocast, args.pool)
            # Images no slot delivered (marked slots only) are left out, with their labels.
            features[split], features[f"{split}_kept"] = rows[present].cpu(), present.nonzero()[:, 0].cpu()
        for split in ("train", "val"):
            values = features[split]
            bad = int((~torch.isfinite(values)).any(dim=1).sum())
            if bad:
                raise CheckpointError(f"checkpoint {str(checkpoint)!r} gives non-finite features (NaN or inf) for "
                                      f"{bad} of {values.shape[0]} {split} images; its weights are not usable for a "
                                      "probe (nothing was cached)")
        if dist_info.is_main:
            out.mkdir(parents=True, exist_ok=True)  # only now: a run stopped by an error leaves no empty folder
            save_features(features, cache)
            logger.info("extracted %d + %d features in %.1f s into %s", len(train_files), len(val_files),
                        time.perf_counter() - started, cache)
    if not dist_info.is_main:
        return None
    if "train_kept" in features:
        train_labels, val_labels = train_labels[features["train_kept"]], val_labels[features["val_kept"]]
    try:
        head, metrics = train_head(features["train"], train_labels, features["val"], val_labels, len(classes),
                                   args.epochs, args.warmup_epochs, args.batch_size, args.blr, args.seed,
                                   args.optimizer, args.weight_decay)
    except NonFiniteLossError as exc:
        raise NonFiniteLossError(f"{exc} (features of checkpoint {str(checkpoint)!r}); no result was written") from exc
    torch.save({"head": head.state_dict(), "classes": classes, "pool": args.pool, "preset": preset}, out / "head.pth")
    results = {"top1": metrics["top1"], "top5": metrics["top5"], "checkpoint": str(checkpoint), "preset": preset,
               "pool": args.pool, "input_size": args.input_size, "classes": len(classes),
               "train_images": len(features["train"]), "val_images": len(features["val"]), "epochs": args.epochs,
               "batch_size": args.batch_size, "blr": args.blr, "optimizer": args.optimizer,
               "weight_decay": args.weight_decay}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the probe; print the result line. Returns the exit code (2 with one line for a mistake)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    from mae_fast.distributed import teardown_distributed

    try:
        results = run(args)
    except MaeFastError as exc:
        if os.environ.get("MAE_FAST_DEBUG", "0") not in ("", "0"):
            raise
        print(f"mae_fast.linprobe: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    finally:
        teardown_distributed()
    if results is not None:
        print(f"linear probe: top-1 {results['top1']:.1%}, top-5 {results['top5']:.1%} on {results['val_images']} "
              f"images of {results['classes']} classes; head and results.json in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
