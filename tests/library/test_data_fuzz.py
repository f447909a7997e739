"""Fuzzing the BARS csv / YAML reader: random bytes, truncations of a valid file, random quoting
and random YAML mutations. Every outcome is a dataset or one of the errors the CLI prints in one
line (ConfigError, DataFormatError, FileNotFoundError): never another exception, never a hang.

Sized to take well under 30 s on 2 cores; a watchdog fails the module if one input hangs.
"""

from __future__ import annotations

import copy
import signal
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cetnet.config import ConfigError  # noqa: E402
from cetnet.data import CTRDataset, DataFormatError, load_bars  # noqa: E402
from cetnet.data.csvio import read_chunks  # noqa: E402

ALLOWED = (ConfigError, DataFormatError, FileNotFoundError)
FUZZ = settings(deadline=None, max_examples=100, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# A small dataset using every feature type: meta (the gAUC group), categorical, numeric and a
# sequence sharing the item vocabulary.
CONFIG = {
    "fuzz_x1": {
        "data_format": "csv",
        "train_data": "train.csv",
        "valid_data": "valid.csv",
        "test_data": "test.csv",
        "min_categr_count": 1,
        "feature_cols": [
            {"name": "user_id", "active": True, "dtype": "int", "type": "meta"},
            {"name": ["item_id", "cate_id"], "active": True, "dtype": "str",
             "type": "categorical"},
            {"name": "price", "active": True, "dtype": "float", "type": "numeric"},
            {"name": "item_history", "active": True, "dtype": "str", "type": "sequence",
             "splitter": "^", "max_len": 5, "share_embedding": "item_id"},
        ],
        "label_col": {"name": "label", "dtype": "float"},
    },
}
HEADER = "label,user_id,item_id,cate_id,price,item_history"
ROWS = ["1,u1,i1,c1,1.5,i2^i3", "0,u2,i2,c2,,i1", '0,u1,"i,3",c1,2.0,', "1,u3,i1,c3,0.5,i3^i1^i2",
        "0,u2,i4,c2,3.25,i4"]
VALID_CSV = "\n".join([HEADER, *ROWS]) + "\n"


@pytest.fixture(autouse=True)
def _watchdog():
    """Fails the test (instead of hanging the session) if it runs past 120 s."""
    def expired(signum, frame):
        raise TimeoutError("fuzz test ran past its 120 s bound: an input hangs the reader")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "dataset_config.yaml").write_text(yaml.safe_dump(CONFIG))
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.csv").write_text(VALID_CSV)
    return tmp_path


def _outcome(config) -> CTRDataset | Exception:
    """A dataset, or the (allowed) error; any other exception fails the test."""
    try:
        return load_bars(config, chunk_size=2)
    except ALLOWED as e:
        assert "\n" not in str(e) and len(str(e)) < 2000, str(e)[:3000]
        return e


def test_the_fuzz_fixture_is_valid(folder):
    ds = _outcome(folder / "dataset_config.yaml")
    assert isinstance(ds, CTRDataset) and len(ds.splits["train"]) == len(ROWS)


@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes_as_the_train_file(folder, data):
    (folder / "train.csv").write_bytes(data)
    _outcome(folder / "dataset_config.yaml")


@FUZZ
@given(cut=st.integers(0, len(VALID_CSV.encode())), split=st.sampled_from(["train", "test"]))
def test_truncations_of_a_valid_file(folder, cut, split):
    (folder / f"{split}.csv").write_bytes(VALID_CSV.encode()[:cut])
    out = _outcome(folder / "dataset_config.yaml")
    if cut == len(VALID_CSV.encode()):
        assert isinstance(out, CTRDataset)


_SPECIALS = ['"', '"', '""', ",", "\n", "\r", "\r\n", "^", "\ufeff", "\x00", "\xe9", " "]


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, len(VALID_CSV)), st.sampled_from(_SPECIALS),
                                st.booleans()), min_size=1, max_size=6))
def test_random_quoting_and_separators(folder, edits):
    text = VALID_CSV
    for pos, piece, replace in edits:
        pos = min(pos, len(text))
        text = text[:pos] + piece + text[pos + (1 if replace else 0):]
    (folder / "train.csv").write_text(text, encoding="utf-8", newline="")
    _outcome(folder / "dataset_config.yaml")
    # the plain reader too, with a tab delimiter and any column set
    try:
        for _ in read_chunks(folder / "train.csv", ["label", "price"], delimiter="\t",
                             chunk_size=1):
            pass
    except ALLOWED:
        pass


# Values a mutated YAML node may take: wrong types, empties, huge, references, specials.
_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10**12), st.floats(allow_nan=True),
    st.sampled_from(["", "label", "item_id", "user_id", "item_history", "price", "^", "1e11",
                     "five", "copy_from(label)", "copy_from(item_id)", "sequence", "meta",
                     "numeric", "categorical", "newest_first", "train.csv", "/etc/passwd",
                     "/dev/zero", "/", "x" * 5000, "a\x00b", "~nobody_here/x.csv"]),
    st.text(max_size=12),
    st.lists(st.sampled_from(["item_id", "cate_id", "label", "", "x"]), max_size=3),
    st.fixed_dictionaries({"name": st.sampled_from(["label", "", "x", "item_id"])}),
)


def _paths(node, prefix=()):
    """Every (path, node) of the YAML tree: mapping keys and list indices."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


_ALL_PATHS = [p for p, _ in _paths(CONFIG) if p]
_KEYS = ["name", "type", "max_len", "splitter", "share_embedding", "active", "preprocess",
         "order", "min_categr_count", "pretrained_emb", "group_id", "label_col", "feature_cols",
         "train_data", "valid_data", "test_data", "data_format", "dataset_id", "tuner_space",
         "dataset_config"]


@FUZZ
@given(mutations=st.lists(st.tuples(st.sampled_from(_ALL_PATHS),
                                    st.sampled_from(["set", "delete", "add", "duplicate"]),
                                    st.sampled_from(_KEYS), _VALUES), min_size=1, max_size=4),
       as_mapping=st.booleans())
def test_random_yaml_mutations(folder, mutations, as_mapping):
    doc = copy.deepcopy(CONFIG)
    for path, op, key, value in mutations:
        parent, node = None, doc
        try:
            for part in path:
                parent, node = node, node[part]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed this path
        last = path[-1]
        if op == "set":
            parent[last] = value
        elif op == "delete":
            del parent[last]
        elif op == "add" and isinstance(node, dict):
            node[key] = value
        elif op == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(node))
    if as_mapping:
        for name, section in doc.items():  # a mapping's relative paths: the working directory
            if isinstance(section, dict):
                for key in ("train_data", "valid_data", "test_data"):
                    if isinstance(section.get(key), str) and section[key].endswith(".csv"):
                        section[key] = str(folder / section[key])
        _outcome(doc)
    else:
        (folder / "dataset_config.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True))
        _outcome(folder / "dataset_config.yaml")


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 8),
                                st.text(alphabet=":-[]{}&*!|>'\"%@`#,?\n\t x1", max_size=4)),
                      min_size=1, max_size=5))
def test_random_yaml_text_edits(folder, edits):
    text = yaml.safe_dump(CONFIG)
    for pos, drop, piece in edits:
        pos = min(pos, len(text))
        text = text[:pos] + piece + text[pos + drop:]
    path: Path = folder / "dataset_config.yaml"
    path.write_text(text)
    _outcome(path)
