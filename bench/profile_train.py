"""Profiles training steps of the default CETNet (DHEN + InterFormer) on MovieLens-100k and prints
where the time goes (torch.profiler, CPU), for the fused and the reference ops.

    python bench/profile_train.py [--batch 512] [--steps 10] [--rows 25] [--workload ml100k]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import make_trainer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=25, help="rows of the operator table")
    ap.add_argument("--providers", default="fused,reference")
    ap.add_argument("--workload", default="ml100k", help="ml100k or synthetic-700k-ids")
    args = ap.parse_args(argv)
    for provider in args.providers.split(","):
        step, model, _, _ = make_trainer(provider, args.batch, workload=args.workload)
        for _ in range(3):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                with torch.profiler.record_function("train_step"):
                    step()
        print(f"\n=== {provider}, {args.workload}: B={args.batch}, {args.steps} steps, "
              f"{torch.get_num_threads()} threads ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
