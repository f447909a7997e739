"""The CPU kernels are compiled once per vector ISA (default, avx2, avx512) and one build is
chosen at import: every compiled build this CPU runs gives the same results as the default one
(to rounding: vector width changes the order of sums and where multiply-adds are fused), the
``CETNET_CPU_CAPABILITY`` environment variable chooses, and a choice that cannot be honoured is
one clear error."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import cetnet_kernels as ck
from cetnet_kernels import MultiTableEmbedding
from embedding_support import DIMS, FEATURES, loss_of, make_ids

INFO = ck.build_info()
pytestmark = [pytest.mark.skipif(not INFO["cpu"], reason="cetnet_kernels._C is not built"),
              pytest.mark.cpu_isa]
RUNNABLE = INFO["cpu_capabilities_runnable"]
WIDER = [c for c in INFO["cpu_capabilities"] if c != "default"]
# Same inputs, same ops, another instruction set: float64 agrees to a few ulps; float32 to the
# rounding of a few reordered sums; 16-bit outputs to one rounding step of their own.
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-5, 2e-6),
       torch.bfloat16: (1.6e-2, 1e-3), torch.float16: (2e-3, 1e-4)}


@contextlib.contextmanager
def cpu_capability(name: str):
    previous = ck.set_cpu_capability(name)
    try:
        yield
    finally:
        ck.set_cpu_capability(previous)


def fusion_outputs(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Forward values and gradients of the three fused ops at an odd batch (SIMD tails)."""
    g = torch.Generator().manual_seed(0)
    B, K = 1003, 5
    base = torch.randn(B, K, generator=g, dtype=torch.float64) * 3
    labels = torch.rand(B, generator=g, dtype=torch.float64).to(dtype)
    out: dict[str, torch.Tensor] = {}
    for space in ("prob", "logit"):
        z = base.to(dtype).requires_grad_()
        t = torch.tensor(1.7, dtype=dtype, requires_grad=True)
        prob, w = ck.confidence_fusion(z, t, fusion_space=space, backend="cpu")
        (prob * torch.linspace(-1, 1, B, dtype=dtype)).sum().backward()
        out.update({f"fusion_{space}_prob": prob, f"fusion_{space}_weights": w,
                    f"fusion_{space}_grad": z.grad, f"fusion_{space}_grad_t": t.grad})
    z = base.to(dtype).requires_grad_()
    loss, prob = ck.collaborative_loss(z, labels, 0.8, distill_weight=0.3, mutual_weight=0.2,
                                       backend="cpu")
    loss.backward()
    out.update({"collab_loss": loss, "collab_prob": prob, "collab_grad": z.grad})
    z = base.to(dtype).requires_grad_()
    loss, teacher = ck.kdef_loss(z, labels, backend="cpu")
    loss.backward()
    out.update({"kdef_loss": loss, "kdef_teacher": teacher, "kdef_grad": z.grad})
    return {k: v.detach() for k, v in out.items()}


def embedding_outputs(dtype: torch.dtype, optimizer: str | None) -> dict[str, torch.Tensor]:
    """Lookup outputs and, after two fused (or plain autograd) steps, the tables and state."""
    torch.manual_seed(0)
    mod = MultiTableEmbedding(len(DIMS), FEATURES, DIMS, optimizer=optimizer, lr=0.05,
                              weights_dtype=dtype, backend="cpu")
    out: dict[str, torch.Tensor] = {}
    for step in range(2):
        ids = make_ids(37, gen=torch.Generator().manual_seed(step))
        outs = mod(ids)
        grads = [torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o) for o in outs]
        loss_of(outs, grads).backward()
        for i, o in enumerate(outs):
            out[f"step{step}_out{i}"] = o.detach()
    out["weight"] = mod.weight.detach().clone()
    if optimizer is None:
        out["grad"] = mod.weight.grad.detach().clone()
    elif optimizer == "rowwise_adagrad":
        out["state"] = mod.optimizer_state.detach().clone()
    return out


