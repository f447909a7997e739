"""The peer a user would pick instead: FuxiCTR's DNN and DCNv2, trained by FuxiCTR's own trainer
on exactly cetnet's data.

:func:`train_fuxictr` loads the run config's dataset with :func:`cetnet.data.load_dataset` (the
same split, rows, ids and dense normalization as cetnet's rows), describes its schema to FuxiCTR
as a :class:`fuxictr.features.FeatureMap` (:func:`build_feature_map`), feeds FuxiCTR the splits
in its batch format (:class:`SplitGenerator`: the train batches of epoch ``e`` are those of
cetnet's epoch ``e``, same seed, same order) and trains with FuxiCTR's ``BaseModel.fit``: its
Adam (every parameter, embeddings included, at ``train.lr``), its BCE loss, its gradient clipping
(norm 10), its early stopping on validation AUC with ``train.patience`` and its learning-rate
decay on plateau (x0.1 per bad epoch), reloading its best checkpoint at the end. The best model is
then scored on valid and test with cetnet's own metrics (:mod:`cetnet.metrics`: AUC, gAUC grouped
by ``Batch.group``, logloss), so the numbers sit next to cetnet's single-member ``dnn`` / ``dcnv2``
rows. What cetnet's trainer adds is not used: its lr schedule and warm-up, weight decay and the
row-wise Adagrad embedding optimizer.

The model zoo (``DNN``, ``DCNv2``) is not in the ``fuxictr`` wheel; :func:`model_classes` builds
both from FuxiCTR's own ``BaseModel`` and layers, as the zoo does.

FuxiCTR is optional (``pip install --no-deps fuxictr==2.3.10`` plus ``polars h5py scikit-learn``;
``make venv`` does it); :func:`fuxictr_available` says whether it imports.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import re
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor

from cetnet.config import ConfigError
from cetnet.data.schema import PAD_ID, Batch, Schema

__all__ = ["FUXICTR_VERSION", "INSTALL_HINT", "KINDS", "FUXICTR_DEFAULTS", "fuxictr_available",
           "require_fuxictr", "build_feature_map", "to_fuxictr", "SplitGenerator",
           "model_classes", "train_fuxictr"]

#: The FuxiCTR release this module was written against (the mirrored model zoo's).
FUXICTR_VERSION = "2.3.10"
INSTALL_HINT = (f".venv/bin/pip install --no-deps fuxictr=={FUXICTR_VERSION} && "
                ".venv/bin/pip install polars h5py scikit-learn (or: make venv)")
KINDS = ("dnn", "dcnv2")

#: FuxiCTR's own defaults per model: the ``<Model>_default`` template of the model zoo's
#: ``config/model_config.yaml`` (the class defaults of DCNv2 leave its DNN empty, which the zoo's
#: code cannot build; the templates are what a FuxiCTR user starts from). ``hidden`` is replaced
#: by the cetnet config's ``model.<kind>.hidden`` when that is given.
FUXICTR_DEFAULTS: dict[str, dict[str, Any]] = {
    "dnn": {"hidden_units": [500, 500, 500], "hidden_activations": "relu", "net_dropout": 0,
            "batch_norm": False, "embedding_regularizer": 0, "net_regularizer": 0},
    "dcnv2": {"model_structure": "parallel", "use_low_rank_mixture": False, "low_rank": 32,
              "num_experts": 4, "stacked_dnn_hidden_units": [500, 500, 500],
              "parallel_dnn_hidden_units": [500, 500, 500], "dnn_activations": "relu",
              "num_cross_layers": 3, "net_dropout": 0, "batch_norm": False,
              "embedding_regularizer": 0, "net_regularizer": 0},
}
#: Which FuxiCTR arguments a cetnet ``hidden`` list replaces.
_HIDDEN_KEYS = {"dnn": ("hidden_units",),
                "dcnv2": ("stacked_dnn_hidden_units", "parallel_dnn_hidden_units")}
_ZOO_NAMES = {"dnn": "DNN", "dcnv2": "DCNv2"}

_FX: types.SimpleNamespace | None = None
_CLASSES: dict[str, type] | None = None


# -- importing FuxiCTR ------------------------------------------------------------------------
def _import_fuxictr() -> types.SimpleNamespace:
    """FuxiCTR's PyTorch API (FeatureMap, BaseModel, layers, seed_everything); ImportError when
    it is not installed or a dependency it imports is missing.

    ``fuxictr.pytorch.layers`` imports ``fuxictr.preprocess.tokenizer`` (for pretrained
    embeddings), and ``fuxictr/preprocess/__init__.py`` imports ``build_dataset`` and with it
    ``ray[data]``, which only FuxiCTR's dataset building uses. When ray is not installed,
    ``fuxictr.preprocess`` is registered as a bare package (its directory, without running its
    ``__init__``) while these modules load, and unregistered after, so ``tokenizer`` loads on
    its own (it needs h5py and polars, not ray)."""
    global _FX
    if _FX is not None:
        return _FX
    if importlib.util.find_spec("fuxictr") is None:
        raise ImportError("No module named 'fuxictr'")
    import fuxictr

    shim = None
    if "fuxictr.preprocess" not in sys.modules and importlib.util.find_spec("ray") is None:
        shim = types.ModuleType("fuxictr.preprocess")
        shim.__path__ = [str(Path(fuxictr.__file__).parent / "preprocess")]
        sys.modules["fuxictr.preprocess"] = shim
    try:
        from fuxictr.features import FeatureMap
        from fuxictr.pytorch import layers
        from fuxictr.pytorch.models import BaseModel
        from fuxictr.pytorch.torch_utils import seed_everything
    finally:
        if shim is not None:
            if sys.modules.get("fuxictr.preprocess") is shim:
                del sys.modules["fuxictr.preprocess"]
            if getattr(fuxictr, "preprocess", None) is shim:
                delattr(fuxictr, "preprocess")
    _FX = types.SimpleNamespace(FeatureMap=FeatureMap, BaseModel=BaseModel, layers=layers,
                                seed_everything=seed_everything,
                                version=getattr(fuxictr, "__version__", "unknown"))
    return _FX


def fuxictr_available() -> bool:
    """Whether FuxiCTR's PyTorch API imports (fuxictr and polars, h5py, scikit-learn)."""
    try:
        _import_fuxictr()
    except ImportError:
        return False
    return True


