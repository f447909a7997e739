"""Training speed of cetnet's single models against the peer a user would pick instead:
FuxiCTR's DNN and DCNv2 (pytest-benchmark).

The models are those of the ``dnn`` / ``dcnv2`` and ``fuxictr_dnn`` / ``fuxictr_dcnv2`` rows
of ``cetnet reproduce`` (docs/RESULTS.md): the default MovieLens-100k config (user-time split,
embedding dim 16, batch ``B``) with one member, trained by cetnet (its fused embedding with
row-wise Adagrad, Adam on the rest), and FuxiCTR's model of that kind with its template
defaults, trained by FuxiCTR's own ``train_step`` (Adam on everything, gradient clipping at
10, as ``BaseModel.fit`` does). One timed call = one training step on the next of a ring of
real batches, already converted to each library's input (conversion is not timed).

The four providers of one B run in interleaved rounds (bench/_common.py), so drift of a shared
machine's speed hits them alike. ``extra_info["providers"]`` holds each one's median / min step
time, samples/s and parameter count; bench/render_peers.py writes bench/PEER_RESULTS.md.
``fuxictr-<kind>-narrow`` is FuxiCTR's model with cetnet's default hidden widths (256, 128)
instead of its 500 x 3: the two libraries on networks of about the same size.
Knobs: CETNET_PEER_BENCH_B (default 512,4096), CETNET_BENCH_TARGET_S (default 20).
Needs FuxiCTR (``pip install --no-deps fuxictr==2.3.10`` plus the ``peers`` extra).
"""

from __future__ import annotations

import os

import pytest
import torch

from _common import InterleavedTimer, device_name, env_ints, ring_step

PROVIDERS = ("cetnet-dnn", "fuxictr-dnn", "fuxictr-dnn-narrow", "cetnet-dcnv2", "fuxictr-dcnv2",
             "fuxictr-dcnv2-narrow")
#: ``-narrow``: FuxiCTR's model with cetnet's default hidden widths instead of its own 500 x 3
#: (the reproduce peer row's config key model.<kind>.hidden): the libraries on networks of
#: about the same size
NARROW = [256, 128]
B_DEFAULT = (512, 4096)
RING = 8

_DATA: dict = {}


def _row_config(kind: str, B: int) -> dict:
    from cetnet.reproduce.experiment import base_config
    from cetnet.reproduce.rows import row_config

    base = base_config("movielens-100k", split="user_time",
                       overrides=[f"train.batch_size={B}"])
    return row_config(base, kind, seed=0)


def _dataset(config: dict):
    from cetnet.data import load_dataset

    key = repr(config["data"])
    if key not in _DATA:
        data = dict(config["data"])
        try:
            _DATA[key] = load_dataset(data.pop("name"), **data)
        except Exception as exc:  # offline and no cached copy
            pytest.skip(f"MovieLens-100k is not available: {type(exc).__name__}: {exc}")
    return _DATA[key]


def _ring(dataset, B: int) -> list:
    batches = []
    for batch in dataset.splits["train"].batches(B, shuffle=True, seed=0, drop_last=True):
        batches.append(batch)
        if len(batches) == RING:
            break
    return batches


def make_cetnet(kind: str, B: int):
    """(step, parameters) of cetnet's single ``kind`` as the reproduce row trains it."""
    from cetnet.models import build_model
    from cetnet.train.loop import dense_optimizer

    config = _row_config(kind, B)
    dataset = _dataset(config)
    torch.manual_seed(0)
    model = build_model(config["model"], dataset.schema, backend=config["backend"])
    model.train()
    optimizer = dense_optimizer(list(model.dense_parameters()), config["train"]["lr"])
    step = ring_step(lambda b: model.loss(b)[0], optimizer, _ring(dataset, B))
    return step, sum(p.numel() for p in model.parameters())


def make_fuxictr(kind: str, B: int, tmp: str, hidden: list[int] | None = None):
    """(step, parameters) of FuxiCTR's ``kind`` as the peer row builds it (with ``hidden``
    widths instead of FuxiCTR's defaults when given), stepped by FuxiCTR's own
    ``BaseModel.train_step``."""
    from cetnet.reproduce import peers

    if not peers.fuxictr_available():
        pytest.skip("FuxiCTR is not installed")
    fx = peers.require_fuxictr()
    config = _row_config(f"fuxictr_{kind}", B)
    if hidden is not None:
        config["model"][kind] = {**(config["model"].get(kind) or {}), "hidden": hidden}
    dataset = _dataset(config)
    dim = config["model"]["embedding_dim"]
    fx.seed_everything(0)
    fmap = peers.build_feature_map(dataset.schema, embedding_dim=dim, dataset_id="bench",
                                   data_dir=tmp)
    cls = peers.model_classes()[kind]
    model = cls(fmap, model_id=f"bench_{kind}", gpu=-1, learning_rate=config["train"]["lr"],
                embedding_dim=dim, task="binary_classification", optimizer="adam",
                loss="binary_crossentropy", metrics=["AUC"], monitor="AUC",
                monitor_mode="max", model_root=tmp, verbose=0,
                **peers.model_params(config, kind))
    model.train()
    model._max_gradient_norm = 10.0  # what BaseModel.fit sets before its epochs
    batches = [peers.to_fuxictr(b, dataset.schema) for b in _ring(dataset, B)]
    base_step = fx.BaseModel.train_step  # FuxiCTR's step, not cetnet's recording wrapper
    it = [0]

    def step():
        batch = batches[it[0] % len(batches)]
        it[0] += 1
        base_step(model, batch)

    return step, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("B", [pytest.param(b, id=f"cpu-ml100k-B{b}")
                               for b in env_ints("CETNET_PEER_BENCH_B", list(B_DEFAULT))])
def bench_peer_train_step(benchmark, B: int, tmp_path):
    """cetnet's DNN / DCNv2 and FuxiCTR's, timed in interleaved rounds (see the module doc)."""
    trainers = {}
    for p in PROVIDERS:
        lib, kind, *narrow = p.split("-")
        torch.manual_seed(0)
        step, params = make_cetnet(kind, B) if lib == "cetnet" else \
            make_fuxictr(kind, B, str(tmp_path / p), NARROW if narrow else None)
        for _ in range(3):  # warm-up: allocator, first-call dispatch, optimizer state
            step()
        trainers[p] = (step, params)
    timer = InterleavedTimer({p: s for p, (s, _) in trainers.items()})
    t = timer.calibrate()
    target = float(os.environ.get("CETNET_BENCH_TARGET_S", "20.0"))
    rounds = max(5, min(200, int(target / max(t, 1e-4))))
    benchmark.group = f"peer-train-step-ml100k-B{B}"
    benchmark.extra_info.update(workload="ml100k", device="cpu", device_name=device_name("cpu"),
                                B=B, torch_version=torch.__version__,
                                torch_threads=torch.get_num_threads())
    benchmark.pedantic(timer.round, rounds=rounds, iterations=1, warmup_rounds=0)
    stats = timer.summary()
    for p, st in stats.items():
        st["samples_per_s"] = B / st["median_s"]
        st["parameters"] = trainers[p][1]
    benchmark.extra_info["providers"] = stats
