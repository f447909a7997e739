"""The fusion kernels once each, for Nsight Compute: are they bound by memory or by issue?

Runs the forward and backward ops of ``confidence_fusion`` and the ``collaborative_loss`` op
(torch.ops.cetnet, no autograd: the ``kernels-*`` rows of bench/bench_gpu.py) once per backend
(cuda, triton) at one size. Profile it with, for example::

    ncu --clock-control none -k 'regex:fusion|collaborative|sums' \\
        --section SpeedOfLight --section SchedulerStats --section WarpStateStats \\
        python3 bench/profile_fusion.py --B 4194304 --K 4

(``sums``: the CUDA loss's final reduction kernel) and compare "Issued Warp Per Scheduler"
(SchedulerStats; 1.0 is the most a scheduler issues per cycle) with "DRAM Throughput"
(SpeedOfLight): a kernel issuing near that ceiling with DRAM far under its peak needs fewer
instructions per row, not a better access pattern. Needs a CUDA GPU; ncu replays each kernel,
so the run's own timing means nothing (use bench/bench_gpu.py for times). `make gpu-check` runs
this under ncu and tabulates the result in GPU_RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cetnet_kernels import available_backends  # noqa: E402  (and registers the ops)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=1 << 22, help="rows (default 4M)")
    ap.add_argument("--K", type=int, default=4, help="members (default 4)")
    ap.add_argument("--backends", default="cuda,triton")
    ap.add_argument("--ops", default="confidence_fusion,collaborative_loss")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_fusion: no CUDA GPU")
        return 2
    from bench_gpu import _fusion_step  # skips itself at import without a GPU

    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(args.B, args.K, generator=gen, device="cuda") * 2
    labels = torch.randint(0, 2, (args.B,), generator=gen, device="cuda").float()
    for backend in args.backends.split(","):
        if backend not in available_backends("cuda"):
            print(f"profile_fusion: backend {backend!r} is not available here; skipped")
            continue
        for op in args.ops.split(","):
            _fusion_step(op, f"kernels-{backend}", logits, labels, 1.0)()
            torch.cuda.synchronize()
            print(f"profile_fusion: ran {op} on {backend} (B={args.B}, K={args.K})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
