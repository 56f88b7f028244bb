"""What every HTTP service shares: the service context, error handling, body
limits, API keys, the ``/health`` ``/ready`` ``/metrics`` routes and serving.

A service builds its FastAPI app in a factory, opens a :class:`ServiceContext`
in its lifespan, and hands the context to routes through :data:`ContextDep`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import hmac
import json
import logging
import socket
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import parse_qsl

import asyncpg
import redis.asyncio as aioredis
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi._compat import ModelField, field_annotation_is_sequence
from fastapi.dependencies.models import Dependant
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from shared.lib.connections import CONNECTION_FAILURES, connect_redis, create_pg_pool
from shared.lib.errors import (
    InvalidInput,
    OrchestratorError,
    PayloadTooLarge,
    ServiceUnavailable,
    StartupError,
    Unauthorized,
    UnsupportedMediaType,
)
from shared.lib.metrics import SERVICE_DEPENDENCY_UP
from shared.lib.safe_input import (
    check_json_limits,
    check_text,
    clipped,
    may_exceed_json_limits,
    may_hold_unsafe_text,
)
from shared.lib.settings import Settings

__all__ = [
    "GC_THRESHOLDS",
    "ApiKeyDep",
    "BodySizeLimit",
    "CheckedQuery",
    "ContextDep",
    "HeadAsGet",
    "InputGuard",
    "ServiceContext",
    "announce_mode",
    "check_api_key",
    "check_port_free",
    "error_response",
    "guard_input",
    "install_error_handlers",
    "non_json_body",
    "open_context",
    "ops_router",
    "serve",
    "stop_server",
    "tune_gc_after_startup",
]

_log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass
class ServiceContext:
    """Per-process connections, created in a lifespan and closed there."""

    settings: Settings
    pool: asyncpg.Pool
    redis: aioredis.Redis
    extras: dict[str, Any] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def open_context(settings: Settings, *, pg_max_size: int = 10) -> AsyncIterator[ServiceContext]:
    if settings.database_url is None or settings.redis_url is None:
        raise StartupError(
            "DATABASE_URL and REDIS_URL must be set for a service; "
            "start it through `agent-orchestrator up` to use embedded servers"
        )
    pool = await create_pg_pool(settings.database_url, max_size=pg_max_size)
    try:
        client = await connect_redis(settings.redis_url)
    except BaseException:
        await pool.close()
        raise
    try:
        yield ServiceContext(settings=settings, pool=pool, redis=client)
    finally:
        await client.aclose()
        await pool.close()


# Dependencies are ``async def`` even when they do not await: FastAPI runs a plain ``def``
# dependency in its thread pool, a thread hop per request.
async def _context(request: Request) -> ServiceContext:
    ctx: ServiceContext = request.app.state.ctx
    return ctx


ContextDep = Annotated[ServiceContext, Depends(_context)]


def _presented_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def require_api_key(request: Request) -> None:
    """The dependency of API-key routes: see :func:`check_api_key`."""
    check_api_key(request)


def check_api_key(request: Request) -> None:
    """Refuse the request unless it carries one of the configured API keys (dev mode is open)."""
    settings: Settings = request.app.state.ctx.settings
    if settings.dev_mode:
        return
    presented = _presented_key(request)
    if presented is None:
        raise Unauthorized("missing API key; send it in the X-API-Key header", field="X-API-Key")
    if not any(hmac.compare_digest(presented.encode(), k.encode()) for k in settings.api_keys):
        raise Unauthorized("wrong API key", field="X-API-Key")


ApiKeyDep = Depends(require_api_key)


def error_response(exc: OrchestratorError) -> JSONResponse:
    # details may carry datetimes (a lock's expiry): encode them as FastAPI encodes bodies.
    return JSONResponse({"error": jsonable_encoder(exc.to_dict())}, status_code=exc.status_code)


#: Where FastAPI found a bad value; the field name alone is what callers fix.
_LOCATIONS = {"body", "query", "path", "header", "cookie"}


def non_json_body(headers: Mapping[str, str]) -> UnsupportedMediaType | None:
    """The 415 (naming ``content-type``) for a body not sent as JSON, or None: one with no
    content type (``curl -H 'Content-Type:'``) or another (``curl -d`` sends a form). FastAPI
    reads such a body as bytes and would refuse it as "not a valid dictionary"; a route that
    reads its body itself calls this first. An empty body is left to the route."""
    if headers.get("content-length", "0") == "0" and "transfer-encoding" not in headers:
        return None
    media_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        return None
    sent = f"not {clipped(media_type)!r}" if media_type else "and this request has no Content-Type"
    return UnsupportedMediaType(
        f"the body must be JSON sent with 'Content-Type: application/json', {sent}", field="content-type"
    )


def _refusal(status: int, code: str, field: str, message: str) -> JSONResponse:
    """A client's error, as every error body reads: not retryable, naming the field."""
    return JSONResponse(
        {"error": {"code": code, "field": field, "message": message, "retryable": False}}, status_code=status
    )


