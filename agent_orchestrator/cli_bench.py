"""``agent-orchestrator bench``: every speed figure, measured beside its peer, in one run.

Each suite runs on a fresh database and Redis key prefix of its own, on the
configured servers (``DATABASE_URL`` / ``REDIS_URL``) or embedded ones started
for the run. The result is one JSON object: figure name -> number, plus
``machine`` (cores, load, versions), ``notes`` (what a number cannot say),
``series`` (what the report plots), ``suites`` (each suite's figure names),
``failed_suites`` and ``command``. ``docs/BENCHMARKS.md`` is rendered from it by
``python -m support.bench.report``.
"""

from __future__ import annotations

import importlib
import shlex
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
import uvloop
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from shared.lib.errors import InvalidInput, StartupError

__all__ = ["SUITES", "bench", "run_suites"]

#: Suite name -> the modules it runs, in order; each has ``async def run(settings, *, progress)``
#: (and may have ``run_detailed`` returning a ``SuiteResult`` with plot data).
SUITES: dict[str, tuple[str, ...]] = {
    "messaging": ("support.bench.messaging", "support.bench.messaging_series"),
    "locks": ("support.bench.locks",),
    "checkpoint": ("support.bench.checkpoint",),
    "workflow": ("support.bench.workflow",),
    "scale": ("support.bench.registry_scale", "support.bench.delivery"),
    "soak": ("support.bench.soak",),
}
#: ``all``: every suite but the soak, which runs for minutes to hours.
ALL = ("messaging", "locks", "checkpoint", "workflow", "scale")

_out = Console(stderr=True)


def _import_support() -> None:
    """The suites live in the checkout's ``support/bench`` (not in the installed package)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "support" / "bench" / "harness.py").exists():
        raise StartupError(f"the benchmarks live in a source checkout (support/bench), not found under {root}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


def _suite_names(names: list[str]) -> list[str]:
    chosen: list[str] = []
    for name in names or ["all"]:
        expanded = ALL if name == "all" else (name,)
        for suite in expanded:
            if suite not in SUITES:
                raise InvalidInput(f"unknown suite {name!r}; choose from all, {', '.join(SUITES)}", field="suite")
            if suite not in chosen:
                chosen.append(suite)
    return chosen


async def _call_module(module_name: str, settings: Any, progress: Callable[[str], None], **kwargs: Any) -> Any:
    from support.bench.harness import SuiteResult

    module = importlib.import_module(module_name)
    if hasattr(module, "run_detailed"):
        result: SuiteResult = await module.run_detailed(settings, progress=progress, **kwargs)
        return result
    return SuiteResult(figures=dict(await module.run(settings, progress=progress, **kwargs)))


async def _clear_prefix(redis_url: str, prefix: str) -> None:
    from shared.lib.connections import connect_redis

    client = await connect_redis(redis_url)
    try:
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            await client.unlink(key)
    finally:
        await client.aclose()


async def _run_suite(
    suite: str, base: Any, admin_url: str, redis_url: str, say: Callable[[str], None], **kwargs: Any
) -> Any:
    """One suite's modules on a fresh database and Redis prefix."""
    from support.bench.harness import SuiteResult, scratch_database

    result = SuiteResult()
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    async with scratch_database(admin_url, label=suite) as db_url:
        settings = base.model_copy(update={"database_url": db_url, "redis_url": redis_url, "redis_prefix": prefix})
        try:
            for module_name in SUITES[suite]:
                result.merge(await _call_module(module_name, settings, say, **kwargs))
        finally:
            await _clear_prefix(redis_url, prefix)
    return result


