"""GPU benchmarks (pytest-benchmark) of the fused ensemble head and the multi-table embedding,
timed with CUDA events and reported as a fraction of the measured device-copy bandwidth.

Run by ``make gpu-check`` (bench/gpu_check.py), or alone on a machine with a CUDA GPU::

    python -m pytest bench/bench_gpu.py --benchmark-json=bench/gpu_cuda.json
    python bench/render_gpu.py bench/gpu_cuda.json       # -> bench/GPU_RESULTS.md

Skipped without a CUDA GPU.

Fusion (fp32 logits [B, K], K = 4, B in {1M, 4M} at temperature 1, the default; also B = 4M at
temperature 0.7, the general path a learned temperature takes;
``bench_gpu_fusion[<op>-K4-B4194304]``, ``[<op>-K4-B4194304-tau0.7]``):

- ``cetnet-cuda`` / ``cetnet-triton``: the public op, forward + ``backward()`` through autograd
  (``validate=False``), what a training step pays.
- ``kernels-cuda`` / ``kernels-triton``: the backend's ops called through ``torch.ops.cetnet``
  with no autograd engine: the kernels' own throughput (confidence_fusion: forward op + backward
  op; collaborative_loss: the one op computing the loss and its per-row gradient).
- ``eager``: the plain-PyTorch reference, forward + backward.
- ``copy``: a device-to-device copy moving the op's minimum bytes (``bytes_moved`` of
  bench_fusion.py): the bandwidth yardstick.

Embedding (M = 2 members x F = 26 features, one table of ``ROWS`` rows each, D = 64, fp32,
B = 65536 single ids per feature; ``uniform`` ids or Zipf(1.05) ids ``(zipf - 1) % ROWS``, whose
hottest row holds several % of a feature's lookups; ``bags``: every feature a mean bag of 1 to
15 uniform ids (8 on average, the pooled multi-hot input); ``bench_gpu_embedding[<ids>-<mode>-...]``):

- mode ``forward``: the lookup alone (``torch.no_grad``).
- mode ``sgd`` / ``rowwise_adagrad``: lookup + backward with the fused optimizer update.
- providers ``cetnet-cuda``, ``cetnet-triton`` (and ``-nocheck``: ``bounds_check="off"``, no
  host synchronization per call); ``torch-loop`` (one ``nn.Embedding`` per member
  and feature, ``sparse=True`` + ``torch.optim.SGD``/``Adagrad``: what a plain PyTorch user
  writes; forward and sgd only), and ``copy`` of the mode's bytes.

Training step (``bench_gpu_train_step``): one `cetnet train` step of the packaged
Criteo_x1 model (bench/train_step.py: CETNet of a DNN and a DCNv2, embedding dim 10 with the
fused row-wise Adagrad, Adam + gradient clipping) on synthetic Criteo-shaped batches (13 dense,
26 categorical features of ``CETNET_BENCH_TRAIN_ROWS`` ids, default 1M, Zipf ids), batches moved
from the CPU in the step; providers ``cetnet-cuda`` and ``cetnet-triton`` (the model's
``backend``). Reported as time per step and samples per second.

Useful bytes follow FBGEMM's accounting: the forward reads each looked-up row and writes the
outputs (``(L + M * F * B) * D * 4`` for ``L`` lookups in all: ``2 * L * D * 4`` for single
ids, ``L = M * F * B``); the fused backward reads the output gradient for each lookup and reads
+ writes its row (``3 * L * D * 4`` more; rows shared by several lookups are counted once per
lookup, so Zipf and uniform ids have the same byte count).

Timing: every provider of one benchmark is timed in interleaved rounds; in a round each
provider runs a burst of calls between two CUDA events (no host sync inside the burst), and its
time per call is recorded. ``extra_info["providers"]`` holds each provider's median / min per
call in seconds; render_gpu.py turns them into GB/s and % of copy.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import env_ints, env_strs  # noqa: E402
from bench_fusion import bytes_moved  # noqa: E402

import cetnet_kernels as ck  # noqa: E402

if not torch.cuda.is_available():
    pytest.skip("the GPU benchmarks need a CUDA GPU", allow_module_level=True)

FUSION_OPS = ("collaborative_loss", "confidence_fusion", "kdef_loss")
FUSION_PROVIDERS = ("cetnet-cuda", "cetnet-triton", "kernels-cuda", "kernels-triton", "eager",
                    "copy")
# "-nocheck": MultiTableEmbedding(bounds_check="off"), no host synchronization per call
EMB_PROVIDERS = ("cetnet-cuda", "cetnet-cuda-nocheck", "cetnet-triton", "cetnet-triton-nocheck",
                 "torch-loop", "copy")
EMB_MODES = ("forward", "sgd", "rowwise_adagrad")
# ids: single ids, uniform or Zipf; "bags": every feature a mean bag of 1..BAG_MAX uniform ids
EMB_IDS = ("uniform", "zipf", "bags")
BAG_MAX = 15
M, F, D = 2, 26, 64
ROWS = int(os.environ.get("CETNET_BENCH_ROWS", "1000000"))
ZIPF_A = 1.05
N_BATCHES = 3
TRAIN_PROVIDERS = ("cetnet-cuda", "cetnet-triton")
TRAIN_BATCH = 4096  # the Criteo_x1 config's batch_size
LR = 0.01


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
class EventTimer:
    """Interleaved rounds of bursts, each burst timed by a pair of CUDA events."""

    def __init__(self, steps: dict, target_s: float, min_burst: int = 1) -> None:
        self.steps = dict(steps)
        self.failed: dict[str, str] = {}
        self.burst: dict[str, int] = {}
        for p, step in steps.items():  # warm-up (JIT, allocator) and burst size: ~5 ms a burst
            try:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                t = self._burst(step, 3) / 3
            except Exception as exc:  # one provider's failure (a compile error, out of
                # memory) is its row's note, not the loss of the other providers' numbers
                if not _device_usable():  # a sticky fault: nothing after it would run
                    raise
                self.failed[p] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
                del self.steps[p]
                continue
            self.burst[p] = max(min_burst, min(200, math.ceil(5e-3 / max(t, 1e-7))))
        if not self.steps:
            raise RuntimeError(f"every provider failed: {self.failed}")
        self.names = list(self.steps)
        self.times: dict[str, list[float]] = {p: [] for p in self.names}
        per_round = sum(self.burst[p] * self._burst(s, 1) for p, s in self.steps.items())
        self.rounds = max(5, min(400, math.ceil(target_s / max(per_round, 1e-7))))
        self._turn = 0

    @staticmethod
    def _burst(step, n: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def round(self) -> None:
        k = self._turn % len(self.names)
        self._turn += 1
        for p in self.names[k:] + self.names[:k]:
            n = self.burst[p]
            self.times[p].append(self._burst(self.steps[p], n) / n)

    def summary(self) -> dict[str, dict]:
        return {p: {"median_s": statistics.median(ts), "min_s": min(ts), "rounds": len(ts),
                    "calls_per_round": self.burst[p]} for p, ts in self.times.items() if ts}


def _device_usable() -> bool:
    """False after a sticky CUDA error (an illegal address: every later call fails too)."""
    try:
        torch.cuda.synchronize()
        return True
    except Exception:
        return False


def _free() -> None:
    """Gives back the memory of tensors no longer referenced (earlier benchmarks' tables)."""
    gc.collect()  # (a failed step's frames in a reference cycle hold its tensors)
    try:
        torch.cuda.empty_cache()
    except Exception:  # after a sticky fault: the original error is the one to see
        pass


def _record(name: str, info: dict) -> None:
    """Appends one finished benchmark (its extra_info) to $CETNET_BENCH_JSONL, when set:
    pytest-benchmark writes its JSON only when the session ends, so a group stopped at its time
    limit keeps the benchmarks it finished (make gpu-check reads them)."""
    path = os.environ.get("CETNET_BENCH_JSONL")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"name": name, "extra_info": info}, default=str) + "\n")


