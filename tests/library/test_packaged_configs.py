"""The packaged configs (python/cetnet/configs/): every train config validates and builds its
model; the MovieLens-100k baselines differ from the paper's pair only in ``model:``; the BARS dataset
YAMLs parse, hold the columns BARS defines, and load tiny csv files laid out as in FuxiCTR's
data/ folder; a train config finds the dataset YAML beside it (``data.config``); one BARS config
trains an epoch end to end through the documented command and resumes from its run directory."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml

from cetnet.cli import main
from cetnet.config import (DEFAULT_CONFIG, default_config_path, dump_config, load_config,
                           paper_config_path, read_yaml)
from cetnet.data import load_bars, load_dataset
from cetnet.data.bars_config import read_config
from cetnet.reproduce.rows import check_model
from cetnet.train.rundir import read_json

from test_data_bars import CONFIGS as BARS_LAYOUTS, HEADERS, _cell

CONFIG_DIR = default_config_path().parent
ROOT = Path(__file__).resolve().parents[2]
DATASET_YAMLS = sorted(CONFIG_DIR.glob("*_dataset.yaml"))
TRAIN_CONFIGS = sorted(set(CONFIG_DIR.glob("*.yaml")) - set(DATASET_YAMLS))
ML100K = [p for p in TRAIN_CONFIGS if p.stem.endswith("_ml100k")]
BARS_IDS = ["amazonelectronics_x1", "taobaoad_x1", "kuaivideo_x1", "criteo_x1", "avazu_x1"]
# where each dataset's csv files lie below the data root (FuxiCTR's data/ folder)
FOLDERS = {"amazonelectronics_x1": "Amazon/AmazonElectronics_x1",
           "taobaoad_x1": "Taobao/TaobaoAd_x1", "kuaivideo_x1": "KuaiShou/KuaiVideo_x1",
           "criteo_x1": "Criteo/Criteo_x1", "avazu_x1": "Avazu/Avazu_x1"}
HAS_VALID = {"criteo_x1", "avazu_x1"}  # the others score valid on test.csv, as BARS does


def _dataset_yaml(dataset_id: str) -> Path:
    return CONFIG_DIR / f"bars_{dataset_id}_dataset.yaml"


def test_the_expected_configs_are_packaged():
    names = {p.name for p in CONFIG_DIR.glob("*.yaml")}
    assert {"cetnet_ml100k.yaml", "cetnet_dhen_interformer_ml100k.yaml", "naive_ml100k.yaml",
            "kdef_ml100k.yaml",
            "multi_embedding_ml100k.yaml", "single_dhen_ml100k.yaml"} <= names
    for dataset_id in BARS_IDS:
        assert {f"bars_{dataset_id}.yaml", f"bars_{dataset_id}_dataset.yaml"} <= names
    kinds = {read_yaml(p)["model"]["ensemble"] for p in ML100K}
    assert kinds == {"cetnet", "naive", "kdef", "multi_embedding"}


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.stem)
def test_every_train_config_validates(path):
    config = load_config(path)  # read, completed and checked by validate_config
    assert config["name"] == path.stem
    # complete on its own: nothing is taken from the default config
    assert {"name", "data", "model", "train"} <= set(read_yaml(path))


@pytest.mark.parametrize("path", [p for p in ML100K if p.name != DEFAULT_CONFIG],
                         ids=lambda p: p.stem)
def test_ml100k_baselines_differ_from_the_papers_pair_only_in_the_model(path):
    paper, config = load_config(paper_config_path()), load_config(path)
    for key in ("data", "train", "backend", "device"):
        assert config[key] == paper[key], key


def test_the_default_config_is_the_searched_design_as_found():
    """docs/DEFAULTS.md: the default is the search's winner with its values as found (its
    retrained runs are the default's evidence: the same config, the same cache key), on the
    data of the paper's pair (its results compare with docs/RESULTS.md)."""
    from cetnet.reproduce.experiment import config_key

    default, paper = load_config(), load_config(paper_config_path())
    winner = load_config(ROOT / "examples" / "search" / "ml100k_search_winner.yaml")
    assert config_key(default) == config_key(winner)
    assert default["model"]["members"] == ["dnn", "dcnv2", "dnn"]
    assert default["data"] == paper["data"] and paper["model"]["members"] == ["dhen",
                                                                              "interformer"]


@pytest.mark.parametrize("path", ML100K, ids=lambda p: p.stem)
def test_ml100k_configs_build_their_model(path):
    # MovieLens-100k may not be downloaded here: the synthetic dataset has the same kinds of
    # features (ids, genres, the user's previous items)
    schema = load_dataset("synthetic", num_rows=200, max_seq_len=20, seed=0).schema
    assert check_model(load_config(path), schema) > 0


def test_the_single_member_config_is_one_member():
    config = load_config(CONFIG_DIR / "single_dhen_ml100k.yaml")
    assert config["model"]["members"] == ["dhen"]


@pytest.mark.parametrize("dataset_id", BARS_IDS)
def test_dataset_yamls_parse_with_the_columns_bars_defines(dataset_id):
    cfg = read_config(_dataset_yaml(dataset_id))
    assert cfg.dataset_id == dataset_id
    # the same features as the layouts of test_data_bars (written down from BARS separately)
    reference = read_config(yaml.safe_load(BARS_LAYOUTS[dataset_id]))
    assert cfg.columns == reference.columns
    assert (cfg.label, cfg.group, cfg.group_column) == (
        reference.label, reference.group, reference.group_column)
    # KuaiVideo's pretrained-embedding features are skipped, and said so
    assert set(reference.notes) <= set(cfg.notes)
    assert all("pretrained embeddings are not read" in n for n in cfg.notes)
    folder = FOLDERS[dataset_id]
    for split, path in cfg.files.items():
        name = split if split == "train" or dataset_id in HAS_VALID else "test"
        assert path.as_posix().endswith(f"{folder}/{name}.csv"), (split, path)


