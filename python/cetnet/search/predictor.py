"""The predictor-guided sampler of ``cetnet search --sampler predictor``.

The approach of Meta's sampling-based AutoML for ranking models: a small regression model,
trained on the finished trials (their encoded architecture and hyperparameters -> validation
AUC), scores a large pool of random candidates from the search space each round, and the best
candidate is the next trial. Here:

- **the pool**: :class:`PoolTrial` runs the space's own define-by-run sampling
  (:func:`cetnet.search.space.sample_config`) with random draws (uniform, log-uniform where the
  space says ``log``), so every candidate has exactly the conditional parameters a real trial
  of that architecture would have;
- **the encoding** (:class:`Encoder`): per parameter a number scaled to [0, 1] over its range
  (its log range for log parameters) or a one-hot of its choices, plus an indicator of its
  absence (a member kind's options exist only when it is chosen);
- **the predictor** (:class:`Predictor`): an ensemble of small MLPs (torch) on bootstrap samples
  of the finished trials; a candidate's score is the ensemble's mean plus ``kappa`` times its
  spread (an upper confidence bound: candidates the predictor knows little about get a chance);
- **the sampler** (:class:`PredictorSampler`, an Optuna ``BaseSampler``): random for the first
  ``n_startup`` trials, then at each trial's start the best-scoring candidate; the trial's
  parameters are that candidate's (a parameter outside it, never in practice, is random).

Optuna runs the study, stores and resumes it as with its own samplers; the predictor is refit
from the study's trials at every trial, so concurrent workers and resumed studies use every
finished trial.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Mapping, Sequence

import torch

__all__ = ["PoolTrial", "Encoder", "Predictor", "PredictorSampler"]


def _key(params: Mapping[str, Any]) -> tuple:
    """A hashable identity of a parameter set."""
    return tuple(sorted(params.items(), key=lambda kv: kv[0]))


class PoolTrial:
    """A stand-in for ``optuna.Trial`` that draws every suggested parameter at random and
    records it (``params``) with its Optuna distribution (``distributions``)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.params: dict[str, Any] = {}
        self.distributions: dict[str, Any] = {}

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        from optuna.distributions import CategoricalDistribution

        value = self.rng.choice(list(choices))
        self.params[name], self.distributions[name] = value, CategoricalDistribution(choices)
        return value

    def suggest_int(self, name: str, low: int, high: int, log: bool = False) -> int:
        from optuna.distributions import IntDistribution

        if log:  # as Optuna's random sampler: log-uniform over [low - 0.5, high + 0.5], rounded
            x = math.exp(self.rng.uniform(math.log(low - 0.5), math.log(high + 0.5)))
            value = min(high, max(low, int(round(x))))
        else:
            value = self.rng.randint(low, high)
        self.params[name], self.distributions[name] = value, IntDistribution(low, high, log=log)
        return value

    def suggest_float(self, name: str, low: float, high: float, log: bool = False) -> float:
        from optuna.distributions import FloatDistribution

        value = math.exp(self.rng.uniform(math.log(low), math.log(high))) if log else \
            self.rng.uniform(low, high)
        self.params[name] = value
        self.distributions[name] = FloatDistribution(low, high, log=log)
        return value


def _unit(value: float, dist: Any) -> float:
    """``value`` scaled to [0, 1] over the distribution's (log) range."""
    lo, hi = float(dist.low), float(dist.high)
    if getattr(dist, "log", False):
        lo, hi, value = math.log(lo), math.log(hi), math.log(max(float(value), 1e-300))
    return 0.0 if hi == lo else min(1.0, max(0.0, (float(value) - lo) / (hi - lo)))


