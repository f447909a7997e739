"""Choice of the implementation behind each fused op."""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable, Generic, TypeVar

import torch
from torch import Tensor
from torch._C import _functions as _autograd_functions
from torch.autograd import forward_ad as _forward_ad

from cetnet_kernels._extension import HAS_C, _C
from cetnet_kernels._host import shape_only

try:
    from torch.fx.experimental.proxy_tensor import get_proxy_mode as _proxy_mode
except ImportError:  # pragma: no cover (an older torch without it)
    _proxy_mode = None  # type: ignore[assignment]

__all__ = ["BACKENDS", "EagerOp", "OpTable", "TritonLoader", "available_backends",
           "first_order", "resolve_backend", "traced"]

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_HAS_C_CUDA = HAS_C and bool(_C.build_info()["cuda"])


def _triton_runs_on(device: torch.device) -> bool:
    if not _HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    # The interpreter runs Triton kernels on CPU tensors (used by the tests).
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on tensors of ``device`` in this installation."""
    device = torch.device(device)
    out = ["reference"]
    if HAS_C and device.type == "cpu":
        out.append("cpu")
    if _HAS_C_CUDA and device.type == "cuda":
        out.append("cuda")
    if _triton_runs_on(device):
        out.append("triton")
    return out


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turns ``backend`` ("auto" or a name; env CETNET_BACKEND overrides "auto") into the name of
    a backend that can run on ``device``, or raises ValueError/RuntimeError saying why not."""
    if backend == "auto":
        backend = os.environ.get("CETNET_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            if _HAS_C_CUDA:
                return "cuda"
            return "triton" if _HAS_TRITON else "reference"
        if device.type == "cpu" and HAS_C:
            return "cpu"
        return "reference"
    if backend == "reference":
        return backend
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend 'cpu' needs CPU tensors, got tensors on {device}")
        if not HAS_C:
            raise RuntimeError("backend 'cpu' is not available: cetnet_kernels._C is not built")
        return backend
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend 'cuda' needs CUDA tensors, got tensors on {device}")
        if not _HAS_C_CUDA:
            raise RuntimeError(
                "backend 'cuda' is not available: cetnet_kernels._C was built without CUDA "
                "(build with a CUDA torch and nvcc, or CETNET_CUDA=1)"
            )
        return backend
    if not _triton_runs_on(device):
        why = "triton is not installed" if not _HAS_TRITON else (
            f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device}")
        raise RuntimeError(f"backend 'triton' is not available: {why}")
    return backend


class TritonLoader:
    """Loads one op family's Triton ops: ``load`` imports the module that defines them and
    registers what they need. It runs at import when Triton can run here (a GPU, or the
    interpreter), so that torch.compile never traces the registration; a broken Triton install
    is remembered, not raised, so the other backends keep working, and :meth:`ensure` says why
    when the triton backend is asked for."""

    def __init__(self, load: Callable[[], None]) -> None:
        self._load = load
        self.loaded = False
        self.error: str | None = None
        if (torch.cuda.is_available() and _triton_runs_on(torch.device("cuda"))) \
                or _triton_runs_on(torch.device("cpu")):
            try:
                self._run()
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}"

    def _run(self) -> None:
        self._load()
        self.loaded = True

    def ensure(self) -> None:
        """Loads the ops if not yet done; RuntimeError if loading failed at import."""
        if self.loaded:
            return
        if self.error is not None:
            raise RuntimeError(f"backend 'triton' failed to load: {self.error}")
        self._run()


Ops = TypeVar("Ops")


class OpTable(Generic[Ops]):
    """The registered ops of one op family, per backend name: ``compiled()`` gives the C++ ops
    (run once at construction, when ``cetnet_kernels._C`` is loaded; shared by "cpu" and
    "cuda") and ``load_triton()`` imports and registers the Triton ones (through a
    :class:`TritonLoader`, so at import where Triton can run, else on first use).

    Args:
        compiled: returns the C++ family's ops (after registering their fakes/autograd), or
            None when the family has no compiled ops.
        load_triton: returns the Triton family's ops after registering what they need.
    """

    def __init__(self, compiled: Callable[[], Ops] | None, load_triton: Callable[[], Ops]) -> None:
        self._ops: dict[str, Ops] = {}
        if HAS_C and compiled is not None:
            self._ops["cpu"] = self._ops["cuda"] = compiled()
        self.triton = TritonLoader(lambda: self._ops.__setitem__("triton", load_triton()))

    def __call__(self, backend: str) -> Ops:
        """The ops of a resolved ``backend`` ("cpu", "cuda" or "triton"; not "reference");
        RuntimeError when the Triton ops failed to load."""
        if backend == "triton":
            self.triton.ensure()
        return self._ops[backend]


def first_order(backward: Callable[..., Any], op: str) -> Callable[..., Any]:
    """``backward`` (an autograd formula of the op named ``op``) run without building a
    graph; with ``create_graph=True`` its gradients come out requiring grad through a node that
    raises when it is differentiated (as ``once_differentiable`` does only when an upstream
    gradient requires grad), so a second derivative through the op is an error, never silently
    zero. The node also takes the tensors the op saved that require grad (its inputs, or its
    outputs, whose graph leads to them): a second backward restricted to the inputs
    (``autograd.grad(penalty, params)``) reaches it too."""
    message = (f"{op} has no second derivative: its gradient cannot be differentiated again "
               "(create_graph=True)").encode()

    def first_order_backward(ctx: Any, *grads: Any) -> Any:
        with torch.no_grad():
            out = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return out
        out = out if isinstance(out, tuple) else (out,)
        where = [i for i, g in enumerate(out) if isinstance(g, Tensor)]
        if not where:
            return out
        anchors = [t for t in ctx.saved_tensors if isinstance(t, Tensor) and t.requires_grad]
        marked = _autograd_functions.DelayedError(message, len(where) + len(anchors))(
            *[out[i].detach().requires_grad_() for i in where], *anchors)
        marked = marked if isinstance(marked, tuple) else (marked,)
        result = list(out)
        for i, g in zip(where, marked):
            result[i] = g
        return tuple(result)
    return first_order_backward


