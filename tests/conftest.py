"""Shared test setup. Triton kernels run through the interpreter when there is no GPU, so the
variable must be set before anything imports triton."""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import cetnet_kernels  # noqa: E402,F401
from run_support import small_run_config  # noqa: E402  (the train_config fixture's)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# Every (backend, device) pair a backend is built for: "cpu" and "cuda" are tied to their device,
# "reference" and "triton" (the interpreter on CPU tensors) run on both.
ALL_BACKEND_DEVICES = [("reference", "cpu"), ("cpu", "cpu"), ("triton", "cpu"),
                       ("reference", "cuda"), ("cuda", "cuda"), ("triton", "cuda")]


def _why_not(backend: str, device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device here"
    if backend == "triton":
        if device == "cpu":
            return ("the Triton interpreter is off (TRITON_INTERPRET unset, or triton not "
                    "installed)")
        return "triton is not installed"
    return f"cetnet_kernels was built without the {backend} kernels"


def backend_device_params(*, exclude=(), skip_triton_interpreter: bool = False, backends=None):
    """pytest.param(backend, device) for every backend of available_backends(device), for every
    device in DEVICES; ids like "cpu-cpu", "reference-cuda", "triton-cuda", "triton-cpu" (the
    interpreter). ``exclude``: backend names left out; ``skip_triton_interpreter``: leave out
    triton on cpu (too slow for the test). ``backends``: only these backends, and every pair of
    ALL_BACKEND_DEVICES among them is listed: one that cannot run here (no GPU, no build of it)
    is a skipped parameter that says why."""
    from cetnet_kernels import available_backends

    out = []
    if backends is not None:
        for backend, device in ALL_BACKEND_DEVICES:
            if backend not in backends or backend in exclude or (
                    skip_triton_interpreter and backend == "triton" and device == "cpu"):
                continue
            runs = (device in DEVICES) and backend in available_backends(device)
            marks = () if runs else pytest.mark.skip(reason=_why_not(backend, device))
            out.append(pytest.param(backend, device, id=f"{backend}-{device}", marks=marks))
        return out
    for device in DEVICES:
        for backend in available_backends(device):
            if backend in exclude or (skip_triton_interpreter and backend == "triton"
                                      and device == "cpu"):
                continue
            out.append(pytest.param(backend, device, id=f"{backend}-{device}"))
    return out


# --- `pytest -m gpu`: only the tests that run on the GPU ----------------------------------------
GPU_ONLY_FILES = {"test_triton_fusion.py"}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: runs on CUDA tensors (a 'cuda' device/backend parameter, or a GPU-only "
        "test file when CUDA is available); select with `pytest -m gpu`")
    config.addinivalue_line(
        "markers", "cpu_isa: compares the CPU kernel builds (default, avx2, avx512) this CPU "
        "runs; make gpu-check runs them too, since GPU hosts usually have AVX-512")


def _runs_on_gpu(item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any("cuda" in str(v) for v in callspec.params.values()):
        return True
    if "cuda" in item.nodeid.split("::", 1)[-1]:  # the test name or its parameter ids
        return True
    return Path(str(item.fspath)).name in GPU_ONLY_FILES


def pytest_collection_modifyitems(config, items):
    # Without CUDA nothing runs on a GPU ("cuda" in a parameter there is an error-message test
    # on CPU tensors): `pytest -m gpu` then selects nothing.
    if not torch.cuda.is_available():
        return
    for item in items:
        if _runs_on_gpu(item):
            item.add_marker(pytest.mark.gpu)


def pytest_report_header(config):
    return f"cetnet_kernels build: {cetnet_kernels.build_info()}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _plugins_of_this_test():
    """The plugin modules a test (or a module fixture it uses) loads count as its process's
    code (cetnet.code_identity) for that test only: a later test's in-process identity would
    otherwise differ from its subprocesses' (a search resumed by a worker process was refused
    as other code)."""
    yield
    builders = sys.modules.get("cetnet.train.builders")
    if builders is not None:
        builders.LOADED_PLUGINS.clear()


# --- training tests (tests/library/test_train*.py, tests/library/test_cli*.py) -------------------
# The real synthetic dataset (planted interactions) and real members, kept small.


@pytest.fixture
def one_thread():
    """The models are tiny: on a small shared machine more threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def train_config(one_thread):
    """``train_config(**train_overrides) -> dict``: a small complete run config."""
    return small_run_config
