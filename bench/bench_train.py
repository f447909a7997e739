"""End-to-end training speed of CETNet (DHEN + InterFormer) on MovieLens-100k (pytest-benchmark).

One timed call = one training step on the next of a fixed ring of real mini-batches: forward,
``loss.backward()``, Adam on the dense parameters (plus the embedding's fused optimizer when it
has one). Providers:

- ``fused``: the default run config (``cetnet train``): cetnet's fused kernels (one-launch
  multi-table embedding with row-wise Adagrad applied in backward, the fused collaborative loss).
- ``fused-dense-emb``: the fused kernels with ordinary dense embedding gradients trained by Adam.
- ``reference``: the same model on the plain-PyTorch ops (``--backend reference``): one
  ``F.embedding`` per member and feature, dense embedding gradients trained by Adam, the
  eager reference of the collaborative loss.
- ``members-only``: a bound, not a way to train: the members' forward, backward and Adam alone,
  on embedding outputs computed once before timing (leaf tensors that still receive their
  gradient), with the fused loss. What a step would cost if the embedding lookup, its backward
  and its optimizer were free: ``reference / members-only`` is the most any embedding + loss
  kernels can speed the step up (Amdahl).

Workloads: ``ml100k`` (the default config: MovieLens-100k, small vocabularies: 753 users, 1,618
items) and ``synthetic-700k-ids`` (the same model on the synthetic dataset with 200k users and
500k items: production-like vocabularies, where a dense embedding gradient and Adam over every
row cost more than the batch's own rows).

The providers of one (workload, B) run in interleaved rounds (see ``bench_train_step``), so a
machine whose speed drifts skews none of them. Knobs: CETNET_TRAIN_BENCH_B (batch sizes, default
512,2048), CETNET_TRAIN_BENCH_WORKLOADS, CETNET_TRAIN_BENCH_PROVIDERS, CETNET_BENCH_TARGET_S
(seconds of rounds per benchmark, default 20). The extra info of each benchmark holds, per
provider, the median and min step time, samples/s and the bytes of parameters, gradients and
optimizer state (the memory a step needs beyond activations). ``python bench/profile_train.py``
profiles one step.
"""

from __future__ import annotations

import os
from copy import deepcopy

import pytest
import torch

from _common import InterleavedTimer, device_name, env_ints, env_strs, ring_step

PROVIDERS = ("fused", "fused-dense-emb", "reference", "members-only")
B_DEFAULT = (512, 2048)
RING = 8  # distinct batches cycled through (real data, not one batch repeated)
WORKLOADS = {
    "ml100k": None,  # the default config's data section
    "synthetic-700k-ids": {"name": "synthetic", "num_rows": 40_000, "num_users": 200_000,
                           "num_items": 500_000, "max_seq_len": 20, "seed": 0},
}


