"""The repo's pytest addopts disable pytest-benchmark for the test suite (--benchmark-disable);
``--benchmark-only`` here means: run the benchmarks, so it re-enables them."""
import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if config.getoption("benchmark_only", False):
        config.option.benchmark_enable = True
