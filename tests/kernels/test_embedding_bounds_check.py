"""MultiTableEmbedding(bounds_check="off"), on every backend and device: an out-of-range id is
treated exactly as padding (a zero vector, no gradient, no update, left out of bag means), with
no host check and, on the Triton path, no synchronizing op at all; the default ("error") still
raises before anything is written. bounds_check="warn" computes what "off" does and the lookup
warns with the error's message (and the count of bad ids), once per feature until
reset_bad_id_warnings(). On a GPU the CUDA and
Triton steps also run under ``torch.cuda.set_sync_debug_mode("error")``, and a CUDA-backend
training step is captured in a CUDA graph and replayed."""

from __future__ import annotations

import contextlib
import re
import warnings

import pytest
import torch

from cetnet_kernels import MultiTableEmbedding, reset_bad_id_warnings
from conftest import backend_device_params
from cetnet_kernels.embedding_args import OptimizerArgs
from embedding_support import FEATURES, loss_of, sample_inputs
from helpers import synchronizing_ops

CASES = backend_device_params(backends=("cpu", "reference", "cuda", "triton"))
DIMS = [3, 4]
VOCAB = {f.name: f.num_embeddings for f in FEATURES}


def _with_bad_ids(ids, pad_with=None):
    """A copy of ``ids`` (from sample_inputs) with out-of-range ids in every input kind:
    negative ones, the vocabulary size, and far past it; with ``pad_with`` those entries hold
    that padding id instead (the input "off" must be equivalent to)."""
    out = {}
    for k, x in ids.items():
        V = VOCAB[k]
        bad_values = torch.tensor([V, -7, 10 * V + 3], device=(x if isinstance(x, torch.Tensor)
                                                              else x[0]).device)
        if pad_with is not None:
            bad_values = torch.full_like(bad_values, pad_with)
        if isinstance(x, torch.Tensor):
            x = x.clone()
            flat = x.view(-1)
            flat[torch.tensor([0, 3, flat.numel() - 1])] = bad_values.to(x.dtype)
            out[k] = x
        else:
            v = x[0].clone()
            n = min(3, v.numel())
            v[:n] = bad_values[:n].to(v.dtype)  # the first bag(s) get bad values
            out[k] = (v, *x[1:])
    return out


def _twins(backend, device, optimizer, padding_idx, weight_decay=0.05, features=FEATURES):
    """(off, error): two modules with the same tables; the second has a padding id (-1 when
    ``padding_idx`` is None: never a valid id, so it stands for "skipped")."""
    kw = dict(optimizer=optimizer, lr=0.3, weight_decay=weight_decay, backend=backend,
              device=device, weights_dtype=torch.float64)
    off = MultiTableEmbedding(2, features, DIMS, padding_idx=padding_idx, bounds_check="off",
                              **kw)
    pad = -1 if padding_idx is None else padding_idx
    err = MultiTableEmbedding(2, features, DIMS, padding_idx=pad, **kw)
    err.load_state_dict(off.state_dict())
    return off, err, pad


# SGD without weight decay takes the CPU kernel's direct path (no sort), with decay the sorted one
OPTIMIZERS = [(None, 0.0), ("sgd", 0.0), ("sgd", 0.05), ("rowwise_adagrad", 0.05)]


def _steps_agree(off, err, bad, padded, optimizer, steps=2):
    """``off`` on ``bad`` and ``err`` on ``padded`` give equal outputs, gradients, weights and
    states, step after step."""
    for step in range(steps):
        outs_off, outs_err = off(bad), err(padded)
        for a, b in zip(outs_off, outs_err):
            assert torch.equal(a, b), f"step {step}: forward differs"
        assert torch.isfinite(torch.cat([o.reshape(-1) for o in outs_off])).all()
        grads = [torch.randn_like(o) for o in outs_off]
        loss_of(outs_off, grads).backward()
        loss_of(outs_err, grads).backward()
        if optimizer is None:
            assert torch.equal(off.weight.grad, err.weight.grad)
            off.weight.grad = err.weight.grad = None
        else:
            assert torch.equal(off.weight, err.weight), f"step {step}: update differs"
        if optimizer == "rowwise_adagrad":
            assert torch.equal(off.optimizer_state, err.optimizer_state)


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("optimizer, weight_decay", OPTIMIZERS,
                         ids=[f"{o}-wd{w}" for o, w in OPTIMIZERS])