def _validation_response(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    err: dict[str, Any] = dict(errors[0]) if errors else {"loc": ("body",), "msg": "invalid request", "type": "x"}
    loc = [str(p) for p in err.get("loc", ())]
    if loc[:1] == ["body"] and (refused := non_json_body(request.headers)) is not None:
        return error_response(refused)
    if loc and loc[0] in _LOCATIONS:
        loc = loc[1:]  # "body.input.x" -> "input.x", "query.limit" -> "limit"
    if err.get("type") == "json_invalid":
        ctx = err.get("ctx") or {}
        why = ctx.get("error", err.get("msg"))
        return _refusal(400, "malformed_json", "body", f"request body is not valid JSON: {why}")
    field_name = ".".join(loc) or "body"
    if err.get("type") == "extra_forbidden":
        return _refusal(422, "invalid_input", field_name, f"{field_name}: unknown field; check its spelling")
    return _refusal(422, "invalid_input", field_name, f"{field_name}: {err.get('msg')}")


def _unparsed_body(cause: BaseException) -> JSONResponse:
    """The answer to a body FastAPI failed to parse other than as malformed JSON (it answers
    those 400 "There was an error parsing the body", naming nothing): the same ``malformed_json``
    naming ``body`` as malformed JSON, saying what is wrong. An error of ours raised while the
    body was read (over the size limit) is answered as itself."""
    if isinstance(cause, OrchestratorError):
        return error_response(cause)
    if isinstance(cause, UnicodeDecodeError):
        why = f"body is not UTF-8 (byte 0x{cause.object[cause.start]:02x} at offset {cause.start}); send JSON as UTF-8"
    elif isinstance(cause, RecursionError):
        why = "body is nested too deeply to read; nest its objects and arrays less deeply"
    elif isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        why = (
            f"body holds a number of more than {sys.get_int_max_str_digits()} digits; send so long a number as a string"
        )
    else:
        why = f"body could not be read as JSON ({type(cause).__name__})"
    return _refusal(400, "malformed_json", "body", f"request {why}")


#: The methods an ``Allow`` header may list; HEAD is served wherever GET is (:class:`HeadAsGet`).
_METHODS = ("DELETE", "GET", "PATCH", "POST", "PUT")


def _method_not_allowed(request: Request) -> JSONResponse:
    """405 with the ``Allow`` header HTTP requires, listing what the path serves (Starlette's
    405 names only the methods of the first route it matched: ``POST`` for ``/workflows``)."""
    routes = request.app.router.routes
    methods = [m for m in _METHODS if any(r.matches({**request.scope, "method": m})[0] is Match.FULL for r in routes)]
    if "GET" in methods:
        methods.insert(methods.index("GET") + 1, "HEAD")
    allowed = ", ".join(methods)
    body = {
        "code": "http_405",
        "message": f"{request.method} is not allowed on {clipped(request.url.path)}; use {allowed}",
        "retryable": False,
    }
    return JSONResponse({"error": body}, status_code=405, headers={"Allow": allowed})


#: Errors that say PostgreSQL or Redis cannot serve right now: answered 503, retryable, not 500
#: (any ``OSError``: a unix socket that is not there yet is a missing file).
_BACKEND_DOWN: tuple[type[Exception], ...] = (OSError, *CONNECTION_FAILURES)


def install_error_handlers(app: FastAPI) -> None:
    """Turn every error into a JSON body naming the problem; never leak a traceback."""

    @app.exception_handler(OrchestratorError)
    async def _orchestrator_error(_: Request, exc: OrchestratorError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not parse the body
            return _unparsed_body(exc.__cause__)
        if exc.status_code == 405:
            return _method_not_allowed(request)
        body = {"code": f"http_{exc.status_code}", "message": str(exc.detail), "retryable": False}
        return JSONResponse({"error": body}, status_code=exc.status_code, headers=exc.headers)

    async def _backend_down(request: Request, exc: Exception) -> JSONResponse:
        _log.warning("%s %s: a backend is unavailable: %r", request.method, request.url.path, exc)
        return error_response(ServiceUnavailable(f"a backend is unavailable, try again: {type(exc).__name__}"))

    # Each class on its own: a handler of ``Exception`` runs in Starlette's outermost middleware,
    # which re-raises after answering, and the server then logs a traceback per 503 of an outage.
    for down in _BACKEND_DOWN:
        app.add_exception_handler(down, _backend_down)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, _BACKEND_DOWN):  # raised where the per-class handlers do not reach
            return await _backend_down(request, exc)
        _log.exception("unhandled error on %s %s", request.method, request.url.path)
        body = {"code": "internal", "message": "internal error; the service log has the details", "retryable": True}
        return JSONResponse({"error": body}, status_code=500)


class BodySizeLimit:
    """Pure ASGI middleware refusing bodies over ``max_bytes`` with 413, streamed or not."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(self._too_large())(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise self._too_large()
            return message

        await self.app(scope, limited, send)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"request body exceeds the limit of {self.max_bytes} bytes; "
            "send a smaller payload or raise AO_MAX_PAYLOAD_BYTES",
            field="body",
        )


class InputGuard:
    """Pure ASGI middleware refusing with 422, naming the field, a query parameter or JSON body
    holding what PostgreSQL cannot store (see ``shared.lib.safe_input``): text with NUL or an
    unpaired surrogate, and, in a body, nesting past ``MAX_JSON_DEPTH`` or an integer past 64
    bits. Install it inside :class:`BodySizeLimit` (:func:`guard_input` does), so it buffers no
    more than the limit. A body is parsed here only when a cheap scan finds a suspicious escape
    or byte, more brackets than the depth limit, or 19 digits in a row."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            _check_query(scope.get("query_string") or b"")
            if _has_body(scope):
                receive = await _checked_body(receive)
        except OrchestratorError as e:
            await error_response(e)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _check_query(raw: bytes) -> None:
    """NUL is the only unsafe character a query can carry: Starlette decodes it as UTF-8 with
    ``errors="replace"``, so an encoded surrogate arrives as U+FFFD."""
    if b"%00" in raw or b"\x00" in raw:
        for key, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
            check_text({key: value})


def _has_body(scope: Scope) -> bool:
    headers = dict(scope.get("headers") or [])
    return headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers


async def _checked_body(receive: Receive) -> Receive:
    """Read the whole body, check it, and give a ``receive`` that replays it as it came."""
    messages: list[Message] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body"):
            break
    _check_body(b"".join(m.get("body", b"") for m in messages))

    async def replay() -> Message:
        return messages.pop(0) if messages else await receive()

    return replay


def _check_body(body: bytes) -> None:
    """Refuse unsafe text, and nesting or integers past what is stored, in a JSON body; parse it
    only when the raw scans say it may hold them. The depth and integer scan added 3 µs to the
    text scan's 3 µs for a 1 KB agent envelope, 1.5 µs to its 1.9 µs for a 70-byte workflow launch
    (``timeit``, best of 5 x 100,000 calls of this function and of ``may_hold_unsafe_text``)."""
    text, limits = may_hold_unsafe_text(body), may_exceed_json_limits(body)
    if not (text or limits):
        return
    try:
        data = json.loads(body)  # as Starlette parses it, so both see the same values
    except (ValueError, RecursionError):
        return  # not JSON, or past what the parser reads: the route answers that, naming the body
    if text:
        check_text(data)
    if limits:
        check_json_limits(data)


class CheckedQuery:
    """Pure ASGI middleware refusing with 422, naming it, a query parameter the route does not
    take (a misspelt ``staus=failed`` was ignored: every workflow was listed) or gives more than
    once where it takes one value (FastAPI would take the last: ``status=a&status=b`` listed
    ``b``). A parameter the route takes as a list (the registry's ``status``) may repeat. A path
    no route serves is left to the router (404, 405); ``/health``, ``/ready`` and ``/metrics``
    ignore a query, as probes and scrapers may add one."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw: bytes = scope.get("query_string") or b""
        if scope["type"] == "http" and raw and (refused := _query_refusal(scope, raw)) is not None:
            await error_response(refused)(scope, receive, send)
            return
        await self.app(scope, receive, send)


#: The operational endpoints every service serves (:func:`ops_router`), which take no parameter.
_OPS_PATHS = frozenset({"/health", "/ready", "/metrics"})


def _query_refusal(scope: Scope, raw: bytes) -> InvalidInput | None:
    """The error naming the first parameter the route does not take, or the first single-valued
    one the query repeats; None when there is neither (or no route serves the path)."""
    if scope.get("path") in _OPS_PATHS:  # probes and scrapers may add their own (Prometheus params)
        return None
    route = _api_route(scope["app"].router.routes, {**scope})  # a copy: matching may note things in it
    if route is None:
        return None
    fields = {f.alias: f for f in _query_fields(route.dependant)}
    counts = Counter(name for name, _ in parse_qsl(raw.decode("latin-1"), keep_blank_values=True))
    for name, n in counts.items():
        if name not in fields:
            known = ", ".join(sorted(fields)) or "none"
            shown = clipped(name)
            return InvalidInput(f"{shown} is not a query parameter of this path (it takes: {known})", field=shown)
        if n > 1 and not field_annotation_is_sequence(fields[name].field_info.annotation):
            return InvalidInput(f"{name} is given {n} times but takes one value; give it once", field=name)
    return None


def _api_route(routes: Sequence[BaseRoute], scope: Scope) -> APIRoute | None:
    """The route that will serve ``scope``. FastAPI keeps an included router as one route of the
    app that matches for all of its own (``original_router``); those are searched in turn."""
    for route in routes:
        if route.matches(scope)[0] is not Match.FULL:
            continue
        if isinstance(route, APIRoute):
            return route
        included = getattr(route, "original_router", None)
        return _api_route(included.routes, scope) if isinstance(included, APIRouter) else None
    return None


def _query_fields(dependant: Dependant) -> Iterator[ModelField]:
    yield from dependant.query_params
    for sub in dependant.dependencies:
        yield from _query_fields(sub)


class HeadAsGet:
    """Pure ASGI middleware answering ``HEAD`` wherever ``GET`` is served, as HTTP expects:
    FastAPI routes only the methods a route declares, so ``HEAD /health`` was a 405. The
    request goes to the app as a ``GET`` (in a copy of the scope: the server, which sees
    ``HEAD``, sends no body either), and the response ends with its headers; a stream
    (server-sent events) is then told the client has gone, so it stops."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        ended = False

        async def headers_only(message: Message) -> None:
            nonlocal ended
            if ended:
                return
            if message["type"] == "http.response.start":
                await send(message)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                ended = True

        async def until_ended() -> Message:
            return {"type": "http.disconnect"} if ended else await receive()

        await self.app({**scope, "method": "GET"}, until_ended, headers_only)


def guard_input(app: FastAPI, *, max_bytes: int) -> None:
    """Every service's handling of a request before its route: bodies over ``max_bytes`` get
    413; unsafe text, JSON nested or an integer past what is stored (:class:`InputGuard`), a query
    parameter the route does not take and a repeated single-valued one 422; ``HEAD`` is served
    wherever ``GET`` is."""
    app.add_middleware(CheckedQuery)
    app.add_middleware(InputGuard)
    app.add_middleware(BodySizeLimit, max_bytes=max_bytes)  # added after InputGuard: outside it
    app.add_middleware(HeadAsGet)


async def _ping(ctx: ServiceContext) -> dict[str, str]:
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(2):
            await ctx.pool.fetchval("SELECT 1")
        checks["postgres"] = "ok"
    except Exception as e:  # noqa: BLE001 - any failure means not ready; say which
        checks["postgres"] = f"error: {type(e).__name__}: {e}"
    try:
        async with asyncio.timeout(2):
            await ctx.redis.ping()  # type: ignore[misc]  # redis-py types ping() as bool | Awaitable
        checks["redis"] = "ok"
    except Exception as e:  # noqa: BLE001 - any failure means not ready; say which
        checks["redis"] = f"error: {type(e).__name__}: {e}"
    for dependency, outcome in checks.items():
        SERVICE_DEPENDENCY_UP.labels(dependency).set(1 if outcome == "ok" else 0)
    return checks


#: service_dependency_up is at most this old when scraped; the probe never delays a scrape.
_PROBE_EVERY_S = 5.0


def _refresh_dependency_probe(ctx: ServiceContext) -> None:
    """Start a background ping when the last one is stale. A scrape must stay fast even when
    PostgreSQL or Redis hangs: waiting on the ping made scrapes time out under load."""
    task: asyncio.Task[dict[str, str]] | None = ctx.extras.get("dependency_probe")
    if task is not None and not task.done():
        return
    if time.monotonic() - ctx.extras.get("dependency_probed_at", 0.0) < _PROBE_EVERY_S:
        return
    ctx.extras["dependency_probed_at"] = time.monotonic()
    ctx.extras["dependency_probe"] = asyncio.create_task(_ping(ctx), name="dependency-probe")


def ops_router(service: str) -> APIRouter:
    """``/health`` (liveness), ``/ready`` (pings PostgreSQL and Redis) and ``/metrics``."""
    router = APIRouter(tags=["operations"])

    @router.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "service": service}

    @router.get("/ready")
    async def ready(ctx: ContextDep) -> JSONResponse:
        checks = await _ping(ctx)
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"status": "ready" if ok else "unavailable", "service": service, "checks": checks},
            status_code=200 if ok else 503,
        )

    @router.get("/metrics")
    async def metrics(ctx: ContextDep) -> PlainTextResponse:
        _refresh_dependency_probe(ctx)
        return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return router


