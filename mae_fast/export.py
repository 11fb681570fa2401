"""``python -m mae_fast.export CHECKPOINT OUT --to timm|hf|safetensors|official``: what pretraining learned, for other
tools.

CHECKPOINT is a mae_fast training checkpoint (a ``.pth`` file, or a ``.dcp`` folder of shards that
``--checkpoint_format dcp`` writes), an official MAE checkpoint, or a state dict with the official
keys (``.pth``/``.safetensors``). The preset is read from the checkpoint (its ``config``, or the
shapes of its weights); ``--model`` checks it.

- ``timm``: the encoder as a timm ``VisionTransformer`` state dict (file OUT, ``.pth`` or
  ``.safetensors``) that loads with ``strict=True`` into ``timm.create_model(NAME, num_classes=0,
  global_pool=..., fc_norm=False, img_size=...)``, NAME the matching timm model
  (``vit_base_patch16_224`` ...). ``global_pool="avg"`` gives ``MAEViT.extract_features(pool="mean")``,
  ``global_pool="token"`` gives ``pool="cls"``; ``fc_norm=False`` keeps the final norm before the
  pooling, as MAE's encoder has it. The command prints the exact call.
- ``hf``: a ``save_pretrained`` folder of Hugging Face ``ViTMAEForPreTraining`` (config and
  weights, encoder and decoder) that ``from_pretrained`` loads; for the same ``noise`` its outputs
  equal mae_fast's. Square images only (Hugging Face's ViTMAE lays its positions out on a square grid).
- ``safetensors``: the official-key state dict in safetensors format (no pickle), which
  ``MAEViT.load_pretrained`` reads too.
- ``official``: one ``.pth`` file laid out as the official checkpoints are (``{"model": state dict}``,
  encoder and decoder under the official keys), e.g. to turn a sharded ``.dcp`` checkpoint into
  one file for tools that expect the official ones.

``--img_size`` exports for another image size: the position embeddings are resized bicubically,
as ``load_pretrained`` and the official fine-tuning code do. An existing OUT is refused unless
``--force``, which replaces only an earlier export: a ``hf`` folder holding nothing but what
``save_pretrained`` writes, a state dict of encoder tensors, or a safetensors file mae_fast wrote;
never the working folder or one above it, the checkpoint or a folder holding it. The new export is
written beside OUT first and then swapped in. Exported files get the mode the umask gives a new
file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch

from mae_fast.cli import CommandParser
from mae_fast.errors import CheckpointError, ConfigError, MaeFastError, OutputDirError, install_hint
from mae_fast.model import MODELS, PRESETS, MAEViT, create_model

TARGETS = ("timm", "hf", "safetensors", "official")
#: mae_fast preset -> the timm model with the same encoder.
TIMM_MODELS = {"mae_vit_tiny_patch16": "vit_tiny_patch16_224", "mae_vit_small_patch16": "vit_small_patch16_224",
               "mae_vit_base_patch16": "vit_base_patch16_224", "mae_vit_large_patch16": "vit_large_patch16_224",
               "mae_vit_huge_patch14": "vit_huge_patch14_224"}
_ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
_DECODER_PREFIXES = ("mask_token", "decoder_")


def _library(name: str, extra: str):
    try:
        return __import__(name)
    except ImportError as exc:
        raise ConfigError(f"--to: exporting needs the {name} package, which is not installed ({exc}); install it "
                          f"with {install_hint(extra)}") from exc


def read_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str | None]:
    """The official-key state dict in a checkpoint (a file, or a DCP checkpoint folder) and the preset its ``config``
    names (None if it has none).

    Raises:
        CheckpointError: missing, unreadable, or not a state dict of tensors.
    """
    path = Path(path)
    if not path.is_file() and not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from mae_fast.checkpoint import load_safetensors

        return load_safetensors(path), None
    from mae_fast.checkpoint import load_file

    loaded = load_file(path)
    state = loaded.get("model", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{str(path)!r} holds no state dict of tensors (nor one under 'model')")
    config = loaded.get("config") if isinstance(loaded, dict) else None
    name = config.get("model", {}).get("name") if isinstance(config, dict) else None
    return dict(state), name


def describe_state(state: dict[str, torch.Tensor]) -> dict:
    """The architecture a state dict holds: patch size, widths, depths (decoder entries absent if it has none)."""
    try:
        proj = state["patch_embed.proj.weight"]
        shape = {"patch_size": proj.shape[-1], "embed_dim": proj.shape[0],
                 "depth": 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))}
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"the checkpoint holds no MAE encoder (missing {exc})") from exc
    if "decoder_embed.weight" in state:
        shape["decoder_embed_dim"] = state["decoder_embed.weight"].shape[0]
        shape["decoder_depth"] = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("decoder_blocks.")),
                                         default=-1)
    return shape


def _preset_shape(name: str) -> dict:
    args = PRESETS[name][1]
    return {k: args[k] for k in ("patch_size", "embed_dim", "depth", "decoder_embed_dim", "decoder_depth")}


def infer_preset(state: dict[str, torch.Tensor], named: str | None = None, asked: str | None = None) -> str:
    """The preset whose shapes the state dict has (the decoder is not required).

    Raises:
        ConfigError: ``asked`` (``--model``) does not fit the checkpoint (naming both), or no preset does.
    """
    shape = describe_state(state)

    def fits(name: str) -> bool:
        want = _preset_shape(name)
        return all(want[k] == v for k, v in shape.items())

    matches = [name for name in MODELS if fits(name)]
    held = named if named in matches else (matches[0] if matches else None)
    summary = (f"a {shape['embed_dim']}-wide, {shape['depth']}-block encoder with {shape['patch_size']}-px patches"
               + (f" ({held})" if held else ""))
    if asked is not None:
        if asked not in MODELS:
            raise ConfigError(f"--model: must be one of {', '.join(MODELS)}, got {asked!r}")
        if not fits(asked):
            raise ConfigError(f"--model: the checkpoint holds {summary}, not {asked}, got {asked!r}")
        return asked
    if held is None:
        raise ConfigError(f"the checkpoint holds {summary}, which is none of the presets ({', '.join(MODELS)})")
    return held


def _grid_of(state: dict, patch_size: int, img_size) -> tuple[int, int]:
    positions = state["pos_embed"].shape[1] - 1
    if img_size is not None:
        return img_size[0] // patch_size, img_size[1] // patch_size
    side = round(positions ** 0.5)
    if side * side != positions:
        raise ConfigError(f"--img_size: the checkpoint's {positions} positions are not a square grid; give the image "
                          "size it was trained at (H W), got None")
    return side, side


def build_model(state: dict[str, torch.Tensor], preset: str, img_size=None) -> tuple[MAEViT, bool]:
    """A float32 MAEViT of ``preset`` holding ``state`` (positions resized for ``img_size`` if given), and whether
    the state had a decoder (an encoder-only release leaves the decoder at its initialization)."""
    patch = PRESETS[preset][1]["patch_size"]
    grid = _grid_of(state, patch, img_size)
    size = img_size if img_size is not None else (grid[0] * patch, grid[1] * patch)
    if size[0] % patch or size[1] % patch:
        raise ConfigError(f"--img_size: must be a multiple of the patch size {patch}, got {list(size)}")
    model = create_model(preset, img_size=tuple(size), kernel_backend="torch", attn_backend="math")
    try:
        model.load_pretrained(state, strict_encoder=True)
    except ValueError as exc:
        raise CheckpointError(f"the checkpoint does not fit {preset}: {exc}") from exc
    return model, "decoder_embed.weight" in state


def timm_state(model: MAEViT) -> dict[str, torch.Tensor]:
    """The encoder's weights under timm ``VisionTransformer``'s names (they are the official ones)."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
            if k.startswith(_ENCODER_PREFIXES)}


