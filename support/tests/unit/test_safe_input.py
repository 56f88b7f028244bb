"""Text PostgreSQL cannot store (NUL, unpaired surrogates), JSON nested too deeply and integers
past 64 bits are found and named by their path, and every service's middleware answers them
with 422 before a route runs."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from shared.lib.errors import InvalidInput
from shared.lib.http_service import guard_input, install_error_handlers
from shared.lib.safe_input import (
    JSON_INT_MAX,
    JSON_INT_MIN,
    MAX_JSON_DEPTH,
    check_json_limits,
    check_text,
    clipped,
    find_json_past_limits,
    find_unsafe_text,
    may_exceed_json_limits,
    may_hold_unsafe_text,
)


def _nested(depth: int) -> list[Any]:
    """A list ``depth`` levels deep: ``[[...]]``."""
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"input": {"name": "a\x00b"}}, "input.name"),
        ({"a": {"b": "ok"}, "c": ["ok", "x\ud800"]}, "c.1"),
        ({"a": [{"k\x00": 1}]}, "a.0.k\\u0000"),
        ({"first": "\x00", "second": "\udfff"}, "first"),
        ({"a": {"deep": "\x00"}, "b": "\x00"}, "a.deep"),
        ({"emoji": "\U0001f600", "escaped": "\\u0000", "n": 1, "none": None}, None),
        ("\x00", ""),
    ],
)
def test_the_first_unsafe_string_is_named_by_its_path(value: Any, path: str | None) -> None:
    """Keys and values alike, in document order; paired surrogates and a literal backslash-u are fine."""
    assert find_unsafe_text(value) == path


def test_any_depth_is_walked() -> None:
    """A value nested far deeper than the recursion limit is walked without a RecursionError."""
    root: dict[str, Any] = {}
    node = root
    for _ in range(5000):
        node["k"] = {}
        node = node["k"]
    node["z"] = "\x00"
    assert find_unsafe_text(root) == ".".join(["k"] * 5000 + ["z"])


def test_check_text_names_the_field_and_says_what_to_do() -> None:
    """The error is InvalidInput (422) naming the prefixed path, and says what is refused."""
    with pytest.raises(InvalidInput) as caught:
        check_text({"path": "a\x00"}, field="payload")
    assert caught.value.field == "payload.path"
    assert caught.value.message.startswith("payload.path: text must not contain NUL (\\u0000)")


@pytest.mark.parametrize(
    ("value", "found"),
    [
        (_nested(MAX_JSON_DEPTH), None),
        ({"a": _nested(MAX_JSON_DEPTH - 1), "n": [JSON_INT_MAX, JSON_INT_MIN, True, 1.5e300]}, None),
        (_nested(MAX_JSON_DEPTH + 1), ("", "nested")),  # the body itself
        ({"metadata": {"d": _nested(300)}}, ("metadata.d", "nested")),
        ({"a": {"b": {}}, "c": _nested(MAX_JSON_DEPTH)}, ("c", "nested")),  # [] past the limit
        ({"a": [{"b": [{"c": _nested(200)}]}]}, ("a.0.b.0.c", "nested")),
        ({"k": {"k": {"k": {"k": {"k": {"k": {"k": {"k": {"k": _nested(200)}}}}}}}}}, ("k.k.k.k.k.k.k.k", "nested")),
        ({"m": {"n": 10**30}}, ("m.n", "64-bit")),
        ({"m": [1, JSON_INT_MAX + 1]}, ("m.1", "64-bit")),
        ({"m": [JSON_INT_MIN - 1], "deep": _nested(300)}, ("m.0", "64-bit")),  # the first, in document order
        (2**64, ("", "64-bit")),
    ],
)
def test_json_past_the_limits_is_named_by_its_path(value: Any, found: tuple[str, str] | None) -> None:
    """Nesting past MAX_JSON_DEPTH is named by its field (the last key of its first 8 levels), an integer past 64 bits
    (what orjson, and so jsonb and the bus, carry) by its path; at the limits, nothing."""
    got = find_json_past_limits(value)
    if found is None:
        assert got is None
    else:
        assert got is not None
        assert (got[0], found[1] in got[1]) == (found[0], True), got


def test_check_json_limits_says_what_to_send_instead() -> None:
    """The error is InvalidInput (422) naming the prefixed path, saying what to do."""
    with pytest.raises(InvalidInput) as caught:
        check_json_limits({"n": 10**30}, field="payload")
    assert caught.value.field == "payload.n"
    assert "send so large a number as a string" in caught.value.message
    with pytest.raises(InvalidInput) as caught:
        check_json_limits({"deep": _nested(200)}, field="input")
    assert caught.value.field == "input.deep"
    assert f"nested more than {MAX_JSON_DEPTH} levels deep; nest it less deeply" in caught.value.message


@pytest.mark.parametrize(
    ("raw", "maybe"),
    [
        (b'{"a": [1, 2, {"b": "9223372036854775807 is in a string"}], "t": 1796111887.237324}', True),
        (b'{"a": [1, 2, {"b": 922337203685477580}], "t": 1796111887.237324}', False),
        (b'{"n": 18446744073709551616}', True),
        (b'{"n": -9223372036854775809}', True),
        (b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH, False),
        (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), True),
        (b'{"a": ' * (MAX_JSON_DEPTH + 1) + b"1" + b"}" * (MAX_JSON_DEPTH + 1), True),
    ],
)
def test_the_limits_scan_never_misses(raw: bytes, maybe: bool) -> None:
    """More brackets than the depth limit, or 19 digits in a row, may be past the limits; a body
    with neither cannot be (a 19-digit run in a string is a false yes the walk settles)."""
    assert may_exceed_json_limits(raw) is maybe


def test_an_echoed_value_is_clipped() -> None:
    """A caller's value is repeated whole up to 80 characters, else cut, saying its length."""
    assert clipped("a" * 80) == "a" * 80
    assert clipped("a" * 8000) == "a" * 80 + "... (8000 characters)"