class Encoder:
    """Parameters -> a fixed-length float vector, over every parameter some trial or
    candidate has had (:meth:`fit` with their distributions)."""

    def __init__(self) -> None:
        self.columns: list[tuple[str, Any]] = []  # (name, distribution), sorted by name
        self.width = 0

    def fit(self, distributions: Sequence[Mapping[str, Any]]) -> "Encoder":
        seen: dict[str, Any] = {}
        for d in distributions:
            for name, dist in d.items():
                seen.setdefault(name, dist)
        self.columns = sorted(seen.items())
        self.width = sum(1 + (len(d.choices) if hasattr(d, "choices") else 1)
                         for _, d in self.columns)
        return self

    def encode(self, params: Mapping[str, Any]) -> list[float]:
        row: list[float] = []
        for name, dist in self.columns:
            present = name in params
            row.append(0.0 if present else 1.0)  # absent: the parameter does not apply
            if hasattr(dist, "choices"):
                row.extend(1.0 if present and params[name] == c else 0.0 for c in dist.choices)
            else:
                row.append(_unit(params[name], dist) if present else 0.0)
        return row

    def matrix(self, params: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        return torch.tensor([self.encode(p) for p in params], dtype=torch.float32).reshape(
            len(params), self.width)


class Predictor:
    """An ensemble of ``members`` small MLPs (one tanh hidden layer of ``hidden`` units), each
    fit on a bootstrap sample of the rows (member 0 on all of them); :meth:`predict` gives
    the ensemble's mean and spread. The members train together as one batched model (their
    losses are summed, Adam is elementwise: the same as training each alone), which makes a
    fit a few hundred small batched steps."""

    def __init__(self, members: int = 5, hidden: int = 32, steps: int = 300,
                 lr: float = 0.01, weight_decay: float = 1e-3, seed: int = 0) -> None:
        self.members, self.hidden, self.steps = members, hidden, steps
        self.lr, self.weight_decay, self.seed = lr, weight_decay, seed
        self.weights: list[torch.Tensor] = []
        self.mean, self.scale = 0.0, 1.0

    @staticmethod
    def _forward(weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = weights  # [M, d, h], [M, 1, h], [M, h, 1], [M, 1, 1]
        return (torch.tanh(x @ w1 + b1) @ w2 + b2)[..., 0]  # [M, n]

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> "Predictor":
        gen = torch.Generator().manual_seed(self.seed)
        self.mean = float(y.mean())
        self.scale = float(y.std()) if len(y) > 1 and float(y.std()) > 0 else 1.0
        target = (y - self.mean) / self.scale
        n, d, h, M = len(x), x.shape[1], self.hidden, self.members

        def uniform(*shape: int, fan_in: int) -> torch.Tensor:  # nn.Linear's initialization
            bound = 1.0 / math.sqrt(max(fan_in, 1))
            return (torch.rand(*shape, generator=gen) * 2 - 1) * bound

        weights = [uniform(M, d, h, fan_in=d), uniform(M, 1, h, fan_in=d),
                   uniform(M, h, 1, fan_in=h), uniform(M, 1, 1, fan_in=h)]
        for w in weights:
            w.requires_grad_(True)
        rows = torch.cat([torch.arange(n)[None],
                          torch.randint(n, (M - 1, n), generator=gen)]) if M > 1 else \
            torch.arange(n)[None]
        xb, yb = x[rows], target[rows]  # [M, n, d], [M, n]
        opt = torch.optim.Adam(weights, lr=self.lr, weight_decay=self.weight_decay)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matrices: more threads only add overhead (10x measured)
        try:
            for _ in range(self.steps):
                opt.zero_grad()
                loss = ((self._forward(weights, xb) - yb) ** 2).mean(1).sum()
                loss.backward()
                opt.step()
        finally:
            torch.set_num_threads(threads)
        self.weights = [w.detach() for w in weights]
        return self

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, spread)`` over the ensemble, in the target's units."""
        preds = self._forward(self.weights, x) * self.scale + self.mean  # [M, n]
        return preds.mean(0), preds.std(0) if len(preds) > 1 else torch.zeros(len(x))


class PredictorSampler:
    """An Optuna sampler (subclass of ``optuna.samplers.BaseSampler``, made on first use so
    that this module imports without Optuna) proposing each trial as the best candidate of a
    random pool under a predictor fit on the finished trials.

    Args:
        sample: ``sample(trial)`` runs the space's define-by-run sampling on ``trial`` (a
            :class:`PoolTrial` for the pool), e.g. ``lambda t: sample_config(t, space, base)``.
        seed: the pool's and the predictor's seed.
        n_startup: trials sampled at random before the predictor proposes.
        pool_size: candidates scored per trial.
        kappa: the weight of the ensemble's spread in a candidate's score.
        direction: ``"maximize"`` or ``"minimize"`` the study's (single) objective.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return _sampler_class()(*args, **kwargs)


_CLASS: list[type] = []


def _sampler_class() -> type:
    if _CLASS:
        return _CLASS[0]
    import optuna
    from optuna.trial import TrialState

    class _PredictorSampler(optuna.samplers.BaseSampler):
        __doc__ = PredictorSampler.__doc__

        def __init__(self, sample: Callable[[Any], Any], *, seed: int = 0, n_startup: int = 8,
                     pool_size: int = 2000, kappa: float = 0.5,
                     direction: str = "maximize") -> None:
            if direction not in ("maximize", "minimize"):
                raise ValueError(f"PredictorSampler: direction must be maximize or minimize, "
                                 f"got {direction!r}")
            self.sample, self.seed, self.n_startup = sample, seed, max(1, int(n_startup))
            self.pool_size, self.kappa, self.direction = int(pool_size), float(kappa), direction
            self._random = optuna.samplers.RandomSampler(seed=seed)
            self._chosen: dict[int, dict[str, Any]] = {}
            #: trial number -> the proposal's predicted (mean, spread), for the report
            self.predictions: dict[int, tuple[float, float]] = {}

        def reseed_rng(self) -> None:
            self._random.reseed_rng()

        def infer_relative_search_space(self, study: Any, trial: Any) -> dict:
            return {}

        def sample_relative(self, study: Any, trial: Any, search_space: dict) -> dict:
            return {}

        def before_trial(self, study: Any, trial: Any) -> None:
            if trial.system_attrs.get("fixed_params"):
                return  # a queued trial (a retry): its parameters are given, nothing to propose
            trials = study.get_trials(deepcopy=False)
            done = [t for t in trials if t.state == TrialState.COMPLETE
                    and t.values is not None and all(math.isfinite(v) for v in t.values)]
            if len(done) < self.n_startup:
                return
            # what was tried (finished, pruned, running elsewhere) is not proposed again
            tried = {_key(t.params) for t in trials if t.number != trial.number
                     and t.state != TrialState.FAIL}
            proposal = self.propose([t.params for t in done], [t.distributions for t in done],
                                    [t.values[0] for t in done], salt=trial.number,
                                    exclude=tried)
            if proposal is not None:
                params, mean, spread = proposal
                self._chosen[trial.number] = params
                self.predictions[trial.number] = (mean, spread)
                # the trial of before_trial is frozen: its attribute goes through the storage
                study._storage.set_trial_user_attr(trial._trial_id, "predicted_value", mean)

        def propose(self, params: Sequence[Mapping[str, Any]],
                    distributions: Sequence[Mapping[str, Any]], values: Sequence[float],
                    salt: int = 0, exclude: set | None = None
                    ) -> tuple[dict[str, Any], float, float] | None:
            """The best candidate of a fresh pool under a predictor fit on ``(params,
            values)``: ``(its params, predicted mean, spread)``; None without a pool (every
            candidate drawn is in ``exclude``: a small discrete space fully tried)."""
            rng = random.Random(self.seed * 1_000_003 + salt)
            pool: list[PoolTrial] = []
            seen: set = set(exclude or ())
            for _ in range(self.pool_size):
                t = PoolTrial(rng)
                try:
                    self.sample(t)
                except (ValueError, KeyError, TypeError):
                    continue
                key = _key(t.params)
                if key not in seen:
                    seen.add(key)
                    pool.append(t)
            if not pool:
                return None
            encoder = Encoder().fit([*distributions, *(t.distributions for t in pool)])
            y = torch.tensor(values, dtype=torch.float32)
            if self.direction == "minimize":
                y = -y
            predictor = Predictor(seed=self.seed + salt).fit(encoder.matrix(params), y)
            mean, spread = predictor.predict(encoder.matrix([t.params for t in pool]))
            best = int(torch.argmax(mean + self.kappa * spread))
            sign = -1.0 if self.direction == "minimize" else 1.0
            return dict(pool[best].params), sign * float(mean[best]), float(spread[best])

        def sample_independent(self, study: Any, trial: Any, param_name: str,
                               param_distribution: Any) -> Any:
            chosen = self._chosen.get(trial.number, {})
            if param_name in chosen:
                try:
                    fits = param_distribution._contains(
                        param_distribution.to_internal_repr(chosen[param_name]))
                except (ValueError, TypeError):
                    fits = False
                if fits:
                    return chosen[param_name]
            return self._random.sample_independent(study, trial, param_name,
                                                   param_distribution)

        def after_trial(self, study: Any, trial: Any, state: Any,
                        values: Sequence[float] | None) -> None:
            self._chosen.pop(trial.number, None)

    _CLASS.append(_PredictorSampler)
    return _PredictorSampler
