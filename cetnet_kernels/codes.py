"""The integer codes the op schemas carry, in one place for every Python backend.

The C++ kernels read the same values from ``csrc/codes.h``; ``tests/kernels/test_codes.py``
checks the two against each other through ``cetnet_kernels._C.codes()``. The op schemas take plain ints (a
``torch.library`` schema has no enum type), so these are ``IntEnum``s: they pass where an int is
expected and print their name in messages.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["BOUNDS_CHECK_CODES", "BoundsCheck", "InputMode", "Optimizer", "Reduction",
           "OPTIMIZER_CODES", "REDUCTION_CODES"]


class InputMode(IntEnum):
    """How one feature's ids arrive in the multi-table embedding ops (one code per feature)."""

    IDS = 0  # one id per sample: [B] ids, no offsets
    BAG_SUM = 1  # a bag per sample (offsets), summed
    BAG_MEAN = 2  # a bag per sample, averaged
    BAG_WEIGHTED_SUM = 3  # a bag per sample with per-sample weights, weighted sum


class Optimizer(IntEnum):
    """What the embedding backward does with a row's gradient."""

    DENSE = 0  # write the gradient rows to grad_weight (no update; the caller's optimizer trains)
    SGD = 1  # w -= lr * (g + weight_decay * w), fused into backward
    ROWWISE_ADAGRAD = 2  # one accumulator per row (FBGEMM's row-wise Adagrad), fused into backward


class BoundsCheck(IntEnum):
    """What the embedding ops do with an id outside ``[0, num_embeddings)`` that is not
    ``padding_idx``."""

    ERROR = 0  # raise IndexError naming feature, batch row, position and id (CUDA: one sync)
    OFF = 1  # no host check, no synchronization: the id reads as zeros and is not updated
    WARN = 2  # as OFF, but the lookup checks (CUDA: a sync) and warns instead of raising


class Reduction(IntEnum):
    """How ``collaborative_loss`` reduces its per-row loss."""

    NONE = 0
    MEAN = 1
    SUM = 2


#: ``MultiTableEmbedding(optimizer=...)`` names -> codes of the fused update (None: dense).
OPTIMIZER_CODES = {None: Optimizer.DENSE, "sgd": Optimizer.SGD,
                   "rowwise_adagrad": Optimizer.ROWWISE_ADAGRAD}
#: ``MultiTableEmbedding(bounds_check=...)`` names -> codes.
BOUNDS_CHECK_CODES = {"error": BoundsCheck.ERROR, "warn": BoundsCheck.WARN,
                      "off": BoundsCheck.OFF}
#: ``reduction=`` names -> codes.
REDUCTION_CODES = {"none": Reduction.NONE, "mean": Reduction.MEAN, "sum": Reduction.SUM}