def _target_s() -> float:
    return float(os.environ.get("CETNET_BENCH_TARGET_S", "0.5"))


def _copy_step(nbytes: int):
    n = max(nbytes // 2 // 4, 1)  # read n floats + write n floats
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _run(benchmark, steps: dict, skipped: dict, group: str, info: dict,
         min_burst: int = 1) -> None:
    """Times ``steps`` (provider -> step) in interleaved rounds; a provider whose warm-up fails
    is listed in ``skipped`` with its error. Empties ``steps`` in the end, whatever happens:
    they hold the tables (13 GB a set), which must be gone before the next benchmark."""
    timer = None
    try:
        if not steps:
            pytest.skip(f"no provider can run: {skipped}")
        timer = EventTimer(steps, _target_s(), min_burst)
        skipped.update(timer.failed)
        benchmark.group = group
        benchmark.extra_info.update(device="cuda", device_name=torch.cuda.get_device_name(),
                                    torch_version=torch.__version__, skipped=skipped, **info)
        benchmark.pedantic(timer.round, rounds=timer.rounds, iterations=1, warmup_rounds=0)
        benchmark.extra_info["providers"] = timer.summary()
        _record(group, dict(benchmark.extra_info))
    finally:
        steps.clear()
        if timer is not None:
            timer.steps.clear()
        _free()


def _backend_reason(backend: str) -> str | None:
    if backend not in ck.available_backends("cuda"):
        return f"backend {backend!r} is not available on cuda: {ck.build_info()}"
    return None


# ------------------------------------------------------------------------------------------------
# Fusion ops
# ------------------------------------------------------------------------------------------------
# A temperature other than 1 (a learnable one leaves 1 after the first step) takes the kernels'
# general path (exp / log of each member's term) and, in the cetnet-* and eager rows, the
# temperature's gradient as well (a tensor requiring grad): timed at the larger batch only.
OTHER_TAU = 0.7


def _fusion_params():
    ks = env_ints("CETNET_BENCH_K", [4])
    bs = env_ints("CETNET_BENCH_B", [1 << 20, 1 << 22])
    params = []
    for op in env_strs("CETNET_BENCH_OPS", list(FUSION_OPS)):
        for K in ks:
            params += [pytest.param(op, K, B, 1.0, id=f"{op}-K{K}-B{B}") for B in bs]
            if op != "kdef_loss":  # (no temperature)
                params.append(pytest.param(op, K, max(bs), OTHER_TAU,
                                           id=f"{op}-K{K}-B{max(bs)}-tau{OTHER_TAU}"))
    return params


def _fusion_step(op: str, provider: str, logits: torch.Tensor, labels: torch.Tensor,
                 temperature: float):
    tau = torch.tensor(temperature, device="cuda")
    if provider.startswith("kernels-"):
        backend = provider.split("-", 1)[1]
        z = logits.detach()
        ones = torch.ones(z.shape[0], device="cuda")
        t = torch.ops.cetnet
        if op == "kdef_loss":
            kdef_op = t.kdef_loss if backend == "cuda" else t.kdef_loss_triton

            def direct():  # both passes: the batch statistics, then the gradient
                kdef_op(z, labels, True)
            return direct
        if op == "collaborative_loss":
            loss_op = t.collaborative_loss if backend == "cuda" else t.collaborative_loss_triton

            def direct():  # the loss and its per-row gradient in one op (autograd's backward
                # then scales that gradient by the upstream gradient / B: the cetnet-* rows)
                loss_op(z, labels, tau, 1.0, 1.0, 0.0, 0.0, False, False, 1, True, False)
            return direct
        if backend == "cuda":
            def direct():
                _p, _w = t.confidence_fusion(z, tau, False, False)
                t.confidence_fusion_backward(ones, None, z, None, tau, False, False, False)
        else:
            def direct():
                _p, _w = t.confidence_fusion_triton(z, tau, False, False)
                t.confidence_fusion_backward_triton(ones, None, z, tau, False, False, False)
        return direct

    reference = {"collaborative_loss": ck.collaborative_loss_reference,
                 "confidence_fusion": ck.confidence_fusion_reference,
                 "kdef_loss": ck.kdef_loss_reference}
    library = {"collaborative_loss": ck.collaborative_loss,
               "confidence_fusion": ck.confidence_fusion, "kdef_loss": ck.kdef_loss}
    if provider == "eager":
        fn = reference[op]
    else:
        lib = library[op]
        backend = provider.split("-", 1)[1]

        def fn(*args):
            return lib(*args, backend=backend, validate=False)

    # Temperature 1 as the default passes it (a float); another stands for a learned one: a
    # tensor that requires grad, so the backward also computes dL/dtau.
    temperature = (temperature if temperature == 1.0 else
                   torch.tensor(temperature, device="cuda", requires_grad=True))

    if op == "kdef_loss":
        def step():
            logits.grad = None
            loss, _prob = fn(logits, labels)
            loss.backward()
    elif op == "collaborative_loss":
        def step():
            logits.grad = None
            loss, _prob = fn(logits, labels, temperature)
            loss.backward()
    else:
        def step():
            logits.grad = None
            prob, _w = fn(logits, temperature)
            prob.sum().backward()
    return step


@pytest.mark.parametrize("op,K,B,tau", _fusion_params())
def bench_gpu_fusion(benchmark, op, K, B, tau):
    _free()  # what an earlier benchmark that failed may still hold
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(B, K, generator=gen, device="cuda") * 2).requires_grad_()
    labels = torch.randint(0, 2, (B,), generator=gen, device="cuda").float()
    steps, skipped = {}, {}
    for p in env_strs("CETNET_BENCH_PROVIDERS", list(FUSION_PROVIDERS)):
        if p not in FUSION_PROVIDERS:
            continue
        reason = _backend_reason(p.split("-", 1)[1]) if "-" in p else None
        if reason:
            skipped[p] = reason
            continue
        steps[p] = (_copy_step(bytes_moved(op, K, B)) if p == "copy"
                    else _fusion_step(op, p, logits, labels, tau))
    name = f"{op}-K{K}-B{B}" + ("" if tau == 1.0 else f"-tau{tau}")
    _run(benchmark, steps, skipped, name, dict(kind="fusion", op=op, K=K, B=B, tau=tau,
                                               dtype="float32", bytes=bytes_moved(op, K, B)))