@pytest.mark.parametrize(
    ("raw", "suspicious"),
    [
        (b'{"a": "plain \\u00e9 text"}', False),
        (b'{"a": "\\u0000"}', True),
        (b'{"a": "\\uD800"}', True),
        (b'{"a": "\xed\xa0\x80"}', True),
        ('{"a": 1}'.encode("utf-16"), True),
    ],
)
def test_the_raw_scan_never_misses(raw: bytes, suspicious: bool) -> None:
    """Escaped NUL or surrogates, UTF-8-encoded surrogates and UTF-16 bodies are all suspicious."""
    assert may_hold_unsafe_text(raw) is suspicious


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    guard_input(app, max_bytes=1000)

    @app.post("/echo")
    async def echo(body: dict[str, Any]) -> dict[str, Any]:
        return body

    @app.get("/find")
    async def find(q: str = "") -> dict[str, str]:
        return {"q": q}

    return app


@pytest.mark.parametrize(
    ("method", "url", "content", "status", "field"),
    [
        ("POST", "/echo", json.dumps({"input": {"name": "a\x00"}}).encode(), 422, "input.name"),
        ("POST", "/echo", json.dumps({"x": "\ud800"}).encode(), 422, "x"),
        ("POST", "/echo", json.dumps({"x": "\\u0000 \U0001f600"}).encode(), 200, None),
        ("POST", "/echo", b'{"x": "\\u0000', 400, "body"),
        ("POST", "/echo", b'{"x": "' + b"y" * 2000 + b'"}', 413, "body"),
        ("POST", "/echo", b'{"x": ' + b"[" * 128 + b"]" * 128 + b"}", 422, "x"),
        ("POST", "/echo", b'{"x": ' + b"[" * 127 + b"]" * 127 + b"}", 200, None),
        ("POST", "/echo", b'{"m": {"n": 1' + b"0" * 30 + b"}}", 422, "m.n"),
        ("POST", "/echo", b'{"m": {"n": -9223372036854775809}}', 422, "m.n"),
        ("POST", "/echo", b'{"m": [18446744073709551615, -9223372036854775808, "1' + b"0" * 30 + b'"]}', 200, None),
        ("GET", "/find?q=a%00", None, 422, "q"),
        ("GET", "/find?q=%ED%A0%80", None, 200, None),
    ],
)
async def test_the_middleware_refuses_unsafe_text_naming_the_field(
    method: str, url: str, content: bytes | None, status: int, field: str | None
) -> None:
    """A body or query with unsafe text, a body nested past the limit or with an integer past 64
    bits gets 422 naming the field; anything else reaches the route (a body at the limits too)."""
    transport = httpx.ASGITransport(app=_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.request(method, url, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    if field is not None:
        assert r.json()["error"]["field"] == field


def test_finding_the_place_in_a_deep_wide_body_keeps_no_path_per_value() -> None:
    """A body nested near the limit with many small items and one huge integer at the end is
    walked without a copy of the whole path per value (60,000 items once took ~350 MB)."""
    import tracemalloc

    deepest: list[Any] = []
    top = deepest
    for _ in range(125):
        deepest.append(inner := [])
        deepest = inner
    deepest.extend([1] * 60_000 + [10**30])
    tracemalloc.start()
    try:
        found = find_json_past_limits({"x": top})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert found is not None
    assert found[0].startswith("x.0.0.0"), found
    assert "integer outside the 64-bit range" in found[1]
    assert peak < 50_000_000, peak
