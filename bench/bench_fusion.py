"""Forward + backward benchmarks of the fused ensemble head (pytest-benchmark).

Ops (fp32 logits [B, K], default arguments):
- ``collaborative_loss``: ``loss, prob = op(logits, labels); loss.backward()`` with the default
  loss weights (ensemble=1, member=1): the reference baseline "prob-space fusion + ensemble BCE +
  member BCE".
- ``confidence_fusion``: ``prob, weights = op(logits); prob.sum().backward()`` (no gradient on
  the weights).
- ``kdef_loss``: ``loss, teacher = op(logits, labels); loss.backward()`` (the KDEF loss).

Providers: ``cetnet-cpu`` / ``cetnet-cuda`` / ``cetnet-triton`` (the library, one backend each),
``eager`` (the plain-PyTorch references of cetnet_kernels.reference), ``compile``
(``torch.compile(reference, dynamic=False)``, compiled and warmed up per shape outside the timed
region), ``autograd-floor`` (``logits.sum().backward()`` alone: the fixed cost of one autograd
backward pass that every provider's step includes), ``ops-direct`` (cetnet's forward op and its
backward, called through ``torch.ops.cetnet`` with no autograd engine: what a framework that
drives the ops itself pays, and the kernels' own cost at small B) and, on CUDA, ``copy``: a
device-to-device copy moving the same number of bytes as the op must move at minimum (see
:func:`bytes_moved`), the bandwidth yardstick of render.py.

One benchmark per (device, op, K, B) times all its providers in interleaved rounds (see
:func:`_run`), so a drift of the machine's speed hits every provider alike. Each timed call sets
``logits.grad = None`` first (as ``zero_grad(set_to_none=True)`` does), so no gradient
accumulation is timed, and ends with ``torch.cuda.synchronize()`` on CUDA.

Matrix knobs (environment): CETNET_BENCH_DEVICES (cpu,cuda; default: cuda if there is a GPU,
else cpu), CETNET_BENCH_OPS, CETNET_BENCH_PROVIDERS, CETNET_BENCH_K, CETNET_BENCH_B,
CETNET_BENCH_TARGET_S (timed seconds of rounds per benchmark; default 2.0 on CPU, 1.0 on CUDA),
CETNET_BENCH_VALIDATE=1 (keep the library's label check, a host sync on CUDA; off by default
because the eager/compile references do not check). ``-k`` works too: ids look like
``bench_confidence_fusion[cpu-K4-B65536]``.
"""

from __future__ import annotations

import math
import os
import time
from functools import partial

import pytest
import torch

import cetnet_kernels as ck
from _common import InterleavedTimer, device_name, env_ints, env_strs, selected_devices

OPS = ("collaborative_loss", "confidence_fusion", "kdef_loss")
KS = (2, 4, 8)
B_CPU = (256, 4096, 65536, 1048576)
B_CUDA = B_CPU + (4194304,)  # 4M rows: the bandwidth target size
PROVIDERS = {
    "cpu": ("cetnet-cpu", "eager", "compile", "autograd-floor", "ops-direct"),
    "cuda": ("cetnet-cuda", "cetnet-triton", "eager", "compile", "copy", "autograd-floor",
             "ops-direct"),
}
DTYPE = torch.float32
VALIDATE = os.environ.get("CETNET_BENCH_VALIDATE", "0") == "1"

_REFERENCE = {
    "collaborative_loss": ck.collaborative_loss_reference,
    "confidence_fusion": ck.confidence_fusion_reference,
    "kdef_loss": ck.kdef_loss_reference,
}
_LIBRARY = {
    "collaborative_loss": ck.collaborative_loss,
    "confidence_fusion": ck.confidence_fusion,
    "kdef_loss": ck.kdef_loss,
}


def bytes_moved(op: str, K: int, B: int, elt: int = 4) -> int:
    """The bytes the op must move at minimum (fp32), forward + backward.

    collaborative_loss, kdef_loss: read logits [B,K] + labels [B], write grad [B,K] + prob [B].
    confidence_fusion: forward reads logits, writes prob [B] + weights [B,K]; backward reads the
    prob gradient [B] and the logits, writes grad [B,K].
    """
    if op in ("collaborative_loss", "kdef_loss"):
        return elt * (2 * B * K + 2 * B)
    return elt * (4 * B * K + 2 * B)


