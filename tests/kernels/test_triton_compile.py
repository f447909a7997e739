"""Every Triton kernel launch the CPU tests make also compiles for a Hopper GPU (sm_90: PTX and
cubin through Triton's bundled ptxas), without a GPU.

The interpreter runs the kernels' Python, not Triton's compiler: a construct the compiler rejects
(a type mismatch between branches of a runtime ``if``, an int64/int32 mix, a bad constexpr) would
only show on the first GPU run. This test records the launches of a representative set of op calls
under the interpreter (kernel, argument types, constexpr values), then compiles each distinct one
ahead of time in a subprocess without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cetnet_kernels import available_backends

pytestmark = pytest.mark.skipif("triton" not in available_backends("cpu"),
                                reason="Triton (interpreter) not available")

_PTR = {torch.float32: "*fp32", torch.float64: "*fp64", torch.float16: "*fp16",
        torch.bfloat16: "*bf16", torch.int32: "*i32", torch.int64: "*i64", torch.bool: "*i1",
        torch.uint8: "*u8"}


def _arg_type(value: object) -> str | None:
    """Triton signature type of a runtime argument; None for a None argument (a constexpr)."""
    if isinstance(value, torch.Tensor):
        return _PTR[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    if value is None:
        return None
    raise TypeError(f"unexpected kernel argument {type(value).__name__}")


def _record_launches(monkeypatch) -> list[dict]:
    """Patches the interpreter's ``kernel[grid]`` to note every launch (then run it)."""
    from triton.runtime.interpreter import InterpretedFunction

    seen: list[dict] = []
    getitem = InterpretedFunction.__getitem__

    def recording_getitem(self, grid):
        launch = getitem(self, grid)

        def run(*args, **kwargs):
            names = list(self.arg_names)
            keep = set(self.kwargs.get("do_not_specialize") or ())
            spec = {"module": self.fn.__module__, "kernel": self.fn.__name__,
                    "signature": {}, "constexprs": {}, "div16": []}
            for name, value in zip(names, args):
                # a GPU launch makes an int argument equal to 1 a constexpr (unless the kernel
                # says do_not_specialize): compile it so, as a .to() on it would then fail
                if (isinstance(value, int) and not isinstance(value, bool) and value == 1
                        and name not in keep):
                    spec["signature"][name] = "constexpr"
                    spec["constexprs"][name] = 1
                    continue
                # what Triton specializes on a GPU: a pointer 16-byte aligned, an int % 16 == 0
                if (isinstance(value, torch.Tensor) and value.data_ptr() % 16 == 0) or (
                        isinstance(value, int) and not isinstance(value, bool)
                        and value % 16 == 0):
                    spec["div16"].append(name)
                kind = _arg_type(value)
                if kind is None:
                    spec["signature"][name] = "constexpr"
                    spec["constexprs"][name] = None
                else:
                    spec["signature"][name] = kind
            for name, value in kwargs.items():
                if name in names:
                    spec["signature"][name] = "constexpr"
                    spec["constexprs"][name] = value
            # launch options change the compiled kernel (layouts, registers): compile with them
            spec["options"] = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
            seen.append(spec)
            return launch(*args, **kwargs)

        return run

    monkeypatch.setattr(InterpretedFunction, "__getitem__", recording_getitem)
    return seen