def announce_mode(service: str, settings: Settings) -> None:
    """Say loudly, at start-up, when a service runs open in development mode."""
    if settings.dev_mode:
        _log.warning(
            "!!! %s runs in DEVELOPMENT MODE: API keys and signatures are NOT checked. "
            "Never expose it beyond this machine. !!!",
            service,
        )


def check_port_free(host: str, port: int, service: str) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            why = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
            raise StartupError(
                f"{service}: port {port} on {host} {why}; stop the other process "
                "or choose another port with AO_PORTS or --port"
            ) from e


#: The collector's thresholds for a serving process (CPython's default is 700, 10, 10). A busy
#: orchestrator allocates a great many short-lived objects per workflow; at the default, young
#: collections ran every ~700 of them and took about a tenth of its CPU. Only cyclic garbage
#: waits longer; everything else is still freed at once by reference counting.
GC_THRESHOLDS = (20_000, 20, 20)


def tune_gc_after_startup(app: FastAPI) -> None:
    """Once the app has started, freeze what is alive (modules, compiled graphs, pools: never
    garbage, so no collection walks them again) and set :data:`GC_THRESHOLDS`. Measured by
    ``agent-orchestrator bench workflow``: ~10 % more workflows per second on one replica."""
    started = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
        async with started(a) as state:
            gc.collect()
            gc.freeze()
            gc.set_threshold(*GC_THRESHOLDS)
            yield state

    app.router.lifespan_context = lifespan


