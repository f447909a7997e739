"""The package as pip sees it: a CPU-only install pulls only torch and three small pure-Python
packages (Triton, torchrec / FBGEMM, TensorBoard and FuxiCTR are extras), the license is an SPDX
expression with its file, and every packaged config is declared as package data."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


def test_core_dependencies_are_light():
    assert sorted(_name(r) for r in PROJECT["dependencies"]) == ["numpy", "pyyaml", "torch",
                                                                  "tqdm"]


def test_heavy_or_optional_packages_are_extras():
    extras = {k: {_name(r) for r in v} for k, v in PROJECT["optional-dependencies"].items()}
    assert "triton" in extras["triton"]
    assert "tensorboard" in extras["tensorboard"]
    assert {"pytest", "hypothesis", "expecttest"} <= extras["test"]
    assert {"pytest-benchmark", "fbgemm-gpu-cpu"} <= extras["bench"]
    # fuxictr itself goes in with --no-deps (its requirements pull in ray[data]), as torchrec
    assert {"polars", "h5py", "scikit-learn"} <= extras["peers"]
    assert "fuxictr" not in extras["peers"]
    assert "optuna" in extras["search"]
    for name in ("triton", "torchrec", "fbgemm-gpu", "fbgemm-gpu-cpu", "tensorboard", "fuxictr",
                 "optuna"):
        assert name not in {_name(r) for r in PROJECT["dependencies"]}, name


def test_the_distributed_extra_never_pulls_the_cuda_fbgemm():
    """``embedding: torchrec``: the extra holds FBGEMM's CPU build and torchrec's pure-Python
    requirements but not torchrec (whose requirement names the CUDA fbgemm-gpu and another
    torch; it is installed with --no-deps), and ``make torchrec`` installs the same list."""
    extra = PROJECT["optional-dependencies"]["distributed"]
    names = {_name(r) for r in extra}
    assert "fbgemm-gpu-cpu==1.8.0; platform_machine == 'x86_64'" in extra
    assert not names & {"torchrec", "fbgemm-gpu", "torch", "torchmetrics"}
    makefile = (ROOT / "Makefile").read_text()
    deps = re.search(r"^DISTRIBUTED_DEPS = (.*?)(?<!\\)$", makefile, re.M | re.S).group(1)
    assert sorted(deps.replace("\\", " ").split()) == sorted(
        r.split(";")[0].strip() for r in extra)
    assert "--no-deps torchrec==1.9.2" in makefile


def test_license_is_spdx_with_its_file():
    assert PROJECT["license"] == "Apache-2.0"
    assert PROJECT["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]


def test_every_packaged_config_is_package_data():
    setup_py = (ROOT / "setup.py").read_text()
    assert '"cetnet.configs"' in setup_py and '"cetnet.configs": ["*.yaml"]' in setup_py
    assert '"cetnet.search": ["default_space.yaml"]' in setup_py
    assert (ROOT / "python" / "cetnet" / "search" / "default_space.yaml").is_file()
    configs = ROOT / "python" / "cetnet" / "configs"
    entries = list(configs.iterdir())
    assert entries and all(p.is_file() and p.suffix == ".yaml" for p in entries), \
        "a config that cetnet.configs' *.yaml does not match would be missing from a wheel"
