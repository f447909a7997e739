"""Shared test setup. Triton kernels run through the interpreter when there is no GPU, so the
variable must be set before anything imports triton."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import cetnet_kernels  # noqa: E402,F401

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_report_header(config):
    return f"cetnet_kernels build: {cetnet_kernels.build_info()}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- training tests (tests/test_train*.py, tests/test_cli*.py) -----------------------------------
# TEMPORARY until cetnet.data / cetnet.models are merged: the tiny dataset and ensemble of
# tests/_train_fixtures.py stand in for them. At the merge, switch these fixtures to the real
# "synthetic" dataset and a real small model config; the tests only use these fixtures.


@pytest.fixture
def train_plugin():
    """The module that registers the run config's dataset and model (a CLI --plugin). Runs
    with one torch thread: the models are tiny, and on a shared small machine more threads
    only contend (10x slower)."""
    import _train_fixtures

    _train_fixtures.register()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield "_train_fixtures"
    torch.set_num_threads(threads)


@pytest.fixture
def train_config(train_plugin):
    """``train_config(**train_overrides) -> dict``: a small complete run config."""
    import _train_fixtures

    return _train_fixtures.tiny_config
