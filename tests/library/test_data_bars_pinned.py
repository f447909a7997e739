"""Pins what the BARS reader produces, byte for byte: the saved dataset (what the cache file
holds) of every BARS layout in ``test_data_bars`` and the cache key of every parsed config.

The digests were recorded before ``bars._encode`` was split into phases; a change to
either is a change of the encoding or of the cache format, which must bump ``_CACHE_VERSION`` (or
the dataset ``FORMAT_VERSION``) and re-record them here on purpose.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from cetnet.data import bars, load_bars
from cetnet.data.cache import cache_file

from test_data_bars import CONFIGS, make_bars

# sha256 of the canonical form of the saved dataset (see _canonical), per layout
# (re-recorded for amazonelectronics_x1 and kuaivideo_x1 when the notes began to name the FuxiCTR
# model keys their YAMLs set: the notes only, the encoding and cache keys unchanged, so no
# _CACHE_VERSION bump; a cache of before just lacks that note)
ENCODED = {
    "amazonelectronics_x1":
        "4b9cfe08db04a2d932a9b1478adf98f3a5cf6afdc3ee68c035fdf906f3d918b5",
    "taobaoad_x1":
        "501a794e63664ef132c10ce11c00fd7bdf8a2d63a2c81a24317b772d62803c30",
    "kuaivideo_x1":
        "feaf6d3c7d0210c7fd4a80ce8a6ce1eb16c780999e1dc0496abde213375309b1",
    "criteo_x1":
        "9400383cc54356969ca10c9c127f33d28e1b6f59d17a1de6ff7de09d6a9fa672",
    "avazu_x1":
        "1df65c03d309a9a3f554781f86741a07670bcd71e1951ca436644c51415261c4",
}
# the cache file name of each parsed config (files resolved under /, no stamps)
CACHE_NAMES = {
    "amazonelectronics_x1": "amazonelectronics_x1-01e6ad896f7a6af5.pt",
    "taobaoad_x1": "taobaoad_x1-d9c2e69f3d8b76ca.pt",
    "kuaivideo_x1": "kuaivideo_x1-6e87bfc17f7f3046.pt",
    "criteo_x1": "criteo_x1-7cea36f3e0990007.pt",
    "avazu_x1": "avazu_x1-bc2c4b2b1caf5dc0.pt",
}


def _canonical(x: Any, out: list[bytes]) -> None:
    """Appends an unambiguous byte form of ``x`` (tensors by dtype, shape and raw bytes; dict
    order kept: the saved order is part of the format)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        out.append(f"T{t.dtype}{tuple(t.shape)}".encode())
        out.append(t.numpy().tobytes())
    elif isinstance(x, dict):
        out.append(f"D{len(x)}".encode())
        for k, v in x.items():
            out.append(repr(k).encode())
            _canonical(v, out)
    elif isinstance(x, (list, tuple)):
        out.append(f"{type(x).__name__[0]}{len(x)}".encode())
        for v in x:
            _canonical(v, out)
    else:  # str, int, float, bool, None
        out.append(f"{type(x).__name__}:{x!r}".encode())


def _digest(path: Path) -> str:
    parts: list[bytes] = []
    _canonical(torch.load(path, weights_only=True), parts)
    return hashlib.sha256(b"\x1f".join(parts)).hexdigest()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bars_encoding_is_pinned(tmp_path, name):
    cfg_path = make_bars(tmp_path, name, rows={"train": 120, "valid": 40, "test": 40}, seed=7)
    ds = load_bars(cfg_path, chunk_size=50)
    ds.save(tmp_path / "saved.pt")
    assert _digest(tmp_path / "saved.pt") == ENCODED[name]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bars_cache_key_is_pinned(tmp_path, monkeypatch, name):
    monkeypatch.chdir("/")  # relative csv paths resolve under the working directory
    cfg = bars.read_config(yaml.safe_load(CONFIGS[name]))
    path = cache_file(tmp_path, cfg.dataset_id, (bars._CACHE_VERSION, cfg, [], None))
    assert path.name == CACHE_NAMES[name]


# options that take other paths through the encoder: a min_count override, newest-first
# sequences, a row cap, and a valid split read from the train file
OPTIONS_CASE = "taobaoad_x1"
OPTIONS_ENCODED = "cd305d3b88d640120a75e1cd6e10360b22ca80db59919987c5821a85527fd258"
TRAIN_AS_VALID_CASE = "criteo_x1"
TRAIN_AS_VALID_ENCODED = "18a5835af427d787933729897f3cf6b7296c7129a9e958d07c1076e81f2a08f8"


def test_bars_encoding_with_options_is_pinned(tmp_path):
    cfg_path = make_bars(tmp_path, OPTIONS_CASE, rows={"train": 150, "valid": 40, "test": 40},
                         seed=3)
    ds = load_bars(cfg_path, chunk_size=17, min_count=2, seq_order="newest_first", max_rows=130)
    ds.save(tmp_path / "saved.pt")
    assert _digest(tmp_path / "saved.pt") == OPTIONS_ENCODED


def test_bars_encoding_of_a_valid_split_read_from_train_is_pinned(tmp_path):
    cfg_path = make_bars(tmp_path, TRAIN_AS_VALID_CASE, seed=5,
                         rows={"train": 100, "valid": 40, "test": 40})
    cfg_path.write_text(cfg_path.read_text().replace("valid_data: valid.csv",
                                                     "valid_data: train.csv"))
    ds = load_bars(cfg_path, chunk_size=30)
    assert ds.splits["valid"] is ds.splits["train"]
    ds.save(tmp_path / "saved.pt")
    assert _digest(tmp_path / "saved.pt") == TRAIN_AS_VALID_ENCODED
