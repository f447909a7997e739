"""The installation: what was built, and that import survives a missing extension."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import cetnet_kernels as ck


def test_build_info_keys():
    info = ck.build_info()
    for key in ("cpu", "cuda", "cpu_capability", "cuda_archs", "cuda_version", "torch_version",
                "triton", "error"):
        assert key in info
    if info["cpu"]:
        assert info["error"] is None
        assert info["cpu_capability"] in info["cpu_capabilities_runnable"]
        assert set(info["cpu_capabilities_runnable"]) <= set(info["cpu_capabilities"])
        assert info["cpu_capabilities"][0] == "default"
        assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    if torch.cuda.is_available() and info["cuda"]:
        assert info["cuda_archs"], "a CUDA build must list its archs"


def test_available_backends():
    cpu = ck.available_backends("cpu")
    assert cpu[0] == "reference"
    assert ("cpu" in cpu) == ck.build_info()["cpu"]


def test_import_without_extension_warns_and_falls_back():
    code = textwrap.dedent("""
        import sys, warnings, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "cetnet_kernels._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, cetnet_kernels as ck
        assert any("cetnet_kernels._C is not available" in str(w.message) for w in caught), caught
        assert ck.build_info()["cpu"] is False and "blocked" in ck.build_info()["error"]
        z = torch.randn(5, 3, requires_grad=True)
        loss, prob = ck.collaborative_loss(z, torch.rand(5))
        loss.backward()
        assert z.grad is not None
        try:
            ck.confidence_fusion(z, backend="cpu")
        except RuntimeError as e:
            assert "not built" in str(e)
        else:
            raise AssertionError("backend='cpu' must fail without the extension")
        print("ok")
    """)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
