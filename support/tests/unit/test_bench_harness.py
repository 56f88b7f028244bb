"""The benchmark harness: percentiles, interleaved measuring, and a tiny suite run end to end
through ``agent-orchestrator bench`` into a valid results file and report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.bench.harness import Plan, measure, percentile, quantiles

ROOT = Path(__file__).resolve().parents[3]


def test_percentile_is_nearest_rank() -> None:
    """Percentiles are observed values: the median of 1..100 is 50, its p99 is 99."""
    samples = [float(i) for i in range(100, 0, -1)]
    assert percentile(samples, 0.5) == 50.0
    assert percentile(samples, 0.99) == 99.0
    assert percentile(samples, 1.0) == 100.0
    assert quantiles(samples, points=3) == [1.0, 50.0, 100.0]


async def test_measure_interleaves_every_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """measure() warms each op up, then runs them in alternating rounds, and keeps every sample."""
    monkeypatch.setenv("AO_BENCH_SCALE", "1")
    calls: list[str] = []

    def op(name: str):  # type: ignore[no-untyped-def]
        async def run() -> None:
            calls.append(name)

        return run

    timings = await measure({"a": op("a"), "b": op("b")}, plan=Plan(warmup=1, rounds=2, per_round=3))
    assert calls == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert len(timings["a"].samples_ms) == 6
    assert timings["b"].p50 >= 0


@pytest.mark.slow
def test_bench_checkpoint_suite_writes_valid_json(server_urls: tuple[str, str], tmp_path: Path) -> None:
    """`bench checkpoint --json` runs the suite on the given servers and writes figures, machine and series."""
    out = tmp_path / "results.json"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AO_")},
        "DATABASE_URL": server_urls[0],
        "REDIS_URL": server_urls[1],
        "AO_BENCH_SCALE": "0.02",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "agent_orchestrator", "bench", "checkpoint", "--json", str(out)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["failed_suites"] == []
    assert results["step_plain_ms"] > 0
    assert results["step_checkpointed_ms"] > results["step_plain_ms"]
    assert results["checkpoint_commits_per_run"] == 3
    assert results["stock_commits_per_run"] > results["checkpoint_commits_per_run"]
    assert results["machine"]["cores"] >= 1
    assert results["machine"]["postgres"]
    assert "step_checkpointed_ms" in results["suites"]["checkpoint"]
    assert len(results["series"]["distributions"]["checkpoint plain"]) == 101

    from support.bench.report import render

    text = render(out, doc=tmp_path / "BENCHMARKS.md", extra=[])
    assert "| `step_checkpointed_ms` |" in text
    assert "![checkpoint latency](bench/checkpoint_latency.png)" in text


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="placing servers apart needs two CPUs")
@pytest.mark.parametrize("placement", ["servers", "split"])
async def test_placement_puts_servers_on_their_own_cpu(placement: str, tmp_path: Path) -> None:
    """PostgreSQL and Redis start on the last CPU; `split` also pins the caller to the others, until the end."""
    from shared.lib.connections import connect_postgres, connect_redis
    from shared.lib.settings import load_settings
    from support.bench.harness import describe_placement, servers

    settings = load_settings(dev_mode=True).model_copy(update={"database_url": None, "redis_url": None})
    own = os.sched_getaffinity(0)
    last = max(own)
    async with servers(settings, data_dir=tmp_path, placement=placement) as (pg_url, redis_url):
        assert os.sched_getaffinity(0) == (own - {last} if placement == "split" else own)
        conn = await connect_postgres(pg_url)
        try:
            assert os.sched_getaffinity(await conn.fetchval("SELECT pg_backend_pid()")) == {last}
        finally:
            await conn.close()
        client = await connect_redis(redis_url)
        try:
            redis_pid = (await client.info("server"))["process_id"]
        finally:
            await client.aclose()
        assert os.sched_getaffinity(redis_pid) == {last}
        assert describe_placement().startswith(f"{placement}: PostgreSQL and Redis on CPU {last}")
    assert os.sched_getaffinity(0) == own
