"""Datasets, feature schemas and batches for CTR training (see docs/MODEL_LIBRARY.md)."""

from cetnet.data.schema import (FEATURE_KINDS, FIRST_ID, OOV_ID, PAD_ID, Batch, FeatureSpec,
                                Schema)

__all__ = ["FEATURE_KINDS", "FIRST_ID", "OOV_ID", "PAD_ID", "Batch", "FeatureSpec", "Schema"]
