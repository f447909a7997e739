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
