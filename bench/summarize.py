"""Print the summary of a benchmark run: tables, then every speed target met, MISSED or NOT MEASURED.

    python bench/summarize.py FILE [FILE ...]

Each FILE is pytest-benchmark's JSON (``pytest bench/ --benchmark-json=FILE``) or the JSON-lines
file that ``MAE_FAST_BENCH_JSONL`` makes (one line per finished benchmark, kept when a run is
stopped before pytest-benchmark writes its JSON). Several files are merged; a benchmark found in
more than one counts once, from the first file that has it.

Ops: median time, GB/s and the share of the measured copy bandwidth per provider and mode, and
the fastest provider against the eager and compiled references. Training step: images/s and MFU
per provider. Data: images/s per loader backend. Targets: the project's speed targets (see
``TARGETS``), judged only where the run measured what they name; the others are listed as not
measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from collections import defaultdict
from typing import NamedTuple

#: Speed targets. Op fractions are of the device-to-device copy bandwidth measured in the same run.
TARGETS = {
    "triton_fraction_of_copy": 0.70,  # each op's forward and backward, Triton
    "cuda_fraction_of_copy": 0.80,  # each op's forward and backward, CUDA; and at least as fast as Triton
    "loss_speedup_vs_eager": 3.0,  # masked_patch_loss forward+backward, Triton, against the eager reference
    "loss_speedup_vs_compile": 1.0,  # ... and strictly faster than the compiled reference
    "step_speedup_vs_huggingface": 1.5,  # training step, mae_fast against ViTMAEForPreTraining
    "step_mfu": 0.40,  # training step, mae_fast (bf16, ViT-B/16)
    "fp8_speedup_vs_compiled_bf16": 1.3,  # training step, ViT-L/16: mae_fast-fp8 against mae_fast-compile
    "finetune_speedup_vs_timm": 1.3,  # fine-tuning step, ViT-B/16: compiled bf16 against timm eager bf16
    "finetune_mfu": 0.40,  # fine-tuning step, ViT-B/16, compiled bf16
    "finetune_fp8_speedup_vs_compiled_bf16": 1.3,  # fine-tuning step, ViT-L/16: FP8 against compiled bf16
    # CPU: DALI from prepared shards (crop decode) against torch on the folder. 1.5x, not the first aim of 2x: on a
    # CPU, DALI's bicubic resize to 224 px costs about 1.3 ms of the 1.9 ms an image takes a core (measured).
    "data_shards_vs_torch_folder_cpu": 1.5,
    "data_images_per_sec_gpu": 8000.0,  # GPU: DALI from prepared shards, mixed decoding (crop decode)
}
TARGET_SHAPES = ("vit_b16", "vit_l16")  # the shapes the op targets are stated for
TARGET_STEP = ("mae_vit_base_patch16", "bf16")  # the setting the bf16 step targets are stated for
TARGET_FP8_STEP = ("mae_vit_large_patch16", "fp8")  # the setting the FP8 step targets are stated for
TARGET_STEP_FT, TARGET_FP8_FT = "vit_base_patch16", "vit_large_patch16"  # the fine-tuning targets' presets
# Judged against the bf16 step targets, each on its own.
STEP_PROVIDERS = ("mae_fast", "mae_fast-compile-blocks", "mae_fast-compile")


class OpResult(NamedTuple):
    op: str
    shape: str
    mode: str
    provider: str
    ms: float
    gb_per_s: float | None
    fraction: float | None


class StepResult(NamedTuple):
    provider: str
    preset: str
    batch: int
    precision: str
    images_per_sec: float | None
    mfu: float | None
    task: str = "pretrain"  # or "finetune"


class DataResult(NamedTuple):
    backend: str
    source: str
    decode: str
    image_size: int
    images_per_sec: float | None
    device: str


def load(path: str) -> dict:
    """The results in pytest-benchmark's JSON layout, from either kind of file."""
    if not path.endswith(".jsonl"):
        with open(path) as f:
            return json.load(f)
    benchmarks = []
    with open(path) as f:
        for line in f:
            if line.strip():
                entry = json.loads(line)
                benchmarks.append({"name": entry["name"], "stats": {"median": entry["median"]},
                                   "extra_info": entry["extra_info"]})
    written = datetime.datetime.fromtimestamp(os.path.getmtime(path), datetime.timezone.utc)
    return {"benchmarks": benchmarks, "datetime": written.isoformat()}


