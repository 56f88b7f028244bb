"""Render docs/BENCHMARKS.md (and docs/bench/*.png) from a results file of ``agent-orchestrator bench``.

Run: ``uv run python -m support.bench.report [support/bench/results/latest.json]``; the soak's
results (``support/bench/results/soak.json``, from ``make soak``) are added when present.
Every goal below is the one the project states; a missed goal is shown as missed.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

__all__ = ["ROWS", "Row", "render"]

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS = ROOT / "support" / "bench" / "results" / "latest.json"
SOAK_RESULTS = ROOT / "support" / "bench" / "results" / "soak.json"
DOC = ROOT / "docs" / "BENCHMARKS.md"

Check = Callable[[dict[str, float]], bool]


@dataclass(frozen=True)
class Row:
    """One figure of a suite's table: its peer (a figure of the same run), the goal and its check."""

    figure: str
    peer: str = ""
    goal: str = ""
    check: Check | None = None
    lower_is_better: bool = True
    baseline: bool = False
    """The peer is a baseline (no checkpointer, the bare floor): the ratio reads "N x the baseline"."""


def _le(name: str, limit: float) -> Check:
    return lambda r: r[name] <= limit


def _ge(name: str, limit: float) -> Check:
    return lambda r: r[name] >= limit


def _all(*checks: Check) -> Check:
    return lambda r: all(c(r) for c in checks)


def _ratio_at_least(slow: str, fast: str, factor: float) -> Check:
    return lambda r: r[slow] / r[fast] >= factor


def _ratio_at_most(name: str, base: str, factor: float) -> Check:
    return lambda r: r[name] / r[base] <= factor


