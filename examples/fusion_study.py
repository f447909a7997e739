"""When does CETNet's confidence fusion help, and when does it hurt?

Run with ``python examples/fusion_study.py --seeds 5`` (a few minutes on a 2-core CPU;
``--quick`` for a smoke run). Synthetic clicks (``cetnet.demo.synthetic_clicks``), two small
members (the demo's DNN and FM) trained on a 60/20/20 train/validation/test split; every number is
a test AUC. Each seed fixes the data *and* the members' initialisation, so configurations are
compared **paired by seed**: tables give the mean of the per-seed differences and its 95 %
Student-t interval. An interval that contains 0 is "no evidence of a difference", not "equal".

Part A — post-hoc fusion of two members trained independently: the fusion rule alone (average,
confidence fusion at several temperatures, logit space), on the members as trained and with the
weaker or the stronger one made over-confident (its logits multiplied by 4, which leaves its AUC
unchanged), and the calibration-gap fallback.

Part B — joint training with ``CETNetFusion``'s collaborative loss: temperature (fixed,
learnable, learnable within a range), uniform-weight warm-up, logit space, detached weights,
``distill_weight`` / ``mutual_weight``, on three member pairs:

* ``demo``: the demo's DNN + FM (the user report: fused AUC below the FM);
* ``bad_init``: DNN + an FM initialised with large embeddings (``std=0.5``, the demo uses 0.05): over-confident and
  noisy at the start (the user report: it took most of the weight);
* ``split_fields``: two DNNs that each see only half of the fields (complementary members).

Part C — learnable-temperature drift: the temperature after each epoch over a longer run with
smaller batches (``--drift-epochs``, ``--drift-batch``), unbounded and bounded to [0.5, 4].

The safeguards are prototyped here by subclassing ``CETNetFusion`` (:class:`GuardedFusion`);
docs/FUSION_GUIDE.md has the results and the recommended change.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cetnet.demo import DNN, FM, synthetic_clicks
from cetnet.metrics import auc
from cetnet_kernels import CETNetFusion, confidence_fusion

UNIFORM_T = 1e4  # a temperature at which the softmax over confidences in [-ln 2, 0] is uniform

# two-sided 95 % Student-t quantiles, by degrees of freedom
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
         17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042}


def t_interval(xs: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95 % t interval); half-width NaN for one value."""
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    df = n - 1
    q = _T975.get(df) or _T975[max(k for k in _T975 if k <= df)]
    return mean, q * sd / math.sqrt(n)


def fmt_diff(xs: list[float], scale: float = 1e3) -> str:
    """``+1.23 ± 0.45 *`` in units of 1e-3 AUC; ``*`` when the interval excludes 0."""
    m, h = t_interval(xs)
    m, h = m * scale, h * scale
    star = " *" if not math.isnan(h) and abs(m) > h else "  "
    return f"{m:+6.2f} ± {h:5.2f}{star}" if not math.isnan(h) else f"{m:+6.2f}         "