def load_all(paths: list[str]) -> dict:
    """The results of several files merged: each benchmark (by name) once, from the first file that has it."""
    merged, seen, dates = [], set(), []
    for path in paths:
        results = load(path)
        dates.append(results.get("datetime", ""))
        for bench in results.get("benchmarks", []):
            if bench["name"] not in seen:
                seen.add(bench["name"])
                merged.append(bench)
    return {"benchmarks": merged, "datetime": min((d for d in dates if d), default="?")}


def rows(results: dict) -> tuple[list[OpResult], list[StepResult], list[tuple]]:
    """Op, training-step and data-loader results, in the order they were measured."""
    ops, steps, data = [], [], []
    for bench in results.get("benchmarks", []):
        info, median = bench.get("extra_info", {}), bench["stats"]["median"]
        if "op" in info:
            ops.append(OpResult(info["op"], info["shape"], info["mode"], info["provider"], median * 1e3,
                                info.get("gb_per_s"), info.get("fraction_of_copy_bandwidth")))
        elif "preset" in info:
            steps.append(StepResult(info["provider"], info["preset"], info["batch"], info["precision"],
                                    info.get("images_per_sec"), info.get("mfu"), info.get("task", "pretrain")))
        elif "backend" in info:
            data.append(DataResult(info["backend"], info.get("source", "folder"), info.get("decode", "full"),
                                   info["image_size"], info.get("images_per_sec"), info.get("device", "")))
    return ops, steps, data


def fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def target_rows(ops: list[OpResult], steps: list[StepResult]) -> list[tuple[str, str, str, bool]]:
    """(target, where, measured, met) for every target this run measured."""
    out = []
    by_key = {(r.op, r.shape, r.mode, r.provider): r for r in ops}
    for r in sorted(ops):
        if r.shape not in TARGET_SHAPES or r.mode == "forward+backward" or r.fraction is None:
            continue
        where = f"{r.op} {r.shape} {r.mode}"
        if r.provider == "triton":
            need = TARGETS["triton_fraction_of_copy"]
            out.append((f"Triton >= {need:.0%} of copy", where, f"{r.fraction:.0%}", r.fraction >= need))
        elif r.provider == "cuda":
            need = TARGETS["cuda_fraction_of_copy"]
            out.append((f"CUDA >= {need:.0%} of copy", where, f"{r.fraction:.0%}", r.fraction >= need))
            triton = by_key.get((r.op, r.shape, r.mode, "triton"))
            if triton is not None:
                ratio = triton.ms / r.ms
                out.append(("CUDA at least as fast as Triton", where,
                            f"{ratio:.2f}x" + ("" if ratio >= 1 else " (CUDA slower)"), ratio >= 1))
    for shape in TARGET_SHAPES:
        times = {r.provider: r.ms for r in ops
                 if r.op == "masked_patch_loss" and r.shape == shape and r.mode == "forward+backward"}
        if "triton" not in times:
            continue
        where = f"masked_patch_loss {shape} forward+backward"
        if "torch" in times:
            need, got = TARGETS["loss_speedup_vs_eager"], times["torch"] / times["triton"]
            out.append((f"Triton loss >= {need:g}x eager", where, f"{got:.2f}x", got >= need))
        if "torch-compile" in times:
            got = times["torch-compile"] / times["triton"]
            out.append(("Triton loss faster than torch.compile", where, f"{got:.2f}x",
                        got > TARGETS["loss_speedup_vs_compile"]))
    out += finetune_target_rows([s for s in steps if s.task == "finetune"])
    step = {(s.provider, s.preset): s for s in steps if s.task == "pretrain"}

    def against_huggingface(ours: StepResult, where: str) -> None:
        hf = step.get(("huggingface", ours.preset))
        if hf is not None and hf.images_per_sec:
            need, got = TARGETS["step_speedup_vs_huggingface"], ours.images_per_sec / hf.images_per_sec
            out.append((f"step >= {need:g}x Hugging Face", where, f"{got:.2f}x", got >= need))

    for provider in STEP_PROVIDERS:
        ours = step.get((provider, TARGET_STEP[0]))
        if ours is None or not ours.images_per_sec or ours.precision != TARGET_STEP[1]:
            continue
        where = f"{provider}: {ours.preset}, batch {ours.batch}, {ours.precision}"
        against_huggingface(ours, where)
        if ours.mfu is not None:
            need = TARGETS["step_mfu"]
            out.append((f"step MFU >= {need:.0%}", where, f"{ours.mfu:.1%}", ours.mfu >= need))
    fp8 = step.get(("mae_fast-fp8", TARGET_FP8_STEP[0]))
    if fp8 is not None and fp8.images_per_sec and fp8.precision == TARGET_FP8_STEP[1]:
        where = f"mae_fast-fp8: {fp8.preset}, batch {fp8.batch}, fp8"
        compiled = step.get(("mae_fast-compile", fp8.preset))
        if compiled is not None and compiled.images_per_sec:
            need, got = TARGETS["fp8_speedup_vs_compiled_bf16"], fp8.images_per_sec / compiled.images_per_sec
            out.append((f"FP8 step >= {need:g}x compiled bf16", where, f"{got:.2f}x", got >= need))
        against_huggingface(fp8, where)
    return out


