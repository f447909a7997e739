"""Host time of the Triton backend's calls: the eager path (the implementations below
torch.library, backends.EagerOp / EmbeddingOps) against the registered ops called with autograd
(the dispatcher and torch.library's Python autograd wrapper), in interleaved rounds in one run.

Run under the interpreter with the kernel launches stubbed out (each ``kernel[grid](...)`` is a
no-op), so what is timed is the Python and torch work around the kernels, the part a GPU host
pays per call whatever the batch:

    TRITON_INTERPRET=1 .venv/bin/python -m pytest bench/bench_triton_host.py

Steps (B = 1024, K = 4 logits; the embedding: 2 members x 26 features, B = 8, fused SGD):
fusion forward + ``prob.sum().backward()``, collaborative loss + backward, KDEF loss + backward,
and a fused-SGD embedding step. ``extra_info["providers"]``: median / min seconds per call of
``eager`` and ``registered-op``; pytest-benchmark's own stats are the eager path's.
"""

from __future__ import annotations

import os

import pytest
import torch

from _common import InterleavedTimer, device_name

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run with TRITON_INTERPRET=1 (the kernels interpreted, their launches stubbed)",
                allow_module_level=True)
pytest.importorskip("triton")

import cetnet_kernels as ck  # noqa: E402
from cetnet_kernels.embedding import OPTIMIZER_CODES  # noqa: E402
from cetnet_kernels.embedding_args import OptimizerArgs  # noqa: E402

B, K, F = 1024, 4, 26
STEPS = ("fusion", "loss", "kdef", "embedding")


@pytest.fixture
def no_launches(monkeypatch):
    """Every interpreted kernel launch a no-op (outputs keep their uninitialized values)."""
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setattr(InterpretedFunction, "__getitem__",
                        lambda self, grid: (lambda *args, **kwargs: None))


def _steps(name: str) -> dict:
    """``{"eager": ..., "registered-op": ...}``: one call + backward of ``name`` each way."""
    t = torch.ops.cetnet
    z = torch.zeros(B, K, requires_grad=True)
    y = torch.zeros(B)
    tau = torch.tensor(1.0)
    if name == "embedding":
        mod = ck.MultiTableEmbedding(2, [(f"f{i}", 1000) for i in range(F)], [16, 16],
                                     optimizer="sgd", backend="triton", bounds_check="off")
        gen = torch.Generator().manual_seed(0)
        ids = {f"f{i}": torch.randint(0, 1000, (8,), generator=gen) for i in range(F)}
        grads = [torch.ones(8, F, 16) for _ in range(2)]
        opt = OptimizerArgs(int(OPTIMIZER_CODES["sgd"]), mod.lr, mod.eps, mod.weight_decay)

        def eager() -> None:
            torch.autograd.backward(mod(ids), grads)

        def registered() -> None:
            a, _ = mod._normalize(ids)
            outs = t.multi_embedding_fused_triton.default(
                a.weight, mod._no_state, mod._placeholder, *a[1:], *opt)
            torch.autograd.backward(outs, grads)
        return {"eager": eager, "registered-op": registered}

    calls = {
        "fusion": (lambda: ck.confidence_fusion(z, 1.0, backend="triton", validate=False)[0].sum(),
                   lambda: t.confidence_fusion_triton(z, tau, False, False)[0].sum()),
        "loss": (lambda: ck.collaborative_loss(z, y, 1.0, backend="triton", validate=False)[0],
                 lambda: t.collaborative_loss_triton(z, y, tau, 1.0, 1.0, 0.0, 0.0, False,
                                                     False, 1, True, False)[0]),
        "kdef": (lambda: ck.kdef_loss(z, y, backend="triton", validate=False)[0],
                 lambda: t.kdef_loss_triton(z, y, True)[0]),
    }[name]

    def run(call):
        def step() -> None:
            z.grad = None
            call().backward()
        return step
    return {"eager": run(calls[0]), "registered-op": run(calls[1])}


@pytest.mark.parametrize("name", STEPS)
def bench_triton_host(benchmark, no_launches, name):
    steps = _steps(name)
    summary = InterleavedTimer.run(steps, calls=20, rounds=30)
    benchmark.group = f"triton-host-{name}"
    benchmark.extra_info.update(
        op=f"triton_host_{name}", device="cpu", device_name=device_name("cpu"), B=B, K=K, F=F,
        providers=summary, torch_version=torch.__version__,
        registered_over_eager=summary["registered-op"]["median_s"] / summary["eager"]["median_s"])
    benchmark.pedantic(steps["eager"], rounds=100, iterations=1, warmup_rounds=5)