class _Server(uvicorn.Server):
    """uvicorn, except that it enters the app's lifespan itself, as the first step of its start-up,
    so that a failure there leaves :meth:`run` as the exception it is (uvicorn logs it with its whole
    traceback, 58 lines for a wrong registration secret, and exits 3); and that SIGTERM/SIGINT run
    ``on_signal`` first (an agent stops taking work at once)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, on_signal: Callable[[], None] | None) -> None:
        super().__init__(config)
        self._app = app
        self._on_signal = on_signal
        self._lifespan: contextlib.AbstractAsyncContextManager[Any] | None = None
        app.state.server = self  # for stop_server

    def stop(self) -> None:
        """Shut down as SIGTERM does, without a signal (uvicorn raises a caught one again on exit)."""
        if self._on_signal is not None:
            self._on_signal()
        self.should_exit = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        lifespan = self._app.router.lifespan_context(self._app)
        await lifespan.__aenter__()  # a failure propagates out of run(), as an exception, unlogged
        self._lifespan = lifespan
        try:
            await super().startup(sockets)
        except BaseException:  # the socket could not be bound: leave (an agent deregisters) before exiting
            await self._exit_lifespan()
            raise

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().shutdown(sockets)
        finally:
            await self._exit_lifespan()

    async def _exit_lifespan(self) -> None:
        lifespan, self._lifespan = self._lifespan, None
        if lifespan is not None:
            await lifespan.__aexit__(None, None, None)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._on_signal is not None:
            self._on_signal()
        super().handle_exit(sig, frame)


def stop_server(app: FastAPI) -> bool:
    """Shut down the :func:`serve` running ``app`` as SIGTERM does (``on_signal``, uvicorn's graceful
    shutdown, the lifespan's exit), so that :func:`serve` returns; False when ``app`` is served
    otherwise (in a test's own loop)."""
    server = getattr(app.state, "server", None)
    if not isinstance(server, _Server):
        return False
    server.stop()
    return True


def serve(
    app: FastAPI,
    *,
    host: str,
    port: int,
    service: str,
    log_level: str = "info",
    on_signal: Callable[[], None] | None = None,
) -> None:
    """Run ``app`` under uvicorn until SIGTERM/SIGINT, after checking the port is free. A start-up
    failure raises: the lifespan's own error (an :class:`OrchestratorError` is one line to print),
    else :class:`StartupError`. ``on_signal`` runs when the signal arrives, before the shutdown."""
    check_port_free(host, port, service)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level.lower(),
        lifespan="off",  # entered by _Server
        access_log=False,
        timeout_graceful_shutdown=30,
    )
    tune_gc_after_startup(app)
    server = _Server(config, app, on_signal)
    try:
        server.run()
    except SystemExit as e:  # uvicorn's own start-up failure (exit 3), its reason logged in one line
        if e.code != uvicorn.config.STARTUP_FAILURE:
            raise
    if not server.started:
        raise StartupError(f"{service} failed to start on {host}:{port}; its log above says why")
