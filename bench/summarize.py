"""Print the summary table of a pytest-benchmark JSON file (``pytest bench/ --benchmark-json=FILE``).

    python bench/summarize.py FILE [--markdown]

Ops: median time, GB/s and the share of the measured copy bandwidth per provider and mode.
Training step: images/s and MFU per provider. Data: images/s per loader backend.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def rows(results: dict):
    ops, steps, data = [], [], []
    for bench in results.get("benchmarks", []):
        info, median = bench.get("extra_info", {}), bench["stats"]["median"]
        if "op" in info:
            ops.append((info["op"], info["shape"], info["mode"], info["provider"], median * 1e3, info.get("gb_per_s"),
                        info.get("fraction_of_copy_bandwidth")))
        elif "preset" in info:
            steps.append((info["provider"], info["preset"], info["batch"], info["precision"],
                          info.get("images_per_sec"), info.get("mfu")))
        elif "backend" in info:
            data.append((info["backend"], info["image_size"], info.get("images_per_sec")))
    return ops, steps, data


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file")
    args = parser.parse_args()
    results = json.load(open(args.json_file))
    env = results["benchmarks"][0]["extra_info"] if results.get("benchmarks") else {}
    print(f"# mae_fast benchmarks on {env.get('device', '?')} ({results.get('datetime', '?')[:10]})")
    print(f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
          f"revision {env.get('git_revision')}\n")
    ops, steps, data = rows(results)
    if ops:
        copy = next((b["extra_info"].get("copy_gb_per_s") for b in results["benchmarks"]
                     if b["extra_info"].get("copy_gb_per_s")), None)
        print(f"## Fused ops (measured copy bandwidth {fmt(copy, ',.0f')} GB/s)\n")
        print("| op | shape | mode | provider | median ms | GB/s | % of copy |")
        print("|---|---|---|---|---:|---:|---:|")
        for op, shape, mode, provider, ms, gbs, frac in sorted(ops):
            print(f"| {op} | {shape} | {mode} | {provider} | {ms:.3f} | {fmt(gbs, ',.1f')} | "
                  f"{fmt(frac * 100 if frac is not None else None, '.0f')} |")
        print()
        speedups = defaultdict(dict)
        for op, shape, mode, provider, ms, _, _ in ops:
            speedups[(op, shape, mode)][provider] = ms
        print("| op | shape | mode | fastest | vs eager torch | vs torch-compile |")
        print("|---|---|---|---|---:|---:|")
        for key, times in sorted(speedups.items()):
            best = min(times, key=times.get)
            eager, compiled = times.get("torch"), times.get("torch-compile")
            print(f"| {key[0]} | {key[1]} | {key[2]} | {best} | "
                  f"{fmt(eager / times[best] if eager else None, '.2f')}x | "
                  f"{fmt(compiled / times[best] if compiled else None, '.2f')}x |")
        print()
    if steps:
        print("## Training step\n")
        print("| provider | preset | batch | precision | images/s | MFU |")
        print("|---|---|---:|---|---:|---:|")
        for provider, preset, batch, precision, ips, mfu in steps:
            print(f"| {provider} | {preset} | {batch} | {precision} | {fmt(ips, ',.0f')} | "
                  f"{fmt(mfu * 100 if mfu is not None else None, '.1f')}{'%' if mfu is not None else ''} |")
        print()
    if data:
        print("## Data loaders\n")
        print("| backend | image size | images/s |")
        print("|---|---:|---:|")
        for backend, size, ips in data:
            print(f"| {backend} | {size} | {fmt(ips, ',.0f')} |")


if __name__ == "__main__":
    main()