# ------------------------------------------------------------------------------------------------
# Embedding
# ------------------------------------------------------------------------------------------------
def _emb_params():
    bs = env_ints("CETNET_BENCH_EMB_B", [65536])
    dists = env_strs("CETNET_BENCH_IDS", list(EMB_IDS))
    modes = [m for m in env_strs("CETNET_BENCH_EMB_MODES", list(EMB_MODES)) if m in EMB_MODES]
    return [pytest.param(dist, mode, B, id=f"{dist}-{mode}-M{M}-F{F}-B{B}-D{D}")
            for dist in dists for mode in modes for B in bs]


def emb_bytes(mode: str, B: int, values: int) -> int:
    """FBGEMM's accounting for ``values`` looked-up rows per member (B * F single ids, or the
    bags' values): the forward reads each and writes the B * F outputs; the fused backward reads
    the output gradient for each value and reads and writes its row."""
    forward = M * (values + F * B) * D * 4
    return forward if mode == "forward" else forward + 3 * M * values * D * 4


def _emb_batches(dist: str, B: int) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(N_BATCHES):
        if dist == "bags":  # per feature: B mean bags of 1..15 uniform ids
            batch = {}
            for f in range(F):
                lengths = rng.integers(1, BAG_MAX + 1, B)
                offsets = np.concatenate([[0], np.cumsum(lengths)])
                values = rng.integers(0, ROWS, int(offsets[-1]))
                batch[f"f{f}"] = (torch.from_numpy(values).cuda(),
                                  torch.from_numpy(offsets).cuda())
            out.append(batch)
            continue
        if dist == "uniform":
            ids = rng.integers(0, ROWS, (F, B))
        else:
            ids = (rng.zipf(ZIPF_A, (F, B)) - 1) % ROWS
        t = torch.from_numpy(ids).cuda()
        out.append({f"f{f}": t[f] for f in range(F)})
    return out