# ------------------------------------------------------------------------------------------------
# The safeguards, prototyped as a subclass
# ------------------------------------------------------------------------------------------------
class GuardedFusion(CETNetFusion):
    """``CETNetFusion`` plus the safeguards under study.

    Args (besides CETNetFusion's):
        temperature_range: ``(lo, hi)`` for a learnable temperature, passed to CETNetFusion
            (which keeps it in the range through a sigmoid); None (the default here, unlike
            CETNetFusion's): unbounded, as the study compares both.
        warmup_steps: the first ``warmup_steps`` training calls (with labels, in train mode) use
            uniform weights (the plain average in prob space).
        calibration_gap: if set, a running (EMA) estimate per member of
            ``gap_k = BCE(p_k, y) - H(p_k)`` (0 for a calibrated member, > 0 for an
            over-confident one) is kept from the training batches; while
            ``max_k gap_k - min_k gap_k > calibration_gap`` the weights are uniform.
    """

    def __init__(self, num_models: int, *args, temperature_range: tuple[float, float] | None = None,
                 warmup_steps: int = 0, calibration_gap: float | None = None,
                 gap_momentum: float = 0.05, **kwargs) -> None:
        # the bounded temperature is CETNetFusion's own (its temperature_range option)
        super().__init__(num_models, *args, temperature_range=temperature_range, **kwargs)
        self.warmup_steps = warmup_steps
        self.calibration_gap = calibration_gap
        self.gap_momentum = gap_momentum
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("gap", torch.full((num_models,), math.nan))

    def uniform_now(self) -> bool:
        if self.training and int(self.steps) < self.warmup_steps:
            return True
        if self.calibration_gap is not None and not bool(torch.isnan(self.gap).any()):
            return float(self.gap.max() - self.gap.min()) > self.calibration_gap
        return False

    @property
    def learned_temperature(self) -> float | Tensor:
        return CETNetFusion.temperature.fget(self)

    @property
    def temperature(self) -> float | Tensor:
        return UNIFORM_T if self.uniform_now() else self.learned_temperature

    def forward(self, logits, labels=None):
        if labels is not None and self.training:
            z = self.stack(logits).detach()
            if self.calibration_gap is not None:
                with torch.no_grad():
                    gap = (bce_rows(z, labels) - entropy_rows(z)).mean(0)
                    m = self.gap_momentum
                    self.gap.copy_(torch.where(torch.isnan(self.gap), gap, (1 - m) * self.gap + m * gap))
        out = super().forward(logits, labels)
        if labels is not None and self.training:
            self.steps += 1
        return out


def bce_rows(z: Tensor, y: Tensor) -> Tensor:
    """``[B, K]`` per-member BCE of logits ``z`` against labels ``y [B]``."""
    return F.binary_cross_entropy_with_logits(z, y[:, None].expand_as(z), reduction="none")


def entropy_rows(z: Tensor) -> Tensor:
    """``[B, K]`` binary entropy of ``sigmoid(z)`` (stable)."""
    p = torch.sigmoid(z)
    return F.softplus(z) - p * z


# ------------------------------------------------------------------------------------------------
# Members and training
# ------------------------------------------------------------------------------------------------
VOCAB, FIELDS = 40, 4
BAD_INIT_STD = 0.5  # the demo FM uses 0.05


class OnFields(nn.Module):
    """A DNN that sees only some of the fields."""

    def __init__(self, cols: list[int]) -> None:
        super().__init__()
        self.register_buffer("cols", torch.tensor(cols))
        self.net = DNN(VOCAB, len(cols))

    def forward(self, ids: Tensor) -> Tensor:
        return self.net(ids[:, self.cols])


def make_members(pair: str) -> nn.ModuleList:
    if pair == "demo":
        return nn.ModuleList([DNN(VOCAB, FIELDS), FM(VOCAB, FIELDS)])
    if pair == "bad_init":
        fm = FM(VOCAB, FIELDS)
        nn.init.normal_(fm.emb.weight, std=BAD_INIT_STD)
        return nn.ModuleList([DNN(VOCAB, FIELDS), fm])
    if pair == "split_fields":
        return nn.ModuleList([OnFields([0, 1]), OnFields([2, 3])])
    raise ValueError(pair)


@dataclass(frozen=True)
class Config:
    name: str
    temperature: float = 1.0
    learnable: bool = False
    temperature_range: tuple[float, float] | None = None
    fusion_space: str = "prob"
    detach_weights: bool = False
    ensemble_weight: float = 1.0
    distill_weight: float = 0.0
    mutual_weight: float = 0.0
    warmup_epochs: float = 0.0
    calibration_gap: float | None = None


@dataclass
class Data:
    ids: Tensor
    y: Tensor
    train: slice
    val: slice
    test: slice


def make_data(rows: int, seed: int) -> Data:
    ids, y = synthetic_clicks(rows, VOCAB, FIELDS, seed)
    a, b = int(0.6 * rows), int(0.8 * rows)
    return Data(ids, y, slice(0, a), slice(a, b), slice(b, None))


@dataclass
class Run:
    member_auc: list[float]
    fused_auc: float
    avg_auc: float  # the plain average of the same members' probabilities
    temperature: float
    weights: list[float]  # mean test fusion weight per member
    trace: list[float]  # the (learned) temperature after each epoch
    test_logits: Tensor = field(repr=False)
    val_logits: Tensor = field(repr=False)


