"""Datasets, feature schemas and batches for CTR training (see docs/MODEL_LIBRARY.md).

``load_dataset(name, **options)`` gives a :class:`CTRDataset` ("movielens-100k", "synthetic",
"bars"); ``prepare(name)`` also prints its summary. Vocabularies and dense statistics always come
from the train split.
"""

from cetnet.data.bars import load_bars
from cetnet.data.cache import default_root
from cetnet.data.csvio import DataFormatError
from cetnet.data.dataset import SPLITS, CacheError, CTRDataset, Split, SplitStats
from cetnet.data.movielens import load_movielens
from cetnet.data.normalize import DenseStats
from cetnet.data.registry import DATASETS, load_dataset, prepare
from cetnet.data.schema import (FEATURE_KINDS, FIRST_ID, OOV_ID, PAD_ID, Batch, FeatureSpec,
                                Schema)
from cetnet.data.synthetic import make_synthetic
from cetnet.data.vocab import TokenCounter, Vocabulary

__all__ = ["FEATURE_KINDS", "FIRST_ID", "OOV_ID", "PAD_ID", "Batch", "FeatureSpec", "Schema",
           "SPLITS", "CTRDataset", "Split", "SplitStats", "DataFormatError", "CacheError",
           "DenseStats",
           "TokenCounter", "Vocabulary", "DATASETS", "default_root", "load_dataset", "prepare",
           "load_movielens", "load_bars", "make_synthetic"]