def _params():
    ops = env_strs("CETNET_BENCH_OPS", list(OPS))
    ks = env_ints("CETNET_BENCH_K", list(KS))
    b_override = os.environ.get("CETNET_BENCH_B", "").strip()
    out = {op: [] for op in ops}
    for device in selected_devices():
        bs = env_ints("CETNET_BENCH_B", []) if b_override else list(
            B_CUDA if device == "cuda" else B_CPU)
        for op in ops:
            for K in ks:
                for B in bs:
                    out[op].append(pytest.param(device, K, B, id=f"{device}-K{K}-B{B}"))
    return out


def _providers(device: str) -> list[str]:
    chosen = env_strs("CETNET_BENCH_PROVIDERS", list(PROVIDERS.get(device, ())))
    return [p for p in chosen if p in PROVIDERS.get(device, ())]


_PARAMS = _params()


def _skip_reason(device: str, provider: str) -> str | None:
    if device == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    if provider.startswith("cetnet-"):
        backend = provider.split("-", 1)[1]
        avail = ck.available_backends(device)
        if backend not in avail:
            info = ck.build_info()
            why = info.get("error") or f"available on {device}: {avail}"
            return f"backend {backend!r} is not available on {device} ({why})"
        if backend == "triton":
            from cetnet_kernels import fusion

            err = fusion._TRITON.error
            if err:
                return f"backend 'triton' failed to load: {err}"
    return None


def _sync(device: str):
    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _make_step(op: str, device: str, provider: str, K: int, B: int, info: dict):
    """The timed callable (forward + backward, synchronized) for one benchmark."""
    sync = _sync(device)
    if provider == "copy":
        n = bytes_moved(op, K, B) // 2 // 4  # read n floats + write n floats
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)

        def copy_step():
            dst.copy_(src)
            sync()

        return copy_step

    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, K, generator=gen, dtype=DTYPE) * 2).to(device).requires_grad_()
    labels = torch.randint(0, 2, (B,), generator=gen).to(device=device, dtype=DTYPE)
    if provider == "autograd-floor":
        # What every provider's step pays besides its own kernels: one autograd backward pass
        # into a leaf (engine start-up, the sum's backward, AccumulateGrad).
        def floor_step():
            logits.grad = None
            logits.sum().backward()
            sync()

        return floor_step

    if provider == "ops-direct":
        return _direct_step(op, device, logits.detach(), labels, sync)
    if provider.startswith("cetnet-"):
        fn = partial(_LIBRARY[op], backend=provider.split("-", 1)[1], validate=VALIDATE)
    elif provider == "eager":
        fn = _REFERENCE[op]
    elif provider == "compile":
        torch._dynamo.reset()  # a fresh cache per shape: no recompile limit, no stale graphs
        fn = torch.compile(_REFERENCE[op], dynamic=False)
    else:
        raise ValueError(provider)

    if op in ("collaborative_loss", "kdef_loss"):
        def step():
            logits.grad = None
            loss, _prob = fn(logits, labels)
            loss.backward()
            sync()
    else:
        def step():
            logits.grad = None
            prob, _weights = fn(logits)
            prob.sum().backward()
            sync()

    if provider == "compile":
        t0 = time.perf_counter()
        try:
            step()  # compiles forward and backward
        except Exception as exc:  # e.g. no C++ compiler / no working triton for inductor
            pytest.skip(f"torch.compile failed: {type(exc).__name__}: {str(exc)[:300]}")
        info["compile_s"] = round(time.perf_counter() - t0, 2)
    return step


