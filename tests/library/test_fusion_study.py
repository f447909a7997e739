"""Smoke test of examples/fusion_study.py (the fusion-defaults study) at tiny sizes."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "fusion_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("fusion_study", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fusion_study"] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("fusion_study", None)


def test_t_interval(study):
    m, h = study.t_interval([1.0, 2.0, 3.0])
    assert m == 2.0
    assert math.isclose(h, 4.303 * 1.0 / math.sqrt(3), rel_tol=1e-9)
    assert math.isnan(study.t_interval([1.0])[1])


def test_bounded_learnable_temperature_stays_in_range(study):
    f = study.GuardedFusion(2, temperature=1.0, learnable_temperature=True,
                            temperature_range=(0.5, 4.0), backend="cpu")
    assert abs(float(f.temperature.detach()) - 1.0) < 1e-6
    z = torch.randn(256, 2) * 3
    y = (torch.rand(256) < torch.sigmoid(z[:, 0])).float()
    theta = f.temperature_logit
    for _ in range(30):  # plain gradient steps, large enough to leave the range if it were open
        theta.grad = None
        f(z, y).loss.backward()
        with torch.no_grad():
            theta -= 50.0 * theta.grad
        assert 0.5 <= float(f.temperature.detach()) <= 4.0


def test_warmup_and_gap_fallback_give_uniform_weights(study):
    f = study.GuardedFusion(2, warmup_steps=2, backend="cpu")
    z = torch.tensor([[3.0, 0.1], [-2.0, 0.5]])
    y = torch.tensor([1.0, 0.0])
    assert f.temperature == study.UNIFORM_T
    f(z, y)
    f(z, y)
    assert f.temperature == 1.0  # warm-up over
    g = study.GuardedFusion(2, calibration_gap=0.05, backend="cpu")
    over = torch.stack([torch.randn(512), torch.randn(512) * 8], 1)  # member 1: noise, confident
    g(over, (torch.rand(512) < 0.5).float())
    assert g.temperature == study.UNIFORM_T
    w = g.eval()(over).weights
    torch.testing.assert_close(w, torch.full_like(w, 0.5), atol=1e-4, rtol=0)


def test_script_runs_and_prints_tables(study, capsys):
    study.main(["--seeds", "2", "--quick", "--rows", "2000", "--epochs", "1", "--batch", "512",
                "--pairs", "demo", "--drift-epochs", "1", "--drift-batch", "512"])
    out = capsys.readouterr().out
    assert "Part B [demo]" in out and "Part A" in out
    assert "learnable T in [0.5,4]" in out and "weaker member x4" in out and "Part C" in out
