"""The installation: what was built, and that import survives a missing extension."""

from __future__ import annotations

import os
import shutil
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


_NEEDS_EXTENSION = pytest.mark.skipif(not ck.build_info()["cpu"], reason="extension not built")


@_NEEDS_EXTENSION
def test_cxx_error_message_with_a_number_reaches_python():
    # A message formatting a number goes through the module's libstdc++ locale. A module with
    # its own static libstdc++ (a compiler wrapper linking it so) dropped the number (gcc 12)
    # or crashed the process (gcc 13, a GPU image): in a subprocess, so a crash fails this test.
    code = textwrap.dedent("""
        import torch, cetnet_kernels
        try:
            torch.ops.cetnet.confidence_fusion(torch.randn(3), torch.tensor(1.0), False, False)
        except ValueError as exc:
            print(str(exc).splitlines()[0])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "logits must be 2-D [batch, members], got 1-D" in proc.stdout, proc.stdout


@_NEEDS_EXTENSION
@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None
                    or shutil.which("nm") is None,
                    reason="reads the ELF dynamic section with binutils (Linux)")
def test_extension_uses_the_shared_libstdcxx():
    # needs torch's libstdc++ and carries none of its own (std::locale is where copies clash)
    import cetnet_kernels._C as ext

    needed = subprocess.run(["readelf", "-d", ext.__file__], capture_output=True, text=True,
                            check=True).stdout
    assert "libstdc++.so" in needed, needed
    defined = subprocess.run(["nm", "-D", "--defined-only", ext.__file__], capture_output=True,
                             text=True, check=True).stdout
    assert "_ZNSt6locale7classicEv" not in defined


def _setup_functions(*names: str) -> dict:
    """Functions of setup.py, without running it (it calls setup() at import)."""
    import ast
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "setup.py"
    tree = ast.parse(path.read_text())
    body = [node for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name in names]
    space: dict = {"os": os}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), space)
    return space


def test_nvcc_split_compile_knob(monkeypatch):
    split = _setup_functions("_flag", "_nvcc_split_compile")["_nvcc_split_compile"]
    monkeypatch.delenv("CETNET_NVCC_SPLIT_COMPILE", raising=False)
    assert split() == []
    monkeypatch.setenv("CETNET_NVCC_SPLIT_COMPILE", "0")
    assert split() == ["--split-compile=0"]
    for bad in ("many", "-1", "\u00b2"):
        monkeypatch.setenv("CETNET_NVCC_SPLIT_COMPILE", bad)
        with pytest.raises(RuntimeError, match="CETNET_NVCC_SPLIT_COMPILE"):
            split()
