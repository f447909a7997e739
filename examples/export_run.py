"""Exporting a trained ensemble for serving with ``torch.export``, and serving it elsewhere.

Export (this process, with the ``cetnet`` library and the run directory)::

    python examples/export_run.py runs/custom-dataset --plugin examples.custom_dataset

1. :func:`cetnet.serve.export_run` rebuilds the run's model from ``config.yaml`` + ``best.pt``
   and traces it with ``torch.export.export`` (eval mode, no grad) into a program over plain
   tensors -- ``sparse`` ids, ``dense`` values, ``multihot`` bags ``(values, offsets)`` and
   padded ``sequence`` ids, any batch size -- that returns the fused probability, the member
   logits and (CETNet) the fusion weights. The fused embedding lookup and the fusion are kept
   as ``torch.ops.cetnet.*`` calls: they are ``torch.library`` ops with fake kernels, so
   export traces them without running them. ``torch.export.save`` writes ``model.pt2`` with
   the schema and member names inside (``cetnet_serving.json``).
2. The eager model scores ``--rows`` rows of the test split; those inputs and outputs are
   saved next to the program.
3. A fresh Python process (``--serve``) loads the program with nothing but ``torch`` and
   ``cetnet_kernels`` (no ``cetnet``, no run directory, no dataset), runs it on the saved
   inputs and compares with the eager outputs; it exits with status 1 when they differ.

The program runs on the device it was exported on (``--device``, default cpu).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch

SERVING_FILE = "cetnet_serving.json"  # cetnet.serve.SCHEMA_FILE: the schema inside model.pt2


def export(args: argparse.Namespace) -> Path:
    """Steps 1 and 2: the program, and eager inputs / outputs to check it against."""
    root = str(Path(__file__).resolve().parents[1])  # so that --plugin examples.* imports
    if root not in sys.path:
        sys.path.insert(0, root)
    from cetnet.serve import batch_inputs, export_run, load_run

    out = export_run(args.run_dir, args.out, checkpoint=args.checkpoint, device=args.device,
                     plugins=args.plugin)
    print(f"exported {args.run_dir}/{args.checkpoint} -> {out} "
          f"({out.stat().st_size / 2**20:.2f} MiB)")
    run = load_run(args.run_dir, checkpoint=args.checkpoint, device=args.device,
                   plugins=args.plugin)
    batch = next(run.dataset.splits["test"].batches(args.rows)).to(run.device)
    with torch.no_grad():
        eager = run.model(batch)
    reference = {"prob": eager.prob, "logits": eager.logits}
    if eager.weights is not None:
        reference["weights"] = eager.weights
    check = out.with_suffix(".check.pt")
    torch.save({"inputs": batch_inputs(batch), "eager": reference}, check)
    return check


def serve(program_path: Path, check_path: Path, tolerance: float) -> int:
    """Step 3, in a process that never imports ``cetnet``."""
    import cetnet_kernels  # noqa: F401  (registers torch.ops.cetnet.*, which the program calls)

    extra = {SERVING_FILE: ""}
    program = torch.export.load(program_path, extra_files=extra)
    meta = json.loads(extra[SERVING_FILE])
    kinds: dict[str, list[str]] = {}
    for f in meta["schema"]["features"]:
        kinds.setdefault(f["kind"], []).append(f["name"])
    print(f"serving {program_path.name}: members {meta['member_names']}; inputs {kinds}")
    model = program.module()
    check = torch.load(check_path, weights_only=True)
    with torch.no_grad():
        served = model(*check["inputs"])
    worst = 0.0
    for key, expected in check["eager"].items():
        diff = float((served[key] - expected).abs().max())
        worst = max(worst, diff)
        print(f"  {key:<8} {tuple(served[key].shape)}  max |exported - eager| = {diff:.3g}")
    print(f"fresh process: the exported program {'matches' if worst <= tolerance else 'DIFFERS'}"
          f" (tolerance {tolerance:g}); cetnet imported: {'cetnet' in sys.modules}")
    return 0 if worst <= tolerance else 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="torch.export a run, then load and run it in a "
                                             "fresh process and compare with eager.")
    ap.add_argument("run_dir", type=Path, nargs="?", help="the run to export")
    ap.add_argument("--out", type=Path, help="the program (default RUN_DIR/model.pt2)")
    ap.add_argument("--checkpoint", default="best.pt")
    ap.add_argument("--device", default="cpu", help="where the program runs (cpu, cuda)")
    ap.add_argument("--rows", type=int, default=256, help="test rows compared")
    ap.add_argument("--tolerance", type=float, default=1e-5)
    ap.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                    help="import MODULE first (the run's registered dataset or model)")
    ap.add_argument("--serve", type=Path, metavar="PROGRAM", help=argparse.SUPPRESS)
    ap.add_argument("--check", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve is not None:  # step 3 (what step 2 starts)
        return serve(args.serve, args.check, args.tolerance)
    if args.run_dir is None:
        ap.error("give the run directory to export")
    args.out = args.out or args.run_dir / "model.pt2"
    check = export(args)
    # a fresh interpreter: nothing of this process (imports, registrations, the model) is there
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), "--serve",
                           str(args.out), "--check", str(check), "--tolerance",
                           str(args.tolerance)], check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