def _name(op: Any) -> str:
    """``"cetnet::<name>"`` of a registered op (an OpOverload), else its str."""
    return op.name() if isinstance(op, torch._ops.OpOverload) else str(op)


def traced(t: Tensor | None) -> bool:
    """Whether a call with tensor ``t`` among its arguments is being traced, so that it must go
    through the registered op rather than run its implementation: under torch.compile or
    torch.export (compiled autograd included), with fake or meta tensors, or under make_fx's
    proxy mode (which records ops, and would miss the kernels of an implementation); also
    under torch.func transforms and inside a forward-mode AD level (``dual_level``), where
    the registered op gets torch's handling (vmap's fallback; an error for a jvp the op does
    not define) instead of an implementation dropping the tangents silently."""
    return (torch.compiler.is_compiling()
            or (t is not None and (shape_only(t) or _functorch_wrapped(t)))
            or (_proxy_mode is not None and _proxy_mode() is not None)
            or _in_dual_level())


def _in_dual_level() -> bool:
    """Whether a forward-mode AD level (``torch.autograd.forward_ad.dual_level``) is open.
    torch keeps the level in a private module global; read defensively, as it is not API."""
    return _forward_ad.__dict__.get("_current_level", -1) >= 0


def _functorch_wrapped(t: Tensor) -> bool:
    """Whether ``t`` is a torch.func transform's wrapper (vmap's batched tensor, grad's
    tracking tensor): only the registered op knows how to run on it (vmap: torch's batching
    rule or fallback), an implementation would read its storage."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def refuse_unsupported_ad(op: str, backend: str, *tensors: Tensor) -> None:
    """RuntimeError naming ``op`` when one of ``tensors`` is being differentiated in a way the
    kernel backends cannot: by a torch.func transform (grad, vjp, jvp, jacrev, ...: their autograd
    is a C++ ``torch::autograd::Function`` or torch.library's Python one, neither of which
    functorch can run, and torch's own message names neither the op nor a way out), or in
    forward mode (a dual tensor's tangent; torch.library's Python ops would silently drop it).
    vmap works: the ops take torch's batching fallback."""
    if torch.compiler.is_compiling():
        return
    if any(torch._C._functorch.is_gradtrackingtensor(t) for t in tensors):
        raise RuntimeError(
            f"{op}: backend {backend!r} does not support torch.func's differentiation "
            f"transforms (grad, vjp, jvp, jacrev, jacfwd, ...): its autograd cannot run "
            f"under functorch. Use "
            f"backend='reference' under torch.func, or torch.autograd (loss.backward(), "
            f"torch.autograd.grad) with this backend")
    if _in_dual_level() and any(
            _forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError(
            f"{op}: backend {backend!r} does not support forward-mode AD (dual tensors, "
            f"torch.func.jvp): use backend='reference', or reverse mode (loss.backward())")


class EagerOp:
    """A Python-implemented op (the Triton ones) called without torch.library's Python layers
    in eager mode.

    Through the dispatcher, an op registered with ``torch.library.custom_op`` / ``triton_op``
    boxes its arguments and runs the Python autograd wrapper of ``register_autograd``: on the
    CI CPU ~60 us per call for the dispatch and ~200 us per training step for the wrapper, more
    than the kernels take at CTR batch sizes on a GPU. In eager mode this calls ``impl`` (the
    op's own implementation, with launches straight to Triton) inside an
    ``torch.autograd.Function`` built from the same ``setup_context`` / ``backward`` formulas as
    the registered autograd; under torch.compile (and torch.export) it calls the registered
    ``op``, which is what tracing needs (see :func:`traced`). Same kernels and formulas either
    way: the results are bitwise equal. The gradients are first-order only: differentiating
    them again (``create_graph=True``, then a backward through them) raises, naming the op,
    instead of treating them as constants.

    Args:
        op: the registered op (``torch.ops.cetnet.<name>.default``).
        impl: the op's implementation, called with the op's arguments.
        setup_context, backward: the op's autograd formulas (as for ``register_autograd``), or
            None for an op that is not differentiable (backward ops).
    """

    def __init__(self, op: Callable[..., Any], impl: Callable[..., Any],
                 setup_context: Callable[..., None] | None = None,
                 backward: Callable[..., Any] | None = None) -> None:
        self.op = op
        self.impl = impl
        self._function: type[torch.autograd.Function] | None = None
        if backward is not None and setup_context is not None:
            def forward(ctx: Any, *args: Any) -> Any:
                # (A separate setup_context staticmethod would make every apply() bind the
                # arguments through inspect.signature: ~60 us.)
                output = impl(*args)
                setup_context(ctx, args, output)
                return output

            self._function = type(f"Eager_{getattr(impl, '__name__', 'op')}",
                                  (torch.autograd.Function,),
                                  {"forward": staticmethod(forward),
                                   "backward": staticmethod(first_order(backward, _name(op)))})

    def __call__(self, *args: Any) -> Any:
        if traced(next((a for a in args if isinstance(a, Tensor)), None)):
            return self.op(*args)
        if self._function is not None and torch.is_grad_enabled() and any(
                isinstance(a, Tensor) and a.requires_grad for a in args):
            return self._function.apply(*args)
        return self.impl(*args)