def _exercise_ops() -> None:
    """A small call of every op family, in the variants that change the compiled kernel."""
    from cetnet_kernels import (MultiTableEmbedding, collaborative_loss, confidence_fusion,
                                kdef_loss)
    from cetnet_kernels.embedding import OPTIMIZERS

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        z = (torch.randn(5, 3, generator=g) * 2).to(dtype).requires_grad_()
        y = torch.rand(5, generator=g)
        t = torch.tensor(0.7, requires_grad=True)
        for space in ("prob", "logit"):
            for detach in (False, True):
                p, w = confidence_fusion(z, t, fusion_space=space, detach_weights=detach,
                                         backend="triton")
                (p.sum() + w[:, 0].sum()).backward()
                loss, _ = collaborative_loss(z, y, t, fusion_space=space, detach_weights=detach,
                                             mutual_weight=0.2, distill_weight=0.3,
                                             backend="triton")
                loss.backward()
        for B, K in ((5, 1), (5, 3), (5, 16), (1, 3)):  # B = 1, K = 1: constexpr arguments
            zk = (torch.randn(B, K, generator=g) * 2).to(dtype).requires_grad_()
            kdef_loss(zk, y[:B], backend="triton")[0].backward()
    features = [("user", 7), ("item", 11), ("tags", 5, "sum")]
    ids = {"user": torch.tensor([1, 2, 6]), "item": torch.tensor([[0, 10], [3, 4], [5, 5]]),
           "tags": (torch.tensor([0, 1, 4, 2]), torch.tensor([0, 2, 3, 4]))}
    for optimizer in OPTIMIZERS:
        # float64: the fused update's settings arrive as bit patterns (SETTINGS_BITS)
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            mod = MultiTableEmbedding(2, features, [4, 3], optimizer=optimizer,
                                      weights_dtype=dtype, backend="triton")
            outs = mod(ids)
            sum(o.float().sum() for o in outs).backward()


_COMPILE = textwrap.dedent("""
    import importlib, json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = []
    for spec in json.load(open(sys.argv[1])):
        kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
        try:
            src = ASTSource(kernel, spec["signature"], constexprs=spec["constexprs"])
            out = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                 options=spec.get("options") or None)
            assert out.asm.get("cubin"), "no cubin"
        except Exception as e:  # report every kernel that fails, not only the first
            failures.append(f"{spec['kernel']} {spec['constexprs']}: {type(e).__name__}: {e}")
    print("\\n".join(failures))
    sys.exit(1 if failures else 0)
""")


def _compile_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default; set, so Triton does not warn
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    return env