def _values(x) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


def hottest_share(batch: dict) -> float:
    """The largest share of one feature's lookups that a single row takes."""
    return max(float(torch.bincount(_values(x)).max()) / _values(x).numel()
               for x in batch.values())


def _module(backend: str, optimizer: str | None, bounds_check: str = "error", bags=False):
    return ck.MultiTableEmbedding(M, [(f"f{f}", ROWS, "mean") if bags else (f"f{f}", ROWS)
                                      for f in range(F)], D, optimizer=optimizer,
                                  lr=LR, bounds_check=bounds_check, backend=backend,
                                  device="cuda")


def _emb_step(provider: str, mode: str, batches, B: int):
    it = iter(range(1 << 62))
    bags = isinstance(batches[0]["f0"], tuple)

    def next_batch():
        return batches[next(it) % len(batches)]

    grads = [torch.ones(B, F, D, device="cuda") for _ in range(M)]
    if provider.startswith("cetnet-"):
        backend, _, check = provider.split("-", 1)[1].partition("-")
        mod = _module(backend, None if mode == "forward" else mode,
                      "off" if check == "nocheck" else "error", bags)
        if mode == "forward":
            def step():
                with torch.no_grad():
                    mod(next_batch())
        else:
            def step():
                torch.autograd.backward(mod(next_batch()), grads)
        return step

    # torch-loop: M * F nn.Embedding(sparse=True) + a torch optimizer.
    if mode == "rowwise_adagrad":
        pytest.skip("torch has no row-wise Adagrad")
    embs = torch.nn.ModuleList(
        torch.nn.EmbeddingBag(ROWS, D, mode="mean", sparse=True, device="cuda") if bags
        else torch.nn.Embedding(ROWS, D, sparse=True, device="cuda") for _ in range(M * F))
    opt = torch.optim.SGD(embs.parameters(), lr=LR)

    def lookup(ids):
        if bags:  # (nn.EmbeddingBag takes the B start offsets, without the end)
            return [torch.stack([embs[m * F + f](ids[f"f{f}"][0], ids[f"f{f}"][1][:-1])
                                 for f in range(F)], dim=1) for m in range(M)]
        return [torch.stack([embs[m * F + f](ids[f"f{f}"]) for f in range(F)], dim=1)
                for m in range(M)]

    if mode == "forward":
        def step():
            with torch.no_grad():
                lookup(next_batch())
    else:
        def step():
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(lookup(next_batch()), grads)
            opt.step()
    return step


