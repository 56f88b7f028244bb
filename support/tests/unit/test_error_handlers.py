"""The error handling and request guards every service shares: a backend that cannot serve
(PostgreSQL out of connections or down, Redis unreachable) is a retryable 503 naming it, not a
500; anything else unexpected is a 500 that leaks no traceback; a body that cannot be parsed is
400 malformed_json naming it; HEAD is served wherever GET is, and a 405 says what is allowed; a
single-valued query parameter given twice is a 422 naming it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

import asyncpg
import httpx
import pytest
import redis.exceptions
from fastapi import APIRouter, Depends, FastAPI, Query
from sse_starlette import EventSourceResponse, ServerSentEvent

from shared.lib.http_service import guard_input, install_error_handlers


def _app(exc: Exception) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise exc

    return app


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"),
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        ConnectionRefusedError(111, "Connection refused"),
        redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379"),
    ],
)
async def test_an_unavailable_backend_is_a_retryable_503(exc: Exception) -> None:
    """Answered, and not raised on to the server: uvicorn logs every exception that reaches it as
    a crash with its traceback, one per request of an outage (the transport raises it here)."""
    transport = httpx.ASGITransport(app=_app(exc), raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/boom")
    assert r.status_code == 503
    error = r.json()["error"]
    assert (error["code"], error["retryable"]) == ("unavailable", True)
    assert type(exc).__name__ in error["message"]


async def test_anything_else_is_a_500_without_a_traceback() -> None:
    transport = httpx.ASGITransport(app=_app(RuntimeError("secret detail")), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/boom")
    assert r.status_code == 500
    assert "secret detail" not in r.text


def _body_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(body: dict[str, Any]) -> dict[str, Any]:
        return body

    return app


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b'{"x": "\xff"}', "body is not UTF-8 (byte 0xff at offset 7)"),
        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (b'{"x": ' + b"9" * 5000 + b"}", "a number of more than 4300 digits"),
        (b'{"x": 1', "request body is not valid JSON"),
    ],
)
async def test_a_body_that_cannot_be_parsed_is_malformed_json_naming_the_body(content: bytes, says: str) -> None:
    """Bytes that are not UTF-8, JSON nested past the recursion limit and a number past Python's
    digit limit get what malformed JSON gets (400 malformed_json naming body, saying what is
    wrong), not FastAPI's "There was an error parsing the body" naming nothing."""
    transport = httpx.ASGITransport(app=_body_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.post("/echo", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["field"], error["retryable"]) == ("malformed_json", "body", False)
    assert says in error["message"]


async def _paged(limit: int = 10) -> int:
    return limit


def _routes_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    guard_input(app, max_bytes=1000)

    router = APIRouter()  # included, as the services' routes are

    @router.post("/items")
    async def add() -> dict[str, str]:
        return {"added": "yes"}

    @router.get("/items")
    async def items(
        limit: Annotated[int, Depends(_paged)], status: str = "any", tag: Annotated[list[str] | None, Query()] = None
    ) -> dict[str, Any]:
        return {"items": [1, 2, 3], "limit": limit, "status": status, "tags": tag}

    app.include_router(router)

    @app.get("/stream")
    async def stream() -> EventSourceResponse:
        async def forever() -> AsyncIterator[ServerSentEvent]:
            while True:
                yield ServerSentEvent(data="tick")
                await asyncio.sleep(0.01)

        return EventSourceResponse(forever())

    @app.get("/health")  # as ops_router's: a probe's query is ignored
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


async def test_head_is_answered_wherever_get_is() -> None:
    """HEAD gets GET's status and headers without the body (it was a 405), a stream included: it
    ends at its headers; HEAD where there is no GET is a 405 like any other method."""
    async with _client(_routes_app()) as client:
        get, head = await client.get("/items"), await client.head("/items")
        assert (head.status_code, head.content) == (200, b"")
        assert head.headers["content-type"] == get.headers["content-type"] == "application/json"
        assert head.headers["content-length"] == get.headers["content-length"] == str(len(get.content))
        async with asyncio.timeout(5):
            streamed = await client.head("/stream")
        assert (streamed.status_code, streamed.content) == (200, b"")
        assert streamed.headers["content-type"].startswith("text/event-stream")


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("DELETE", "/items", "GET, HEAD, POST"), ("PUT", "/stream", "GET, HEAD"), ("PATCH", "/items", "GET, HEAD, POST")],
)
async def test_a_method_not_allowed_is_a_405_with_an_allow_header(method: str, path: str, allow: str) -> None:
    """405 keeps its JSON body and adds the Allow header HTTP requires, listing the methods of
    every route on the path (Starlette named only the first route's)."""
    async with _client(_routes_app()) as client:
        r = await client.request(method, path)
    assert r.status_code == 405
    assert r.headers["allow"] == allow
    error = r.json()["error"]
    assert (error["code"], error["retryable"]) == ("http_405", False)
    assert error["message"] == f"{method} is not allowed on {path}; use {allow}"


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


@pytest.mark.parametrize(
    ("query", "status", "field"),
    [
        ("status=failed&status=succeeded", 422, "status"),
        ("limit=1&status=a&limit=2", 422, "limit"),  # a dependency's parameter too
        ("tag=a&tag=b&status=x", 200, None),  # a list may repeat
        ("status=x", 200, None),
        ("staus=failed", 422, "staus"),  # a parameter the route does not take: misspelt
        ("status=x&other=1&other=2", 422, "other"),
    ],
)
async def test_a_query_parameter_not_taken_or_repeated_is_a_422_naming_it(
    query: str, status: int, field: str | None
) -> None:
    """status=a&status=b was answered with the last value, as if the first were not there, and a
    misspelt staus=failed was ignored (everything listed)."""
    async with _client(_routes_app()) as client:
        r = await client.get(f"/items?{query}")
    assert r.status_code == status, r.text
    if field is not None:
        error = r.json()["error"]
        assert (error["code"], error["field"]) == ("invalid_input", field)
        repeated = f"{field} is given 2 times but takes one value; give it once"
        unknown = f"{field} is not a query parameter of this path (it takes: limit, status, tag)"
        assert error["message"] == (unknown if field in {"staus", "other"} else repeated)


async def test_the_ops_endpoints_ignore_a_query() -> None:
    """A probe or scraper may add its own parameters (Prometheus params, a cache buster)."""
    async with _client(_routes_app()) as client:
        r = await client.get("/health?_=123&_=124")
    assert r.status_code == 200, r.text