def test_every_recorded_triton_launch_compiles_for_sm90(monkeypatch, tmp_path):
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend")
    seen = _record_launches(monkeypatch)
    _exercise_ops()
    for s in seen:
        del s["div16"]  # compiled as launched without alignment facts (the general variant)
    unique = {json.dumps(s, sort_keys=True): s for s in seen}
    kernels = {s["kernel"] for s in unique.values()}
    assert len(kernels) >= 5, kernels  # fusion fwd/bwd/loss and the embedding kernels
    warps = {s["kernel"] for s in unique.values() if s["options"].get("num_warps") == 8}
    # launch options are recorded and compiled with (the fusion kernels run 8 warps at K <= 8)
    assert {"_bags_kernel", "_confidence_fusion_fwd_kernel", "_collaborative_loss_kernel"} \
        <= warps, warps
    print(f"{len(unique)} distinct launches of {len(kernels)} kernels")
    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps(list(unique.values())))
    proc = subprocess.run([sys.executable, "-c", _COMPILE, str(specs)],
                          env=_compile_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{len(unique)} launches; failures:\n{proc.stdout}{proc.stderr[-3000:]}"


_VECTOR_WIDTHS = textwrap.dedent("""
    import collections, importlib, json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    widths = {}
    for spec in json.load(open(sys.argv[1])):
        kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
        attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in spec["div16"]}
        src = ASTSource(kernel, spec["signature"], constexprs=spec["constexprs"], attrs=attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options=spec.get("options") or None).asm["ptx"]
        seen = widths.setdefault(spec["kernel"], collections.Counter())
        access = r"\\b(ld|st)\\.global(?:\\.[a-z0-9_]+)*?(\\.v[248])?\\.[bfsu]32\\b"
        for m in re.finditer(access, ptx):
            seen[m.group(1) + (m.group(2) or "")] += 1
    print(json.dumps(widths))
""")


def test_embedding_rows_move_in_128_bit_accesses(monkeypatch, tmp_path):
    """With member dims that are multiples of 16 (64 and 32 here), the embedding kernels as a
    GPU launch specializes them (16-byte aligned pointers and ints divisible by 16, recorded
    from the interpreter's launches) load table and gradient rows with 128-bit vector loads
    (``ld.global.v4``), and the lookup stores its rows the same way: the dim and table base are
    kernel arguments, one launch per member. (When the dim was read from memory, every element
    was its own 32-bit access.)"""
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend")
    from cetnet_kernels import MultiTableEmbedding

    seen = _record_launches(monkeypatch)
    ids = {"user": torch.tensor([1, 2, 6, 0]), "hist": torch.tensor([[0, 10], [3, 4], [5, 5],
                                                                      [1, 2]]),
           "tags": (torch.tensor([0, 1, 4, 2, 3]), torch.tensor([0, 2, 3, 4, 5])),
           # a hot row: a run longer than _LONG_RUN entries (the long-run kernel)
           "hot": (torch.full((40,), 2), torch.tensor([0, 10, 20, 30, 40]))}
    weighted = dict(ids, hot=(*ids["hot"], torch.rand(40)))  # per-value weights: HAS_WEIGHTS
    from cetnet_kernels.triton import embedding as triton_embedding
    for optimizer in ("sgd", "rowwise_adagrad"):
        # the second pass indexes every slot in 64 bits (INDEX_32 off: grids past 2^31 slots)
        monkeypatch.setattr(triton_embedding, "_INDEX_32_SLOTS",
                            2**31 - 1 if optimizer == "sgd" else 0)
        mod = MultiTableEmbedding(2, [("user", 7), ("hist", 11), ("tags", 5, "mean"),
                                      ("hot", 3, "sum")], [64, 32],
                                  optimizer=optimizer, backend="triton")
        sum(o.sum() for o in mod(ids)).backward()
        sum(o.sum() for o in mod(weighted)).backward()
        # no mean or weighted bag: every entry's factor is 1 (HAS_SCALE off)
        plain = MultiTableEmbedding(2, [("user", 7), ("hot", 3, "sum")], [64, 32],
                                    optimizer=optimizer, backend="triton")
        sum(o.sum() for o in plain({"user": ids["user"], "hot": ids["hot"]})).backward()
    specs = [s for s in seen if s["module"].endswith("triton.embedding")]
    assert {s["kernel"] for s in specs} == {"_gather_kernel", "_bags_kernel", "_runs_kernel",
                                            "_list_long_runs_kernel", "_long_runs_kernel"}
    assert all({"D", "tb"} <= set(s["div16"]) for s in specs
               if s["kernel"] != "_list_long_runs_kernel"), specs  # (it moves no row)
    assert {s["constexprs"]["HAS_WEIGHTS"] for s in specs
            if s["kernel"] == "_bags_kernel"} == {False, True}
    assert {s["constexprs"]["INDEX_32"] for s in specs
            if s["kernel"] in ("_gather_kernel", "_bags_kernel")} == {False, True}
    assert {s["constexprs"]["HAS_SCALE"] for s in specs
            if s["kernel"] in ("_runs_kernel", "_long_runs_kernel")} == {False, True}
    # the bounds check in the first member's gather (its atomic flag), not in the second's
    assert {s["constexprs"]["CHECK"] for s in specs if s["kernel"] == "_gather_kernel"} == {
        False, True}
    path = tmp_path / "specs.json"
    unique = {json.dumps(s, sort_keys=True): s for s in specs}
    path.write_text(json.dumps(list(unique.values())))
    proc = subprocess.run([sys.executable, "-c", _VECTOR_WIDTHS, str(path)],
                          env=_compile_env(tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    widths = json.loads(proc.stdout.strip().splitlines()[-1])
    for kernel in ("_gather_kernel", "_bags_kernel", "_runs_kernel", "_long_runs_kernel"):  # rows
        assert widths[kernel].get("ld.v4", 0) > 0, widths
    assert widths["_gather_kernel"].get("st.v4", 0) > 0, widths
    assert widths["_gather_kernel"].get("st", 0) == 0, widths  # no 32-bit store of a row