@pytest.mark.parametrize("padding_idx", [-1, None])
def test_off_treats_bad_ids_as_padding(backend, device, optimizer, weight_decay, padding_idx):
    if backend == "reference" and optimizer is not None:
        pytest.skip("the reference backend has a dense gradient only")
    off, err, pad = _twins(backend, device, optimizer, padding_idx, weight_decay)
    base = sample_inputs(device, 7, pad=padding_idx)
    bad, padded = _with_bad_ids(base), _with_bad_ids(base, pad_with=pad)
    with pytest.raises(IndexError, match="out of range"):  # the default still raises
        err(bad)
    _steps_agree(off, err, bad, padded, optimizer)


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_off_hot_row_and_many_bad_ids(backend, device, optimizer):
    """A row looked up 100 times and 90 bad ids (more than the CUDA kernel's 64-entry limit
    for a run handled by one group: the hot row and the padding tail after the last run go to
    the block-per-run kernel), in single ids and in a mean bag."""
    if backend == "reference":
        pytest.skip("the reference backend has a dense gradient only")
    feats = [("a", 5), ("b", 4, "mean")]
    off, err, pad = _twins(backend, device, optimizer, -1, 0.05, feats)
    ids_a = torch.tensor([2] * 100 + [7, -3, 2**33] * 30 + [1, 4], device=device)
    vals_b = torch.tensor([3] * 70 + [4, -2] * 45 + [0], device=device)
    offs_b = torch.tensor([0, 100, 100, 161], device=device)
    bad = {"a": ids_a[:3 * 64].reshape(3, 64), "b": (vals_b, offs_b)}
    padded = {"a": torch.where((bad["a"] < 0) | (bad["a"] >= 5), pad, bad["a"]),
              "b": (torch.where((vals_b < 0) | (vals_b >= 4), pad, vals_b), offs_b)}
    _steps_agree(off, err, bad, padded, optimizer)


@pytest.mark.parametrize("backend, device", CASES)
def test_off_batch_of_only_bad_ids_touches_nothing(backend, device):
    optimizer = None if backend == "reference" else "rowwise_adagrad"
    mod = MultiTableEmbedding(2, [("a", 5), ("b", 4, "mean")], DIMS, optimizer=optimizer,
                              lr=0.5, weight_decay=0.1, bounds_check="off", backend=backend,
                              device=device)
    w0 = mod.weight.detach().clone()
    ids = {"a": torch.tensor([5, -3, 2**40], device=device),
           "b": (torch.tensor([4, 9, -2], device=device), torch.tensor([0, 2, 2, 3],
                                                                       device=device))}
    outs = mod(ids)
    assert all(float(o.detach().abs().sum()) == 0.0 for o in outs)
    loss_of(outs, [torch.ones_like(o) for o in outs]).backward()
    assert torch.equal(mod.weight.detach(), w0)
    if optimizer is None:
        assert float(mod.weight.grad.abs().sum()) == 0.0
    else:
        assert float(mod.optimizer_state.abs().sum()) == 0.0


@pytest.mark.parametrize("backend, device",
                         backend_device_params(backends=("cuda", "triton")))
