"""What the library offers, as text for ``cetnet models``, ``cetnet data list`` and
``cetnet --version``: ensembles and members with their config options and defaults, datasets
with their options and where their data comes from, and the versions of what runs."""

from __future__ import annotations

import inspect
import re
from importlib import metadata
from typing import Any, Callable

__all__ = ["version_text", "models_text", "datasets_text", "signature_options"]

#: One line per ensemble kind (``model.ensemble``).
ENSEMBLE_TEXT = {
    "cetnet": "confidence fusion of K members (negated entropy -> temperature softmax -> "
              "weighted mix) with the collaborative loss; options in model.fusion",
    "naive": "K independent members, mean probability (model.naive.average: prob | logit)",
    "multi_embedding": "one model with several embedding sets, a cross-net branch per set and "
                       "a shared top (options in model.multi_embedding)",
    "kdef": "knowledge-driven ensemble: exam-scored members distilled from their mean-logit "
            "teacher and from each other (fused KDEF loss)",
}


def signature_options(fn: Callable[..., Any], skip: tuple[str, ...] = ()) -> list[str]:
    """``name=default`` for every keyword of ``fn`` (``name=<required>`` without a default;
    ``skip`` left out)."""
    out = []
    for p in inspect.signature(fn).parameters.values():
        if p.name in skip or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if p.default is p.empty:
            out.append(f"{p.name}=<required>")
            continue
        default = list(p.default) if isinstance(p.default, tuple) else p.default
        out.append(f"{p.name}={default!r}")
    return out


def _first_line(obj: Any) -> str:
    """The first line of ``obj``'s docstring without reST markup."""
    doc = (inspect.getdoc(obj) or "").splitlines()
    return re.sub(r":\w+:`~?([^`]+)`|``([^`]+)``", lambda m: m.group(1) or m.group(2),
                  doc[0]) if doc else ""


def version_text() -> str:
    """``cetnet <version>`` and what runs it: torch, the compiled kernels (CPU ISA, CUDA),
    Triton."""
    import torch

    from cetnet_kernels import build_info

    try:
        version = metadata.version("cetnet")
    except metadata.PackageNotFoundError:
        version = "unknown (not installed)"
    info = build_info()
    kernels = "not built" if not info.get("cpu") else (
        f"CPU {info.get('cpu_capability', '?')} (compiled: "
        f"{', '.join(info.get('cpu_capabilities') or []) or '?'})"
        + (f", CUDA {info.get('cuda_version')} {info.get('cuda_archs')}" if info.get("cuda")
           else ", no CUDA"))
    return (f"cetnet {version}\ntorch {torch.__version__}\nkernels: {kernels}\n"
            f"triton: {'yes' if info.get('triton') else 'no'}" + gpu_text(info))


def gpu_text(info: dict) -> str:
    """The GPU line of :func:`version_text` ('' without one): the device, its arch, the backends
    that run on it, and a note when no compiled arch covers it (the same major arch, a minor one
    at most the GPU's): the CUDA kernels' launches then fail with "no kernel image", unless PTX
    of an older arch was embedded."""
    import torch

    from cetnet_kernels import available_backends

    if not torch.cuda.is_available():
        return ""
    major, minor = torch.cuda.get_device_capability()
    arch = major * 10 + minor
    text = (f"\ngpu: {torch.cuda.get_device_name()} (sm_{arch}), backends: "
            f"{', '.join(b for b in available_backends('cuda') if b != 'reference')}")
    compiled = [a // 10 for a in info.get("cuda_archs") or []]  # __CUDA_ARCH_LIST__: 900 -> 90
    # a cubin runs on GPUs of its major arch and a minor one at least its own (sm_80 on sm_86)
    covered = any(c // 10 == major and c % 10 <= minor for c in compiled)
    if info.get("cuda") and compiled and not covered:
        text += (f"\n  note: the CUDA kernels were compiled for "
                 f"{', '.join(f'sm_{a}' for a in compiled)}, not this GPU's sm_{arch}; if the "
                 f"cuda backend fails to launch, rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor}")
    return text


def models_text() -> str:
    """The ensembles and the member kinds with their options (keys of the ``model:`` config
    section and of ``model.<kind>``), defaults included, and the ensembles that plugins
    registered (``cetnet --plugin MODULE models``)."""
    from cetnet.models.build import _FUSION_SKIP, _MEMBER_SKIP, DEFAULTS, ENSEMBLES, MEMBERS
    from cetnet.train.builders import registered_models
    from cetnet_kernels import CETNetFusion

    lines = ["Ensembles (model.ensemble):"]
    lines += [f"  {name:<16} {ENSEMBLE_TEXT.get(name, '')}" for name in ENSEMBLES]
    extra = registered_models()
    if extra:  # a plugin's factory reads its own options: only its name is known here
        lines += ["", "Registered by plugins: " + ", ".join(extra)]
    lines += ["", "Common keys of model: (defaults):"]
    lines += [f"  {k}: {v!r}" for k, v in DEFAULTS.items() if k != "fusion"]
    lines += ["", "model.fusion (cetnet only):",
              # the options a config may set (validate, num_models, backend: build_model's)
              "  " + ", ".join(signature_options(CETNetFusion, skip=_FUSION_SKIP))]
    lines += ["", "Members (model.members; options under model.<kind>):"]
    for kind, cls in MEMBERS.items():
        lines.append(f"  {kind:<12} {_first_line(cls)}")
        lines.append("    " + ", ".join(signature_options(cls, skip=_MEMBER_SKIP)))
    lines += ["", "docs/MODEL_LIBRARY.md has the full reference."]
    return "\n".join(lines)


def datasets_text() -> str:
    """The datasets (``data.name``) with their options and defaults, and what the default
    training config uses."""
    from cetnet.config import load_config
    from cetnet.data.cache import default_root
    from cetnet.data.movielens import grouplens_url
    from cetnet.data.registry import DATASETS
    from cetnet.train.builders import registered_datasets

    default = load_config(None)["data"]
    lines = ["Datasets (data.name):"]
    for name, loader in DATASETS.items():
        lines.append(f"  {name:<16} {_first_line(loader)}")
        lines.append("    " + ", ".join(signature_options(loader)))
    extra = registered_datasets()
    if extra:
        lines += ["", "Registered by plugins: " + ", ".join(extra)]
    options = {k: v for k, v in default.items() if k != "name"}
    lines += ["", f"The default config trains on {default['name']} with {options}; "
              f"`cetnet data prepare {default['name']}` prepares exactly that.",
              "", f"Data cache: {default_root()} ($CETNET_DATA, else ~/.cache/cetnet; the "
                  f"root=DIR option for another). movielens-100k is downloaded once from "
                  f"{grouplens_url()} (else from the recbole wheel on the package index); "
                  f"offline, download that zip elsewhere and run `cetnet data prepare "
                  f"movielens-100k --from ml-100k.zip`."]
    return "\n".join(lines)
