"""Where a run gets its dataset and model: ``cetnet.data`` / ``cetnet.models``, or a registry.

The registry is the extension point for datasets and ensembles that are not part of the
library (a private log, an experimental model) and for test fixtures: register a factory
under a name and every config that names it (``data.name``, ``model.ensemble``) uses it,
from Python or, through a plugin module (``cetnet --plugin MODULE``, :func:`load_plugins`),
from the command line.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol, Sequence

from cetnet.config import ConfigError
from cetnet.data.schema import Schema

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = ["DatasetFactory", "ModelFactory", "EnsembleModel", "register_dataset",
           "register_model", "unregister_dataset", "unregister_model", "registered_datasets",
           "registered_models",
           "load_dataset", "build_model", "prepare_dataset", "load_plugins", "PLUGINS_ENV",
           "LOADED_PLUGINS"]

#: ``factory(**options) -> CTRDataset`` (the options of the config's ``data:`` section).
DatasetFactory = Callable[..., Any]
#: ``factory(model_config, schema, backend=...) -> Ensemble``, as ``cetnet.models.build_model``.
ModelFactory = Callable[..., Any]


class EnsembleModel(Protocol):
    """What training and evaluation use of a model beyond ``nn.Module`` (the Ensemble contract,
    docs/MODEL_LIBRARY.md); a registered factory's model need not subclass
    ``cetnet.models.Ensemble``."""

    member_names: Sequence[str]

    def loss(self, batch: Any) -> tuple[Tensor, Any]: ...

    def dense_parameters(self) -> Iterable[nn.Parameter]: ...


#: Comma-separated modules the CLI imports before running (each registers its factories).
PLUGINS_ENV = "CETNET_PLUGINS"

_DATASETS: dict[str, DatasetFactory] = {}
_MODELS: dict[str, ModelFactory] = {}


def register_dataset(name: str, factory: DatasetFactory) -> None:
    """Makes ``data.name == name`` load with ``factory(**options)`` instead of
    ``cetnet.data.load_dataset`` (re-registering a name replaces it)."""
    _DATASETS[name] = factory


def register_model(ensemble: str, factory: ModelFactory) -> None:
    """Makes ``model.ensemble == ensemble`` build with ``factory(config, schema,
    backend=backend)`` instead of ``cetnet.models.build_model``."""
    _MODELS[ensemble] = factory


def registered_datasets() -> list[str]:
    """The dataset names registered (by plugins or code) besides the library's."""
    return sorted(_DATASETS)


def registered_models() -> list[str]:
    """The ensemble names registered (by plugins or code) besides the library's."""
    return sorted(_MODELS)


def unregister_dataset(name: str) -> None:
    _DATASETS.pop(name, None)


def unregister_model(ensemble: str) -> None:
    _MODELS.pop(ensemble, None)


def load_dataset(name: str, **options: Any) -> Any:
    """The dataset ``name``: a registered factory, else ``cetnet.data.load_dataset``."""
    if name in _DATASETS:
        return _DATASETS[name](**options)
    from cetnet.data import load_dataset as library_load  # imported late: optional at import

    return library_load(name, **options)


def prepare_dataset(name: str, **options: Any) -> Any:
    """Downloads/caches dataset ``name`` (``cetnet.data.prepare``); a registered dataset is
    prepared by loading it."""
    if name in _DATASETS:
        return _DATASETS[name](**options)
    from cetnet.data import prepare

    return prepare(name, **options)


def build_model(config: dict, schema: Schema, *, backend: str = "auto") -> Any:
    """The ensemble of a ``model:`` section: a registered factory for ``config["ensemble"]``,
    else ``cetnet.models.build_model``."""
    ensemble = config.get("ensemble") if isinstance(config, dict) else None
    factory = _MODELS.get(ensemble) if isinstance(ensemble, str) else None
    if factory is not None:
        return factory(config, schema, backend=backend)
    from cetnet.models import build_model as library_build

    return library_build(config, schema, backend=backend)


#: The plugin modules :func:`load_plugins` imported, in order (their code is part of the code
#: identity that reproduce and search record: :mod:`cetnet.code_identity`).
LOADED_PLUGINS: list[str] = []


def load_plugins(modules: Sequence[str] = ()) -> None:
    """Imports plugin modules (and those named in ``$CETNET_PLUGINS``) so that they can
    register datasets and models; ConfigError naming one that does not exist."""
    names = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    for name in [*names, *modules]:
        try:
            importlib.import_module(name)
            if name not in LOADED_PLUGINS:
                LOADED_PLUGINS.append(name)
        except ModuleNotFoundError as e:
            # the plugin itself (or its package) is missing: the user's input, one line; a
            # module missing inside the plugin is the plugin's error and keeps its traceback
            if e.name is None or not (name == e.name or name.startswith(f"{e.name}.")):
                raise
            where = f"${PLUGINS_ENV}" if name in names else "--plugin"
            raise ConfigError(f"{where} {name}: no module named {e.name!r} (not on the Python "
                              "path: a module of the current directory needs PYTHONPATH=. or "
                              "python -m cetnet, which puts the directory on the path)") from None
