"""wire.parse, the one parser for JSON from outside: every limit refuses with BadJSON, and
ordinary JSON passes untouched."""

from __future__ import annotations

import pytest

from forge_cli import wire
from forge_cli.errors import UsageError


@pytest.mark.parametrize("raw, reason", [
    (b'{"a": NaN}', "not a finite number"),
    (b'{"a": Infinity}', "not a finite number"),
    (b'[-Infinity]', "not a finite number"),
    (b'{"count": 1e400}', "not a finite number"),
    (b'[' * 65 + b']' * 65, "nested more than 64"),
    (b'[' * 100_000 + b']' * 100_000, "nested more than 64"),
    (b'{"a": ', "not valid JSON"),
    (b'\xff\xfe', "not valid JSON"),
])
def test_parse_refuses_what_forge_cannot_walk(raw: bytes, reason: str):
    with pytest.raises(wire.BadJSON, match=reason):
        wire.parse(raw)


def test_parse_caps_the_size_before_reading():
    with pytest.raises(wire.BadJSON, match="more than the limit of 16"):
        wire.parse(b'{"a": "' + b"x" * 20 + b'"}', limit=16)
    assert wire.parse(b'{"a": 1}', limit=16) == {"a": 1}


def test_parse_passes_ordinary_json_and_a_refusal_is_a_400():
    assert wire.parse('{"messages": [{"role": "user", "content": "hi"}], "t": 0.5}') == {
        "messages": [{"role": "user", "content": "hi"}], "t": 0.5}
    assert wire.parse(b'[' * 64 + b']' * 64) is not None  # exactly the limit
    assert issubclass(wire.BadJSON, UsageError) and wire.BadJSON("x").http_status == 400


def test_finite_int_reads_only_integers_in_range():
    assert wire.finite_int(5) == 5
    assert [wire.finite_int(v) for v in (True, 1.0, "5", -1, 2**53 + 1, None)] == [None] * 6