def require_fuxictr() -> types.SimpleNamespace:
    """FuxiCTR's API; ConfigError naming the install command when it does not import."""
    try:
        return _import_fuxictr()
    except ImportError as e:
        raise ConfigError(f"the FuxiCTR peer needs fuxictr ({e}); install it with: "
                          f"{INSTALL_HINT}") from None


# -- the data, in FuxiCTR's terms -----------------------------------------------------------
def _dataset_id(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "dataset"


def build_feature_map(schema: Schema, *, embedding_dim: int, dataset_id: str = "cetnet",
                      data_dir: str | Path = ".") -> Any:
    """A FuxiCTR FeatureMap of ``schema``, feature for feature and in schema order, with the same
    ids: ``sparse`` -> ``categorical``; ``multihot`` -> ``sequence`` pooled as the spec says
    (``mean``: FuxiCTR's ``MaskedAveragePooling``, ``sum``: ``MaskedSumPooling``); ``sequence``
    -> ``sequence`` mean-pooled over its real items (cetnet's DNN and DCNv2 mean-pool
    sequences; it is also FuxiCTR's default sequence encoder); ``dense`` -> ``numeric``. Every
    table has cetnet's vocab size and padding id 0 (a zero vector, as FuxiCTR's preprocessor
    also sets); each feature has its own table, as in cetnet. The label is ``schema.label``."""
    fx = require_fuxictr()
    fmap = fx.FeatureMap(dataset_id, str(data_dir))
    for f in schema.features:
        if f.kind == "dense":
            spec: dict[str, Any] = {"source": "", "type": "numeric"}
        elif f.kind == "sparse":
            spec = {"source": "", "type": "categorical", "vocab_size": int(f.vocab_size),
                    "padding_idx": PAD_ID}
        else:
            pooling = f.pooling if f.kind == "multihot" else "mean"
            encoder = ("layers.MaskedAveragePooling()" if pooling == "mean"
                       else "layers.MaskedSumPooling()")
            spec = {"source": "", "type": "sequence", "vocab_size": int(f.vocab_size),
                    "padding_idx": PAD_ID, "max_len": max(int(f.max_len), 1),
                    "feature_encoder": encoder}
        fmap.features[f.name] = spec
    fmap.labels = [schema.label]
    fmap.default_emb_dim = int(embedding_dim)
    fmap.num_fields = fmap.get_num_fields()
    fmap.total_features = sum(s.get("vocab_size", 1) for s in fmap.features.values())
    fmap.set_column_index()
    return fmap


def _padded(values: Tensor, offsets: Tensor) -> Tensor:
    """A multihot bag (``values``, ``offsets``) as ``[B, L]`` ids, left-aligned, 0-padded
    (``L``: the longest bag of the batch, at least 1)."""
    lengths = offsets[1:] - offsets[:-1]
    rows = lengths.numel()
    width = max(int(lengths.max()), 1) if rows else 1
    out = torch.zeros(rows, width, dtype=torch.int64)
    if values.numel():
        row = torch.repeat_interleave(torch.arange(rows), lengths)
        col = torch.arange(values.numel()) - torch.repeat_interleave(offsets[:-1], lengths)
        out[row, col] = values
    return out


def to_fuxictr(batch: Batch, schema: Schema) -> dict[str, Tensor]:
    """A cetnet :class:`Batch` as FuxiCTR's batch: ``{feature name: tensor, label: [B]}`` (ids
    ``[B]`` or ``[B, L]`` int64, a numeric feature ``[B]`` float32)."""
    out: dict[str, Tensor] = {}
    dense_col = {f.name: j for j, f in enumerate(schema.dense)}
    for f in schema.features:
        if f.kind == "sparse":
            out[f.name] = batch.sparse[f.name]
        elif f.kind == "dense":
            out[f.name] = batch.dense[:, dense_col[f.name]]
        elif f.kind == "multihot":
            out[f.name] = _padded(*batch.multihot[f.name])
        else:
            out[f.name] = batch.sequence[f.name]
    out[schema.label] = batch.label
    return out


class SplitGenerator:
    """A cetnet split as the data generator FuxiCTR's ``fit`` / ``evaluate`` / ``predict`` take
    (``len()`` batches, iterated once per epoch), yielding :func:`to_fuxictr` batches.

    With ``shuffle``, the ``e``-th iteration (epoch ``e``, from 1) shuffles with
    ``cetnet.train.rng.shuffle_seed(seed, e)``: the batches cetnet's trainer gives its epoch
    ``e``, in the same order. ``max_steps`` caps the batches per iteration (cetnet's
    ``train.max_steps_per_epoch``)."""

    def __init__(self, split: Any, schema: Schema, batch_size: int, *, shuffle: bool = False,
                 seed: int = 0, max_steps: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.split, self.schema, self.batch_size = split, schema, int(batch_size)
        self.shuffle, self.seed, self.max_steps = shuffle, seed, max_steps
        self.epoch = 0

    def __len__(self) -> int:
        n = math.ceil(len(self.split) / self.batch_size)
        return n if self.max_steps is None else min(n, self.max_steps)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        from cetnet.train.rng import shuffle_seed

        seed = 0
        if self.shuffle:
            self.epoch += 1
            seed = shuffle_seed(self.seed, self.epoch)
        steps = len(self)
        batches = self.split.batches(self.batch_size, shuffle=self.shuffle, seed=seed)
        for step, batch in enumerate(batches):
            if step >= steps:
                break
            yield to_fuxictr(batch, self.schema)


# -- the models -------------------------------------------------------------------------------
def model_classes() -> dict[str, type]:
    """``{"dnn": DNN, "dcnv2": DCNv2}``: FuxiCTR models built on FuxiCTR's ``BaseModel`` and
    layers as its model zoo builds them, plus a record of each epoch for cetnet's report."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    fx = require_fuxictr()
    BaseModel: Any = fx.BaseModel  # a class known only at run time: a dynamic base
    layers = fx.layers

    class _Recording:
        """Records, around FuxiCTR's own ``fit``: each epoch's mean train loss per row, its
        validation AUC and lr, the best epoch, the rows trained on and the time spent in
        training (FuxiCTR's end-of-epoch evaluation excluded)."""

        def fit(self, data_generator, epochs=1, validation_data=None, max_gradient_norm=10.,
                **kwargs):
            self.record = {"history": [], "best_epoch": 0, "train_seconds": 0.0,
                           "train_samples": 0}
            self._loss_sum, self._loss_rows, self._eval_seconds = 0.0, 0, 0.0
            return super().fit(data_generator, epochs=epochs, validation_data=validation_data,
                               max_gradient_norm=max_gradient_norm, **kwargs)

        def train_epoch(self, data_generator):
            start, self._eval_seconds = time.perf_counter(), 0.0
            super().train_epoch(data_generator)
            self.record["train_seconds"] += time.perf_counter() - start - self._eval_seconds

        def train_step(self, batch_data):
            loss = super().train_step(batch_data)
            rows = int(batch_data[self.feature_map.labels[0]].shape[0])
            self._loss_sum += float(loss.detach()) * rows
            self._loss_rows += rows
            self.record["train_samples"] += rows
            return loss

        def eval_step(self):
            start = time.perf_counter()
            super().eval_step()
            self._eval_seconds += time.perf_counter() - start

        def checkpoint_and_earlystop(self, logs, min_delta=1e-6):
            best_before = self._best_metric
            super().checkpoint_and_earlystop(logs, min_delta=min_delta)
            epoch = self._epoch_index + 1
            if self._best_metric != best_before:
                self.record["best_epoch"] = epoch
            self.record["history"].append({
                "epoch": epoch,
                "train_loss": self._loss_sum / max(self._loss_rows, 1),
                "lr": float(self.optimizer.param_groups[0]["lr"]),
                "valid": {"fused": {"auc": float(self._monitor.get_value(logs))}},
            })
            self._loss_sum, self._loss_rows = 0.0, 0

    class DNN(_Recording, BaseModel):
        """FuxiCTR's DNN: every feature embedded by ``FeatureEmbedding`` (flattened) -> an
        ``MLP_Block`` with a sigmoid output. Mirrors ``model_zoo/DNN/DNN_torch/src/DNN.py`` of
        FuxiCTR 2.3.x (same arguments and defaults), the zoo not being in the wheel."""

        def __init__(self, feature_map, model_id="DNN", gpu=-1, learning_rate=1e-3,
                     embedding_dim=10, hidden_units=[64, 64, 64], hidden_activations="ReLU",
                     net_dropout=0, batch_norm=False, embedding_regularizer=None,
                     net_regularizer=None, **kwargs):
            super().__init__(feature_map, model_id=model_id, gpu=gpu,
                             embedding_regularizer=embedding_regularizer,
                             net_regularizer=net_regularizer, **kwargs)
            self.embedding_layer = layers.FeatureEmbedding(feature_map, embedding_dim)
            self.mlp = layers.MLP_Block(input_dim=feature_map.sum_emb_out_dim(),
                                        output_dim=1,
                                        hidden_units=hidden_units,
                                        hidden_activations=hidden_activations,
                                        output_activation=self.output_activation,
                                        dropout_rates=net_dropout,
                                        batch_norm=batch_norm)
            self.compile(kwargs["optimizer"], kwargs["loss"], learning_rate)
            self.reset_parameters()
            self.model_to_device()

        def forward(self, inputs):
            X = self.get_inputs(inputs)
            feature_emb = self.embedding_layer(X, flatten_emb=True)
            return {"y_pred": self.mlp(feature_emb)}

    class DCNv2(_Recording, BaseModel):
        """FuxiCTR's DCNv2: ``FeatureEmbedding`` (flattened) -> ``CrossNetV2`` (or
        ``CrossNetMix``) and an ``MLP_Block``, ``parallel`` (the zoo's default: [cross ‖ deep]),
        ``stacked``, ``stacked_parallel`` or ``crossnet_only`` -> a linear layer and a sigmoid.
        Mirrors ``model_zoo/DCNv2/src/DCNv2.py`` of FuxiCTR 2.3.x (same arguments and defaults),
        the zoo not being in the wheel."""

        def __init__(self, feature_map, model_id="DCNv2", gpu=-1, model_structure="parallel",
                     use_low_rank_mixture=False, low_rank=32, num_experts=4,
                     learning_rate=1e-3, embedding_dim=10, stacked_dnn_hidden_units=[],
                     parallel_dnn_hidden_units=[], dnn_activations="ReLU", num_cross_layers=3,
                     net_dropout=0, batch_norm=False, embedding_regularizer=None,
                     net_regularizer=None, **kwargs):
            super().__init__(feature_map, model_id=model_id, gpu=gpu,
                             embedding_regularizer=embedding_regularizer,
                             net_regularizer=net_regularizer, **kwargs)
            self.embedding_layer = layers.FeatureEmbedding(feature_map, embedding_dim)
            input_dim = feature_map.sum_emb_out_dim()
            if use_low_rank_mixture:
                self.crossnet = layers.CrossNetMix(input_dim, num_cross_layers,
                                                   low_rank=low_rank, num_experts=num_experts)
            else:
                self.crossnet = layers.CrossNetV2(input_dim, num_cross_layers)
            self.model_structure = model_structure
            assert self.model_structure in ["crossnet_only", "stacked", "parallel",
                                            "stacked_parallel"], \
                "model_structure={} not supported!".format(self.model_structure)

            def deep(hidden_units):  # the zoo's MLP_Block, output: its last hidden layer
                return layers.MLP_Block(input_dim=input_dim, output_dim=None,
                                        hidden_units=hidden_units,
                                        hidden_activations=dnn_activations,
                                        output_activation=None, dropout_rates=net_dropout,
                                        batch_norm=batch_norm)

            if self.model_structure in ["stacked", "stacked_parallel"]:
                self.stacked_dnn = deep(stacked_dnn_hidden_units)
                final_dim = stacked_dnn_hidden_units[-1]
            if self.model_structure in ["parallel", "stacked_parallel"]:
                self.parallel_dnn = deep(parallel_dnn_hidden_units)
                final_dim = input_dim + parallel_dnn_hidden_units[-1]
            if self.model_structure == "stacked_parallel":
                final_dim = stacked_dnn_hidden_units[-1] + parallel_dnn_hidden_units[-1]
            if self.model_structure == "crossnet_only":
                final_dim = input_dim
            self.fc = torch.nn.Linear(final_dim, 1)
            self.compile(kwargs["optimizer"], kwargs["loss"], learning_rate)
            self.reset_parameters()
            self.model_to_device()

        def forward(self, inputs):
            X = self.get_inputs(inputs)
            feature_emb = self.embedding_layer(X, flatten_emb=True)
            cross_out = self.crossnet(feature_emb)
            if self.model_structure == "crossnet_only":
                final_out = cross_out
            elif self.model_structure == "stacked":
                final_out = self.stacked_dnn(cross_out)
            elif self.model_structure == "parallel":
                dnn_out = self.parallel_dnn(feature_emb)
                final_out = torch.cat([cross_out, dnn_out], dim=-1)
            else:  # stacked_parallel
                final_out = torch.cat([self.stacked_dnn(cross_out),
                                       self.parallel_dnn(feature_emb)], dim=-1)
            y_pred = self.output_activation(self.fc(final_out))
            return {"y_pred": y_pred}

    _CLASSES = {"dnn": DNN, "dcnv2": DCNv2}
    return _CLASSES


def model_params(config: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The FuxiCTR arguments of ``kind``: :data:`FUXICTR_DEFAULTS`, with the hidden widths of the
    cetnet config's ``model.<kind>.hidden`` when it is given."""
    if kind not in KINDS:
        raise ConfigError(f"FuxiCTR peer: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    params = {k: (list(v) if isinstance(v, list) else v)
              for k, v in FUXICTR_DEFAULTS[kind].items()}
    section = config.get("model", {}).get(kind) or {}
    hidden = section.get("hidden") if isinstance(section, Mapping) else None
    if hidden is not None:
        if (isinstance(hidden, (str, bytes)) or not hasattr(hidden, "__iter__")
                or not list(hidden)
                or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0
                           for h in hidden)):
            raise ConfigError(f"FuxiCTR peer: model.{kind}.hidden must be a non-empty list of "
                              f"positive ints, got {hidden!r}")
        for key in _HIDDEN_KEYS[kind]:
            params[key] = [int(h) for h in hidden]
    return params


def _gpu(device: str | None) -> int:
    """FuxiCTR's ``gpu`` argument (-1: CPU) for cetnet's ``device`` setting."""
    device = device or "auto"
    if device == "cpu":
        return -1
    if device == "auto":
        return 0 if torch.cuda.is_available() else -1
    if device == "cuda":
        return 0
    if device.startswith("cuda:"):
        return int(device.split(":", 1)[1])
    raise ConfigError(f"FuxiCTR peer: device must be cpu, cuda, cuda:N or auto, got {device!r}")


def _scores(prob: np.ndarray, split: Any) -> dict[str, float]:
    from cetnet.metrics import auc, gauc, logloss

    p = torch.from_numpy(np.asarray(prob, dtype=np.float64))
    return {"auc": auc(p, split.label),
            "gauc": gauc(p, split.label, split.group) if split.grouped else math.nan,
            "logloss": logloss(p, split.label)}


@dataclass
class _Data:
    schema: Schema
    splits: dict[str, Any]
    name: str


def _load(config: Mapping[str, Any]) -> _Data:
    from cetnet.data import load_dataset

    data = dict(config["data"])
    name = data.pop("name")
    ds = load_dataset(name, **data)
    return _Data(ds.schema, ds.splits, name)


def train_fuxictr(config: Mapping[str, Any], kind: str, run_dir: str | Path) -> dict[str, Any]:
    """Trains FuxiCTR's ``kind`` (``"dnn"`` or ``"dcnv2"``) with FuxiCTR's ``BaseModel.fit`` on
    the dataset, split and features of the validated cetnet ``config`` and scores its best model
    with cetnet's metrics.

    From the config: ``data`` (the dataset), ``model.embedding_dim`` (an int),
    ``model.<kind>.hidden`` (optional; FuxiCTR's template default otherwise, see
    :data:`FUXICTR_DEFAULTS`), ``train.epochs``, ``batch_size``, ``eval_batch_size``, ``lr``
    (FuxiCTR's Adam), ``patience`` (FuxiCTR's ``early_stop_patience`` on validation AUC; null:
    never stop), ``seed`` (FuxiCTR's ``seed_everything``, and the shuffle of cetnet's trainer)
    and ``max_steps_per_epoch``; ``device``. Everything else trains as FuxiCTR does (see the
    module doc). FuxiCTR's checkpoint goes to ``run_dir/<dataset>/<Model>.model``.

    Returns a dict shaped like cetnet's run metrics: ``fused`` and ``members["fuxictr_<kind>"]``
    (the same test ``auc`` / ``gauc`` / ``logloss``), ``valid`` (``{"fused": {...}}``, the best
    model on valid), ``best_epoch``, ``epochs_completed``, ``stopped_early``, ``train_seconds``
    (training steps only), ``train_samples``, ``train_samples_per_s``, ``history`` (per epoch:
    ``epoch``, ``train_loss``, ``lr``, ``valid: {fused: {auc}}``), ``num_parameters`` and
    ``peer`` (library, version, model, its FuxiCTR arguments). ConfigError for a bad kind or
    config or a missing FuxiCTR; TrainingError when FuxiCTR's training fails on the data (e.g.
    non-finite predictions or a one-class validation split)."""
    with _process_settings_kept():
        return _train_fuxictr(config, kind, run_dir)


@contextlib.contextmanager
def _process_settings_kept() -> Iterator[None]:
    """FuxiCTR's ``seed_everything`` sets process-wide settings (cuDNN's deterministic mode,
    ``$PYTHONHASHSEED``): they are restored once the peer has trained, so that the cetnet rows
    a ``reproduce`` process trains after it run as they would without it."""
    deterministic = torch.backends.cudnn.deterministic
    hash_seed = os.environ.get("PYTHONHASHSEED")
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic = deterministic
        if hash_seed is None:
            os.environ.pop("PYTHONHASHSEED", None)
        else:
            os.environ["PYTHONHASHSEED"] = hash_seed


def _train_fuxictr(config: Mapping[str, Any], kind: str, run_dir: str | Path) -> dict[str, Any]:
    from cetnet.train.loop import TrainingError

    fx = require_fuxictr()
    params = model_params(config, kind)
    dim = config["model"].get("embedding_dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ConfigError(f"FuxiCTR peer: model.embedding_dim must be a positive int, got "
                          f"{dim!r}")
    t = config["train"]
    gpu = _gpu(config.get("device"))
    run_dir = Path(run_dir)
    data = _load(config)
    seed = int(t["seed"])
    fx.seed_everything(seed % 2**32)  # numpy's seed must lie in [0, 2**32)
    fmap = build_feature_map(data.schema, embedding_dim=dim, dataset_id=_dataset_id(data.name),
                             data_dir=run_dir)
    cls = model_classes()[kind]
    patience = t.get("patience")
    model = cls(fmap, model_id=_ZOO_NAMES[kind], gpu=gpu, learning_rate=float(t["lr"]),
                embedding_dim=dim, task="binary_classification", optimizer="adam",
                loss="binary_crossentropy", metrics=["AUC"], monitor="AUC", monitor_mode="max",
                early_stop_patience=int(t["epochs"]) + 1 if patience is None else int(patience),
                save_best_only=True, eval_steps=None, reduce_lr_on_plateau=True,
                model_root=str(run_dir), verbose=0, **params)
    os.makedirs(model.model_dir, exist_ok=True)
    train = SplitGenerator(data.splits["train"], data.schema, t["batch_size"], shuffle=True,
                           seed=seed, max_steps=t.get("max_steps_per_epoch"))
    valid = SplitGenerator(data.splits["valid"], data.schema, t["eval_batch_size"])
    test = SplitGenerator(data.splits["test"], data.schema, t["eval_batch_size"])
    try:
        model.fit(train, epochs=int(t["epochs"]), validation_data=valid)
    except (ValueError, FileNotFoundError) as e:
        # sklearn's roc_auc_score refuses NaN predictions and a one-class split; with no better
        # epoch there is no checkpoint to reload
        raise TrainingError(f"FuxiCTR {_ZOO_NAMES[kind]}: training failed: "
                            f"{type(e).__name__}: {e}") from None
    rec = model.record
    valid_scores = _scores(model.predict(valid), data.splits["valid"])
    test_scores = _scores(model.predict(test), data.splits["test"])
    history = rec["history"]
    return {
        "name": f"fuxictr_{kind}",
        "split": "test",
        "fused": dict(test_scores),
        "members": {f"fuxictr_{kind}": dict(test_scores)},
        "valid": {"fused": valid_scores, "members": {f"fuxictr_{kind}": dict(valid_scores)}},
        "best_epoch": rec["best_epoch"],
        "epochs_completed": len(history),
        "stopped_early": bool(model._stop_training),
        "history": history,
        "train_seconds": rec["train_seconds"],
        "train_samples": rec["train_samples"],
        "train_samples_per_s": rec["train_samples"] / max(rec["train_seconds"], 1e-9),
        "num_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "checkpoint": model.checkpoint,
        "peer": {"library": "fuxictr", "version": fx.version, "model": _ZOO_NAMES[kind],
                 "params": params, "embedding_dim": dim, "optimizer": "adam",
                 "learning_rate": float(t["lr"]), "reduce_lr_on_plateau": True,
                 "max_gradient_norm": 10.0},
    }