def timm_call(preset: str, img_size, pool: str = "mean") -> str:
    """The ``timm.create_model`` call whose model loads :func:`timm_state` with ``strict=True``."""
    global_pool = "avg" if pool == "mean" else "token"
    return (f"timm.create_model({TIMM_MODELS[preset]!r}, num_classes=0, global_pool={global_pool!r}, fc_norm=False, "
            f"img_size={tuple(img_size)})")


# Hugging Face ViTMAE names, per block: (our suffix, the suffixes transformers 4.x and 5.x use).
_HF_BLOCK = [("norm1", ("layernorm_before",)), ("norm2", ("layernorm_after",)),
             ("attn.proj", ("attention.output.dense", "attention.o_proj")),
             ("mlp.fc1", ("intermediate.dense", "mlp.fc1")), ("mlp.fc2", ("output.dense", "mlp.fc2"))]
_HF_QKV = (("attention.attention.query", "attention.q_proj"), ("attention.attention.key", "attention.k_proj"),
           ("attention.attention.value", "attention.v_proj"))
_HF_TOP = {"vit.embeddings.cls_token": "cls_token", "vit.embeddings.position_embeddings": "pos_embed",
           "vit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "vit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "vit.layernorm.weight": "norm.weight", "vit.layernorm.bias": "norm.bias",
           "decoder.mask_token": "mask_token", "decoder.decoder_pos_embed": "decoder_pos_embed",
           "decoder.decoder_embed.weight": "decoder_embed.weight", "decoder.decoder_embed.bias": "decoder_embed.bias",
           "decoder.decoder_norm.weight": "decoder_norm.weight", "decoder.decoder_norm.bias": "decoder_norm.bias",
           "decoder.decoder_pred.weight": "decoder_pred.weight", "decoder.decoder_pred.bias": "decoder_pred.bias"}
