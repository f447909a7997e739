"""A synthetic CTR dataset of any size with planted signal, deterministic by seed.

The click logit is a sum of known parts, so a model that learns them beats one that does not:
per-user and per-item biases, a pairwise interaction table between two sparse fields, a linear
and a multiplicative term on the dense features, a per-tag effect of the multi-hot bag, and a
sequence term: each user prefers one item cluster, her history is drawn mostly from it, and the
logit rises with the share of history items in the target item's cluster. The planted logit is
kept in ``Batch.extras["planted_logit"]`` so tests can check the label is learnable.
"""

from __future__ import annotations

import numpy as np

from cetnet.data.csvio import shorten
from cetnet.data.dataset import SPLITS, CTRDataset, Split, SplitStats
from cetnet.data.normalize import DenseStats
from cetnet.data.options import MAX_SEQ_LEN, ConfigError, check_float, check_int
from cetnet.data.schema import FIRST_ID, FeatureSpec, Schema

__all__ = ["make_synthetic"]


def make_synthetic(num_rows: int = 100_000, *, seed: int = 0, num_users: int = 1_000,
                   num_items: int = 2_000, num_clusters: int = 20, cross_size: int = 30,
                   num_dense: int = 3, num_tags: int = 50, max_tags: int = 4,
                   max_seq_len: int = 20, signal: float = 1.0,
                   split_fractions: tuple[float, float] = (0.8, 0.9)) -> CTRDataset:
    """Generates the dataset (rows in time-like order, cut ``80/10/10``).

    Features: ``user``, ``item``, ``cross_a``, ``cross_b`` (sparse), ``dense_0..`` (dense),
    ``tags`` (multi-hot, mean pooling), ``hist_item`` (sequence of ``item`` ids, most recent
    first, variable length). Ids are already final (no OOV: every value is known).

    Args:
        num_rows: total rows over the three splits.
        seed: everything is a function of the seed.
        num_users, num_items, num_clusters, cross_size, num_dense, num_tags, max_tags,
            max_seq_len: sizes of the feature spaces.
        signal: scales the planted logit (0 gives labels independent of the features).
        split_fractions: cumulative fractions where train and valid end.

    Raises:
        ConfigError: an option of the wrong type or out of range (naming it).
    """
    where = "dataset 'synthetic'"
    num_rows = check_int(num_rows, "num_rows", where, minimum=3)
    seed = check_int(seed, "seed", where, minimum=0)
    for key, value, low in (("num_users", num_users, 1), ("num_clusters", num_clusters, 1),
                            ("cross_size", cross_size, 1), ("num_dense", num_dense, 0),
                            ("num_tags", num_tags, 1), ("max_tags", max_tags, 1)):
        check_int(value, key, where, minimum=low)
    num_items = check_int(num_items, "num_items", where, minimum=num_clusters)
    max_seq_len = check_int(max_seq_len, "max_seq_len", where, minimum=1, maximum=MAX_SEQ_LEN)
    signal = check_float(signal, "signal", where)
    if (not isinstance(split_fractions, (list, tuple)) or len(split_fractions) != 2
            or not all(isinstance(f, (int, float)) and not isinstance(f, bool)
                       for f in split_fractions)
            or not 0 < split_fractions[0] < split_fractions[1] < 1):
        raise ConfigError(f"{where}: split_fractions: expected two cumulative fractions "
                          f"0 < train < valid < 1 (e.g. [0.8, 0.9]), got "
                          f"{shorten(split_fractions)}")
    cut = [0, *(int(round(f * num_rows)) for f in split_fractions), num_rows]
    empty = [name for k, name in enumerate(SPLITS) if cut[k + 1] <= cut[k]]
    if empty:
        raise ConfigError(f"{where}: num_rows {num_rows} with split_fractions "
                          f"{list(split_fractions)} leaves the {' and '.join(empty)} split "
                          f"empty; use more rows")
    rng = np.random.default_rng(seed)
    n = num_rows
    # latent structure
    user_bias = rng.normal(0, 0.5, num_users)
    item_bias = rng.normal(0, 0.5, num_items)
    cross = rng.normal(0, 1.0, (cross_size, cross_size))
    tag_effect = rng.normal(0, 0.7, num_tags)
    w_dense = rng.normal(0, 0.5, num_dense)
    user_cluster = rng.integers(0, num_clusters, num_users)
    item_cluster = np.arange(num_items) % num_clusters

    user = rng.integers(0, num_users, n)
    # half of the impressions are items from the user's preferred cluster
    item = rng.integers(0, num_items, n)
    pref = rng.random(n) < 0.5
    per_cluster = num_items // num_clusters
    item[pref] = (user_cluster[user[pref]]
                  + num_clusters * rng.integers(0, per_cluster, pref.sum()))
    a = rng.integers(0, cross_size, n)
    b = rng.integers(0, cross_size, n)
    dense = rng.normal(0, 1, (n, num_dense))
    ntag = rng.integers(1, max_tags + 1, n)
    tags = rng.integers(0, num_tags, (n, max_tags))
    tag_mask = np.arange(max_tags) < ntag[:, None]

    seq_len = rng.integers(0, max_seq_len + 1, n)
    seq_mask = np.arange(max_seq_len) < seq_len[:, None]
    from_pref = rng.random((n, max_seq_len)) < 0.7
    hist = rng.integers(0, num_items, (n, max_seq_len))
    hist_pref = (user_cluster[user][:, None]
                 + num_clusters * rng.integers(0, per_cluster, (n, max_seq_len)))
    hist = np.where(from_pref, hist_pref, hist)

    same = (item_cluster[hist] == item_cluster[item][:, None]) & seq_mask
    seq_share = same.sum(1) / np.maximum(seq_len, 1)
    logit = (user_bias[user] + item_bias[item] + cross[a, b]
             + (tag_effect[tags] * tag_mask).sum(1) / ntag + 2.0 * (seq_share - 0.5))
    if num_dense:
        logit = logit + dense @ w_dense + 0.5 * dense[:, 0] * dense[:, min(1, num_dense - 1)]
    logit = signal * logit
    label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)

    schema = Schema([
        FeatureSpec("user", "sparse", num_users + FIRST_ID),
        FeatureSpec("item", "sparse", num_items + FIRST_ID),
        FeatureSpec("cross_a", "sparse", cross_size + FIRST_ID),
        FeatureSpec("cross_b", "sparse", cross_size + FIRST_ID),
        *[FeatureSpec(f"dense_{k}", "dense") for k in range(num_dense)],
        FeatureSpec("tags", "multihot", num_tags + FIRST_ID, max_len=max_tags, pooling="mean"),
        FeatureSpec("hist_item", "sequence", num_items + FIRST_ID, max_len=max_seq_len,
                    source="item"),
    ], label="label", group="user")
    ids = {"user": user + FIRST_ID, "item": item + FIRST_ID, "cross_a": a + FIRST_ID,
           "cross_b": b + FIRST_ID, "tags": np.where(tag_mask, tags + FIRST_ID, 0),
           "hist_item": np.where(seq_mask, hist + FIRST_ID, 0)}
    # dense features get a missing value now and then so imputation is exercised
    dense_raw = dense.copy()
    dense_raw[rng.random(dense.shape) < 0.01] = np.nan
    dense_stats = DenseStats.fit(dense_raw[:cut[1]])
    names = [f.name for f in schema.dense]
    splits = {}
    for k, name in enumerate(SPLITS):
        s = slice(cut[k], cut[k + 1])
        z, imputed = dense_stats.transform(dense_raw[s])
        part = {key: v[s] for key, v in ids.items()}
        cells = {f.name: int((part[f.name] != 0).sum()) for f in schema.categorical}
        splits[name] = Split(schema, sparse=part, dense=z, multihot=part, sequence=part,
                             label=label[s], group=user[s],
                             stats=SplitStats(oov={f: 0 for f in cells}, cells=cells,
                                              imputed=dict(zip(names, map(int, imputed)))),
                             extras={"planted_logit": logit[s].astype(np.float32)})
    return CTRDataset("synthetic", schema, splits, {}, dense_stats, group_key="user",
                      notes=[f"synthetic: seed {seed}, planted logit in extras['planted_logit']"])
