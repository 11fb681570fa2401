"""pytest fixtures for the benchmarks (the helpers live in bench_env.py)."""

import json
import os

import pytest

from bench_env import environment


@pytest.fixture
def record(request, benchmark):
    """Adds the environment to the result and returns a function that adds throughput figures.

    With ``MAE_FAST_BENCH_JSONL=FILE`` set, each finished benchmark is also appended to FILE as one
    JSON line (name, median seconds, extra_info) as soon as it ends, so a run that is stopped
    early (the GPU check's time limit) keeps what it measured; ``bench/summarize.py`` reads both.
    """
    benchmark.extra_info.update(environment())

    def add(**figures):
        benchmark.extra_info.update(figures)

    yield add
    path = os.environ.get("MAE_FAST_BENCH_JSONL")
    stats = getattr(benchmark, "stats", None)
    if path and stats:
        line = {"name": request.node.name, "median": stats.stats.median, "extra_info": dict(benchmark.extra_info)}
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
