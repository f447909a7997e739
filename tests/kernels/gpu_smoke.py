"""A small run of every CUDA and Triton kernel (fusion, collaborative and KDEF losses,
embedding), for compute-sanitizer (``make gpu-check`` runs it under ``compute-sanitizer --tool
memcheck``): odd shapes, every optimizer mode, padding, bags and sequences, a hot row,
out-of-range ids with the bounds check off and warn, fp32, bf16 and fp64. Not a pytest module
(the checks of values are in tests/; test_gpu_check.py runs these functions on the CPU
backends); it only exercises the kernels and checks that the results are finite. Exits 0 and
prints "smoke ok"."""

from __future__ import annotations

import sys
import warnings

import torch

import cetnet_kernels as ck


def fusion(backend: str, device: str = "cuda") -> None:
    for B, K, dtype in ((1, 1, torch.float32), (37, 5, torch.float32), (130, 16, torch.bfloat16),
                        (33, 3, torch.float64)):
        z = (torch.randn(B, K, device=device) * 3).to(dtype).requires_grad_()
        y = torch.randint(0, 2, (B,), device=device).float()
        t = torch.tensor(0.7, device=device, requires_grad=True)
        p, w = ck.confidence_fusion(z, t, backend=backend)
        (p.float().sum() + w.float().square().sum()).backward()
        loss, p = ck.collaborative_loss(z, y, t, distill_weight=0.3, mutual_weight=0.2,
                                        backend=backend)
        loss.backward()
        assert torch.isfinite(z.grad.float()).all() and torch.isfinite(loss)
        z.grad = None
        loss, teacher = ck.kdef_loss(z, y, backend=backend)
        (loss + teacher.float().mean()).backward()
        assert torch.isfinite(z.grad.float()).all() and torch.isfinite(loss)


def embedding(backend: str, device: str = "cuda") -> None:
    feats = [("a", 1000), ("bag", 17, "mean"), ("seq", 300)]
    B = 257
    lens = torch.randint(0, 5, (B,))
    ids = {"a": torch.randint(0, 1000, (B,)),
           "bag": (torch.randint(0, 17, (int(lens.sum()),)),
                   torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])),
           "seq": torch.randint(-1, 300, (B, 7))}
    ids = {k: (v.to(device) if isinstance(v, torch.Tensor) else tuple(x.to(device) for x in v))
           for k, v in ids.items()}
    ids["a"][:200] = 3  # a hot row: a run longer than the CUDA backward's long-run cut (64)
    for optimizer in (None, "sgd", "rowwise_adagrad"):
        for wdt in (torch.float32, torch.bfloat16):
            mod = ck.MultiTableEmbedding(3, feats, [1, 10, 16], optimizer=optimizer,
                                         weights_dtype=wdt, backend=backend, device=device)
            outs = mod(ids)
            sum(o.float().sum() for o in outs).backward()
            assert torch.isfinite(mod.weight.float()).all()
    # Out-of-range ids with the check off / warn: read as padding, nothing out of range may
    # be touched (memcheck sees it); float64 tables: the fused update's settings as bits.
    bad = dict(ids)
    bad["a"] = ids["a"].clone()
    bad["a"][::5] = 5000
    bad["seq"] = ids["seq"].clone()
    bad["seq"][:, 0] = 300
    if len(ids["bag"][0]):
        values = ids["bag"][0].clone()
        values[::3] = 99
        bad["bag"] = (values, ids["bag"][1])
    for check, wdt in (("off", torch.float32), ("warn", torch.float64)):
        mod = ck.MultiTableEmbedding(3, feats, [1, 10, 16], optimizer="rowwise_adagrad",
                                     weights_dtype=wdt, bounds_check=check, backend=backend,
                                     device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs = mod(bad)
        sum(o.float().sum() for o in outs).backward()
        assert torch.isfinite(mod.weight.float()).all()


def main(argv: list[str]) -> int:
    wanted = argv or ["cuda", "triton"]  # e.g. `gpu_smoke.py cuda` for the CUDA kernels only
    backends = [b for b in wanted if b in ck.available_backends("cuda")]
    if not backends:
        print("smoke: no GPU backend available", ck.build_info())
        return 1
    for b in backends:
        fusion(b)
        embedding(b)
    torch.cuda.synchronize()
    print(f"smoke ok: {', '.join(backends)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