async def _run_guarded(
    suite: str, settings: Any, admin_url: str, redis_url: str, say: Callable[[str], None], **kwargs: Any
) -> Any:
    """Run one suite, timed; a failure becomes a note, so one broken suite keeps the others' figures."""
    from support.bench.harness import SuiteResult

    started = time.monotonic()
    try:
        result = await _run_suite(suite, settings, admin_url, redis_url, say, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported as the suite's error; the run goes on
        result = SuiteResult(notes={f"{suite}_error": f"{type(e).__name__}: {e}"})
        _out.print(f"[bold red]suite {suite} failed:[/] {escape(f'{type(e).__name__}: {e}')}")
        _out.print(traceback.format_exc(limit=8), style="dim", highlight=False, markup=False)
    result.figures[f"bench_{suite}_duration_s"] = time.monotonic() - started
    return result


async def _versions(admin_url: str, redis_url: str) -> tuple[str, str]:
    from shared.lib.connections import connect_postgres, connect_redis

    conn = await connect_postgres(admin_url)
    try:
        pg = str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()
    client = await connect_redis(redis_url)
    try:
        info = await client.info("server")
    finally:
        await client.aclose()
    return pg, str(info.get("redis_version", "unknown"))


async def run_suites(
    suites: list[str],
    *,
    settings: Any,
    suite_kwargs: dict[str, dict[str, Any]] | None = None,
    placement: str = "servers",
) -> dict[str, Any]:
    """Run ``suites`` and return the results object (figures, machine, notes, series, command).

    ``placement`` says where embedded servers and the rest run (``support.bench.harness``).
    """
    from support.bench.harness import SuiteResult, machine_info, servers

    collected = SuiteResult()
    failed: list[str] = []
    names: dict[str, list[str]] = {}
    columns = (TextColumn("[bold]{task.fields[suite]:<10}"), BarColumn(), TextColumn("{task.description}"))
    async with servers(settings, placement=placement) as (admin_url, redis_url):
        with Progress(*columns, TimeElapsedColumn(), console=_out, transient=False) as bar:
            task = bar.add_task("starting", total=len(suites), suite="")
            for suite in suites:
                bar.update(task, suite=suite, description="starting")

                def say(message: str) -> None:
                    bar.update(task, description=message[:100])

                kwargs = (suite_kwargs or {}).get(suite, {})
                result = await _run_guarded(suite, settings, admin_url, redis_url, say, **kwargs)
                names[suite] = list(result.figures)
                collected.merge(result)
                if f"{suite}_error" in result.notes:
                    failed.append(suite)
                bar.advance(task)
        pg, redis_version = await _versions(admin_url, redis_url)
    return {
        **{k: float(v) for k, v in collected.figures.items()},
        "machine": machine_info(postgres=pg, redis=redis_version),
        "notes": collected.notes,
        "series": {"distributions": collected.distributions, "curves": collected.series},
        "suites": names,
        "command": "agent-orchestrator " + shlex.join(sys.argv[1:]),
        "failed_suites": failed,
    }


_PLACEMENT_HELP = (
    "servers (the default): embedded PostgreSQL and Redis on the last CPU, so every client-server hop "
    "crosses CPUs alike; split: also every other process on the other CPUs; free: the kernel places all."
)
_SUITES_HELP = "Suites: all (the default: every suite but soak), messaging, locks, checkpoint, workflow, scale, soak."


def bench(
    json_path: Annotated[Path, typer.Option("--json", help="Write the results object here (figure name -> number).")],
    suites: Annotated[list[str] | None, typer.Argument(help=_SUITES_HELP)] = None,
    minutes: Annotated[float, typer.Option("--minutes", min=0.1, help="Soak duration in minutes.")] = 5.0,
    placement: Annotated[str, typer.Option("--placement", help=_PLACEMENT_HELP)] = "servers",
) -> None:
    """Run benchmark suites against their peers; write the figures as JSON."""
    from shared.lib.bootstrap import configure_logging
    from shared.lib.settings import load_settings

    settings = load_settings(dev_mode=True)  # the suites bring their own secrets
    configure_logging("WARNING")
    chosen = _suite_names(suites or [])
    _import_support()
    from support.bench.harness import PLACEMENTS

    if placement not in PLACEMENTS:
        raise InvalidInput(f"unknown placement {placement!r}; choose from {', '.join(PLACEMENTS)}", field="placement")
    suite_kwargs = {"soak": {"duration_s": minutes * 60}}
    # The services run on uvloop (uvicorn's default when it is installed): so do the suites and their peers.
    results = uvloop.run(run_suites(chosen, settings=settings, suite_kwargs=suite_kwargs, placement=placement))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
    _summary(results)
    if results["failed_suites"]:
        failed = escape(f"{', '.join(results['failed_suites'])}; the rest is in {json_path}")
        _out.print(f"[bold red]failed suites:[/] {failed}")
        raise typer.Exit(1)
    _out.print(f"[green]wrote[/] {escape(str(json_path))}")


def _summary(results: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table("figure", "value", title="benchmark figures")
    for key, value in results.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:,.4g}")
    _out.print(table)