def _write_data_root(root: Path, dataset_id: str, rows: int = 160, seed: int = 0) -> None:
    """Tiny csv files with the dataset's columns, where the dataset YAML expects them below the
    data root."""
    rng = np.random.default_rng(seed)
    folder = root / FOLDERS[dataset_id]
    folder.mkdir(parents=True, exist_ok=True)
    splits = {"train": rows, "test": rows // 2} | ({"valid": rows // 2}
                                                  if dataset_id in HAS_VALID else {})
    for split, n in splits.items():
        with open(folder / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(HEADERS[dataset_id])
            w.writerows([_cell(rng, c, dataset_id) for c in HEADERS[dataset_id]]
                         for _ in range(n))


@pytest.mark.parametrize("dataset_id", BARS_IDS)
def test_dataset_yamls_load_csv_files_below_the_working_directory(tmp_path, monkeypatch,
                                                                  dataset_id):
    _write_data_root(tmp_path, dataset_id)
    monkeypatch.chdir(tmp_path)  # the data root
    ds = load_bars(_dataset_yaml(dataset_id))
    cfg = read_config(_dataset_yaml(dataset_id))
    assert len(ds.splits["train"]) == 160 and len(ds.splits["test"]) == 80
    assert (ds.splits["valid"] is ds.splits["test"]) == (dataset_id not in HAS_VALID)
    features = [c.name for c in cfg.columns if c.type != "meta"]
    assert [f.name for f in ds.schema.features] == features
    assert ds.schema.label == cfg.label


@pytest.mark.parametrize("dataset_id", BARS_IDS)
def test_bars_train_configs_build_their_model_on_the_dataset(tmp_path, monkeypatch, dataset_id):
    _write_data_root(tmp_path, dataset_id)
    monkeypatch.chdir(tmp_path)
    config = load_config(CONFIG_DIR / f"bars_{dataset_id}.yaml", ["data.cache_dir=null"])
    assert config["data"]["name"] == "bars"
    assert config["data"]["config"] == str(_dataset_yaml(dataset_id))  # found beside it
    data = dict(config["data"])
    data.pop("name")
    schema = load_dataset("bars", **data).schema
    assert check_model(config, schema) > 0


def test_a_bars_config_trains_an_epoch_with_the_documented_command(tmp_path, monkeypatch,
                                                                   one_thread):
    # docs/DATASETS.md: cd <data root>; cetnet train --config "$CONFIGS/bars_criteo_x1.yaml"
    _write_data_root(tmp_path, "criteo_x1", rows=200)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert main(["train", "--config", str(CONFIG_DIR / "bars_criteo_x1.yaml"),
                 "--set", "device=cpu", "train.epochs=1", "train.batch_size=64",
                 "train.eval_batch_size=256", "model.dnn.hidden=[16]",
                 "model.dcnv2.hidden=[16]", "--out", str(run), "--quiet", "--no-plots"]) == 0
    metrics = read_json(run / "metrics.json")
    assert metrics["name"] == "bars_criteo_x1" and metrics["epochs_completed"] == 1
    assert 0.0 <= metrics["fused"]["auc"] <= 1.0
    assert (tmp_path / "cetnet_cache").is_dir()  # data.cache_dir is below the data root
    # the run directory's config names the dataset YAML by its absolute path: it resumes
    assert read_yaml(run / "config.yaml")["data"]["config"] == str(_dataset_yaml("criteo_x1"))
    assert main(["train", "--resume", str(run), "train.epochs=2", "--quiet", "--no-plots"]) == 0
    assert read_json(run / "metrics.json")["epochs_completed"] == 2


def test_a_relative_data_config_is_found_beside_the_config_file(tmp_path, monkeypatch):
    folder, elsewhere = tmp_path / "configs", tmp_path / "work"
    (folder / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    for name in ("mine_dataset.yaml", "sub/other.yaml"):
        (folder / name).write_text("x: {}\n")
    (elsewhere / "mine_dataset.yaml").write_text("x: {}\n")  # a copy in the working directory

    def data_config(value, overrides=()):
        dump_config({"name": "t", "data": {"name": "bars", "config": value}},
                    folder / "train.yaml")
        return load_config(folder / "train.yaml", list(overrides))["data"]["config"]

    monkeypatch.chdir(elsewhere)
    # beside the config file, whatever the working directory (absolute, so config.yaml keeps it)
    assert data_config("mine_dataset.yaml") == str(folder / "mine_dataset.yaml")
    assert data_config("sub/other.yaml") == str(folder / "sub" / "other.yaml")
    assert data_config("./sub/../mine_dataset.yaml") == str(folder / "mine_dataset.yaml")
    # not beside it: relative to the working directory, as before
    assert data_config("nowhere.yaml") == "nowhere.yaml"
    # an override is what the user typed: relative to the working directory
    assert data_config("x.yaml", ["data.config=mine_dataset.yaml"]) == "mine_dataset.yaml"
    # absolute and ~ paths are left alone
    assert data_config(str(elsewhere / "mine_dataset.yaml")) == str(
        elsewhere / "mine_dataset.yaml")
    assert data_config("~/mine_dataset.yaml") == "~/mine_dataset.yaml"
    # a config file named by a relative path: the result is absolute all the same
    data_config("mine_dataset.yaml")
    monkeypatch.chdir(tmp_path)
    assert load_config(Path("configs/train.yaml"))["data"]["config"] == str(
        folder / "mine_dataset.yaml")