def finetune_target_rows(steps: list[StepResult]) -> list[tuple[str, str, str, bool]]:
    """The fine-tuning step targets this run measured: compiled bf16 ViT-B/16 against timm and its MFU, FP8 ViT-L/16
    against compiled bf16."""
    out = []
    step = {(s.provider, s.preset): s for s in steps}
    ours, baseline = step.get(("mae_fast-compile", TARGET_STEP_FT)), step.get(("timm", TARGET_STEP_FT))
    if ours is not None and ours.images_per_sec and ours.precision == "bf16":
        where = f"fine-tuning, mae_fast-compile: {ours.preset}, batch {ours.batch}, bf16"
        if baseline is not None and baseline.images_per_sec:
            need, got = TARGETS["finetune_speedup_vs_timm"], ours.images_per_sec / baseline.images_per_sec
            out.append((f"fine-tuning step >= {need:g}x timm", where, f"{got:.2f}x", got >= need))
        if ours.mfu is not None:
            need = TARGETS["finetune_mfu"]
            out.append((f"fine-tuning step MFU >= {need:.0%}", where, f"{ours.mfu:.1%}", ours.mfu >= need))
    fp8, compiled = step.get(("mae_fast-fp8", TARGET_FP8_FT)), step.get(("mae_fast-compile", TARGET_FP8_FT))
    if fp8 is not None and fp8.images_per_sec and compiled is not None and compiled.images_per_sec:
        need, got = TARGETS["finetune_fp8_speedup_vs_compiled_bf16"], fp8.images_per_sec / compiled.images_per_sec
        out.append((f"fine-tuning FP8 step >= {need:g}x compiled bf16", f"{fp8.preset}, batch {fp8.batch}",
                    f"{got:.2f}x", got >= need))
    return out


def data_target_rows(data: list[DataResult]) -> list[tuple[str, str, str, bool]]:
    """The data loader targets this run measured."""
    out = []
    by_case = {(d.backend, d.source, d.decode): d for d in data if d.images_per_sec}
    shards = by_case.get(("dali", "shards", "crop"))
    if shards is None:
        return out
    on_gpu = not shards.device.startswith("cpu")
    if on_gpu:
        need = TARGETS["data_images_per_sec_gpu"]
        out.append((f"DALI from shards >= {need:,.0f} images/s", f"mixed decoding, {shards.image_size} px",
                    f"{shards.images_per_sec:,.0f}", shards.images_per_sec >= need))
    else:
        torch_folder = by_case.get(("torch", "folder", "full"))
        if torch_folder is not None:
            need, got = TARGETS["data_shards_vs_torch_folder_cpu"], shards.images_per_sec / torch_folder.images_per_sec
            out.append((f"DALI CPU from shards >= {need:g}x torch from the folder", f"{shards.image_size} px",
                        f"{got:.2f}x", got >= need))
    return out


