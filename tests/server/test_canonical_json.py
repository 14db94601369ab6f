"""``CanonicalJson``: a JSON value written as ``json.dumps(..., ensure_ascii=False)`` writes it, a settled prefix at
a time, however the text is cut (the streamed tool-call arguments join to the whole answer's string)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.canonical_json import CanonicalJson


def _fed(raw: str, cuts: list[int]) -> tuple[str, CanonicalJson]:
    """The canonical text of ``raw`` fed as growing prefixes ending at each cut, then whole."""
    canonical, out = CanonicalJson(), []
    for cut in sorted(cuts) + [len(raw)]:
        out.append(canonical.feed(raw[:cut]))
    return "".join(out), canonical


MODEL_WRITTEN = [
    '{"city":"Paris"}',
    '{ "a" : [1, 2.50, -3e2, true,false , null], "b":{"c":"\\u00e9\\n\\/x\\"y\\\\"}}',
    '{"emoji": "\\ud83d\\ude00!", "lone": "\\ud83d"}',
    '{"n": -0.0, "m": 1E+2, "big": 123456789012345678901234567890}',
    '{}',
    '{"nested": [[], {}, [{"x": []}]]}',
    '{"text": "café ☃ 日本"}',
    '{\n  "indented": {\n    "k": "v"\n  }\n}',
    '{"odd": [NaN, Infinity, -Infinity]}',  # not JSON, but json.loads reads them and the whole answer keeps them
]


@pytest.mark.parametrize("raw", MODEL_WRITTEN)
def test_every_cut_gives_json_dumps_of_the_value(raw):
    want = json.dumps(json.loads(raw), ensure_ascii=False)
    for step in (1, 2, 3, 5):
        out, canonical = _fed(raw, list(range(1, len(raw), step)))
        assert out == want
        assert canonical.done and canonical.end == len(raw) and not canonical.broken


def test_held_back_until_settled():
    canonical = CanonicalJson()
    assert canonical.feed('{"n": 12') == '{"n": '  # more digits may follow
    assert canonical.feed('{"n": 123, "t": tr') == "123, \"t\": "
    assert canonical.feed('{"n": 123, "t": true, "s": "a\\') == 'true, "s": "a'  # half an escape
    assert canonical.feed('{"n": 123, "t": true, "s": "a\\u00') == ""
    assert canonical.feed('{"n": 123, "t": true, "s": "a\\u00e9\\ud83d') == "é"  # a high surrogate waits its pair
    assert canonical.feed('{"n": 123, "t": true, "s": "a\\u00e9\\ud83d\\ude00"}') == '😀"}'
    assert canonical.done


def test_the_value_ends_where_its_brackets_close():
    raw = '{"a": {"b": 1}}}</tool_call>'
    out, canonical = _fed(raw, list(range(1, len(raw))))
    assert out == '{"a": {"b": 1}}' and canonical.end == raw.index("}}") + 2


@pytest.mark.parametrize("raw, settled", [
    ('{"a": tru}', '{"a": '),
    ('{"a": "x\ny"}', '{"a": "x'),  # a raw newline in a string: json.loads refuses it
    ('{"a": "\\q"}', '{"a": "'),
    ('{"a": 1}}', '{"a": 1}'),  # the extra bracket is past the value: not read
    ('}', ''),
])
def test_text_that_is_not_json_stops_the_output(raw, settled):
    out, canonical = _fed(raw, list(range(1, len(raw))))
    assert out == settled
    assert canonical.broken or canonical.done


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(value=st.dictionaries(st.text(max_size=8), _VALUES, max_size=5), ascii_only=st.booleans(),
       indent=st.sampled_from([None, 0, 2]), data=st.data())
def test_any_json_object_however_written_and_cut(value, ascii_only, indent, data):
    raw = json.dumps(value, ensure_ascii=ascii_only, indent=indent)
    cuts = data.draw(st.lists(st.integers(1, max(1, len(raw) - 1)), max_size=12))
    out, canonical = _fed(raw, cuts)
    assert out == json.dumps(json.loads(raw), ensure_ascii=False)
    assert canonical.done and canonical.end == len(raw)
