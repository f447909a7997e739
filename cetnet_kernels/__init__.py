"""cetnet_kernels: fused PyTorch ops for multi-model CTR ensembles.

- :func:`confidence_fusion`: CETNet's confidence-weighted fusion of K member logits.
- :func:`collaborative_loss`: the collaborative training loss and its gradient in one kernel.
- :func:`kdef_loss`: the KDEF (knowledge-driven ensemble) loss and its gradient, fused.
- :class:`CETNetFusion`: a drop-in ``nn.Module`` ensembling any models' logits.
- :class:`MultiTableEmbedding`: every member's embedding tables of every feature, looked up in
  one launch (flat TBE-style storage, optional fused SGD / row-wise Adagrad in backward).

Backends: C++ (CPU), CUDA, Triton and a plain-PyTorch reference; ``backend="auto"`` (or the
``CETNET_BACKEND`` environment variable) picks the fastest one available for the tensors' device.
The C++ CPU kernels are compiled for several vector ISAs; :func:`build_info` says which one runs
(``CETNET_CPU_CAPABILITY`` or :func:`set_cpu_capability` choose another).
"""

from cetnet_kernels._extension import build_info, set_cpu_capability
from cetnet_kernels.backends import BACKENDS, available_backends
from cetnet_kernels.embedding import EmbeddingFeature, MultiTableEmbedding
from cetnet_kernels.embedding_args import reset_bad_id_warnings
from cetnet_kernels.embedding_reference import multi_table_embedding_reference
from cetnet_kernels.fusion import collaborative_loss, confidence_fusion
from cetnet_kernels.kdef import kdef_loss
from cetnet_kernels.modules import CETNetFusion, FusionOutput
from cetnet_kernels.reference import (collaborative_loss_reference, confidence_fusion_reference,
                                      kdef_loss_reference)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "CETNetFusion",
    "EmbeddingFeature",
    "FusionOutput",
    "MultiTableEmbedding",
    "available_backends",
    "build_info",
    "collaborative_loss",
    "collaborative_loss_reference",
    "confidence_fusion",
    "confidence_fusion_reference",
    "kdef_loss",
    "kdef_loss_reference",
    "multi_table_embedding_reference",
    "reset_bad_id_warnings",
    "set_cpu_capability",
]
