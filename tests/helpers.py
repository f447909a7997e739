"""Helpers shared by the test modules: backends to test, tolerances, reference gradients."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from cetnet_kernels import available_backends, collaborative_loss_reference

TERMS = {
    "ensemble": dict(ensemble_weight=1.0, member_weight=0.0),
    "member": dict(ensemble_weight=0.0, member_weight=1.0),
    "distill": dict(ensemble_weight=0.0, member_weight=0.0, distill_weight=1.0),
    "mutual": dict(ensemble_weight=0.0, member_weight=0.0, mutual_weight=1.0),
    "all": dict(ensemble_weight=0.7, member_weight=0.4, distill_weight=0.3, mutual_weight=0.2),
}


def compiled_backends(device: str) -> list[str]:
    """Every non-reference backend that runs on ``device`` here."""
    return [b for b in available_backends(device) if b != "reference"]


def all_backend_params(device: str = "cpu") -> list[str]:
    return available_backends(device)


def make_logits(B: int, K: int, *, scale: float = 3.0, dtype=torch.float64, device="cpu"):
    return (torch.randn(B, K, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def sample_inputs(device, B: int = 37, K: int = 5, *, dtype=torch.float64):
    """The shared input of the fusion op family (confidence_fusion, collaborative_loss):
    ``(logits [B, K], labels [B], temperature 0-dim)`` on ``device``, in ``dtype``: logits of
    scale 3 with one saturated member, 0/1 labels, temperature 0.7."""
    g = torch.Generator().manual_seed(7)
    z = torch.randn(B, K, generator=g, dtype=torch.float64) * 3.0
    z[0, 0] = 100.0
    y = (torch.rand(B, generator=g, dtype=torch.float64) > 0.5).double()
    tau = torch.tensor(0.7, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (z, y, tau))


def reference_loss_grads(z, y, tau, *, reduction="mean", grad_prob=None, **kw):
    """Loss, prob and autograd gradients (logits, temperature) of the float64 reference."""
    z64 = z.detach().double().requires_grad_()
    t64 = torch.tensor(float(tau), dtype=torch.float64, requires_grad=True)
    loss, prob = collaborative_loss_reference(z64, y.double(), t64, reduction=reduction, **kw)
    total = loss.sum()
    if grad_prob is not None:
        total = total + (prob * grad_prob.double()).sum()
    gz, gt = torch.autograd.grad(total, [z64, t64], allow_unused=True)
    if gt is None:
        gt = torch.zeros((), dtype=torch.float64)
    return loss.detach(), prob.detach(), gz, gt


def lowp_tolerance_ok(ours, ref_lowp, ref64, atol: float) -> tuple[bool, float, float]:
    """flash-attention rule: our low-precision error is at most 2x the low-precision reference's
    error (both against float64), plus a small absolute slack."""
    err = (ours.double() - ref64).abs().max().item()
    base = (ref_lowp.double() - ref64).abs().max().item()
    return err <= 2 * base + atol, err, base


# torch.library.opcheck imports expecttest, which a bare GPU image may lack.
requires_expecttest = pytest.mark.skipif(
    importlib.util.find_spec("expecttest") is None,
    reason="torch.library.opcheck needs the 'expecttest' package (pip install expecttest)")


#: Ops that make a GPU host wait for the device: reading a value, nonzero, unique, a Python
#: number made a tensor (on CUDA a copy from pageable memory). A dispatch mode sees them on CPU
#: tensors too, so the CPU suite catches a synchronization a GPU run would pay.
SYNCHRONIZING_OPS = frozenset({
    "aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::lift_fresh",
    "aten::masked_select", "aten::is_nonzero", "aten::equal", "aten::unique_consecutive",
    "aten::_unique2", "aten::unique_dim"})

#: Indexing ops that synchronize when an index is a boolean mask (they run nonzero inside,
#: where a dispatch mode does not see it).
_INDEXING_OPS = frozenset({"aten::index", "aten::index_put", "aten::index_put_",
                           "aten::_index_put_impl_"})

def compiled_autograd():
    """A context under which backward runs through compiled autograd (dynamo traces it; the
    aot_eager backend, fullgraph); its entry point is ``_enable`` in recent torch versions,
    ``enable`` in older ones."""
    import torch._dynamo.compiled_autograd as ca

    enable = getattr(ca, "_enable", None) or ca.enable
    torch._dynamo.reset()
    return enable(torch.compile(backend="aot_eager", fullgraph=True))


def dispatched_ops(fn):
    """``(names, fn())``: the set of op names ``fn()`` dispatches, as a TorchDispatchMode sees
    them (ops behind autograd included; what runs below the dispatcher is not seen)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func._schema.name)
            return func(*args, **(kwargs or {}))

    with Seen() as seen:
        out = fn()
    return seen.names, out


