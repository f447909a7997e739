"""cetnet: CTR ensembles (CETNet, KDEF) built on the fused ops of :mod:`cetnet_kernels`."""

from cetnet.metrics import auc, gauc, logloss

__version__ = "0.1.0"

__all__ = ["auc", "gauc", "logloss"]