@pytest.mark.parametrize("dist,mode,B", _emb_params())
def bench_gpu_embedding(benchmark, dist, mode, B):
    _free()  # what an earlier benchmark that failed may still hold
    batches = _emb_batches(dist, B)
    values = sum(_values(x).numel() for x in batches[0].values())  # per member
    nbytes = emb_bytes(mode, B, values)
    steps, skipped = {}, {}
    for p in env_strs("CETNET_BENCH_PROVIDERS", list(EMB_PROVIDERS)):
        if p not in EMB_PROVIDERS:
            continue
        reason = _backend_reason(p.split("-")[1]) if p.startswith("cetnet-") else None
        if reason is None:
            try:
                steps[p] = (_copy_step(nbytes) if p == "copy"
                            else _emb_step(p, mode, batches, B))
            except pytest.skip.Exception as exc:
                reason = str(exc)
            except Exception as exc:  # e.g. out of memory: the other providers still run
                if not _device_usable():
                    raise
                reason = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        if reason:
            skipped[p] = reason
    _run(benchmark, steps, skipped, f"embedding-{dist}-{mode}",
         dict(kind="embedding", ids=dist, mode=mode, M=M, F=F, B=B, D=D, rows=ROWS,
              values_per_output=round(values / (F * B), 3),
              hottest_share=round(hottest_share(batches[0]), 4), bytes=nbytes))


# ------------------------------------------------------------------------------------------------
# A whole training step
# ------------------------------------------------------------------------------------------------
def bench_gpu_train_step(benchmark):
    _free()  # what an earlier benchmark that failed may still hold
    try:  # (imported here: the model library needs more packages than the kernels' benchmarks)
        from train_step import train_step
    except ImportError as exc:
        pytest.skip(f"the model library does not import here: {exc}")
    rows = env_ints("CETNET_BENCH_TRAIN_ROWS", [1_000_000])[0]
    steps, skipped = {}, {}
    for p in env_strs("CETNET_BENCH_PROVIDERS", list(TRAIN_PROVIDERS)):
        if p not in TRAIN_PROVIDERS:
            continue
        backend = p.split("-", 1)[1]
        reason = _backend_reason(backend)
        if reason:
            skipped[p] = reason
            continue
        try:
            _model, steps[p] = train_step(backend, "cuda", rows, TRAIN_BATCH)
        except Exception as exc:  # e.g. out of memory: the other provider still runs
            if not _device_usable():
                raise
            skipped[p] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    # bursts of several steps: a step's host work before its first kernel overlaps the previous
    # step's kernels, as in a training loop
    _run(benchmark, steps, skipped, f"train-step-criteo-B{TRAIN_BATCH}",
         dict(kind="train", config="bars_criteo_x1", B=TRAIN_BATCH, rows=rows), min_burst=4)
