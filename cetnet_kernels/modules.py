"""``CETNetFusion``: the drop-in layer that ensembles any K models' logits."""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from cetnet_kernels._host import check_count
from cetnet_kernels.backends import BACKENDS
from cetnet_kernels.fusion import (_check_weight, _fusion_space, _reduction_code,
                                   collaborative_loss, confidence_fusion)

__all__ = ["CETNetFusion", "FusionOutput"]


class FusionOutput:
    """What :class:`CETNetFusion` returns.

    Attributes:
        prob: ``[B]`` fused click probability (differentiable).
        loss: the collaborative loss when labels were given, else ``None``.
        logits: the ``[B, K]`` member logits that were fused.
        weights: ``[B, K]`` fusion weights. With labels they are computed on first access (the
            loss kernel does not write them), without gradient, with the temperature and
            settings of the forward that made this output (an optimizer step since then does
            not change them).
    """

    def __init__(self, prob: Tensor, logits: Tensor, weights: Tensor | None,
                 loss: Tensor | None,
                 fuse: "Callable[[], Tensor] | CETNetFusion | None" = None) -> None:
        self.prob = prob
        self.logits = logits
        self.loss = loss
        self._weights = weights
        if isinstance(fuse, CETNetFusion):  # (as before 2026-12-01: its settings when read)
            module = fuse
            self._fuse: Callable[[], Tensor] | None = \
                lambda: module.fuse(self.logits.detach())[1]
        else:
            self._fuse = fuse

    @property
    def weights(self) -> Tensor:
        if self._weights is None:
            if self._fuse is None:
                raise RuntimeError("FusionOutput: made without weights or a way to compute them")
            with torch.no_grad():
                self._weights = self._fuse()
        return self._weights

    @property
    def member_probs(self) -> Tensor:
        """``[B, K]`` each member's own probability, ``sigmoid(logits)``."""
        return torch.sigmoid(self.logits)

    def __repr__(self) -> str:
        loss = None if self.loss is None else float(self.loss.detach().float().mean())
        return f"FusionOutput(B={self.prob.shape[0]}, K={self.logits.shape[1]}, loss={loss})"


def _check_range(temperature_range: object, temperature: float | None) -> tuple[float, float]:
    """``(low, high)`` with ``0 < low < temperature < high`` (``0 < low < high`` when
    ``temperature`` is None: a fixed temperature, which the range does not bound), finite;
    ValueError otherwise."""
    bounds: tuple[float, ...] = ()
    if isinstance(temperature_range, (tuple, list)) and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)
            for b in temperature_range):
        bounds = tuple(float(b) for b in temperature_range)
    inside = "low < high" if temperature is None else f"low < temperature ({temperature!r}) < high"
    if len(bounds) != 2 or not 0 < bounds[0] < bounds[1] or (
            temperature is not None and not bounds[0] < temperature < bounds[1]):
        raise ValueError(f"CETNetFusion: temperature_range must be (low, high) with 0 < "
                         f"{inside}, both finite, or None for an unbounded learnable "
                         f"temperature; got {temperature_range!r}")
    return bounds[0], bounds[1]


#: How far a state's temperature bounds may be from a module's and still be its range: the
#: rounding of the coarsest cast a state can go through (bfloat16 keeps 8 significant bits).
_BOUNDS_RTOL = 2.0 ** -8