ROWS: dict[str, list[Row]] = {
    "messaging": [
        Row(
            "rpc_p50_ms",
            "celery_p50_ms",
            "≤ 0.5 ms; ≥ 3x faster than Celery",
            _all(_le("rpc_p50_ms", 0.5), _ratio_at_least("celery_p50_ms", "rpc_p50_ms", 3)),
        ),
        Row("rpc_p99_ms"),
        Row("rpc_p50_ms", "bare_streams_rtt_p50_ms", "report (the floor: a bare Streams round trip)", baseline=True),
        Row(
            "rpc_throughput_rps",
            "celery_throughput_rps",
            "≥ 10,000/s; ≥ 10x Celery",
            _all(_ge("rpc_throughput_rps", 10_000), _ratio_at_least("rpc_throughput_rps", "celery_throughput_rps", 10)),
            lower_is_better=False,
        ),
    ],
    "locks": [
        Row("lock_p50_ms", goal="≤ 0.3 ms", check=_le("lock_p50_ms", 0.3)),
        Row("lock_p50_ms", "lock_floor_p50_ms", "report (the floor)", baseline=True),
        Row("lock_p50_ms", "redis_lock_p50_ms", "report (the peer)"),
        Row("lock_contended_throughput", goal="report (64 tasks, 16 resources)", lower_is_better=False),
    ],
    "checkpoint": [
        Row(
            "step_checkpointed_ms",
            "step_plain_ms",
            "≤ 2x plain (durability sync)",
            _ratio_at_most("step_checkpointed_ms", "step_plain_ms", 2),
            baseline=True,
        ),
        Row("step_checkpointed_new_thread_ms", "step_plain_ms", "report (no read; one commit)", baseline=True),
        Row("step_checkpointed_async_commit_ms", "step_plain_ms", "report (no WAL flush wait)", baseline=True),
        Row(
            "step_checkpointed_new_thread_async_commit_ms",
            "step_plain_ms",
            "report (new thread, no WAL flush wait)",
            baseline=True,
        ),
        Row("stock_step_checkpointed_ms", "step_plain_ms", "report (stock saver, default durability)", baseline=True),
        Row("step_checkpointed_ms", "stock_step_checkpointed_ms", "report (ours at sync, stock at async)"),
        Row("step_inmemory_sync_ms", "step_plain_ms", "report (LangGraph's own work, no I/O)", baseline=True),
        Row(
            "step_checkpointed_floor_ms",
            "step_plain_ms",
            "report (3 commits in turn: the best without the new-thread hint)",
            baseline=True,
        ),
        Row(
            "pooled_concurrent_runs_per_s",
            "stock_concurrent_runs_per_s",
            "report (16 in flight, one saver)",
            lower_is_better=False,
        ),
    ],
    "workflow": [
        Row(
            "workflow_e2e_streamed_p50_ms",
            "langgraph_dev_run_p50_ms",
            "≤ 10 ms (followed in one request: launched with stream=true)",
            _le("workflow_e2e_streamed_p50_ms", 10),
        ),
        Row("workflow_e2e_streamed_p99_ms"),
        Row(
            "workflow_e2e_p50_ms",
            "langgraph_dev_run_p50_ms",
            "≤ 10 ms (launched, then followed on GET /events)",
            _le("workflow_e2e_p50_ms", 10),
        ),
        Row("workflow_e2e_p99_ms"),
        Row(
            "workflow_e2e_wait_p50_ms",
            "langgraph_dev_run_p50_ms",
            "≤ 10 ms (launched with wait_s, as the peer's /runs/wait)",
            _le("workflow_e2e_wait_p50_ms", 10),
        ),
        Row(
            "workflow_throughput_per_s",
            "langgraph_dev_runs_per_s",
            "≥ 300/s across 2 replicas",
            _ge("workflow_throughput_per_s", 300),
            lower_is_better=False,
        ),
        Row("workflow_cpu_ms_orchestrator", goal="report (CPU per workflow at throughput, both replicas)"),
        Row("workflow_cpu_ms_agents", goal="report (both no-op agents)"),
        Row("workflow_cpu_ms_client", goal="report (the benchmark's own HTTP client)"),
        Row(
            "workflow_hop_pg_commit_after_idle_ms",
            "workflow_hop_pg_commit_ms",
            "report (a one-row commit after 5 ms idle, against back to back)",
            baseline=True,
        ),
        Row(
            "workflow_hop_redis_ping_after_idle_ms",
            "workflow_hop_redis_ping_ms",
            "report (a Redis PING after 5 ms idle, against back to back)",
            baseline=True,
        ),
    ],
    "scale": [
        Row("agents_heartbeating", goal="500", check=lambda r: r["agents_heartbeating"] == 500, lower_is_better=False),
        Row("agents_wrongly_offline", goal="0", check=lambda r: r["agents_wrongly_offline"] == 0),
        Row(
            "delivery_ratio_50_agents",
            goal="1.0 exactly",
            check=lambda r: r["delivery_ratio_50_agents"] == 1.0,
            lower_is_better=False,
        ),
    ],
    "soak": [
        Row(
            "soak_max_rss_growth_percent",
            goal="< 5 %",
            check=_le("soak_max_rss_growth_percent", 4.999),
        ),
        Row(
            "soak_workflows_unfinished",
            goal="0 (every launched workflow finishes)",
            check=lambda r: r["soak_workflows_unfinished"] == 0,
        ),
    ],
}

_SUITE_TITLES = {
    "messaging": "Messaging: request/response over Redis Streams (peer: Celery 5, `-P solo`)",
    "locks": "Locks: PostgreSQL advisory-lock leases (floor: bare advisory lock; peer: redis-py `Lock`)",
    "checkpoint": "Checkpoints: one superstep (peer: no checkpointer, stock `AsyncPostgresSaver`)",
    "workflow": "Workflows through the HTTP API (peer: `langgraph dev`)",
    "scale": "Scale: registry heartbeats and bus delivery",
    "soak": "Soak",
}


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if value == 0:
        return "0"
    if value == int(value) and abs(value) >= 1:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _ratio(row: Row, figures: dict[str, float]) -> str:
    if not row.peer or row.peer not in figures or not figures[row.figure]:
        return ""
    ours, peer = figures[row.figure], figures[row.peer]
    if not peer:
        return ""
    if row.baseline:
        return f"{ours / peer:.2f}x the baseline"
    if row.lower_is_better:
        return f"{peer / ours:.2f}x faster" if ours <= peer else f"{ours / peer:.2f}x slower"
    return f"{ours / peer:.2f}x as much"