#: Each target's row names (the start of the ``target`` column), to tell which targets a run judged.
TARGET_ROW_NAMES = {
    "triton_fraction_of_copy": ("Triton >=",),
    "cuda_fraction_of_copy": ("CUDA >=", "CUDA at least as fast"),
    "loss_speedup_vs_eager": ("Triton loss >=",),
    "loss_speedup_vs_compile": ("Triton loss faster",),
    "step_speedup_vs_huggingface": ("step >=",),
    "step_mfu": ("step MFU",),
    "fp8_speedup_vs_compiled_bf16": ("FP8 step",),
    "finetune_speedup_vs_timm": ("fine-tuning step >=",),
    "finetune_mfu": ("fine-tuning step MFU",),
    "finetune_fp8_speedup_vs_compiled_bf16": ("fine-tuning FP8 step",),
    "data_shards_vs_torch_folder_cpu": ("DALI CPU from shards",),
    "data_images_per_sec_gpu": ("DALI from shards",),
}
#: What each target needs measured, and the GPU check's phase that measures it.
TARGET_NEEDS = {
    "triton_fraction_of_copy": ("the Triton ops' forward and backward at ViT-B/16 or ViT-L/16 on a GPU", "op_bench"),
    "cuda_fraction_of_copy": ("the CUDA ops' forward and backward at ViT-B/16 or ViT-L/16 on a GPU", "op_bench"),
    "loss_speedup_vs_eager": ("masked_patch_loss forward+backward, Triton and eager torch, at ViT-B/16 or ViT-L/16",
                              "op_bench"),
    "loss_speedup_vs_compile": ("masked_patch_loss forward+backward, Triton and torch-compile, at ViT-B/16 or "
                                "ViT-L/16", "op_bench"),
    "step_speedup_vs_huggingface": ("a mae_fast bf16 step and the Hugging Face step on the same preset", "step_bench"),
    "step_mfu": ("a mae_fast bf16 step on ViT-B/16 on a GPU whose peak is known", "step_bench"),
    "fp8_speedup_vs_compiled_bf16": ("the FP8 and compiled bf16 steps on ViT-L/16 (torchao, FP8 tensor cores)",
                                     "step_bench"),
    "finetune_speedup_vs_timm": ("the compiled bf16 and timm fine-tuning steps on ViT-B/16", "finetune_bench"),
    "finetune_mfu": ("the compiled bf16 fine-tuning step on ViT-B/16 on a GPU whose peak is known", "finetune_bench"),
    "finetune_fp8_speedup_vs_compiled_bf16": ("the FP8 and compiled bf16 fine-tuning steps on ViT-L/16 (torchao, "
                                              "FP8 tensor cores)", "finetune_bench"),
    "data_shards_vs_torch_folder_cpu": ("DALI from shards (crop decode) and torch from the folder, on a CPU",
                                        "data_bench"),
    "data_images_per_sec_gpu": ("DALI from shards with mixed decoding on a GPU (DALI installed)", "data_bench"),
}


def unjudged(targets: list[tuple[str, str, str, bool]]) -> list[str]:
    """The keys of :data:`TARGETS` that no row of ``targets`` judged."""
    names = [name for name, *_ in targets]
    return [key for key, starts in TARGET_ROW_NAMES.items()
            if not any(name.startswith(start) for name in names for start in starts)]


def verdict_counts(targets: list[tuple[str, str, str, bool]]) -> dict[str, int]:
    """How many target rows were met and MISSED, and how many targets were NOT MEASURED."""
    return {"met": sum(met for *_, met in targets), "MISSED": sum(not met for *_, met in targets),
            "NOT MEASURED": len(unjudged(targets))}


