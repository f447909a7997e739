"""pytest-benchmark setup for bench/: machine description (recorded in the JSON's machine_info)
and a report header. The matrix knobs (environment variables) are in _common.py / README.md."""

from __future__ import annotations

import importlib.util

import torch

import cetnet_kernels
from _common import cpu_name, device_name, selected_devices


def pytest_report_header(config):
    names = []
    for d in selected_devices():
        if d == "cuda" and not torch.cuda.is_available():
            names.append("cuda: not available")
        else:
            names.append(f"{d}: {device_name(d)}")
    return [f"cetnet bench devices: {'; '.join(names)}",
            f"cetnet_kernels build: {cetnet_kernels.build_info()}"]


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch_version"] = torch.__version__
    machine_info["triton_version"] = None
    if importlib.util.find_spec("triton") is not None:
        try:
            import triton

            machine_info["triton_version"] = triton.__version__
        except Exception:  # a broken triton install: recorded as missing
            pass
    machine_info["cetnet_build"] = {k: (str(v) if not isinstance(v, (bool, int, str, type(None),
                                                                    list)) else v)
                                    for k, v in cetnet_kernels.build_info().items()}
    machine_info["cpu_name"] = cpu_name()
    machine_info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        machine_info["cuda_device_name"] = torch.cuda.get_device_name()
        machine_info["cuda_version"] = torch.version.cuda