def provider_config(provider: str, workload: str = "ml100k") -> dict:
    """The run config of a provider: the paper's CETNet (DHEN + InterFormer, the default config
    when TRAIN_RESULTS.md was measured) with its backend and embedding mode."""
    from cetnet.config import load_config, paper_config_path

    cfg = load_config(paper_config_path())
    if WORKLOADS[workload] is not None:
        cfg["data"] = dict(WORKLOADS[workload])
    if provider in ("fused", "members-only"):
        cfg["backend"] = "auto"
    elif provider == "fused-dense-emb":
        cfg["backend"] = "auto"
        cfg["model"]["embedding_optimizer"] = None
    elif provider == "reference":
        cfg["backend"] = "reference"
        cfg["model"]["embedding_optimizer"] = None
    else:
        raise ValueError(provider)
    return cfg


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters, buffers (incl. fused optimizer state), gradients, Adam state."""
    n = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    n += sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
             if p.grad is not None)
    for st in optimizer.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return n


_DATASETS: dict = {}


def make_trainer(provider: str, B: int, seed: int = 0, workload: str = "ml100k"):
    """(step, model, optimizer, dataset) for one provider: step() trains on the next batch."""
    from cetnet.data import load_dataset
    from cetnet.models import build_model
    from cetnet.train.loop import dense_optimizer

    cfg = provider_config(provider, workload)
    data_opts = {k: v for k, v in cfg["data"].items() if k != "name"}
    try:
        if workload not in _DATASETS:
            _DATASETS[workload] = load_dataset(cfg["data"]["name"], **data_opts)
        dataset = _DATASETS[workload]
    except Exception as exc:  # offline and no cached copy
        pytest.skip(f"dataset {workload} is not available: {type(exc).__name__}: {exc}")
    torch.manual_seed(seed)
    model = build_model(deepcopy(cfg["model"]), dataset.schema, backend=cfg["backend"])
    model.train()
    optimizer = dense_optimizer(list(model.dense_parameters()), cfg["train"]["lr"])  # as fit does
    batches = []
    for batch in dataset.splits["train"].batches(B, shuffle=True, seed=seed, drop_last=True):
        batches.append(batch)
        if len(batches) == RING:
            break
    if provider == "members-only":
        return _members_only_step(model, optimizer, batches), model, optimizer, dataset
    return ring_step(lambda b: model.loss(b)[0], optimizer, batches), model, optimizer, dataset


def _members_only_step(model, optimizer, batches):
    """A training step of the members alone on precomputed embedding outputs (see the module
    docstring): the embedding's share of the step removed, everything else as in ``fused``."""
    from dataclasses import replace

    def leaf(t):
        return t.detach().clone().requires_grad_()

    views = []
    with torch.no_grad():
        for batch in batches:
            views.append([replace(v, fields=leaf(v.fields),
                                  sequences={k: leaf(x) for k, x in v.sequences.items()})
                          for v in model.front(batch)])
    members = list(model.members.values())
    it = [0]

    def step():
        i = it[0] % len(batches)
        it[0] += 1
        vs = views[i]
        for v in vs:  # as a fresh lookup would: no gradient accumulation across steps
            v.fields.grad = None
            for x in v.sequences.values():
                x.grad = None
        z = torch.stack([m(v) for m, v in zip(members, vs)], dim=1)
        loss = model.fusion(z, batches[i].label).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _params():
    bs = env_ints("CETNET_TRAIN_BENCH_B", list(B_DEFAULT))
    ws = env_strs("CETNET_TRAIN_BENCH_WORKLOADS", list(WORKLOADS))
    return [pytest.param(w, B, id=f"cpu-{w}-B{B}") for w in ws for B in bs]


@pytest.mark.parametrize("workload,B", _params())
def bench_train_step(benchmark, workload: str, B: int):
    """All providers of one (workload, B), timed in interleaved rounds.

    One timed round = one training step of every provider, in an order rotated each round; each
    step is also timed on its own. On a shared machine whose speed drifts over minutes, timing the
    providers one after the other skews their ratios by more than the effects measured here;
    interleaved, every provider sees the same conditions. pytest-benchmark's stats describe the
    whole round; ``extra_info["providers"]`` holds each provider's own median / min step time,
    samples/s and state bytes (what render_train.py tabulates).
    """

    providers = [p for p in env_strs("CETNET_TRAIN_BENCH_PROVIDERS", list(PROVIDERS))
                 if p in PROVIDERS]
    trainers = {}
    for p in providers:
        torch.manual_seed(0)
        step, model, optimizer, _ = make_trainer(p, B, workload=workload)
        for _ in range(3):  # warm-up: allocator, first-call dispatch, optimizer state
            step()
        trainers[p] = (step, model, optimizer)
    timer = InterleavedTimer({p: trainers[p][0] for p in providers})
    t = timer.calibrate()
    target = float(os.environ.get("CETNET_BENCH_TARGET_S", "20.0"))
    rounds = max(5, min(200, int(target / max(t, 1e-4))))
    benchmark.group = f"train-step-{workload}-B{B}"
    benchmark.extra_info.update(workload=workload, device="cpu", device_name=device_name("cpu"),
                                B=B, torch_version=torch.__version__,
                                members=list(trainers[providers[0]][1].member_names))
    benchmark.pedantic(timer.round, rounds=rounds, iterations=1, warmup_rounds=0)
    stats = timer.summary()
    for p, st in stats.items():
        st["samples_per_s"] = B / st["median_s"]
        st["state_bytes"] = state_bytes(trainers[p][1], trainers[p][2])
    benchmark.extra_info["providers"] = stats