def test_off_malformed_offsets_read_nothing_out_of_range(backend, device):
    """Off, the device backends do not validate offsets either (that needs a sync): malformed
    ones give unspecified bags but never an out-of-range read, a crash or a non-finite value."""
    mod = MultiTableEmbedding(2, [("a", 5), ("t", 6)], DIMS, optimizer="sgd", lr=0.1,
                              bounds_check="off", backend=backend, device=device)
    values = torch.tensor([1, 2, 3, 4], device=device)
    for offsets in ([0, 3, 1, 4], [2, 9, 9, 4], [-5, 1, 2, 100], [0, 0, 0, 7]):
        ids = {"a": torch.tensor([0, 1, 4], device=device),
               "t": (values, torch.tensor(offsets, device=device))}
        outs = mod(ids)
        loss_of(outs, [torch.ones_like(o) for o in outs]).backward()
        assert all(torch.isfinite(o).all() for o in outs)
        assert torch.isfinite(mod.weight).all()
    if device == "cuda":
        torch.cuda.synchronize()  # no device-side fault was left behind


# ------------------------------------------------------------------------------------------------
# bounds_check="warn": "off" plus the lookup's check, a warning instead of IndexError
# ------------------------------------------------------------------------------------------------
WARN_OPTIMIZERS = [(None, 0.0), ("sgd", 0.0), ("rowwise_adagrad", 0.05)]
TRIGGERED = re.compile(r" \(Triggered internally at .*\)$")  # TORCH_WARN's suffix (C++ kernels)


@pytest.fixture(autouse=True)
def _warnings_rearmed():
    """Every test starts with no feature warned about (the registry is per process)."""
    reset_bad_id_warnings()
    yield
    reset_bad_id_warnings()


