"""bench/summarize.py: the tables and the target verdicts the GPU check prints, from both file kinds."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SUMMARIZE = Path(__file__).resolve().parents[1] / "bench" / "summarize.py"


@pytest.fixture(scope="module")
def summarize():
    spec = importlib.util.spec_from_file_location("bench_summarize", SUMMARIZE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def op(op, shape, mode, provider, ms, fraction=None):
    info = {"op": op, "shape": shape, "mode": mode, "provider": provider, "device": "NVIDIA H100 80GB HBM3",
            "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0", "git_revision": "abc1234", "copy_gb_per_s": 3000.0}
    if fraction is not None:
        info.update(gb_per_s=fraction * 3000.0, fraction_of_copy_bandwidth=fraction)
    return {"name": f"test_{op}[{shape}-{provider}-{mode}]", "stats": {"median": ms / 1e3}, "extra_info": info}


def step(provider, images_per_sec, mfu=None, preset="mae_vit_base_patch16", precision="bf16"):
    info = {"provider": provider, "preset": preset, "batch": 256, "precision": precision,
            "images_per_sec": images_per_sec}
    if mfu is not None:
        info["mfu"] = mfu
    return {"name": f"test_train_step[{preset}-{provider}]", "stats": {"median": 256 / images_per_sec}, "extra_info": info}


RESULTS = {"datetime": "2026-11-28T10:00:00", "benchmarks": [
    op("gather_tokens", "vit_b16", "forward", "triton", 0.10, 0.75),
    op("gather_tokens", "vit_b16", "backward", "triton", 0.20, 0.50),
    op("gather_tokens", "vit_b16", "forward", "cuda", 0.09, 0.85),
    op("gather_tokens", "vit_b16", "backward", "cuda", 0.25, 0.81),
    op("gather_tokens", "square", "forward", "triton", 0.01, 0.01),  # not a target shape: not judged
    op("masked_patch_loss", "vit_b16", "forward+backward", "torch", 3.0, 0.2),
    op("masked_patch_loss", "vit_b16", "forward+backward", "torch-compile", 1.2, 0.5),
    op("masked_patch_loss", "vit_b16", "forward+backward", "triton", 0.9, 0.7),
    step("mae_fast", 3000.0, 0.45),
    step("mae_fast-compile-blocks", 2500.0, 0.38),
    step("huggingface", 1800.0, 0.27),
    step("mae_fast-compile", 1000.0, 0.42, preset="mae_vit_large_patch16"),
    step("mae_fast-fp8", 1400.0, 0.59, preset="mae_vit_large_patch16", precision="fp8"),
    step("huggingface", 1000.0, 0.42, preset="mae_vit_large_patch16"),
]}


def test_targets_are_judged_where_measured(summarize):
    ops, steps, _ = summarize.rows(RESULTS)
    verdicts = {(name, where): (measured, met) for name, where, measured, met in summarize.target_rows(ops, steps)}
    assert verdicts[("Triton >= 70% of copy", "gather_tokens vit_b16 forward")] == ("75%", True)
    assert verdicts[("Triton >= 70% of copy", "gather_tokens vit_b16 backward")] == ("50%", False)
    assert verdicts[("CUDA >= 80% of copy", "gather_tokens vit_b16 backward")] == ("81%", True)
    assert verdicts[("CUDA at least as fast as Triton", "gather_tokens vit_b16 forward")][1] is True
    slower = verdicts[("CUDA at least as fast as Triton", "gather_tokens vit_b16 backward")]
    assert slower == ("0.80x (CUDA slower)", False)
    assert verdicts[("Triton loss >= 3x eager", "masked_patch_loss vit_b16 forward+backward")] == ("3.33x", True)
    assert verdicts[("Triton loss faster than torch.compile", "masked_patch_loss vit_b16 forward+backward")] == \
        ("1.33x", True)
    where = "mae_fast: mae_vit_base_patch16, batch 256, bf16"
    assert verdicts[("step >= 1.5x Hugging Face", where)] == ("1.67x", True)
    assert verdicts[("step MFU >= 40%", where)] == ("45.0%", True)
    where = "mae_fast-compile-blocks: mae_vit_base_patch16, batch 256, bf16"
    assert verdicts[("step >= 1.5x Hugging Face", where)] == ("1.39x", False)
    assert verdicts[("step MFU >= 40%", where)] == ("38.0%", False)
    where = "mae_fast-fp8: mae_vit_large_patch16, batch 256, fp8"
    assert verdicts[("FP8 step >= 1.3x compiled bf16", where)] == ("1.40x", True)
    assert verdicts[("step >= 1.5x Hugging Face", where)] == ("1.40x", False)  # against ViT-L's Hugging Face run
    assert not any("mae_fast-compile:" in w for _, w in verdicts)  # compiled bf16 is judged on ViT-B only
    assert not any("square" in w for _, w in verdicts)
    assert len(verdicts) == 14


def test_step_targets_need_the_stated_setting(summarize):
    results = {"benchmarks": [step("mae_fast", 90.0, preset="mae_vit_tiny_patch16", precision="fp32"),
                              step("huggingface", 30.0, preset="mae_vit_tiny_patch16", precision="fp32")]}
    ops, steps, _ = summarize.rows(results)
    assert summarize.target_rows(ops, steps) == []
    text = summarize.summary(results)
    assert f"0 met, 0 MISSED, {len(summarize.TARGETS)} of {len(summarize.TARGETS)} NOT MEASURED" in text.splitlines()[-1]
    for key in summarize.TARGETS:
        assert f"| {key} (" in text


def test_summary_from_json_and_from_partial_lines_agree(summarize, tmp_path):
    full = tmp_path / "bench.json"
    full.write_text(json.dumps(RESULTS))
    partial = tmp_path / "bench_partial.jsonl"
    partial.write_text("".join(json.dumps({"name": b["name"], "median": b["stats"]["median"],
                                           "extra_info": b["extra_info"]}) + "\n" for b in RESULTS["benchmarks"]))
    text = summarize.summary(summarize.load(str(full)))
    assert text.splitlines()[0] == "# mae_fast benchmarks on NVIDIA H100 80GB HBM3 (2026-11-28)"
    assert "| gather_tokens | vit_b16 | backward | cuda | 0.250 | 2,430.0 | 81 |" in text
    assert "| pretrain | mae_fast | mae_vit_base_patch16 | 256 | bf16 | 3,000 | 45.0% |" in text
    assert "| MISSED |" in text
    # Measured here: every op and step target; the two data targets are not, and say which phase measures them.
    assert "| data_images_per_sec_gpu (8000) | needs DALI from shards with mixed decoding on a GPU (DALI installed) | - | " \
           "NOT MEASURED (phase data_bench) |" in text
    assert text.splitlines()[-1] == "Targets: 9 met, 5 MISSED, 5 of 12 NOT MEASURED."
    from_lines = summarize.summary(summarize.load(str(partial)))
    # Everything but the date (taken from the file's time) is the same.
    assert from_lines.splitlines()[1:] == text.splitlines()[1:]


ONE_BENCHMARK = "bench/test_gather_tokens.py::test_gather_tokens[square-torch-forward]"


def run_one_benchmark(*flags: str, **env_vars: str) -> subprocess.CompletedProcess:
    """Run ONE_BENCHMARK in a fresh pytest with ``flags`` and extra environment variables."""
    # pytest-benchmark turns itself off when it sees pytest-xdist's variables (this test on a worker).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.update(env_vars)
    return subprocess.run([sys.executable, "-m", "pytest", ONE_BENCHMARK, "-q", "-p", "no:cacheprovider", *flags],
                          cwd=SUMMARIZE.parents[1], env=env, capture_output=True, text=True, timeout=300)


def test_each_finished_benchmark_is_appended_as_it_ends(summarize, tmp_path):
    lines = tmp_path / "partial.jsonl"
    for extra in (["--benchmark-disable"], []):  # a smoke run measures nothing, so it writes nothing
        done = run_one_benchmark(*extra, MAE_FAST_BENCH_JSONL=str(lines))
        assert done.returncode == 0, done.stdout + done.stderr
        if extra:
            assert not lines.exists()
    (entry,) = [json.loads(line) for line in lines.read_text().splitlines()]
    assert entry["name"] == "test_gather_tokens[square-torch-forward]" and entry["median"] > 0
    assert entry["extra_info"]["op"] == "gather_tokens" and entry["extra_info"]["provider"] == "torch"
    assert "git_revision" in entry["extra_info"]
    assert "| gather_tokens | square | forward | torch |" in summarize.summary(summarize.load(str(lines)))


def test_a_saved_baseline_catches_a_slowdown(tmp_path):
    """The regression check of bench/README.md, against a baseline in the layout the GPU check saves."""
    storage = f"--benchmark-storage=file://{tmp_path}"
    assert run_one_benchmark(storage, "--benchmark-save=gpu_check").returncode == 0
    (saved,) = tmp_path.glob("*/0001_gpu_check.json")
    baseline = json.loads(saved.read_text())
    compare = ("--benchmark-compare=0001", "--benchmark-compare-fail=median:10%")
    for seconds, regressed in ((1e-9, True), (1e3, False)):  # a baseline far faster, then far slower
        for entry in baseline["benchmarks"]:
            entry["stats"].update({k: seconds for k in ("min", "max", "mean", "median", "q1", "q3")}, ops=1 / seconds)
        saved.write_text(json.dumps(baseline))
        done = run_one_benchmark(storage, *compare)
        assert (done.returncode != 0) == regressed, done.stdout[-2000:] + done.stderr[-2000:]
        assert ("Performance has regressed" in done.stdout + done.stderr) == regressed


def data(backend, source, decode, images_per_sec, device):
    info = {"backend": backend, "source": source, "decode": decode, "image_size": 224,
            "images_per_sec": images_per_sec, "device": device}
    return {"name": f"test_loader_throughput[{backend}-{source}-{decode}]", "stats": {"median": 1.0},
            "extra_info": info}


def test_data_loader_targets(summarize):
    cpu = "cpu (x86_64)"
    results = {"datetime": "2026-11-28T10:00:00", "benchmarks": [
        data("torch", "folder", "full", 600.0, cpu), data("dali", "shards", "crop", 1300.0, cpu)]}
    (target,) = summarize.data_target_rows(summarize.rows(results)[2])
    assert target[2] == "2.17x" and target[3]
    results["benchmarks"][1] = data("dali", "shards", "crop", 894.0, cpu)  # 1.49x: under the CPU aim of 1.5x
    (target,) = summarize.data_target_rows(summarize.rows(results)[2])
    assert target[0] == "DALI CPU from shards >= 1.5x torch from the folder"
    assert target[2] == "1.49x" and not target[3]
    text = summarize.summary(results)
    assert "| dali | shards | crop | 224 | 894 |" in text and "| MISSED |" in text
    gpu = {"datetime": "2026-11-28T10:00:00", "benchmarks": [data("dali", "shards", "crop", 9100.0, "NVIDIA H200")]}
    (target,) = summarize.data_target_rows(summarize.rows(gpu)[2])
    assert target[0].startswith("DALI from shards >= 8,000") and target[3]


def test_fine_tuning_targets(summarize):
    def ft(provider, ips, mfu=None, preset="vit_base_patch16", precision="bf16"):
        entry = step(provider, ips, mfu, preset=preset, precision=precision)
        entry["extra_info"]["task"] = "finetune"
        entry["name"] = entry["name"].replace("test_train_step", "test_finetune_step")
        return entry

    results = {"datetime": "2026-11-28T10:00:00", "benchmarks": [
        ft("mae_fast-compile", 1400.0, 0.43), ft("timm", 1000.0, 0.31),
        ft("mae_fast-compile", 500.0, 0.44, preset="vit_large_patch16"),
        ft("mae_fast-fp8", 600.0, 0.53, preset="vit_large_patch16", precision="fp8"),
        step("huggingface", 999.0)]}  # a pretraining step of the same provider name space: not mixed in
    ops, steps, _ = summarize.rows(results)
    verdicts = {name: (measured, met) for name, _, measured, met in summarize.target_rows(ops, steps)}
    assert verdicts["fine-tuning step >= 1.3x timm"] == ("1.40x", True)
    assert verdicts["fine-tuning step MFU >= 40%"] == ("43.0%", True)
    assert verdicts["fine-tuning FP8 step >= 1.3x compiled bf16"] == ("1.20x", False)
    text = summarize.summary(results)
    assert "| finetune | timm | vit_base_patch16 | 256 | bf16 | 1,000 | 31.0% |" in text
    assert "finetune_mfu (0.4)" not in text  # judged, so not listed as NOT MEASURED