def _direct_step(op: str, device: str, logits: torch.Tensor, labels: torch.Tensor, sync):
    """Forward op + backward op of the compiled backend (cpu / cuda), as the C++ autograd of
    csrc/autograd.cpp calls them, without the engine: default arguments, mean reduction,
    temperature 1, and for confidence_fusion the gradient of prob.sum() (ones)."""
    if ck.build_info().get(device) is not True:
        pytest.skip(f"the compiled {device} ops are not built")
    ops = torch.ops.cetnet
    tau = torch.tensor(1.0, device=device)
    ones = torch.ones(logits.shape[0], device=device, dtype=logits.dtype)
    keep_w = device == "cpu"  # the CPU backward reuses the forward's weights (autograd.cpp)
    inv_b = 1.0 / max(logits.shape[0], 1)

    if op == "collaborative_loss":
        def direct():
            _loss, _prob, grad, _gt = ops.collaborative_loss(
                logits, labels, tau, 1.0, 1.0, 0.0, 0.0, False, False, 1, True, False)
            grad * inv_b  # what the backward does with the stored gradient
            sync()
    elif op == "kdef_loss":
        def direct():
            _loss, _teacher, grad = ops.kdef_loss(logits, labels, True)
            grad * 1.0  # the backward scales the stored gradient by grad_loss
            sync()
    else:
        def direct():
            _prob, w = ops.confidence_fusion(logits, tau, False, False)
            ops.confidence_fusion_backward(ones, None, logits, w if keep_w else None, tau,
                                           False, False, False)
            sync()
    return direct


def _run(benchmark, op: str, device: str, K: int, B: int):
    """Times every provider of one (op, device, K, B) in interleaved rounds.

    A timed round runs each provider's step for a burst of calls (order rotated every round);
    each burst is also timed on its own, per call. Providers timed one after the other would
    each see a different stretch of a shared machine whose speed drifts, which skews ratios more
    than the effects measured here.
    pytest-benchmark's stats describe the whole round; ``extra_info["providers"]`` holds each
    provider's own median / min / rounds (what render.py tabulates) and ``skipped`` the providers
    that cannot run here, with the reason.
    """
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    steps, skipped, compile_s = {}, {}, None
    for provider in _providers(device):
        reason = _skip_reason(device, provider)
        if reason is None:
            torch.manual_seed(0)
            info: dict = {}
            try:
                steps[provider] = _make_step(op, device, provider, K, B, info)
            except pytest.skip.Exception as exc:
                reason = str(exc)
            compile_s = info.get("compile_s", compile_s)
        if reason is not None:
            skipped[provider] = reason
    if not steps:
        pytest.skip(f"no provider can run: {skipped}")
    # Each provider runs a burst of calls per round (~20 ms, at least one call), timed as a
    # whole: steady-state (warm-cache) cost per call, while rounds of ~0.1 s interleave the
    # providers on a time scale far below the machine's drift.
    burst = {}
    for p, step in steps.items():  # warm-up (allocator, dispatch caches) and calibration
        for _ in range(3):
            step()
        t0 = time.perf_counter()
        step()
        step()
        burst[p] = max(1, math.ceil(0.02 / max((time.perf_counter() - t0) / 2, 1e-7)))
    timer = InterleavedTimer(steps, burst)
    t = timer.calibrate()
    target = float(os.environ.get("CETNET_BENCH_TARGET_S", "2.0" if device == "cpu" else "1.0"))
    rounds = max(5, min(2000, math.ceil(target / max(t, 1e-7))))
    multi = len(selected_devices()) > 1
    benchmark.group = f"{op}-K{K}-B{B}" + (f"-{device}" if multi else "")
    benchmark.extra_info.update(
        op=op, device=device, device_name=device_name(device), K=K, B=B, dtype="float32",
        bytes=bytes_moved(op, K, B), validate=VALIDATE, torch_version=torch.__version__,
        skipped=skipped, **({"compile_s": compile_s} if compile_s is not None else {}))
    benchmark.pedantic(timer.round, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info["providers"] = timer.summary()


@pytest.mark.parametrize("device,K,B", _PARAMS.get("collaborative_loss", []))
def bench_collaborative_loss(benchmark, device, K, B):
    _run(benchmark, "collaborative_loss", device, K, B)


@pytest.mark.parametrize("device,K,B", _PARAMS.get("confidence_fusion", []))
def bench_confidence_fusion(benchmark, device, K, B):
    _run(benchmark, "confidence_fusion", device, K, B)


@pytest.mark.parametrize("device,K,B", _PARAMS.get("kdef_loss", []))
def bench_kdef_loss(benchmark, device, K, B):
    _run(benchmark, "kdef_loss", device, K, B)
