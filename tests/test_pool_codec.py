"""The pool's payload codec (the plain form for builtin values, else pickle): every value comes
back equal and of the same types as through pickle, shared containers stay shared, and corrupt
input raises instead of crashing."""
import math
import pickle

import pytest
from hypothesis import given, settings, strategies as st

from cpool import _core

PLAIN, PICKLE = 1, 0

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) |
           st.text() | st.binary() | st.characters(blacklist_categories=()).map(str))
values = st.recursive(
    scalars,
    lambda inner: (st.lists(inner, max_size=6) | st.lists(inner, max_size=6).map(tuple) |
                   st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=6)),
    max_leaves=40)


class Str(str):
    pass


def same(a, b):
    """Equal values of the same exact types, all the way down (NaN equals NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


def roundtrip(v):
    enc, data = _core._payload_encode(v)
    return enc, _core._payload_decode(enc, data)


@settings(max_examples=400, deadline=None)
@given(values)
def test_values_come_back_as_through_pickle(v):
    enc, back = roundtrip(v)
    assert same(back, pickle.loads(pickle.dumps(v, 5)))
    assert same(back, v)


def test_plain_values_take_the_plain_form_and_others_pickle():
    assert roundtrip(['a', b'b', 1, 2.5, None, True, ('t',), {'k': [1]}])[0] == PLAIN
    assert roundtrip('lone \ud800 surrogate') == (PICKLE, 'lone \ud800 surrogate')
    assert roundtrip(2 ** 70) == (PICKLE, 2 ** 70)
    assert roundtrip({1, 2})[0] == PICKLE
    enc, back = roundtrip([Str('x')])
    assert enc == PICKLE and type(back[0]) is Str  # a subclass is not the builtin


def test_a_list_held_twice_stays_one_object():
    shared = [1, 2]
    enc, back = roundtrip((shared, shared))
    assert back[0] is back[1]
    d = {}
    enc, back = roundtrip([d, {'again': d}])
    assert back[0] is back[1]['again']


def test_deep_nesting_goes_to_pickle():
    v = []
    for _ in range(40):
        v = [v]
    enc, back = roundtrip(v)
    assert enc == PICKLE and same(back, v)


def test_large_lists_of_lines():
    lines = ['read%d\t%s' % (i, 'ACGT' * 40) for i in range(50_000)]
    for v in (lines, [s.encode() for s in lines], [(s, i) for i, s in enumerate(lines)]):
        enc, back = roundtrip(v)
        assert enc == PLAIN and same(back, v)


@settings(max_examples=300, deadline=None)
@given(values, st.data())
def test_corrupt_payloads_raise(v, data):
    enc, good = _core._payload_encode(v)
    if enc != PLAIN or not good:
        return
    bad = bytearray(good)
    how = data.draw(st.sampled_from(['truncate', 'flip', 'extend']))
    if how == 'truncate':
        bad = bad[:data.draw(st.integers(0, len(bad) - 1))]
    elif how == 'flip':
        i = data.draw(st.integers(0, len(bad) - 1))
        bad[i] ^= data.draw(st.integers(1, 255))
    else:
        bad += data.draw(st.binary(min_size=1, max_size=8))
    try:
        _core._payload_decode(PLAIN, bytes(bad))
    except (ValueError, UnicodeDecodeError, MemoryError, TypeError):  # TypeError: a key made unhashable
        pass  # what corrupt input may raise; anything else (or a crash) is a bug


def test_heap_payload_is_refused_without_a_pool():
    with pytest.raises(ValueError):
        _core._payload_decode(2, b'\x01' + bytes(40))