_HF_LAYER = re.compile(r"^(vit\.encoder\.layer|vit\.layers|decoder\.decoder_layers)\.(\d+)\.(.+)\.(weight|bias)$")


def hf_config(model: MAEViT, mask_ratio: float = 0.75):
    """The ``ViTMAEConfig`` of ``model``."""
    transformers = _library("transformers", "export")
    cfg = model.config
    if cfg["img_size"][0] != cfg["img_size"][1]:
        raise ConfigError(f"--to hf: Hugging Face's ViTMAE lays its positions on a square grid; export for a square "
                          f"--img_size, got {list(cfg['img_size'])}")
    return transformers.ViTMAEConfig(
        hidden_size=cfg["embed_dim"], num_hidden_layers=cfg["depth"], num_attention_heads=cfg["num_heads"],
        intermediate_size=int(cfg["embed_dim"] * cfg["mlp_ratio"]), hidden_act="gelu", layer_norm_eps=1e-6,
        image_size=cfg["img_size"][0], patch_size=cfg["patch_size"], num_channels=cfg["in_chans"], qkv_bias=True,
        decoder_num_attention_heads=cfg["decoder_num_heads"], decoder_hidden_size=cfg["decoder_embed_dim"],
        decoder_num_hidden_layers=cfg["decoder_depth"],
        decoder_intermediate_size=int(cfg["decoder_embed_dim"] * cfg["mlp_ratio"]), mask_ratio=mask_ratio,
        norm_pix_loss=cfg["norm_pix_loss"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def hf_state(model: MAEViT, hf_keys) -> dict[str, torch.Tensor]:
    """``model``'s weights under the names of a Hugging Face ViTMAEForPreTraining whose keys are ``hf_keys``.

    Raises:
        RuntimeError: a key this transformers version uses that mae_fast does not know.
    """
    ours = model.state_dict()
    out = {}
    for key in hf_keys:
        if key in _HF_TOP:
            out[key] = ours[_HF_TOP[key]]
            continue
        match = _HF_LAYER.match(key)
        if match is None:
            raise RuntimeError(f"Hugging Face ViTMAE key {key!r} is not known to mae_fast's export")
        stack, index, suffix, kind = match.groups()
        block = f"{'decoder_blocks' if stack.startswith('decoder') else 'blocks'}.{index}"
        qkv = next((i for i, names in enumerate(_HF_QKV) if suffix in names), None)
        if qkv is not None:
            out[key] = ours[f"{block}.attn.qkv.{kind}"].chunk(3, dim=0)[qkv]
            continue
        name = next((mine for mine, names in _HF_BLOCK if suffix in names), None)
        if name is None:
            raise RuntimeError(f"Hugging Face ViTMAE key {key!r} is not known to mae_fast's export")
        out[key] = ours[f"{block}.{name}.{kind}"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def hf_model(model: MAEViT, mask_ratio: float = 0.75):
    """A Hugging Face ``ViTMAEForPreTraining`` holding ``model``'s weights."""
    transformers = _library("transformers", "export")
    hf = transformers.ViTMAEForPreTraining(hf_config(model, mask_ratio))
    hf.load_state_dict(hf_state(model, hf.state_dict().keys()), strict=True)
    return hf.eval()


#: The files ``save_pretrained`` writes into a Hugging Face folder (weights in one file or in numbered shards).
_HF_FILES = re.compile(r"config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors"
                       r"|model\.safetensors\.index\.json")


def _refuse_existing(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ConfigError(f"OUT: {str(out)!r} exists; nothing was overwritten (pass --force to replace it), "
                          f"got {str(out)!r}")


def _refuse_unless_an_export(out: Path, to: str, checkpoint) -> None:
    """With --force, an existing OUT is replaced only when an earlier export wrote it.

    Raises:
        ConfigError: OUT is the working folder or one above it, the checkpoint or a folder holding it, of the other
            kind (a folder for a file target, a file for ``hf``), or holds anything an export does not write.
    """
    target, ckpt, cwd = Path(os.path.abspath(out)), Path(os.path.abspath(checkpoint)), Path.cwd()

    def refuse(why: str):
        return ConfigError(f"OUT: {str(out)!r} {why}; --force replaces only an earlier export and nothing was "
                           f"changed, got {str(out)!r}")

    if target == cwd or target in cwd.parents:
        raise refuse("is the working folder or a folder above it")
    if target == ckpt or (out.exists() and ckpt.exists() and os.path.samefile(out, ckpt)):
        raise refuse("is the checkpoint")
    if target in ckpt.parents:
        raise refuse("holds the checkpoint")
    if to == "hf":
        if not out.is_dir():
            raise refuse("is a file; --to hf writes a folder")
        strangers = sorted(p.name for p in out.iterdir() if not (p.is_file() and _HF_FILES.fullmatch(p.name)))
        if strangers or not _is_hf_mae_config(out / "config.json"):
            raise refuse(f"holds files an export did not write (for example {(strangers or ['config.json'])[0]!r})")
    elif out.is_dir():
        raise refuse(f"is a folder; --to {to} writes a file (for example {str(out / 'encoder.pth')!r})")
    elif not _is_file_export(out):
        raise refuse("is not an export of mae_fast (a state dict of encoder tensors, or safetensors mae_fast wrote)")


def _is_hf_mae_config(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("model_type") == "vit_mae"
    except (OSError, ValueError, AttributeError):
        return False


def _is_file_export(path: Path) -> bool:
    """Whether ``path`` is a safetensors file whose metadata names a mae_fast preset, or a torch file holding only
    tensors under the encoder's official names (what ``--to timm`` writes)."""
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        if 0 < length < 1 << 24:
            try:
                header = json.loads(f.read(length))
                return "mae_fast_preset" in (header.get("__metadata__") or {})
            except (ValueError, AttributeError, TypeError):
                pass
    try:
        with warnings.catch_warnings():  # torch warns about what it then refuses to load
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch file, or one holding more than tensors: not an export
        return False
    prefixes = _ENCODER_PREFIXES
    if isinstance(state, dict) and set(state) == {"model"}:  # what --to official writes
        state, prefixes = state["model"], _ENCODER_PREFIXES + _DECODER_PREFIXES
    return isinstance(state, dict) and bool(state) and all(
        isinstance(k, str) and k.startswith(prefixes) and isinstance(v, torch.Tensor) for k, v in state.items())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _give_new_file_modes(path: Path) -> None:
    """The mode the umask gives a new file or folder, on ``path`` and everything under it (temporary files and
    folders are created private, and some writers keep that)."""
    mask = _umask()
    for item in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def _write_errors(out: Path):
    """An OSError while writing OUT (a full disk, a read-only folder) as one line; what was at OUT stays."""
    try:
        yield
    except OSError as exc:
        raise OutputDirError(f"cannot write {str(out)!r}: {exc.strerror or exc}; what was there is left as it "
                             "was") from exc


def _write_file(tensors: dict, out: Path, tmp: Path, to: str, preset: str, size) -> None:
    """Write a file export to ``tmp`` beside ``out``, give it the umask's mode, rename it over ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if out.suffix == ".safetensors" or to == "safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata={"format": "pt", "mae_fast_preset": preset,
                                                   "img_size": json.dumps(list(size))})
        else:
            torch.save(tensors, tmp)
        _give_new_file_modes(tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def _swap_in(staging: Path, target: Path) -> None:
    """Put the complete ``staging`` at ``target``, replacing what is there; the old one is removed only after."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = target.with_name(f".{target.name}.export-old-{os.getpid()}")
    os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old) if old.is_dir() else old.unlink()


def export(checkpoint, to: str, out, model_name: str | None = None, img_size=None, force: bool = False) -> str:
    """Export a checkpoint; returns a line saying what was written and how to load it.

    Raises:
        ConfigError: a bad target, preset, image size, a missing library (naming the extra) or an existing OUT.
        CheckpointError: the checkpoint cannot be read or does not fit.
        OutputDirError: OUT cannot be written (a full disk, a read-only folder); what was there is left as it was.
    """
    if to not in TARGETS:
        raise ConfigError(f"--to: must be one of {', '.join(TARGETS)}, got {to!r}")
    out = Path(out)
    if to == "official" and out.suffix == ".safetensors":
        raise ConfigError(f"OUT: --to official writes a torch file (.pth), as the official checkpoints are; for "
                          f"safetensors use --to safetensors, got {str(out)!r}")
    _refuse_existing(out, force)
    if out.exists():
        _refuse_unless_an_export(out, to, checkpoint)
    if to == "safetensors" or (to == "timm" and out.suffix == ".safetensors"):
        _library("safetensors", "export")
    state, named = read_state(checkpoint)
    preset = infer_preset(state, named, model_name)
    model, has_decoder = build_model(state, preset, img_size)
    size = model.patch_embed.img_size
    if to == "hf":
        if not has_decoder:
            raise CheckpointError("--to hf: the checkpoint has no decoder (an encoder-only release); export it --to "
                                  "timm or safetensors")
        hf = hf_model(model)
        target = Path(os.path.abspath(out))
        staging = target.with_name(f".{target.name}.export-tmp-{os.getpid()}")
        with _write_errors(out):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                hf.save_pretrained(staging)
                _give_new_file_modes(staging)
                _swap_in(staging, target)
            finally:
                if staging.exists():
                    shutil.rmtree(staging)
        return (f"wrote {out}: transformers.ViTMAEForPreTraining.from_pretrained({str(out)!r}) ({preset}, "
                f"{size[0]}x{size[1]})")
    if to == "timm" or (not has_decoder and to != "official"):
        tensors = timm_state(model)
    else:
        tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        if not has_decoder:  # an encoder-only checkpoint stays encoder-only
            tensors = {k: v for k, v in tensors.items() if k.startswith(_ENCODER_PREFIXES)}
    if to == "official":
        tensors = {"model": tensors}
    tmp = out.with_name(f".{out.name}.export-tmp-{os.getpid()}")
    with _write_errors(out):
        _write_file(tensors, out, tmp, to, preset, size)
    if to == "official":
        return (f"wrote {out}: an official-layout checkpoint ({{'model': state dict}}) of {preset} "
                f"({size[0]}x{size[1]}), read by MAEViT.load_pretrained and the official scripts")
    if to == "timm":
        return (f"wrote {out}: loads with strict=True into {timm_call(preset, size, 'mean')} (mean pooling, as "
                f"extract_features(pool='mean')) or global_pool='token' (pool='cls')")
    return f"wrote {out}: the official-key state dict of {preset} ({size[0]}x{size[1]}), read by MAEViT.load_pretrained"


def build_parser() -> CommandParser:
    """The command line of ``python -m mae_fast.export``."""
    parser = CommandParser("mae_fast.export", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("checkpoint", help="a mae_fast training checkpoint (.pth file or .dcp folder), an official MAE "
                                           "checkpoint, or a state dict with the official keys (.pth or "
                                           ".safetensors)")
    parser.add_argument("out", help="the file (timm, safetensors) or folder (hf) to write")
    parser.add_argument("--to", required=True, choices=TARGETS, help="the target format")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="the preset the checkpoint must hold (default: read from the checkpoint)")
    parser.add_argument("--img_size", type=int, nargs="+", default=None, metavar="PX",
                        help="export for this image size, H or H W (default: the checkpoint's own); the positions "
                             "are resized bicubically")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT (default: refuse)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, export, print one line. Returns the exit code (2 for a mistake, with one line saying it)."""
    args = build_parser().parse_args(argv)
    img_size = None
    if args.img_size is not None:
        if len(args.img_size) not in (1, 2) or min(args.img_size) < 1:
            print(f"mae_fast.export: error: --img_size: give H or H W, got {args.img_size}", file=sys.stderr)
            return 2
        img_size = (args.img_size[0], args.img_size[-1])
    try:
        print(export(args.checkpoint, args.to, args.out, args.model, img_size, args.force))
    except MaeFastError as exc:
        if os.environ.get("MAE_FAST_DEBUG", "0") not in ("", "0"):
            raise
        print(f"mae_fast.export: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
