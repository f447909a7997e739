"""CTR members and ensembles over one fused embedding (docs/MODEL_LIBRARY.md).

Members (``Member(schema, dim, **hyperparameters)``, ``forward(MemberInputs) -> [B]`` logits):
:class:`DNN`, :class:`DCNv2`, :class:`DHEN`, :class:`InterFormer`. Ensembles
(``forward(batch) -> EnsembleOutput``, ``loss(batch) -> (loss, EnsembleOutput)``):
:class:`CETNet`, :class:`NaiveEnsemble`, :class:`KDEF`, :class:`MultiEmbedding`.
:func:`build_model` builds one from the ``model:`` config section.
"""

import torch  # noqa: F401  (loads libtorch before cetnet_kernels' extension)

from cetnet.models.build import DEFAULTS, ENSEMBLES, MEMBERS, build_member, build_model
from cetnet.models.dcnv2 import DCNv2
from cetnet.models.dhen import DHEN
from cetnet.models.dnn import DNN
from cetnet.models.ensembles import (CETNet, Ensemble, EnsembleOutput, KDEF, MultiEmbedding,
                                     NaiveEnsemble, unique_names)
from cetnet.models.front import EmbeddingFront, MemberInputs
from cetnet.models.interformer import InterFormer
from cetnet.models.layers import count_parameters

__all__ = ["CETNet", "DCNv2", "DEFAULTS", "DHEN", "DNN", "ENSEMBLES", "EmbeddingFront",
           "Ensemble", "EnsembleOutput", "InterFormer", "KDEF", "MEMBERS", "MemberInputs",
           "MultiEmbedding", "NaiveEnsemble", "build_member", "build_model", "count_parameters",
           "unique_names"]
