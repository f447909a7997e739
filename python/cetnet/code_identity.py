"""Which code computed a result: cetnet's version, torch's, a digest of the sources that
training's numbers depend on, and the device they ran on.

``cetnet reproduce`` keys its cached results by config; two builds of cetnet can train one
config to different numbers (a kernel's summation order, a model fix), so every result also
records the :func:`code_identity` that trained it, and results of other code are not paired
with new ones unless asked (docs/REPRODUCE.md, "Caching").

The digest covers the Python sources of ``cetnet`` and ``cetnet_kernels`` as code (their syntax
trees without docstrings and comments: editing prose changes nothing; the syntax tree's printed
form depends on Python's minor version, which the identity names) except the modules that
only present results (:data:`PRESENTATION_MODULES`), the plugin modules loaded
(``cetnet --plugin``: their datasets and models train by their code), and the bytes of the
compiled extension this process loaded (``cetnet_kernels._C``: what runs, not the sources
beside it, which may have been edited without a rebuild).

The identity also names the device a config's ``device`` setting trains on here (``cpu``, or the
GPU's name and compute capability with Triton's version): a GPU runs other kernels than the CPU
(and its own speed), so a result trained on one is other code for the other, as a machine with
``device: auto`` resolves to whichever it has.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Iterable

__all__ = ["COMPARED", "PRESENTATION_MODULES", "code_identity", "code_tag", "describe",
           "device_identity", "fuxictr_identity", "same_code", "source_digest"]

#: Modules (relative to the directory holding the packages) that read, render or serve
#: results but never compute one: editing them keeps the digest, so a report can be re-rendered
#: from its cache after a change to how it is written.
PRESENTATION_MODULES = frozenset({
    "cetnet/catalog.py", "cetnet/cli.py", "cetnet/demo.py", "cetnet/messages.py",
    "cetnet/plan.py", "cetnet/serve.py", "cetnet/code_identity.py",
    "cetnet/reproduce/__main__.py", "cetnet/reproduce/report.py",
    "cetnet/reproduce/study_report.py", "cetnet/reproduce/stats.py",
    "cetnet/search/__main__.py", "cetnet/search/compare.py", "cetnet/search/report.py",
})

#: What :func:`same_code` compares: the digest, the versions outside it, the CPU kernel build in
#: use (``default``, ``avx2``, ``avx512``: they may round differently in the last bits), and the
#: device with, on a GPU, Triton's version (its kernels are compiled by it); a result FuxiCTR
#: trained (a peer row of ``cetnet reproduce``) names FuxiCTR's version too.
COMPARED = ("digest", "torch", "python", "cetnet", "cpu", "device", "triton", "fuxictr")


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _python_code(path: Path) -> bytes:
    """The module as code: its syntax tree without docstrings (comments are not in it)."""
    source = path.read_bytes()
    try:
        tree = ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError):
        return source
    return ast.dump(_without_docstrings(tree), include_attributes=False).encode()


def source_digest(files: Iterable[tuple[str, Path]]) -> str:
    """A digest (16 hex digits) of ``(name, path)`` files: Python files as code (see the module
    docstring), other files as bytes; independent of the order given."""
    h = hashlib.sha256()
    for name, path in sorted(files):
        h.update(name.encode() + b"\0")
        h.update(_python_code(path) if path.suffix == ".py" else path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _plugin_files(plugins: tuple[str, ...]) -> list[tuple[str, Path]]:
    """The Python files of the plugin modules loaded (a package: every file under it): a
    dataset or model a plugin registers trains by its code."""
    files: list[tuple[str, Path]] = []
    for name in plugins:
        module = sys.modules.get(name)
        where = getattr(module, "__file__", None)
        if not where:
            continue
        path = Path(where)
        paths = sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]
        files += [(f"plugin:{name}/{p.relative_to(path.parent).as_posix()}", p) for p in paths
                  if p.is_file()]  # (an editor's lock file is a dangling .py link)
    return files


def _package_files() -> list[tuple[str, Path]]:
    import cetnet
    import cetnet_kernels

    files: list[tuple[str, Path]] = []
    for package in (cetnet, cetnet_kernels):
        root = Path(str(package.__file__)).parent
        for path in root.rglob("*.py"):
            name = path.relative_to(root.parent).as_posix()
            if name not in PRESENTATION_MODULES and path.is_file():
                files.append((name, path))
    from cetnet_kernels import _extension

    loaded = getattr(_extension._C, "__file__", None)
    if loaded:  # the binary that runs (without it the ops run their Python references)
        files.append(("cetnet_kernels/_C", Path(loaded)))
    return files


@functools.lru_cache(maxsize=None)
def _fixed_identity(plugins: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    import torch

    try:
        version = metadata.version("cetnet")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return (("cetnet", version), ("torch", torch.__version__),
            ("python", "{}.{}".format(*sys.version_info[:2])),
            ("digest", source_digest(_package_files() + _plugin_files(plugins))))


def device_identity(device: str) -> dict[str, str]:
    """What a config's ``device`` setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``) trains on in
    this process: ``{"device": "cpu"}``, or ``{"device": "<GPU name> (sm_XY)", "triton":
    version or "none"}``; a CUDA device this machine lacks is ``"<setting> (unavailable)"``
    (training it is refused elsewhere, with the reason)."""
    import torch

    from cetnet.config import ConfigError
    from cetnet.train.loop import resolve_device

    try:
        resolved = resolve_device(device)
    except ConfigError:
        return {"device": f"{device} (unavailable)"}
    if resolved.type != "cuda":
        return {"device": resolved.type}
    major, minor = torch.cuda.get_device_capability(resolved)
    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = "none"
    return {"device": f"{torch.cuda.get_device_name(resolved)} (sm_{major}{minor})",
            "triton": triton}


def fuxictr_identity() -> dict[str, str]:
    """``{"fuxictr": its installed version, or "none"}``: what a result FuxiCTR trained adds to
    its :func:`code_identity` (the peer's own code)."""
    try:
        return {"fuxictr": metadata.version("fuxictr")}
    except metadata.PackageNotFoundError:
        return {"fuxictr": "none"}


def code_identity(device: str) -> dict[str, str]:
    """``{"cetnet": version, "torch": version, "python": "3.11", "digest": 16 hex digits,
    "cpu": the CPU kernel build in use, **device_identity(device)}`` of this process's code
    training on a config's ``device`` setting (the digest computed once per process: ~0.5 s;
    the CPU build read at each call, as ``set_cpu_capability`` may change it)."""
    from cetnet.train.builders import LOADED_PLUGINS
    from cetnet_kernels import build_info

    return {**dict(_fixed_identity(tuple(LOADED_PLUGINS))),
            "cpu": str(build_info().get("cpu_capability")), **device_identity(device)}


def code_tag(identity: object) -> str:
    """A recorded identity as a folder name, naming everything :func:`same_code` compares
    (``unrecorded`` for None or a record of an earlier cetnet): two identities that differ get
    two names."""
    if not isinstance(identity, dict) or "digest" not in identity:
        return "unrecorded"
    text = (f"{identity['digest']}-torch{identity.get('torch')}-py{identity.get('python')}"
            f"-v{identity.get('cetnet')}-{identity.get('cpu')}")
    if "device" in identity:  # (recorded since 2026-12-01)
        text += f"-{identity['device']}" + (f"-triton{identity.get('triton')}"
                                             if "triton" in identity else "")
    if "fuxictr" in identity:
        text += f"-fuxictr{identity['fuxictr']}"
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


def same_code(identity: object, device: str, *, fuxictr: bool = False) -> bool:
    """Whether a recorded :func:`code_identity` is this process's training on ``device`` (every
    key of :data:`COMPARED`; a record of an earlier cetnet, which lacks some, is other code),
    with FuxiCTR's version too for a result FuxiCTR trained (``fuxictr``)."""
    mine = {**code_identity(device), **(fuxictr_identity() if fuxictr else {})}
    return isinstance(identity, dict) and all(identity.get(k) == mine.get(k) for k in COMPARED)


def describe(identity: object) -> str:
    """One line naming a recorded identity ("unrecorded" for a result written before cetnet
    recorded it)."""
    if not isinstance(identity, dict) or "digest" not in identity:
        return "unrecorded (an earlier cetnet)"
    device = identity.get("device", "?")
    return (f"cetnet {identity.get('cetnet', '?')}, code {identity['digest']}, "
            f"torch {identity.get('torch', '?')}, Python {identity.get('python', '?')}, "
            f"CPU kernels {identity.get('cpu', '?')}, device {device}"
            + (f" with Triton {identity['triton']}" if "triton" in identity else "")
            + (f", FuxiCTR {identity['fuxictr']}" if "fuxictr" in identity else ""))
