"""``cetnet search``: architecture and hyperparameter search over the ensembles on Optuna
(docs/SEARCH.md).

- :mod:`cetnet.search.space`: the search-space YAML (packaged default: default_space.yaml) and
  its define-by-run sampling into an ordinary run config.
- :mod:`cetnet.search.cost`: FLOPs per sample (``torch.utils.flop_counter``) and parameters.
- :mod:`cetnet.search.engine`: the study (samplers, the warm-up proxy and its pruner, storage,
  resume) around :func:`cetnet.train.run_training`.
- :mod:`cetnet.search.proxies`: SiGeo-style statistics of a warmed-up candidate (``--proxy``).
- :mod:`cetnet.search.predictor`: ``--sampler predictor``, a learned model of AUC proposing
  each trial from a random pool of candidates.
- :mod:`cetnet.search.report`: trials.csv, pareto.csv, SEARCH.md, best_config.yaml, the plot,
  rank correlations.
- :mod:`cetnet.search.compare`: ``--compare``, finished studies side by side (best-so-far
  curves at equal budget, the proxies over all their trials, the winner retrained over seeds).

Optuna is imported only when a search runs (``pip install optuna``; PostgreSQL storage also
needs ``psycopg2``).
"""

from cetnet.search.space import SpaceError, default_space_path, load_space, sample_config

__all__ = ["SpaceError", "default_space_path", "load_space", "sample_config"]