#: Tensor methods that read a device tensor's values into Python or host memory without an op
#: a dispatch mode sees when the tensor is on the CPU (as it is in these tests).
_HOST_READS = ("tolist", "numpy", "cpu")


def _sync_name(func, args: tuple, kwargs: dict) -> str | None:
    """The name :func:`synchronizing_ops` records for this dispatched op call, or None."""
    name = func._schema.name
    if name in SYNCHRONIZING_OPS:
        return name
    if name in _INDEXING_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
               for i in indices):
            return f"{name} (boolean mask)"
    if name in ("aten::_to_copy", "aten::copy_"):  # a device tensor copied to the host
        src = args[1] if name == "aten::copy_" else args[0]
        to_host = (args[0].device.type == "cpu" if name == "aten::copy_"
                   else kwargs.get("device") == torch.device("cpu"))
        if isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta") and to_host:
            return f"{name} (to the host)"
    return None


def synchronizing_ops(fn, *, host_code: tuple[str, ...] = ()) -> list[str]:
    """What of ``fn()`` would make a GPU host wait for the device, in order: the
    :data:`SYNCHRONIZING_OPS` it dispatches, boolean-mask indexing, copies of a device tensor to
    the host, and calls of ``Tensor.tolist`` / ``numpy`` / ``cpu`` (on CPU tensors a dispatch
    mode sees no op for those). ``host_code``: path fragments of files whose tensors stay on
    the host in a GPU run too (e.g. the data pipeline): what is called from them is not
    recorded."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    def from_host_code() -> bool:
        return bool(host_code) and any(part in frame.filename for frame in
                                       traceback.extract_stack() for part in host_code)

    class Syncs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = _sync_name(func, args, kwargs or {})
            if name is not None and not from_host_code():
                self.seen.append(name)
            return func(*args, **(kwargs or {}))

    def recording(method: str, original):
        def read(self, *args, **kwargs):
            if not from_host_code():
                mode.seen.append(f"Tensor.{method}")
            return original(self, *args, **kwargs)
        return read

    own = {m: torch.Tensor.__dict__.get(m) for m in _HOST_READS}  # (None: inherited)
    mode = Syncs()
    try:
        for m in _HOST_READS:
            setattr(torch.Tensor, m, recording(m, getattr(torch.Tensor, m)))
        with mode:
            fn()
    finally:
        for m, original in own.items():
            if original is None:
                delattr(torch.Tensor, m)
            else:
                setattr(torch.Tensor, m, original)
    return mode.seen


def flip_a_stored_byte(data: bytes) -> bytes:
    """``data`` (a ``torch.save`` file) with one bit in the middle of its largest stored
    tensor changed: the file still loads, another value in place (a disk's or a copy's flipped
    bit), which only the zip members' CRCs tell."""
    import io
    import struct
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename),  # tensors
                   key=lambda i: i.file_size)
    # the member's bytes follow its local header (30 bytes, then its name and extra field)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:
                                                   info.header_offset + 30])
    # the lowest bit of an element (little-endian: its first byte): an id one off, a float a
    # rounding apart: values that still pass every range check
    at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2 // 8 * 8
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]