def _met(row: Row, figures: dict[str, float]) -> str:
    if row.check is None:
        return "—"
    try:
        return "yes" if row.check(figures) else "**no**"
    except (KeyError, ZeroDivisionError):
        return "not measured"


def _table(suite: str, figures: dict[str, float], names: list[str]) -> list[str]:
    lines = [
        "| figure | value | peer | ours against the peer | goal | met? |",
        "| --- | ---: | --- | ---: | --- | --- |",
    ]
    shown: set[str] = set()
    for row in ROWS.get(suite, []):
        if row.figure not in figures:
            lines.append(f"| `{row.figure}` | not measured | {row.peer and f'`{row.peer}`'} | | {row.goal} | no |")
            continue
        peer = f"`{row.peer}` = {_fmt(figures[row.peer])}" if row.peer in figures else (row.peer and f"`{row.peer}`")
        lines.append(
            f"| `{row.figure}` | {_fmt(figures[row.figure])} | {peer} | {_ratio(row, figures)} | {row.goal} | "
            f"{_met(row, figures)} |"
        )
        shown |= {row.figure, row.peer}
    rest = [n for n in names if n not in shown and not n.startswith("bench_")]
    if rest:
        lines += ["", "Every other figure of this suite:", "", "| figure | value |", "| --- | ---: |"]
        lines += [f"| `{n}` | {_fmt(figures[n])} |" for n in rest]
    return lines