def summary(results: dict) -> str:
    """The whole summary as Markdown; its last line counts the targets met, MISSED and NOT MEASURED."""
    lines = []
    env = results["benchmarks"][0]["extra_info"] if results.get("benchmarks") else {}
    lines.append(f"# mae_fast benchmarks on {env.get('device', '?')} ({results.get('datetime', '?')[:10]})")
    lines.append(f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
                 f"revision {env.get('git_revision')}\n")
    ops, steps, data = rows(results)
    if ops:
        copy = next((b["extra_info"].get("copy_gb_per_s") for b in results["benchmarks"]
                     if b["extra_info"].get("copy_gb_per_s")), None)
        lines.append(f"## Fused ops (measured copy bandwidth {fmt(copy, ',.0f')} GB/s)\n")
        lines.append("| op | shape | mode | provider | median ms | GB/s | % of copy |")
        lines.append("|---|---|---|---|---:|---:|---:|")
        for r in sorted(ops):
            lines.append(f"| {r.op} | {r.shape} | {r.mode} | {r.provider} | {r.ms:.3f} | {fmt(r.gb_per_s, ',.1f')} | "
                         f"{fmt(r.fraction * 100 if r.fraction is not None else None, '.0f')} |")
        lines.append("")
        times = defaultdict(dict)
        for r in ops:
            times[(r.op, r.shape, r.mode)][r.provider] = r.ms
        lines.append("| op | shape | mode | fastest | vs eager torch | vs torch-compile |")
        lines.append("|---|---|---|---|---:|---:|")
        for key, by_provider in sorted(times.items()):
            best = min(by_provider, key=by_provider.get)
            eager, compiled = by_provider.get("torch"), by_provider.get("torch-compile")
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {best} | "
                         f"{fmt(eager / by_provider[best] if eager else None, '.2f', 'x')} | "
                         f"{fmt(compiled / by_provider[best] if compiled else None, '.2f', 'x')} |")
        lines.append("")
    if steps:
        lines.append("## Training steps (pretraining and fine-tuning)\n")
        lines.append("| task | provider | preset | batch | precision | images/s | MFU |")
        lines.append("|---|---|---|---:|---|---:|---:|")
        for s in steps:
            lines.append(f"| {s.task} | {s.provider} | {s.preset} | {s.batch} | {s.precision} | "
                         f"{fmt(s.images_per_sec, ',.0f')} | {fmt(s.mfu * 100 if s.mfu is not None else None, '.1f', '%')} |")
        lines.append("")
    if data:
        lines.append("## Data loaders\n")
        lines.append("| backend | source | decode | image size | images/s |")
        lines.append("|---|---|---|---:|---:|")
        for d in data:
            lines.append(f"| {d.backend} | {d.source} | {d.decode} | {d.image_size} | {fmt(d.images_per_sec, ',.0f')} |")
        lines.append("")
    targets = target_rows(ops, steps) + data_target_rows(data)
    counts = verdict_counts(targets)
    lines.append("## Targets\n")
    lines.append("Every target of the project: met or MISSED where this run measured it, NOT MEASURED (with the "
                 "GPU check's phase that measures it) where it did not. The op targets are stated for "
                 f"{', '.join(TARGET_SHAPES)}, the bf16 step targets for {TARGET_STEP[0]} and the FP8 one for "
                 f"{TARGET_FP8_STEP[0]}.\n")
    lines.append("| target | where | measured | |")
    lines.append("|---|---|---:|---|")
    for name, where, measured, met in targets:
        lines.append(f"| {name} | {where} | {measured} | {'met' if met else 'MISSED'} |")
    for key in unjudged(targets):
        need, phase = TARGET_NEEDS[key]
        lines.append(f"| {key} ({TARGETS[key]:g}) | needs {need} | - | NOT MEASURED (phase {phase}) |")
    lines.append("")
    lines.append(f"Targets: {counts['met']} met, {counts['MISSED']} MISSED, {counts['NOT MEASURED']} of {len(TARGETS)} "
                 "NOT MEASURED.")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_files", nargs="*", metavar="FILE",
                        help="pytest-benchmark JSON, or the MAE_FAST_BENCH_JSONL lines")
    args = parser.parse_args()
    print(summary(load_all(args.results_files)))


if __name__ == "__main__":
    main()
