"""The integer codes of the op schemas: cetnet_kernels/codes.py (Python) against csrc/codes.h (C++).

The schemas carry plain ints, so a code that differs between the two homes would silently run
another mode, optimizer or reduction: the C++ values are read back through ``_C.codes()``.
"""

from __future__ import annotations

import pytest

from cetnet_kernels import _extension, codes

pytestmark = pytest.mark.skipif(
    not _extension.HAS_C, reason=f"cetnet_kernels._C is not built ({_extension.load_error})"
)

ENUMS = [codes.InputMode, codes.Optimizer, codes.Reduction, codes.BoundsCheck]


@pytest.mark.parametrize("enum", ENUMS, ids=lambda e: e.__name__)
def test_python_enum_equals_cpp_codes(enum):
    cpp = _extension._C.codes()
    assert enum.__name__ in cpp, f"_C.codes() has no {enum.__name__}"
    assert {m.name: int(m) for m in enum} == dict(cpp[enum.__name__])


def test_cpp_codes_have_no_extra_families():
    assert set(_extension._C.codes()) == {e.__name__ for e in ENUMS}


def test_name_tables_map_to_the_codes():
    # The user-facing names (MultiTableEmbedding(optimizer=...), reduction=...) reach the same
    # codes as the C++ side.
    cpp = _extension._C.codes()
    assert {k: int(v) for k, v in codes.OPTIMIZER_CODES.items()} == {
        None: cpp["Optimizer"]["DENSE"], "sgd": cpp["Optimizer"]["SGD"],
        "rowwise_adagrad": cpp["Optimizer"]["ROWWISE_ADAGRAD"]}
    assert {k: int(v) for k, v in codes.REDUCTION_CODES.items()} == {
        "none": cpp["Reduction"]["NONE"], "mean": cpp["Reduction"]["MEAN"],
        "sum": cpp["Reduction"]["SUM"]}
    assert {k: int(v) for k, v in codes.BOUNDS_CHECK_CODES.items()} == {
        "error": cpp["BoundsCheck"]["ERROR"], "off": cpp["BoundsCheck"]["OFF"],
        "warn": cpp["BoundsCheck"]["WARN"]}