def _bad_id_warnings(fn) -> list[str]:
    """The bounds_check='warn' messages ``fn()`` emits (every one shown), without TORCH_WARN's
    suffix."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fn()
    assert all(w.category is UserWarning for w in seen if "bounds_check='warn'" in str(w.message))
    return [TRIGGERED.sub("", str(w.message)) for w in seen
            if "bounds_check='warn'" in str(w.message)]


def _bad_count(ids, padding_idx):
    from cetnet_kernels.embedding_args import invalid_ids
    return sum(int(invalid_ids(x if isinstance(x, torch.Tensor) else x[0], VOCAB[k],
                               padding_idx).sum()) for k, x in ids.items())


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("optimizer, weight_decay", WARN_OPTIMIZERS,
                         ids=[f"{o}-wd{w}" for o, w in WARN_OPTIMIZERS])
@pytest.mark.parametrize("padding_idx", [-1, None])
def test_warn_reads_bad_ids_as_padding_and_warns_once_per_feature(backend, device, optimizer,
                                                                  weight_decay, padding_idx):
    if backend == "reference" and optimizer is not None:
        pytest.skip("the reference backend has a dense gradient only")
    warn, err, pad = _twins(backend, device, optimizer, padding_idx, weight_decay)
    warn.bounds_check = "warn"
    base = sample_inputs(device, 7, pad=padding_idx)
    bad, padded = _with_bad_ids(base), _with_bad_ids(base, pad_with=pad)
    # the warning is the error a module with the same padding_idx raises, plus the count
    strict = MultiTableEmbedding(2, FEATURES, DIMS, padding_idx=padding_idx,
                                 optimizer=optimizer, backend=backend, device=device,
                                 weights_dtype=torch.float64)
    with pytest.raises(IndexError) as error:
        strict(bad)
    n = _bad_count(bad, padding_idx)
    name = re.search(r"feature '([^']*)'", error.value.args[0]).group(1)
    expected = (f"{error.value.args[0]}; bounds_check='warn': {n} ids out of range in this "
                "lookup, read as padding (zero vectors, no gradient or update). Warned once "
                f"per feature: later out-of-range ids of '{name}' are read as padding without a "
                "warning (cetnet_kernels.reset_bad_id_warnings() re-arms it)")
    bad_features = {k for k, x in bad.items() if _bad_count({k: x}, padding_idx) > 0}
    warned = []
    # Each step reports the first bad id among the features not warned about yet: one new
    # feature per step until every bad feature is known, then silence; after a reset, the
    # first message again.
    for step in range(len(bad_features) + 2):
        if step == len(bad_features) + 1:
            reset_bad_id_warnings()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            _steps_agree(warn, err, bad, padded, optimizer, steps=1)
        ours = [w for w in seen if "bounds_check='warn'" in str(w.message)]
        messages = [TRIGGERED.sub("", str(w.message)) for w in ours]
        if step == len(bad_features):
            assert messages == [], (step, messages)
            continue
        assert len(messages) == 1, (step, messages)  # forward only: backward is silent
        if step in (0, len(bad_features) + 1):
            assert messages == [expected], (step, messages)
        assert f"; bounds_check='warn': {n} ids out of range in this lookup" in messages[0]
        if step < len(bad_features):
            warned.append(re.search(r"feature '([^']*)'", messages[0]).group(1))
        assert all(w.category is UserWarning for w in ours)
        if backend in ("reference", "triton"):  # Python warnings name the caller's line
            assert all(w.filename == __file__ for w in ours), [w.filename for w in ours]
    assert len(warned) == len(set(warned)) and set(warned) == bad_features, warned


@pytest.mark.parametrize("backend, device", CASES)
def test_warn_once_per_feature_across_modules(backend, device):
    """Each feature is warned about the first time it has a bad id, in any module on any
    backend: a lookup reports its first bad id among the features not warned about yet (a
    feature bad in every batch does not hide another's), and is silent when all are known."""
    optimizer = None if backend == "reference" else "sgd"

    def make():
        return MultiTableEmbedding(2, [("a", 5), ("t", 6)], DIMS, optimizer=optimizer,
                                   bounds_check="warn", backend=backend, device=device)

    mod, other = make(), make()
    offsets = torch.tensor([0, 1, 3, 4], device=device)
    good_t = torch.tensor([1, 2, 3, 4], device=device)

    def lookup(module, a, t):
        outs = module({"a": torch.tensor(a, device=device),
                       "t": (torch.tensor(t, device=device), offsets)})
        loss_of(outs, [torch.ones_like(o) for o in outs]).backward()

    first = _bad_id_warnings(lambda: lookup(mod, [0, 9, 4], good_t.tolist()))
    assert len(first) == 1 and "feature 'a': id 9 " in first[0] and "batch row 1" in first[0]
    assert _bad_id_warnings(lambda: lookup(mod, [7, 1, 2], good_t.tolist())) == []
    assert _bad_id_warnings(lambda: lookup(other, [8, 1, 2], good_t.tolist())) == []
    # 'a' (row 0, known) and 't' (row 2, new): 't' is reported, the count covers both
    t_bad = _bad_id_warnings(lambda: lookup(other, [5, 1, 2], [1, 2, 60, 4]))
    assert len(t_bad) == 1 and "feature 't': id 60 " in t_bad[0] and "2 ids out of" in t_bad[0]
    assert _bad_id_warnings(lambda: lookup(mod, [5, 1, 2], [1, 2, 60, 4])) == []
    reset_bad_id_warnings()
    again = _bad_id_warnings(lambda: lookup(mod, [5, 1, 2], [1, 2, 60, 4]))
    assert len(again) == 1 and "feature 'a': id 5 " in again[0] and "2 ids out of" in again[0]


@pytest.mark.parametrize("backend, device", CASES)
def test_warn_is_silent_on_valid_ids_and_raises_on_malformed_offsets(backend, device):
    optimizer = None if backend == "reference" else "sgd"
    mod = MultiTableEmbedding(2, [("a", 5), ("t", 6)], DIMS, optimizer=optimizer, lr=0.1,
                              bounds_check="warn", backend=backend, device=device)
    values = torch.tensor([1, 2, 3, 4], device=device)
    ids = {"a": torch.tensor([0, 1, 4], device=device),
           "t": (values, torch.tensor([0, 1, 3, 4], device=device))}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        loss_of(mod(ids), [torch.ones(3, 2, d, device=device) for d in DIMS]).backward()
    # (others' warnings aside: Triton 3.6's interpreter warns about numpy conversions)
    assert not [w for w in seen if "out of range" in str(w.message)], [str(w.message) for w in seen]
    w0 = mod.weight.detach().clone()
    for offsets in ([0, 3, 1, 4], [0, 1, 3, 5], [1, 1, 3, 4]):
        with pytest.raises(ValueError, match=re.escape("'t'") + ".*offsets"):
            mod({**ids, "t": (values, torch.tensor(offsets, device=device))})
    if device == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(mod.weight.detach(), w0)


def test_bounds_check_argument_is_validated():
    with pytest.raises(ValueError, match="bounds_check must be one of"):
        MultiTableEmbedding(1, [("a", 5)], 2, bounds_check="ignore")
    assert "bounds_check='off'" in repr(MultiTableEmbedding(1, [("a", 5)], 2,
                                                            bounds_check="off"))


@pytest.mark.parametrize("backend, device", backend_device_params(backends=("triton",)))
@pytest.mark.parametrize("optimizer", [0, 2], ids=["dense", "rowwise_adagrad"])
def test_triton_off_dispatches_no_synchronizing_op(backend, device, optimizer):
    """The Triton host code of a forward and a backward / fused update with bounds checking
    off runs no op that synchronizes with the host (reading a value, nonzero, unique, a copy to
    the CPU), seen through a dispatch mode around the ops' Python implementations; with the
    check on, the forward's one synchronizing read is seen (the detector works)."""
    from cetnet_kernels.triton import embedding as te

    mod = MultiTableEmbedding(2, FEATURES, DIMS, backend="triton", device=device)
    args = mod._normalize(_with_bad_ids(sample_inputs(device, 5)))[0]
    vocab = list(mod._vocab)
    state = torch.zeros(2 * sum(vocab), device=device)
    # (bounds check code, forward synchronizes, backward / update synchronizes): warn (2)
    # checks in the lookup only. A first call (warm-up) copies the layout's constants.
    for check, fwd_sync, bwd_sync in ((1, None, None), (1, False, False), (0, True, True),
                                      (2, True, False)):
        if check != 1:
            args = mod._normalize(sample_inputs(device, 5))[0]
        tail = (args.ids, args.offsets, args.per_sample_weights, args.modes, DIMS, vocab, -1,
                check)
        w = mod.weight.detach().clone()
        outs: list = []
        fwd = synchronizing_ops(lambda: outs.extend(te._multi_embedding(w, *tail,
                                                                        mod._joined_names)))
        grads = [torch.randn_like(o) for o in outs]
        if optimizer == 0:
            bwd = synchronizing_ops(lambda: te._multi_embedding_backward(grads, w, *tail))
        else:
            bwd = synchronizing_ops(lambda: te._multi_embedding_update(
                grads, w, state, *tail, optimizer, 0.1, 1e-8, 0.0))
        if fwd_sync is None:
            continue
        assert ("aten::_local_scalar_dense" in fwd) == fwd_sync, (check, fwd)
        assert bool(bwd) == bwd_sync, (check, bwd)
        if not fwd_sync:
            assert fwd == [], fwd


# ------------------------------------------------------------------------------------------------
# The backward of a lookup trusts the lookup's check
# ------------------------------------------------------------------------------------------------
OP_CASES = backend_device_params(backends=("cpu", "cuda", "triton"))


@contextlib.contextmanager
def _embedding_op_calls(backend: str):
    """Records (op name, bounds_check argument) of every cetnet embedding op call under it, in
    a list: the registered ops through a dispatch mode (those behind autograd too), and the
    implementations that eager calls of the backend's ops run below the dispatcher (Triton)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from cetnet_kernels.embedding_ops import ops_for

    seen: list[tuple[str, int]] = []

    def note(name: str, args) -> None:
        schema = getattr(torch.ops.cetnet, name).default._schema
        names = [a.name for a in schema.arguments]
        seen.append((name, int(args[names.index("bounds_check")])))

    class Calls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name.startswith("cetnet::multi_embedding"):
                note(func._schema.name.split("::")[1], args)
            return func(*args, **(kwargs or {}))

    ops = ops_for(backend)
    suffix = "_triton" if backend == "triton" else ""
    kept = {}
    for attr, name in (("_lookup", "multi_embedding"), ("_fused", "multi_embedding_fused"),
                       ("_backward", "multi_embedding_backward"),
                       ("_update", "multi_embedding_update")):
        fn = kept[attr] = getattr(ops, attr)
        if not isinstance(fn, torch._ops.OpOverload):  # an implementation: no dispatch to see
            def recording(*args, fn=fn, name=name + suffix):
                note(name, args)
                return fn(*args)
            setattr(ops, attr, recording)
    try:
        with Calls():
            yield seen
    finally:
        for attr, fn in kept.items():
            setattr(ops, attr, fn)


@pytest.mark.parametrize("backend, device", OP_CASES)
@pytest.mark.parametrize("optimizer", [None, "sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("path", ["module", "op"])
def test_backward_trusts_the_lookups_check(backend, device, optimizer, path):
    """Through autograd the backward / fused update runs with bounds checking OFF whatever the
    lookup's mode: the lookup has raised for a bad id (error) or read it as padding, as OFF
    does (warn, off), so checking again would only cost the CUDA backend a second
    synchronization per step. ``module``: MultiTableEmbedding (the eager autograd.Functions);
    ``op``: the registered op called with autograd (the formula torch.compile uses). Results
    equal those of the backward op called directly with the lookup's mode."""
    from cetnet_kernels.codes import BoundsCheck
    from cetnet_kernels.embedding_ops import ops_for

    suffix = "_triton" if backend == "triton" else ""
    for mode in ("error", "warn", "off"):
        mod = MultiTableEmbedding(2, FEATURES, DIMS, optimizer=optimizer, lr=0.2,
                                  bounds_check=mode, backend=backend, device=device,
                                  weights_dtype=torch.float64)
        ids = sample_inputs(device, 5)
        grads = [torch.randn(5, 10, d, device=device, dtype=torch.float64) for d in DIMS]
        args = mod._normalize(ids)[0]
        w0 = mod.weight.detach().clone()
        with _embedding_op_calls(backend) as calls:
            if path == "module":
                outs = mod(ids)
            elif optimizer is None:
                outs = getattr(torch.ops.cetnet, "multi_embedding" + suffix).default(*args)
            else:
                state = mod.optimizer_state if mod.optimizer_state is not None \
                    else mod._no_state
                opt = (int({"sgd": 1, "rowwise_adagrad": 2}[optimizer]), mod.lr, mod.eps,
                       mod.weight_decay)
                outs = getattr(torch.ops.cetnet, "multi_embedding_fused" + suffix).default(
                    args.weight, state, mod._placeholder, *args[1:], *opt)
            loss_of(outs, grads).backward()
        lookup, backward = calls[0], calls[-1]
        assert lookup == (("multi_embedding" if optimizer is None or path == "module"
                           else "multi_embedding_fused") + suffix,
                          int(BoundsCheck[mode.upper()])), calls
        assert backward == (("multi_embedding_backward" if optimizer is None
                             else "multi_embedding_update") + suffix,
                            int(BoundsCheck.OFF)), calls
        # the same result as the backward op called directly with the lookup's mode
        ops = ops_for(backend)
        checked = args._replace(weight=w0.clone())
        if optimizer is None:
            expected = ops._backward(grads, checked.weight, *checked.update_args())
            torch.testing.assert_close(mod.weight.grad, expected, rtol=0, atol=0)
        else:
            state = torch.zeros_like(mod.optimizer_state) if optimizer == "rowwise_adagrad" \
                else mod._no_state
            ops._update(grads, checked.weight, state, *checked.update_args(),
                        *OptimizerArgs(int({"sgd": 1, "rowwise_adagrad": 2}[optimizer]),
                                       mod.lr, mod.eps, mod.weight_decay))
            torch.testing.assert_close(mod.weight.detach(), checked.weight, rtol=0, atol=0)


@pytest.mark.parametrize("backend, device", OP_CASES)
@pytest.mark.parametrize("optimizer", [None, "sgd"])
@pytest.mark.parametrize("hooks", [None, "identity", "save_on_cpu"])
def test_ids_changed_in_place_after_the_lookup_are_checked_again(backend, device, optimizer,
                                                                 hooks):
    """The backward trusts the lookup's check only for the ids the lookup saw. An id tensor
    changed in place between lookup and backward (here to an out-of-range id) is refused by
    autograd's saved-tensor check; under a saved-tensor hook that hands back the same tensor
    (an identity hook; save_on_cpu of CPU tensors) autograd lets it through, and the backward,
    seeing the version counters moved, checks again: IndexError, nothing written. (save_on_cpu
    of CUDA tensors hands back the copy made at the lookup: the checked ids, trusted.)"""
    mod = MultiTableEmbedding(2, [("a", 5), ("t", 6)], DIMS, optimizer=optimizer, lr=0.1,
                              backend=backend, device=device)
    twin = MultiTableEmbedding(2, [("a", 5), ("t", 6)], DIMS, optimizer=optimizer, lr=0.1,
                               backend=backend, device=device)
    twin.load_state_dict(mod.state_dict())
    a = torch.tensor([0, 1, 4], device=device)
    ids = {"a": a, "t": (torch.tensor([1, 2, 3, 4], device=device),
                         torch.tensor([0, 1, 3, 4], device=device))}
    twin_outs = twin({"a": a.clone(), "t": ids["t"]})  # the step on the ids as looked up
    loss_of(twin_outs, [torch.ones_like(o) for o in twin_outs]).backward()
    context = {None: contextlib.nullcontext,
               "identity": lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t,
                                                                            lambda t: t),
               "save_on_cpu": torch.autograd.graph.save_on_cpu}[hooks]
    with context():
        outs = mod(ids)
    w0 = mod.weight.detach().clone()
    a[1] = 99
    copied = hooks == "save_on_cpu" and device == "cuda"
    error = (RuntimeError, "modified by an inplace operation") if hooks is None else (
        IndexError, "feature '#0': id 99 is out of range")  # (backward ops: no names)
    if copied:  # the step of the ids as looked up, as the twin's
        loss_of(outs, [torch.ones_like(o) for o in outs]).backward()
        if optimizer is None:
            assert torch.equal(mod.weight.grad, twin.weight.grad)
        else:
            assert torch.equal(mod.weight.detach(), twin.weight.detach())
        return
    with pytest.raises(error[0], match=error[1]):
        loss_of(outs, [torch.ones_like(o) for o in outs]).backward()
    assert torch.equal(mod.weight.detach(), w0)
    assert mod.weight.grad is None


