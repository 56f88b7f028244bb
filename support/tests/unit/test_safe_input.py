"""Text PostgreSQL cannot store (NUL, unpaired surrogates) is found and named by its path,
and every service's middleware answers it with 422 before a route runs."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from shared.lib.errors import InvalidInput
from shared.lib.http_service import guard_input, install_error_handlers
from shared.lib.safe_input import check_text, find_unsafe_text, may_hold_unsafe_text


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
        ("GET", "/find?q=a%00", None, 422, "q"),
        ("GET", "/find?q=%ED%A0%80", None, 200, None),
    ],
)
async def test_the_middleware_refuses_unsafe_text_naming_the_field(
    method: str, url: str, content: bytes | None, status: int, field: str | None
) -> None:
    """A body or query with unsafe text gets 422 naming the field; anything else reaches the route."""
    transport = httpx.ASGITransport(app=_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.request(method, url, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    if field is not None:
        assert r.json()["error"]["field"] == field