def train(pair: str, cfg: Config, data: Data, seed: int, epochs: int, batch: int,
          lr: float = 3e-3) -> Run:
    torch.manual_seed(seed)
    members = make_members(pair)
    n_train = data.train.stop
    steps_per_epoch = math.ceil(n_train / batch)
    fusion = GuardedFusion(
        len(members), temperature=cfg.temperature, learnable_temperature=cfg.learnable,
        fusion_space=cfg.fusion_space, ensemble_weight=cfg.ensemble_weight,
        distill_weight=cfg.distill_weight, mutual_weight=cfg.mutual_weight,
        detach_weights=cfg.detach_weights, temperature_range=cfg.temperature_range,
        warmup_steps=int(cfg.warmup_epochs * steps_per_epoch),
        calibration_gap=cfg.calibration_gap)
    opt = torch.optim.Adam([*members.parameters(), *fusion.parameters()], lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    trace = []
    for _ in range(epochs):
        perm = torch.randperm(n_train, generator=g)
        for start in range(0, n_train, batch):
            idx = perm[start:start + batch]
            out = fusion([m(data.ids[idx]) for m in members], data.y[idx])
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        lt = fusion.learned_temperature
        trace.append(float(lt.detach()) if isinstance(lt, Tensor) else float(lt))
    fusion.eval()
    with torch.no_grad():
        zt = fusion.stack([m(data.ids[data.test]) for m in members])
        zv = fusion.stack([m(data.ids[data.val]) for m in members])
        out = fusion(zt)
    yt = data.y[data.test]
    t = fusion.temperature
    return Run(member_auc=[auc(out.member_probs[:, k], yt) for k in range(len(members))],
               fused_auc=auc(out.prob, yt), avg_auc=auc(out.member_probs.mean(1), yt),
               temperature=float(t.detach()) if isinstance(t, Tensor) else float(t),
               weights=out.weights.mean(0).tolist(), trace=trace, test_logits=zt, val_logits=zv)


# ------------------------------------------------------------------------------------------------
# Part A: post-hoc fusion rules on independently trained members
# ------------------------------------------------------------------------------------------------
def fuse_auc(z: Tensor, y: Tensor, t: float, space: str = "prob",
             k: int = 1) -> tuple[float, float]:
    prob, w = confidence_fusion(z, t, fusion_space=space)
    return auc(prob, y), float(w[:, k].mean())


def part_a(runs: dict[int, Run], datas: dict[int, Data], gap_threshold: float) -> None:
    print("\n== Part A: post-hoc fusion of independently trained DNN + FM "
          "(members trained on their own BCE) ==")
    print("One member's logits multiplied by 4 (over-confident, same AUC); weaker/stronger by "
          "validation AUC. "
          "Δ in 1e-3 AUC, mean ± 95% t half-width over seeds, * = interval excludes 0.")
    rules = [("average (T=inf)", UNIFORM_T, "prob"), ("conf T=4", 4.0, "prob"),
             ("conf T=1", 1.0, "prob"), ("conf T=0.3", 0.3, "prob"), ("conf T=0.1", 0.1, "prob"),
             ("conf T=1 logit", 1.0, "logit"), ("conf T=0.3 logit", 0.3, "logit")]
    for label, which, s in (("as trained", "weak", 1.0), ("weaker member x4 (over-confident)", "weak", 4.0),
                            ("stronger member x4 (over-confident)", "strong", 4.0)):
        print(f"\n logits {label}")
        print(f"  {'rule':<22}{'fused AUC':>10}{'Δ vs best member':>20}{'Δ vs average':>20}"
              f"{'w(scaled)':>11}")
        per_rule: dict[str, dict[str, list[float]]] = {}
        gaps = []
        for seed, run in runs.items():
            d = datas[seed]
            y = d.y[d.test]
            val_auc = [auc(run.val_logits[:, k], d.y[d.val]) for k in range(2)]
            k = val_auc.index(min(val_auc) if which == "weak" else max(val_auc))
            scale = torch.ones(2)
            scale[k] = s
            z = run.test_logits * scale
            best = max(run.member_auc)
            avg = auc(torch.sigmoid(z).mean(1), y)
            zv = run.val_logits * scale
            yv = d.y[d.val]
            gap = (bce_rows(zv, yv) - entropy_rows(zv)).mean(0)
            gaps.append(float(gap.max() - gap.min()))
            fallback = float(gap.max() - gap.min()) > gap_threshold
            rows = [(name, *fuse_auc(z, y, t, space, k)) for name, t, space in rules]
            a, w = fuse_auc(z, y, UNIFORM_T if fallback else 1.0, "prob", k)
            rows.append(("T=1 + gap fallback", a, w))
            for name, a, w in rows:
                r = per_rule.setdefault(name, {"auc": [], "best": [], "avg": [], "w": []})
                r["auc"].append(a)
                r["best"].append(a - best)
                r["avg"].append(a - avg)
                r["w"].append(w)
        for name, r in per_rule.items():
            n = len(r["auc"])
            print(f"  {name:<22}{sum(r['auc']) / n:>10.4f}{fmt_diff(r['best']):>20}"
                  f"{fmt_diff(r['avg']):>20}{sum(r['w']) / n:>11.3f}")
        print(f"  validation calibration gap spread (max-min of BCE-H, nats): "
              f"{', '.join(f'{g:.3f}' for g in gaps)}; fallback when > {gap_threshold}")


# ------------------------------------------------------------------------------------------------
# Part B: joint training with the collaborative loss
# ------------------------------------------------------------------------------------------------
INDEPENDENT = Config("independent + average", ensemble_weight=0.0)  # members on their own BCE
REFERENCE = Config("CETNet T=1 (default)")
CONFIGS = [
    INDEPENDENT,
    REFERENCE,
    Config("T=0.3", temperature=0.3),
    Config("T=3", temperature=3.0),
    Config("uniform weights (T=inf)", temperature=UNIFORM_T),
    Config("learnable T", learnable=True),
    Config("learnable T in [0.5,4]", learnable=True, temperature_range=(0.5, 4.0)),
    Config("learnable, demo (mutual .1)", learnable=True, mutual_weight=0.1),
    Config("logit space", fusion_space="logit"),
    Config("detach weights", detach_weights=True),
    Config("distill 0.1", distill_weight=0.1),
    Config("distill 0.5", distill_weight=0.5),
    Config("mutual 0.1", mutual_weight=0.1),
    Config("mutual 0.5", mutual_weight=0.5),
    Config("warm-up 1 epoch uniform", warmup_epochs=1.0),
    Config("calibration-gap fallback", calibration_gap=0.05),
    Config("fallback + warm-up", calibration_gap=0.05, warmup_epochs=1.0),
]
CORE = {"independent + average", "CETNet T=1 (default)", "uniform weights (T=inf)", "learnable T",
        "learnable T in [0.5,4]", "logit space", "warm-up 1 epoch uniform", "calibration-gap fallback",
        "fallback + warm-up"}  # the configurations run on the other pairs (all run on "demo")
QUICK = [INDEPENDENT, REFERENCE, Config("learnable T in [0.5,4]", learnable=True,
                                        temperature_range=(0.5, 4.0)),
         Config("fallback + warm-up", calibration_gap=0.05, warmup_epochs=1.0)]


def part_b(pair: str, configs: list[Config], seeds: list[int], datas: dict[int, Data],
           epochs: int, batch: int) -> dict[str, dict[int, Run]]:
    results: dict[str, dict[int, Run]] = {}
    for cfg in configs:
        results[cfg.name] = {s: train(pair, cfg, datas[s], s, epochs, batch) for s in seeds}
    ref = results[REFERENCE.name]
    ind = results[INDEPENDENT.name]
    r0 = next(iter(ref.values()))
    names = ["DNN", "FM"] if pair != "split_fields" else ["DNN(f0,f1)", "DNN(f2,f3)"]
    print(f"\n== Part B [{pair}]: joint training, members {names[0]} + {names[1]} ==")
    print("Δ in 1e-3 AUC, paired by seed (mean ± 95% t half-width, * = excludes 0); "
          "'best member' is the better member of the same run.")
    print(f"  {'config':<30}{'fused AUC':>10}{'Δ vs best member':>20}{'Δ vs T=1 default':>20}"
          f"{'Δ vs indep.avg':>20}{'final T':>9}{'w2':>7}{'  member AUCs':>15}")
    for name, runs in results.items():
        fa = [r.fused_auc if name != INDEPENDENT.name else r.avg_auc for s, r in runs.items()]
        best = [a - max(r.member_auc) for a, r in zip(fa, runs.values())]
        dref = [a - ref[s].fused_auc for a, s in zip(fa, runs)]
        dind = [a - ind[s].avg_auc for a, s in zip(fa, runs)]
        n = len(fa)
        temps = [r.temperature for r in runs.values()]
        t = sum(temps) / n
        tt = "inf" if t >= UNIFORM_T else f"{t:.2f}"
        w2 = sum(r.weights[1] for r in runs.values()) / n
        m = [sum(r.member_auc[k] for r in runs.values()) / n for k in range(2)]
        print(f"  {name:<30}{sum(fa) / n:>10.4f}{fmt_diff(best):>20}{fmt_diff(dref):>20}"
              f"{fmt_diff(dind):>20}{tt:>9}{w2:>7.3f}   {m[0]:.4f}/{m[1]:.4f}")
    del r0
    return results


def part_c(seeds: list[int], datas: dict[int, Data], epochs: int, batch: int) -> None:
    """Learnable-temperature drift: longer training with more (smaller) steps."""
    cfgs = [Config("fixed T=1"), Config("learnable T", learnable=True),
            Config("learnable T in [0.5,4]", learnable=True, temperature_range=(0.5, 4.0))]
    res = {c.name: {s: train("demo", c, datas[s], s, epochs, batch) for s in seeds} for c in cfgs}
    print(f"\n== Part C: learnable temperature over {epochs} epochs, batch {batch} "
          f"(DNN + FM, lr 3e-3) ==")
    print(f"  {'config':<26}{'T after each epoch (mean over seeds; min-max of final)':<60}"
          f"{'fused AUC':>10}{'Δ vs fixed T=1':>20}")
    ref = res["fixed T=1"]
    for name, runs in res.items():
        n = len(runs)
        tr = [sum(r.trace[e] for r in runs.values()) / n for e in range(epochs)]
        fin = [r.trace[-1] for r in runs.values()]
        traj = " ".join(f"{t:.2f}" for t in tr) + f" [{min(fin):.2f}-{max(fin):.2f}]"
        fa = [r.fused_auc for r in runs.values()]
        d = [r.fused_auc - ref[s].fused_auc for s, r in runs.items()]
        print(f"  {name:<26}{traj:<60}{sum(fa) / n:>10.4f}{fmt_diff(d):>20}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rows", type=int, default=24_000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--pairs", default="demo,bad_init,split_fields",
                    help="comma-separated member pairs for part B")
    ap.add_argument("--quick", action="store_true", help="four configurations only (smoke run)")
    ap.add_argument("--all-configs", action="store_true",
                    help="every configuration on every pair (default: all on 'demo' only)")
    ap.add_argument("--drift-epochs", type=int, default=8, help="part C epochs (0: skip part C)")
    ap.add_argument("--drift-batch", type=int, default=256)
    ap.add_argument("--gap-threshold", type=float, default=0.05)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    seeds = list(range(args.seeds))
    datas = {s: make_data(args.rows, s) for s in seeds}
    t0 = time.perf_counter()
    print(f"fusion study: {args.seeds} seeds, {args.rows} rows (60/20/20), {args.epochs} epochs, "
          f"batch {args.batch}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"command: python examples/fusion_study.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    first = None
    for pair in [p for p in args.pairs.split(",") if p]:
        configs = QUICK if args.quick else [
            c for c in CONFIGS if args.all_configs or pair == "demo" or c.name in CORE]
        res = part_b(pair, configs, seeds, datas, args.epochs, args.batch)
        if first is None and pair == "demo":
            first = res[INDEPENDENT.name]
    if first is None:
        first = {s: train("demo", INDEPENDENT, datas[s], s, args.epochs, args.batch) for s in seeds}
    part_a(first, datas, args.gap_threshold)
    if args.drift_epochs:
        part_c(seeds, datas, args.drift_epochs, args.drift_batch)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