# ------------------------------------------------------------------------------------------------
# GPU only: no synchronization under CUDA's sync debug mode; a CUDA graph of a training step
# ------------------------------------------------------------------------------------------------
GPU_CASES = backend_device_params(backends=("cuda", "triton"), skip_triton_interpreter=True)


@pytest.mark.parametrize("backend, device", GPU_CASES)
@pytest.mark.parametrize("optimizer", [None, "sgd", "rowwise_adagrad"])
def test_gpu_step_off_never_synchronizes(backend, device, optimizer):
    mod = MultiTableEmbedding(2, FEATURES, DIMS, optimizer=optimizer, bounds_check="off",
                              backend=backend, device=device)
    ids = _with_bad_ids(sample_inputs(device, 64))
    grads = [torch.randn(64, 10, d, device=device) for d in DIMS]
    loss_of(mod(ids), grads).backward()  # warm-up: compilation, caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss_of(mod(ids), grads).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    if backend != "triton":
        return
    # The default mode's check does synchronize: the debug mode sees it (the detector works;
    # checked on the Triton path, whose check is Python code).
    checked = MultiTableEmbedding(2, FEATURES, DIMS, backend=backend, device=device)
    checked_ids = sample_inputs(device, 64)  # (made before: a copy from pageable memory waits)
    checked(checked_ids)  # (first call of the layout: its constants, one wait)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            checked(checked_ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend, device", GPU_CASES)
