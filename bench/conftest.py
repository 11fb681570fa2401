"""pytest fixtures for the benchmarks (the helpers live in bench_env.py)."""

import pytest

from bench_env import environment


@pytest.fixture
def record(benchmark):
    """Adds the environment to the result and returns a function that adds throughput figures."""
    benchmark.extra_info.update(environment())

    def add(**figures):
        benchmark.extra_info.update(figures)

    return add

