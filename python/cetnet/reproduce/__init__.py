"""``cetnet reproduce``: the evidence for CETNet (docs/REPRODUCE.md).

Rows (:mod:`~cetnet.reproduce.rows`) are overrides of one base config; each (row, seed, grid
point) is trained once and cached (:mod:`~cetnet.reproduce.experiment`); the grid point is
chosen on validation; rows are compared over seeds with paired t intervals
(:mod:`~cetnet.reproduce.stats`) in a Markdown report (:mod:`~cetnet.reproduce.report`).
"""

from cetnet.reproduce.experiment import GRIDS, Experiment, base_config, config_key, grid_points
from cetnet.reproduce.rows import ROW_NAMES, ROWS, row_config
from cetnet.reproduce.stats import paired_difference, t_quantile_975

__all__ = ["GRIDS", "Experiment", "base_config", "config_key", "grid_points", "ROW_NAMES",
           "ROWS", "row_config", "paired_difference", "t_quantile_975", "main"]


def main(argv=None) -> int:
    """``cetnet reproduce`` with ``argv`` (see :mod:`cetnet.reproduce.__main__`)."""
    from cetnet.reproduce.__main__ import main as _main

    return _main(argv)