@pytest.mark.parametrize("optimizer", [None, "sgd", "rowwise_adagrad"])
def test_gpu_backward_of_a_checked_lookup_never_synchronizes(backend, device, optimizer):
    """The default ("error") lookup synchronizes once, for its check; the backward / fused
    update after it does not check again and never waits for the GPU."""
    mod = MultiTableEmbedding(2, FEATURES, DIMS, optimizer=optimizer, backend=backend,
                              device=device)
    ids = sample_inputs(device, 64)
    grads = [torch.randn(64, 10, d, device=device) for d in DIMS]
    loss_of(mod(ids), grads).backward()  # warm-up: compilation, caches
    outs = mod(ids)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss_of(outs, grads).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend, device", GPU_CASES)
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_graph_captures_a_fused_training_step(backend, device, optimizer, dtype):
    """With bounds checking off, forward + backward + fused update of the CUDA and Triton
    backends is captured by torch.cuda.graph (after warm-up on a side stream, as its docs ask:
    it also makes the Triton path's layout constants and compiled kernels) and each replay
    equals an eager step of a twin module on the same batch. float64 tables too: their
    settings are kernel arguments as well (Triton: bit patterns), nothing uploaded per call."""
    B = 256

    def make():
        torch.manual_seed(0)
        return MultiTableEmbedding(2, FEATURES, DIMS, optimizer=optimizer, lr=0.05,
                                   bounds_check="off", backend=backend, device=device,
                                   weights_dtype=dtype)

    graphed, eager = make(), make()
    ids = _with_bad_ids(sample_inputs(device, B))
    grads = [torch.randn(B, 10, d, device=device) for d in DIMS]

    def step(mod):
        loss_of(mod(ids), grads).backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(graphed)
            step(eager)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graphed)
    for _ in range(3):  # capturing ran nothing: both have had the 3 warm-up steps
        graph.replay()
        step(eager)
    torch.cuda.synchronize()
    torch.testing.assert_close(graphed.weight, eager.weight, rtol=0, atol=0)
    if optimizer == "rowwise_adagrad":
        torch.testing.assert_close(graphed.optimizer_state, eager.optimizer_state, rtol=0,
                                   atol=0)


@pytest.mark.parametrize("compiled", [True, False])
def test_warned_features_registry(monkeypatch, compiled):
    """One registry of warned features: the compiled extension's (its kernels report there), or
    a Python one when the extension is not loaded."""
    from cetnet_kernels import _extension
    from cetnet_kernels.embedding_args import _first_bad_id_warning
    if compiled and _extension._C is None:
        pytest.skip("the compiled extension is not loaded")
    if not compiled:
        monkeypatch.setattr(_extension, "_C", None)
    from cetnet_kernels.codes import BoundsCheck
    from cetnet_kernels.embedding_args import warned_features
    assert _first_bad_id_warning("x") and _first_bad_id_warning("y")
    assert not _first_bad_id_warning("x")
    assert warned_features(["x", "z", "y"], BoundsCheck.WARN) == {0, 2}
    assert warned_features(["x", "z", "y"], BoundsCheck.ERROR) == set()  # errors name any
    reset_bad_id_warnings()
    assert _first_bad_id_warning("x") and not _first_bad_id_warning("x")