class CETNetFusion(nn.Module):
    """Confidence-based fusion of K CTR models with the collaborative loss (CETNet).

    ``forward(logits, labels=None)`` takes the members' logits, either a ``[B, K]`` tensor or a
    list of K tensors shaped ``[B]`` or ``[B, 1]`` (the raw outputs of any models), and returns a
    :class:`FusionOutput`. With labels it runs the fused collaborative-loss kernel (loss and
    gradient in one pass); without, the fusion kernel.

    Args:
        num_models: K, the number of members (>= 1).
        temperature: softmax temperature over member confidences (> 0).
        learnable_temperature: learn the temperature, starting at ``temperature``.
        temperature_range: with a learnable temperature, the ``(low, high)`` it is kept in:
            ``tau = exp(log low + (log high - log low) * sigmoid(theta))``, theta the parameter
            ``temperature_logit``. A learned temperature drifts down in training, and a low
            one lets an over-confident member take most of the weight (docs/FUSION_GUIDE.md),
            so the default bounds it to ``(0.5, 4.0)``; ``None``: unbounded, parameterized as
            ``log_temperature``. A fixed temperature ignores it (it must still be a valid
            pair, or None). The state dict keeps the bounds (``temperature_bounds``): a state
            of another range is refused by ``load_state_dict``, since its ``temperature_logit``
            would be another temperature.
        fusion_space: ``"prob"`` (mix probabilities) or ``"logit"`` (mix logits).
        ensemble_weight, member_weight, distill_weight, mutual_weight: loss-term weights, see
            :func:`cetnet_kernels.collaborative_loss`.
        detach_weights: no gradient through the fusion weights.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        backend: kernel backend (``"auto"`` picks the fastest available).
        validate: check the label values and a tensor temperature's value at every call on the
            ``cuda``, ``triton`` and ``reference`` backends: a host synchronization per step on
            a GPU (the CPU kernels check in their own pass, always). Turn it off in a GPU
            training loop whose labels are validated upstream (cetnet's datasets are, so the
            models ``build_model`` makes turn it off); a NaN temperature then gives a NaN loss
            instead of an error.
    """

    def __init__(
        self,
        num_models: int,
        temperature: float = 1.0,
        learnable_temperature: bool = False,
        fusion_space: str = "prob",
        ensemble_weight: float = 1.0,
        member_weight: float = 1.0,
        distill_weight: float = 0.0,
        mutual_weight: float = 0.0,
        *,
        detach_weights: bool = False,
        reduction: str = "mean",
        backend: str = "auto",
        temperature_range: tuple[float, float] | None = (0.5, 4.0),
        validate: bool = True,
    ) -> None:
        super().__init__()
        op = "CETNetFusion"
        check_count(num_models, "num_models", op)
        if isinstance(temperature, bool) or not (
                isinstance(temperature, (int, float)) and math.isfinite(temperature)
                and temperature > 0):
            raise ValueError(f"{op}: temperature must be finite and > 0, got {temperature!r}")
        _fusion_space(fusion_space, op)
        _reduction_code(reduction, op)
        # checked here, not at the first forward with labels (or never, without labels)
        weights = {n: _check_weight(v, n, op) for n, v in (
            ("ensemble_weight", ensemble_weight), ("member_weight", member_weight),
            ("distill_weight", distill_weight), ("mutual_weight", mutual_weight))}
        for name, flag in (("learnable_temperature", learnable_temperature),
                           ("detach_weights", detach_weights), ("validate", validate)):
            if not isinstance(flag, bool):
                raise TypeError(f"{op}: {name} must be a bool, got {flag!r}")
        if backend not in BACKENDS:
            raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
        self.num_models = num_models
        self.fusion_space = fusion_space
        self.ensemble_weight = weights["ensemble_weight"]
        self.member_weight = weights["member_weight"]
        self.distill_weight = weights["distill_weight"]
        self.mutual_weight = weights["mutual_weight"]
        self.detach_weights = detach_weights
        self.reduction = reduction
        self.backend = backend
        self.validate = bool(validate)
        self.temperature_range: tuple[float, float] | None = None
        self.register_parameter("log_temperature", None)
        self.register_parameter("temperature_logit", None)
        self._temperature = float(temperature)
        if learnable_temperature and temperature_range is not None:
            low, high = _check_range(temperature_range, temperature)
            self.temperature_range = (low, high)
            # in the state too: temperature_logit means a temperature only within its bounds
            # (loading it into other bounds would change the learned temperature silently);
            # float32: every device has it (a cast to 16 bits rounds it, see the load)
            self.register_buffer("temperature_bounds",
                                 torch.tensor([low, high], dtype=torch.float32))
            # sigmoid(theta) places log(temperature) between log(low) and log(high)
            share = (math.log(temperature) - math.log(low)) / (math.log(high) - math.log(low))
            self.temperature_logit = nn.Parameter(torch.tensor(math.log(share / (1 - share))))
        elif learnable_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        elif temperature_range is not None:
            _check_range(temperature_range, None)  # unused, but a typo is still refused

    #: State keys added after states were saved without them (those still load).
    OPTIONAL_STATE_KEYS = ("temperature_bounds",)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict,
                              strict: bool, missing_keys: list, unexpected_keys: list,
                              error_msgs: list) -> None:
        key = prefix + "temperature_bounds"
        saved = state_dict.get(key)
        if self.temperature_range is not None and isinstance(saved, Tensor) \
                and saved.device.type != "meta":
            bounds = tuple(float(b) for b in saved.detach().double().reshape(-1).tolist())
            # equal up to the rounding of any cast the state went through (bfloat16: 2^-8 of
            # the value): a range that close is the same temperature mapping
            if len(bounds) != 2 or any(abs(b - mine) > _BOUNDS_RTOL * mine
                                       for b, mine in zip(bounds, self.temperature_range)):
                error_msgs.append(
                    f"CETNetFusion: the state's temperature_logit is a temperature within "
                    f"temperature_range {bounds}, but this module's range is "
                    f"{self.temperature_range}: loading it would change the learned "
                    f"temperature; build the module with temperature_range={bounds}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)  # a state saved before the bounds were kept: unchecked
        bounds_buffer = self._buffers.get("temperature_bounds")
        if self.temperature_range is not None and bounds_buffer is not None \
                and bounds_buffer.device.type != "meta":
            with torch.no_grad():  # this module's own bounds, not the state's rounded copy
                bounds_buffer.copy_(torch.tensor(self.temperature_range))

    @property
    def learnable_temperature(self) -> bool:
        return self.log_temperature is not None or self.temperature_logit is not None

    @property
    def temperature(self) -> float | Tensor:
        """The current temperature (a 0-dim tensor when learnable)."""
        if self.temperature_logit is not None:
            if self.temperature_range is None:
                raise RuntimeError("CETNetFusion: temperature_logit is set without a "
                                   "temperature_range (the bounds it maps into)")
            low, high = (math.log(b) for b in self.temperature_range)
            return torch.exp(low + (high - low) * torch.sigmoid(self.temperature_logit))
        if self.log_temperature is not None:
            return self.log_temperature.exp()
        return self._temperature

    def stack(self, logits: Tensor | Sequence[Tensor]) -> Tensor:
        """Turns the members' outputs into one ``[B, K]`` tensor, checking K and shapes."""
        if isinstance(logits, Tensor):
            z = logits
        else:
            parts = list(logits)
            if not parts or not all(isinstance(t, Tensor) for t in parts):
                raise TypeError("CETNetFusion: logits must be a [B, K] tensor or a list of K tensors")
            flat: list[Tensor] = []
            for i, t in enumerate(parts):
                if t.dim() == 2 and t.shape[1] == 1:
                    t = t[:, 0]
                if t.dim() != 1:
                    raise ValueError(f"CETNetFusion: member {i} output must be [B] or [B, 1], "
                                     f"got shape {tuple(t.shape)}")
                if flat and t.shape[0] != flat[0].shape[0]:
                    raise ValueError(f"CETNetFusion: member {i} output has {t.shape[0]} rows, "
                                     f"member 0's {flat[0].shape[0]}: the members must score "
                                     "the same batch")
                flat.append(t)
            z = torch.stack(flat, dim=1)
        if z.dim() != 2 or z.shape[1] != self.num_models:
            raise ValueError(f"CETNetFusion: expected logits of {self.num_models} members "
                             f"([B, {self.num_models}]), got shape {tuple(z.shape)}")
        return z

    def fuse(self, z: Tensor, temperature: float | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(prob, weights)`` of ``[B, K]`` logits (at ``temperature``, default the current
        one)."""
        return confidence_fusion(z, self.temperature if temperature is None else temperature,
                                 fusion_space=self.fusion_space,
                                 detach_weights=self.detach_weights, backend=self.backend,
                                 validate=self.validate)

    def forward(self, logits: Tensor | Sequence[Tensor], labels: Tensor | None = None) -> FusionOutput:
        z = self.stack(logits)
        tau = self.temperature
        if labels is None:
            prob, weights = self.fuse(z, tau)
            return FusionOutput(prob, z, weights, None)
        loss, prob = collaborative_loss(
            z, labels, tau, ensemble_weight=self.ensemble_weight,
            member_weight=self.member_weight, distill_weight=self.distill_weight,
            mutual_weight=self.mutual_weight, fusion_space=self.fusion_space,
            detach_weights=self.detach_weights, reduction=self.reduction, backend=self.backend,
            validate=self.validate)
        # the weights of this forward, if asked for later: its logits, temperature (a learned
        # one detached: an optimizer step does not reach it) and settings
        z_now = z.detach()
        tau_now = tau.detach() if isinstance(tau, Tensor) else tau
        fuse = functools.partial(confidence_fusion, z_now, tau_now,
                                 fusion_space=self.fusion_space, backend=self.backend,
                                 validate=self.validate)
        return FusionOutput(prob, z, None, loss, lambda: fuse()[1])

    def extra_repr(self) -> str:
        t: float | str = self._temperature
        if self.learnable_temperature:
            t = "learnable" + (f" in {self.temperature_range}" if self.temperature_range else "")
        return (f"num_models={self.num_models}, temperature={t}, fusion_space={self.fusion_space!r}, "
                f"weights=(ensemble={self.ensemble_weight}, member={self.member_weight}, "
                f"distill={self.distill_weight}, mutual={self.mutual_weight})")