def _plot_distribution(suite: str, dists: dict[str, list[float]], own: dict[str, float], out: Path) -> bool:
    """Latency quantile curves of the suite's operations; without them, its ms figures as bars."""
    import matplotlib.pyplot as plt

    mine = {k: v for k, v in dists.items() if k.startswith(suite + " ") and v}
    fig, ax = plt.subplots(figsize=(7, 4))
    if mine:
        for name, qs in mine.items():
            ax.plot([i / (len(qs) - 1) * 100 for i in range(len(qs))], qs, label=name.removeprefix(suite + " "))
        ax.set_xlabel("percentile")
        ax.set_ylabel("latency (ms)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ms = {k: v for k, v in own.items() if k.endswith("_ms")}
        if not ms:
            plt.close(fig)
            return False
        ax.barh(list(ms), list(ms.values()))
        ax.set_xlabel("ms (median, or p99 where named)")
    ax.set_title(f"{suite}: latency distribution")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def _plot_curves(title: str, curves: dict[str, list[list[float]]], *, xlabel: str, ylabel: str, out: Path) -> bool:
    """Several named (x, y) curves on one plot."""
    import matplotlib.pyplot as plt

    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def _plot_curve(name: str, points: list[list[float]], *, xlabel: str, ylabel: str, out: Path) -> bool:
    import matplotlib.pyplot as plt

    if not points:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    if len(points) > 2 and points[-1][0] / max(points[0][0], 1e-9) >= 16:
        ax.set_xscale("log", base=2)
    ax.set_xticks([p[0] for p in points], [f"{p[0]:g}" for p in points])
    ax.set_ylim(bottom=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


_CURVES = {
    "messaging throughput vs in-flight": ("requests in flight", "requests/s", "messaging_throughput.png"),
    "workflow latency vs replicas": ("orchestrator replicas", "workflow p50 (ms)", "workflow_replicas.png"),
}


def _plots(series: dict[str, Any], figures: dict[str, float], suites: dict[str, list[str]], plots: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    plots.mkdir(parents=True, exist_ok=True)
    lines: list[str] = ["## Plots", ""]
    for suite, names in suites.items():
        own = {n: figures[n] for n in names if n in figures}
        if _plot_distribution(suite, series.get("distributions", {}), own, plots / f"{suite}_latency.png"):
            lines.append(f"![{suite} latency](bench/{suite}_latency.png)")
    for name, (xlabel, ylabel, filename) in _CURVES.items():
        points = series.get("curves", {}).get(name, [])
        if _plot_curve(name, points, xlabel=xlabel, ylabel=ylabel, out=plots / filename):
            lines.append(f"![{name}](bench/{filename})")
    memory = {k.removeprefix("soak rss "): v for k, v in series.get("curves", {}).items() if k.startswith("soak rss ")}
    if _plot_curves(
        "soak: resident memory", memory, xlabel="minutes", ylabel="RSS (MB)", out=plots / "soak_memory.png"
    ):
        lines.append("![soak memory](bench/soak_memory.png)")
    return [*lines, ""]


def _machine(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    return (
        f"{m.get('cores', '?')} cores, load {m.get('load_1m', '?')} / {m.get('load_5m', '?')} / "
        f"{m.get('load_15m', '?')} (1/5/15 min, at the end), PostgreSQL {m.get('postgres', '?')}, "
        f"Redis {m.get('redis', '?')}, Python {m.get('python', '?')}, {m.get('platform', '')}"
    )


def _placement(results: dict[str, Any]) -> str:
    return str(results.get("machine", {}).get("placement", "not recorded"))


def _load(path: Path) -> tuple[dict[str, Any], dict[str, float]]:
    results: dict[str, Any] = orjson.loads(path.read_bytes())
    figures = {k: float(v) for k, v in results.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return results, figures


def _run_section(results: dict[str, Any], figures: dict[str, float]) -> list[str]:
    lines = [
        f"- Command: `{results.get('command', 'make bench')}`, then `python -m support.bench.report`.",
        f"- Machine: {_machine(results)}.",
        f"- Placement: {_placement(results)}.",
        "",
    ]
    for suite, names in results.get("suites", {}).items():
        lines += [f"## {_SUITE_TITLES.get(suite, suite)}", "", *_table(suite, figures, names), ""]
    return lines


def render(results_path: Path = DEFAULT_RESULTS, *, doc: Path = DOC, extra: Sequence[Path] | None = None) -> str:
    """Write the report for ``results_path`` (and the ``extra`` result files, by default the soak's
    when there is one) to ``doc``, with its plots beside it (``bench/*.png``)."""
    if extra is None:
        extra = [SOAK_RESULTS] if SOAK_RESULTS.exists() else []
    lines = [
        "# Benchmarks",
        "",
        "Every figure below comes from a run of the benchmark harness on this machine, each beside the",
        "thing a user would pick instead, measured in the same run on the same servers. Values are",
        "medians unless the name says p99; latencies are in ms. A goal that is missed says **no**.",
        "The suites run on uvloop, the event loop the services run on (uvicorn's default), and so",
        "do their peers. The machine is a shared 2-core VM: the same code measured minutes apart",
        "moves by up to half, peers included, so compare the figures of one run with each other.",
        "Where the servers run is fixed, not left to the kernel: on this VM a client and its server",
        "on one CPU answer each other about 4x faster than across CPUs, and an unpinned run gets",
        "either at random, not always alike for ours and the floor. By default (`--placement servers`)",
        "the embedded PostgreSQL and Redis run on the last CPU, so every process, ours and the peers',",
        "talks to them across CPUs; the placement line of each run says which it used.",
        "",
    ]
    results, figures = _load(results_path)
    lines += _run_section(results, figures)
    notes: dict[str, str] = dict(results.get("notes", {}))
    series: dict[str, dict[str, Any]] = {"distributions": {}, "curves": {}}
    suites: dict[str, list[str]] = dict(results.get("suites", {}))
    for path in extra:
        more, more_figures = _load(path)
        lines += _run_section(more, more_figures)
        notes.update(more.get("notes", {}))
        figures = {**more_figures, **figures}
        suites.update({k: v for k, v in more.get("suites", {}).items() if k not in suites})
        for kind in series:
            series[kind].update(more.get("series", {}).get(kind, {}))
    for kind in series:
        series[kind].update(results.get("series", {}).get(kind, {}))
    if notes:
        lines += ["## Notes", ""] + [f"- **{k}**: {v}" for k, v in sorted(notes.items())] + [""]
    lines += _plots(series, figures, suites, doc.parent / "bench")
    text = "\n".join(lines)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    return text


if __name__ == "__main__":
    render(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_RESULTS)
    print(f"wrote {DOC.relative_to(ROOT)} and docs/bench/*.png")