def assert_builds_agree(compute, dtype: torch.dtype) -> None:
    with cpu_capability("default"):
        expected = compute()
    rtol, atol = TOL[dtype]
    for name in RUNNABLE:
        with cpu_capability(name):
            got = compute()
        for key, want in expected.items():
            torch.testing.assert_close(got[key], want, rtol=rtol, atol=atol,
                                       msg=lambda m: f"{name} vs default, {key}: {m}")


def test_default_build_present_and_choice_runnable():
    assert INFO["cpu_capabilities"][0] == "default"
    assert INFO["cpu_capability"] in RUNNABLE


@pytest.mark.skipif(len(RUNNABLE) < 2, reason="this CPU runs only the default build")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_fusion_ops_agree_across_builds(dtype):
    assert_builds_agree(lambda: fusion_outputs(dtype), dtype)


@pytest.mark.skipif(len(RUNNABLE) < 2, reason="this CPU runs only the default build")
@pytest.mark.parametrize("optimizer", [None, "sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_embedding_ops_agree_across_builds(dtype, optimizer):
    assert_builds_agree(lambda: embedding_outputs(dtype, optimizer), dtype)


def test_set_capability_errors_name_the_choice():
    with pytest.raises(ValueError, match=r"avx9.*must be one of .*default"):
        ck.set_cpu_capability("avx9")
    for name in INFO["cpu_capabilities"]:
        if name not in RUNNABLE:
            with pytest.raises(ValueError, match=f"this CPU cannot run the {name} kernels"):
                ck.set_cpu_capability(name)
    assert ck.build_info()["cpu_capability"] == INFO["cpu_capability"]  # unchanged


def _run_with(capability: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent("""
        import torch, cetnet_kernels as ck
        z = torch.randn(9, 3)
        prob, _ = ck.confidence_fusion(z, backend="cpu")
        print(ck.build_info()["cpu_capability"], bool(torch.isfinite(prob).all()))
    """)
    env = {**os.environ, "CETNET_CPU_CAPABILITY": capability}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("name", RUNNABLE)
def test_environment_variable_chooses_the_build(name):
    r = _run_with(name)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [name, "True"]


def test_environment_variable_bad_value_fails_at_import():
    r = _run_with("avx9")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError") and "CETNET_CPU_CAPABILITY=avx9" in last, r.stderr
    for name in INFO["cpu_capabilities"]:
        if name not in RUNNABLE:  # e.g. avx512 on a CPU without it: refused, never run
            r = _run_with(name)
            assert r.returncode != 0 and "cannot run the" in r.stderr, r.stderr


@pytest.mark.skipif(sys.platform != "linux" or not WIDER, reason="no extra ISA build compiled in")
def test_wider_builds_hold_their_instructions_and_the_default_does_not():
    """The wider builds really use their registers, and the default build's kernels none of
    them: a wheel built here runs on any x86-64 CPU. Reads the extension's disassembly."""
    objdump = subprocess.run(["which", "objdump"], capture_output=True, text=True).stdout.strip()
    if not objdump:
        pytest.skip("objdump not installed")
    so = ck._extension._C.__file__
    asm = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", so], capture_output=True,
                         text=True, timeout=300).stdout
    functions: dict[str, list[str]] = {}
    current = None
    for line in asm.splitlines():
        if line.endswith(">:"):
            current = line
            functions[current] = []
        elif current is not None:
            functions[current].append(line)

    def body(ns: str) -> str:
        return "\n".join(line for name, lines in functions.items()
                         if f"cetnet::cpu::{ns}::" in name for line in lines)

    default = body("base")
    assert default and "%ymm" not in default and "%zmm" not in default
    if "avx2" in WIDER:
        assert "%ymm" in body("avx2")
    if "avx512" in WIDER:
        assert "%zmm" in body("avx512")
