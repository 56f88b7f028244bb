"""The six agents' real work on real git repositories made in each test.

Every call goes through ``Agent.run`` (payload validation included), which is
the path both the bus and ``POST /agent-request`` take.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import os
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage

from agents.catalogue import AGENTS
from agents.sdk.agent import Agent
from agents.sdk.brain import ChatModelBrain
from agents.sdk.routes import status_for_error_code
from agents.work.release import current_release, release_history
from shared.lib.agent_events import AgentRequestEvent, signing_key_for
from shared.lib.errors import Conflict, InvalidInput, NotFound, Timeout
from shared.lib.settings import Settings
from support.tests.conftest import TEST_SECRETS
from support.tests.integration.conftest import BusFactory, serve_on

FAKE_AWS_KEY = "AKIA" + "IOSFODNN7EXAMPLE"  # split so this file never trips a secret scanner itself


class Repo:
    """A git repository in a temporary directory, with helpers to write files and commit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True)
        self.git("init", "-q", "-b", "main")
        self.git("config", "user.email", "dev@example.com")
        self.git("config", "user.name", "Dev")
        self.git("config", "commit.gpgsign", "false")

    def git(self, *args: str) -> str:
        return subprocess.run(["git", *args], cwd=self.path, check=True, capture_output=True, text=True).stdout.strip()

    def commit(self, files: dict[str, str], message: str = "change") -> str:
        for name, text in files.items():
            target = self.path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        return self.git("rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return Repo(tmp_path / "repo")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        api_keys=[TEST_SECRETS["AO_API_KEYS"]],
        registration_secret=TEST_SECRETS["AO_REGISTRATION_SECRET"],
        signing_key=TEST_SECRETS["AO_SIGNING_KEY"],
        keep_releases=2,
    )


@pytest.fixture
def agent(settings: Settings) -> Callable[..., Agent]:
    def make(name: str, *, brain: Any = None) -> Agent:
        return AGENTS[name](settings, brain=brain)

    return make


CLEAN = '"""Arithmetic."""\n\n\ndef add(a: int, b: int) -> int:\n    """Add two numbers."""\n    return a + b\n'


async def test_review_rejects_a_lint_error_and_an_aws_key(repo: Repo, agent: Callable[..., Agent]) -> None:
    """A change adding an unused import and an AWS access key id is not approved, with both findings located."""
    base = repo.commit({"calc.py": CLEAN})
    head = repo.commit({"calc.py": "import os\n" + CLEAN + f'\nAWS_KEY_ID = "{FAKE_AWS_KEY}"\n'})
    result = await agent("code-review").run("REVIEW_CODE", {"repo_path": str(repo.path), "base": base, "head": head})
    assert result["approved"] is False
    rules = {(f["rule"], f["file"], f["line"], f["severity"]) for f in result["findings"]}
    assert ("ruff/F401", "calc.py", 1, "error") in rules
    assert ("secret/aws-access-key-id", "calc.py", 9, "error") in rules
    assert result["python_files"] == ["calc.py"]


async def test_review_approves_a_clean_change(repo: Repo, agent: Callable[..., Agent]) -> None:
    """A change with no error-level finding is approved and leaves no worktree behind."""
    base = repo.commit({"README.md": "# calc\n"})
    head = repo.commit({"calc.py": CLEAN})
    result = await agent("code-review").run("REVIEW_CODE", {"repo_path": str(repo.path), "base": base, "head": head})
    assert result["approved"] is True, result["findings"]
    assert result["counts"]["error"] == 0
    assert repo.git("worktree", "list").count("\n") == 0  # only the main worktree is left


async def test_review_flags_conflict_markers_and_oversized_files(repo: Repo, agent: Callable[..., Agent]) -> None:
    """Conflict markers and a file over the size limit are error-level findings."""
    base = repo.commit({"notes.txt": "one\n"})
    head = repo.commit({"notes.txt": "<<<<<<< HEAD\none\n=======\ntwo\n>>>>>>> branch\n", "blob.bin": "x" * 5000})
    payload = {"repo_path": str(repo.path), "base": base, "head": head, "max_file_bytes": 1000}
    result = await agent("code-review").run("REVIEW_CODE", payload)
    rules = [(f["file"], f["rule"]) for f in result["findings"]]
    assert rules.count(("notes.txt", "conflict-marker")) == 3
    assert ("blob.bin", "file-too-large") in rules
    assert result["approved"] is False


async def test_review_summary_comes_from_the_configured_llm(repo: Repo, agent: Callable[..., Agent]) -> None:
    """With an LLM brain configured, the review adds its summary on top of the deterministic findings."""
    brain = ChatModelBrain(GenericFakeChatModel(messages=iter([AIMessage("Remove the unused import.")])))
    base = repo.commit({"calc.py": CLEAN})
    head = repo.commit({"calc.py": "import os\n" + CLEAN})
    payload = {"repo_path": str(repo.path), "base": base, "head": head}
    result = await agent("code-review", brain=brain).run("REVIEW_CODE", payload)
    assert result["summary"] == "Remove the unused import."
    assert result["approved"] is False


async def test_explain_code_summarizes_a_module(repo: Repo, agent: Callable[..., Agent]) -> None:
    """EXPLAIN_CODE lists the module's classes, methods and function signatures from its AST."""
    source = CLEAN + '\n\nclass Acc:\n    """Accumulates."""\n\n    def push(self, x: int) -> None:\n        pass\n'
    repo.commit({"pkg/calc.py": source})
    result = await agent("code-review").run("EXPLAIN_CODE", {"repo_path": str(repo.path), "path": "pkg/calc.py"})
    assert result["module"] == "pkg.calc"
    assert [f["signature"] for f in result["functions"]] == ["def add(a: int, b: int) -> int"]
    assert result["classes"][0]["name"] == "Acc"
    assert [m["name"] for m in result["classes"][0]["methods"]] == ["push"]


async def test_a_relative_repo_path_is_refused_naming_it(
    repo: Repo, agent: Callable[..., Agent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative ``repo_path`` would be read in the agent's directory, not the caller's: refused
    even where it names a repository from the agent's directory."""
    repo.commit({"pkg/calc.py": CLEAN})
    monkeypatch.chdir(repo.path)
    with pytest.raises(InvalidInput) as err:
        await agent("code-review").run("EXPLAIN_CODE", {"repo_path": ".", "path": "pkg/calc.py"})
    assert err.value.field == "repo_path"
    assert "absolute" in err.value.message


TEST_OK = "from calc import add\n\n\ndef test_add():\n    assert add(1, 2) == 3\n"
TEST_BAD = TEST_OK + "\n\ndef test_wrong():\n    assert add(1, 1) == 3\n"


async def test_pipeline_fails_on_a_failing_test(repo: Repo, agent: Callable[..., Agent]) -> None:
    """A revision whose tests pass passes; the next one, with a failing test, fails with the counts."""
    good = repo.commit({"calc.py": CLEAN, "test_calc.py": TEST_OK})
    bad = repo.commit({"test_calc.py": TEST_BAD})
    cicd = agent("cicd")
    passed = await cicd.run("RUN_PIPELINE", {"repo_path": str(repo.path), "revision": good})
    failed = await cicd.run("RUN_PIPELINE", {"repo_path": str(repo.path), "revision": bad})
    assert (passed["success"], passed["passed"], passed["failed"]) == (True, 1, 0), passed["log_tail"]
    assert (failed["success"], failed["passed"], failed["failed"]) == (False, 1, 1), failed["log_tail"]
    assert failed["exit_code"] != 0
    assert "test_wrong" in failed["log_tail"]
    assert failed["command_source"] == "default"


async def test_pipeline_runs_the_declared_command_and_times_out(repo: Repo, agent: Callable[..., Agent]) -> None:
    """The pyproject's test-command is used, and a command past its timeout fails as timed out."""
    declared = '[tool.agent-orchestrator]\ntest-command = "python -c \\"print(\'3 passed in 0.01s\')\\""\n'
    rev = repo.commit({"pyproject.toml": declared})
    cicd = agent("cicd")
    result = await cicd.run("RUN_PIPELINE", {"repo_path": str(repo.path), "revision": rev})
    assert result["command_source"] == "pyproject"
    assert result["passed"] == 3
    assert result["success"] is True
    slow = {"repo_path": str(repo.path), "revision": rev, "command": "sleep 30", "timeout_s": 0.5}
    timed = await cicd.run("RUN_PIPELINE", slow)
    assert timed["timed_out"] is True
    assert timed["success"] is False
    assert timed["duration_s"] < 5


async def test_a_cancelled_pipeline_leaves_no_unretrieved_exception(repo: Repo, agent: Callable[..., Agent]) -> None:
    """Cancelling a running test command (a cancelled request) kills it without asyncio reporting an
    exception never retrieved (the cancelled readers of its output)."""
    rev = repo.commit({"calc.py": CLEAN})
    reported: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        run = asyncio.create_task(
            agent("cicd").run("RUN_PIPELINE", {"repo_path": str(repo.path), "revision": rev, "command": "sleep 30"})
        )
        await asyncio.sleep(1.0)  # the command runs
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        for _ in range(5):  # the readers see their cancellation, then are collected
            await asyncio.sleep(0.01)
            gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert [c["message"] for c in reported] == []


async def test_pipeline_log_holds_both_streams_in_the_order_written(repo: Repo, agent: Callable[..., Agent]) -> None:
    """What the test command writes to stderr and stdout is one log, in order: a warning printed at
    start-up comes before the summary line, which stays last in the tail and gives the counts."""
    script = "import sys; sys.stderr.write('a warning at start-up\\n'); sys.stderr.flush(); print('1 failed in 0.01s')"
    rev = repo.commit(
        {"pyproject.toml": f"[tool.agent-orchestrator]\ntest-command = {json.dumps(['python', '-c', script])}\n"}
    )
    result = await agent("cicd").run("RUN_PIPELINE", {"repo_path": str(repo.path), "revision": rev})
    assert result["log_tail"].splitlines() == ["a warning at start-up", "1 failed in 0.01s"]
    assert (result["success"], result["failed"]) == (False, 1)


async def test_a_long_pipeline_log_keeps_its_end(repo: Repo, agent: Callable[..., Agent]) -> None:
    """Of a log longer than the agent keeps (4 MiB), the end is kept: the summary line and its counts."""
    script = "import sys; [sys.stdout.write('x' * 99 + '\\n') for _ in range(60_000)]; print('1 failed in 0.01s')"
    rev = repo.commit(
        {"pyproject.toml": f"[tool.agent-orchestrator]\ntest-command = {json.dumps(['python', '-c', script])}\n"}
    )
    result = await agent("cicd").run("RUN_PIPELINE", {"repo_path": str(repo.path), "revision": rev})
    assert result["log_tail"].splitlines()[-1] == "1 failed in 0.01s"
    assert (result["success"], result["failed"]) == (False, 1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_a_pipeline_is_stopped_at_its_deadline_on_the_bus_and_over_http(
    repo: Repo, make_bus: BusFactory, settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    """RUN_PIPELINE of a 20 s command with a 60 s timeout_s, sent with 2 s to its deadline, is stopped at
    the deadline and answered timeout naming deadline, off the bus and through execute() (/agent-request,
    a 504), its command killed (it answered success after 20 s)."""
    rev = repo.commit({"app.py": "VERSION = 1\n"})
    server, client = await make_bus(), await make_bus()
    cicd = AGENTS["cicd"](settings_factory())
    task = await serve_on(server, "cicd", cicd.handle)

    def request(pidfile: Path) -> AgentRequestEvent:
        command = ["sh", "-c", f"echo $$ > {pidfile}; exec sleep 20"]
        payload = {"repo_path": str(repo.path), "revision": rev, "command": command, "timeout_s": 60}
        return AgentRequestEvent.create(
            source_agent="tester", target_agent="cicd", request_type="RUN_PIPELINE", payload=payload, timeout_s=2
        )

    try:
        started = time.monotonic()
        with pytest.raises(Timeout):  # the bus's requester raises an answer of status timeout
            await client.request_agent(request(tmp_path / "bus.pid"), timeout_s=10)
        signed = request(tmp_path / "http.pid").signed(signing_key_for(server.settings, "cicd"))
        over_http = await server.execute(signed, cicd.handle)
        elapsed = time.monotonic() - started
    finally:
        await server.stop_serving(grace_s=1)
        await task
    assert elapsed < 8, elapsed
    assert over_http.status == "timeout"
    assert over_http.error is not None
    assert (over_http.error["code"], over_http.error["field"]) == ("timeout", "deadline")
    assert status_for_error_code(over_http.error["code"]) == 504
    for name in ("bus.pid", "http.pid"):
        pid = int((tmp_path / name).read_text())
        for _ in range(100):
            if not _alive(pid):
                break
            await asyncio.sleep(0.05)
        assert not _alive(pid), name


async def test_validate_build_names_the_file_that_does_not_compile(repo: Repo, agent: Callable[..., Agent]) -> None:
    """VALIDATE_BUILD compiles every Python file of the revision and reports the broken one."""
    rev = repo.commit({"calc.py": CLEAN, "broken.py": "def f(:\n"})
    result = await agent("cicd").run("VALIDATE_BUILD", {"repo_path": str(repo.path), "revision": rev})
    assert result["valid"] is False
    assert result["files_checked"] == 2
    assert [e["file"] for e in result["errors"]] == ["broken.py"]


async def _package(cicd: Agent, repo: Repo, rev: str) -> dict[str, Any]:
    return await cicd.run("DEPLOY_ARTIFACT", {"repo_path": str(repo.path), "revision": rev})


async def test_artifact_is_archived_with_its_checksum(repo: Repo, agent: Callable[..., Agent]) -> None:
    """DEPLOY_ARTIFACT writes a tar.gz of the revision with its sha256; packaging again reuses it."""
    rev = repo.commit({"calc.py": CLEAN})
    cicd = agent("cicd")
    first = await _package(cicd, repo, rev)
    again = await _package(cicd, repo, rev)
    path = Path(first["path"])
    assert first["created"] is True
    assert again["created"] is False
    assert again["sha256"] == first["sha256"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == first["sha256"]
    with tarfile.open(path) as tar:
        assert "calc.py" in tar.getnames()


async def test_the_same_revision_packaged_concurrently_by_one_agent(repo: Repo, agent: Callable[..., Agent]) -> None:
    """Two workflows may package one revision at once (repositories of the same name and
    history): every call gets the one intact artifact, and no temporary file is left."""
    rev = repo.commit({"calc.py": CLEAN})
    cicd = agent("cicd")
    results = await asyncio.gather(*(_package(cicd, repo, rev) for _ in range(8)))
    path = Path(results[0]["path"])
    assert {r["path"] for r in results} == {str(path)}
    assert {r["sha256"] for r in results} == {hashlib.sha256(path.read_bytes()).hexdigest()}
    with tarfile.open(path) as tar:
        assert "calc.py" in tar.getnames()
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


async def test_deploy_switches_current_and_rollback_switches_back(
    repo: Repo, agent: Callable[..., Agent], settings: Settings
) -> None:
    """A deploy switches current atomically, a repeat changes nothing, a rollback restores the previous release."""
    cicd, infra = agent("cicd"), agent("infrastructure")
    one = await _package(cicd, repo, repo.commit({"app.py": "VERSION = 1\n"}))
    two = await _package(cicd, repo, repo.commit({"app.py": "VERSION = 2\n"}))
    env = settings.data_dir / "environments" / "staging"
    await infra.run("DEPLOY_SERVICE", {"artifact": one["path"], "environment": "staging", "sha256": one["sha256"]})
    result = await infra.run("DEPLOY_SERVICE", {"artifact": two["path"], "environment": "staging"})
    assert (result["changed"], result["previous"], result["revision"]) == (True, one["revision"], two["revision"])
    assert (env / "current").is_symlink()
    assert (env / "current" / "app.py").read_text() == "VERSION = 2\n"
    repeat = await infra.run("DEPLOY_SERVICE", {"artifact": two["path"], "environment": "staging"})
    assert repeat["changed"] is False
    assert len(os.listdir(env / "releases")) == 2
    back = await infra.run("ROLLBACK", {"environment": "staging"})
    assert back["revision"] == one["revision"]
    assert current_release(env) == one["revision"]
    assert (env / "current" / "app.py").read_text() == "VERSION = 1\n"


async def test_a_deploy_after_a_rollback_rolls_back_past_the_release_rolled_back_from(
    repo: Repo, agent: Callable[..., Agent], settings: Settings
) -> None:
    """A deployed, B rolled back to A, then C: rolling C back reaches A (B was rolled back as
    bad and leaves the history, its directory with it), never B."""
    cicd, infra = agent("cicd"), agent("infrastructure")
    a, b, c = [await _package(cicd, repo, repo.commit({"app.py": f"VERSION = {n}\n"})) for n in "abc"]
    for artifact in (a, b):
        await infra.run("DEPLOY_SERVICE", {"artifact": artifact["path"], "environment": "redo"})
    assert (await infra.run("ROLLBACK", {"environment": "redo"}))["revision"] == a["revision"]
    deployed = await infra.run("DEPLOY_SERVICE", {"artifact": c["path"], "environment": "redo"})
    assert deployed["previous"] == a["revision"]
    env = settings.data_dir / "environments" / "redo"
    assert release_history(env) == [a["revision"], c["revision"]]
    assert sorted(os.listdir(env / "releases")) == sorted([a["revision"], c["revision"]])
    assert (await infra.run("ROLLBACK", {"environment": "redo"}))["revision"] == a["revision"]


async def test_deploy_keeps_the_last_n_releases(repo: Repo, agent: Callable[..., Agent], settings: Settings) -> None:
    """Past keep_releases, the oldest release directories are removed; the current one always stays."""
    cicd, infra = agent("cicd"), agent("infrastructure")
    revs = []
    for n in range(3):
        artifact = await _package(cicd, repo, repo.commit({"app.py": f"VERSION = {n}\n"}))
        await infra.run("DEPLOY_SERVICE", {"artifact": artifact["path"], "environment": "prod"})
        revs.append(artifact["revision"])
    env = settings.data_dir / "environments" / "prod"
    assert sorted(os.listdir(env / "releases")) == sorted(revs[1:])
    assert release_history(env) == revs[1:]


_DEPLOYER = """
import asyncio, json, sys
from pathlib import Path
from agents.work.release import deploy_release, rollback
from shared.lib.errors import Conflict

async def main(env, artifacts):
    for path, revision in artifacts:
        result = await deploy_release(Path(path), Path(env), revision, keep_releases=2)
        print(json.dumps(result.as_dict()), flush=True)
        try:
            result = await rollback(Path(env))
        except Conflict:  # nothing before the release just deployed
            continue
        print(json.dumps(result.as_dict()), flush=True)

print("ready", flush=True)
sys.stdin.readline()
asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
"""


def _in_one_order(ops: list[dict[str, Any]], current: str | None) -> list[dict[str, Any]] | None:
    """An order of the changes ``ops`` in which each starts where the one before left off, from
    nothing deployed to ``current``; None when there is none (two changes interleaved)."""

    def walk(at: str | None, left: tuple[int, ...]) -> list[int] | None:
        if not left:
            return [] if at == current else None
        for i in left:
            if ops[i]["previous"] == at:
                rest = walk(ops[i]["revision"], tuple(j for j in left if j != i))
                if rest is not None:
                    return [i, *rest]
        return None

    order = walk(None, tuple(range(len(ops))))
    return None if order is None else [ops[i] for i in order]


async def test_concurrent_deploys_and_rollbacks_of_one_environment_never_interleave(
    repo: Repo, agent: Callable[..., Agent], tmp_path: Path
) -> None:
    """20 DEPLOY_SERVICE and 4 ROLLBACK at once in the agent, with two other processes deploying and
    rolling back the same directory: the answers chain into one order ending at the final current,
    releases/ holds exactly the kept history (no orphan, at most keep_releases), history.json agrees
    (answers contradicted each other and the final state, and an orphaned release stayed)."""
    cicd, infra = agent("cicd"), agent("infrastructure")
    artifacts = [await _package(cicd, repo, repo.commit({"app.py": f"VERSION = {n}\n"})) for n in range(28)]
    env = tmp_path / "shared-env"
    others = [[(a["path"], a["revision"]) for a in artifacts[20 + 4 * k : 24 + 4 * k]] for k in range(2)]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _DEPLOYER, str(env), json.dumps(mine),
            cwd=Path(__file__).resolve().parents[3], stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        for mine in others
    ]  # fmt: skip
    for proc in procs:  # imports done: all start at once
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"ready\n"
    calls = [
        infra.run("DEPLOY_SERVICE", {"artifact": a["path"], "environment": str(env), "keep_releases": 2})
        for a in artifacts[:20]
    ]
    calls[5:5] = [infra.run("ROLLBACK", {"environment": str(env)}) for _ in range(4)]
    outputs_pending = [asyncio.wait_for(proc.communicate(b"go\n"), 120) for proc in procs]
    answers, *outputs = await asyncio.gather(asyncio.gather(*calls, return_exceptions=True), *outputs_pending)
    assert [proc.returncode for proc in procs] == [0, 0]
    for answer in answers:  # a rollback may come before any deploy, or with nothing before current
        assert isinstance(answer, dict | Conflict | NotFound), answer
    ops = [a for a in answers if isinstance(a, dict)] + [
        json.loads(line) for out, _ in outputs for line in out.splitlines()
    ]
    assert all(op["changed"] and len(op["releases"]) <= 2 for op in ops)
    final = current_release(env)
    order = _in_one_order(ops, final)
    assert order is not None, ops
    assert order[-1]["releases"] == release_history(env)
    assert sorted(os.listdir(env / "releases")) == sorted(release_history(env))
    assert final in release_history(env)


def _tar_with(path: Path, member: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(member)
    return path


async def test_a_refused_deploy_creates_nothing_and_releases_are_readable_by_others(
    repo: Repo, agent: Callable[..., Agent], tmp_path: Path
) -> None:
    """A bad artifact (not a tar, truncated, a member escaping the release, a manifest that is not JSON)
    or a bad rollback target is a 422 naming the field and leaves no environment directory (releases/
    was created anyway); a release directory gets the umask's mode, not drwx------."""
    infra = agent("infrastructure")
    good = await _package(agent("cicd"), repo, repo.commit({"app.py": "VERSION = 1\n"}))
    escaping = tarfile.TarInfo("link")
    escaping.type, escaping.linkname = tarfile.SYMTYPE, "/etc/passwd"
    bad = {
        "garbage": tmp_path / "garbage.tar.gz",
        "truncated": tmp_path / "truncated.tar.gz",
        "escaping": _tar_with(tmp_path / "escaping.tar.gz", escaping),
        "manifest": tmp_path / "manifest.tar.gz",
    }
    bad["garbage"].write_bytes(b"not a tar")
    bad["truncated"].write_bytes(Path(good["path"]).read_bytes()[:-64])
    bad["manifest"].write_bytes(Path(good["path"]).read_bytes())
    bad["manifest"].with_name("manifest.tar.gz.json").write_text("{not json")
    env = tmp_path / "outside" / "env"
    for name, artifact in bad.items():
        revision = {} if name == "manifest" else {"revision": "r1"}
        with pytest.raises(InvalidInput) as refused:
            await infra.run("DEPLOY_SERVICE", {"artifact": str(artifact), "environment": str(env), **revision})
        assert refused.value.field == "artifact", name
        assert not env.exists(), name
    umask = os.umask(0o022)
    os.umask(umask)
    await infra.run("DEPLOY_SERVICE", {"artifact": good["path"], "environment": str(env)})
    assert stat.S_IMODE((env / "releases" / good["revision"]).stat().st_mode) == 0o777 & ~umask
    with pytest.raises(InvalidInput) as escaped:
        await infra.run("ROLLBACK", {"environment": str(env), "to": "../../outside"})
    assert escaped.value.field == "to"


async def test_rollback_without_a_previous_release_is_a_conflict(
    repo: Repo, agent: Callable[..., Agent], tmp_path: Path
) -> None:
    """Rolling back the first release is refused; an unknown artifact names the field."""
    cicd, infra = agent("cicd"), agent("infrastructure")
    env = str(tmp_path / "abs-env")
    artifact = await _package(cicd, repo, repo.commit({"app.py": "VERSION = 1\n"}))
    await infra.run("DEPLOY_SERVICE", {"artifact": artifact["path"], "environment": env})
    with pytest.raises(Conflict):
        await infra.run("ROLLBACK", {"environment": env})
    with pytest.raises(NotFound) as missing:
        await infra.run("DEPLOY_SERVICE", {"artifact": str(tmp_path / "nope.tar.gz"), "environment": env})
    assert missing.value.field == "artifact"


async def test_health_check_reports_unreachable_targets(agent: Callable[..., Agent], tmp_path: Path) -> None:
    """A closed TCP port and an unanswered URL are critical issues; an undeployed environment is a warning."""
    from support.tests.procs import free_port

    port = free_port()
    payload = {
        "targets": [
            {"kind": "tcp", "host": "127.0.0.1", "port": port},
            {"kind": "http", "url": f"http://127.0.0.1:{port}/"},
        ],
        "environment": str(tmp_path / "never"),
        "timeout_s": 1,
    }
    result = await agent("infrastructure").run("HEALTH_CHECK", payload)
    assert result["healthy"] is False
    assert sorted(i["kind"] for i in result["issues"]) == ["http_unreachable", "not_deployed", "tcp_unreachable"]


MODULE = """\"\"\"Shapes.\"\"\"

__all__ = ["area", "Square"]


def area(w: float, h: float) -> float:
    \"\"\"Area of a rectangle.\"\"\"
    return w * h


def _hidden() -> None:
    pass


class Square:
    \"\"\"A square.\"\"\"

    def side(self) -> float:
        \"\"\"Its side.\"\"\"
        return 1.0
"""


async def test_generated_docs_list_the_functions_of_the_module(repo: Repo, agent: Callable[..., Agent]) -> None:
    """The API reference names every public function and class, with signatures and docstrings."""
    repo.commit({"shapes/geometry.py": MODULE, "shapes/__init__.py": "", "tests/test_x.py": "def test(): pass\n"})
    payload = {"repo_path": str(repo.path), "doc_type": "api"}
    result = await agent("documentation").run("GENERATE_DOCS", payload)
    assert result["functions"] == ["shapes.geometry.area"]
    assert result["modules"] == ["shapes", "shapes.geometry"]
    markdown = result["markdown"]
    assert "def area(w: float, h: float) -> float" in markdown
    assert "Area of a rectangle." in markdown
    assert "class `Square`" in markdown
    assert "`side`" in markdown
    assert "_hidden" not in markdown
    assert result["prose"] is None


async def test_guide_uses_the_readme_and_llm_prose(repo: Repo, agent: Callable[..., Agent]) -> None:
    """The user guide carries the README, and a configured LLM adds its prose."""
    repo.commit({"README.md": "# Shapes\n\nCompute areas.\n"})
    brain = ChatModelBrain(GenericFakeChatModel(messages=iter([AIMessage("An introduction.")])))
    result = await agent("documentation", brain=brain).run(
        "GENERATE_DOCS", {"repo_path": str(repo.path), "doc_type": "guide"}
    )
    assert "Compute areas." in result["markdown"]
    assert result["prose"] == "An introduction."


async def test_update_readme_is_idempotent(repo: Repo, agent: Callable[..., Agent]) -> None:
    """UPDATE_README inserts the module list once and leaves the rest of the README alone."""
    repo.commit({"README.md": "# Shapes\n\nIntro.\n", "shapes/geometry.py": MODULE})
    docs = agent("documentation")
    first = await docs.run("UPDATE_README", {"repo_path": str(repo.path)})
    second = await docs.run("UPDATE_README", {"repo_path": str(repo.path)})
    text = (repo.path / "README.md").read_text()
    assert first["changed"] is True
    assert second["changed"] is False
    assert text.startswith("# Shapes\n\nIntro.\n")
    assert "`shapes.geometry`: Shapes. (area, Square)" in text


def _link(repo: Repo, name: str, target: Path) -> None:
    """Make ``name`` in ``repo`` a symbolic link to ``target`` and commit it."""
    link = repo.path / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    repo.commit({}, f"link {name}")


async def test_docs_refuse_links_leaving_the_repository(
    repo: Repo, agent: Callable[..., Agent], tmp_path: Path
) -> None:
    """A README or module that is a symbolic link out of the repository is refused with a 422 naming
    the link, never read into the answer, published as a module or written into README.md (the guide
    answered with /etc/passwd, the reference published calc.link, an unparsable target failed on its
    syntax)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("root:x:0:0:SECRET\n")
    (outside / "theirs.py").write_text('"""SECRET module."""\n\n\ndef stolen() -> None:\n    pass\n')
    (outside / "broken.py").write_text("def (:\n")
    repo.commit({"calc/__init__.py": "", "calc/ops.py": CLEAN, "README.md": "# calc\n"})
    docs, path = agent("documentation"), str(repo.path)
    cases: list[tuple[str, Path, str, dict[str, Any]]] = [
        ("calc/link.py", outside / "theirs.py", "GENERATE_DOCS", {"doc_type": "api"}),
        ("calc/link.py", outside / "broken.py", "GENERATE_DOCS", {"doc_type": "api"}),
        ("calc/link.py", outside / "theirs.py", "GENERATE_DOCS", {"modules": ["calc.link"]}),
        ("calc/link.py", outside / "theirs.py", "UPDATE_README", {}),
        ("README.md", outside / "secret.txt", "GENERATE_DOCS", {"doc_type": "guide"}),
        ("README.md", outside / "secret.txt", "UPDATE_README", {"write": False}),
        ("deploy/compose.yml", outside / "secret.txt", "GENERATE_DOCS", {"doc_type": "deployment"}),
    ]
    for name, target, request_type, extra in cases:
        (repo.path / name).unlink(missing_ok=True)
        _link(repo, name, target)
        with pytest.raises(InvalidInput) as refused:
            await docs.run(request_type, {"repo_path": path, **extra})
        assert refused.value.field == ("modules" if "modules" in extra else "repo_path")
        assert f"{name} is outside the repository" in refused.value.message
        (repo.path / name).unlink()
        repo.commit({"README.md": "# calc\n"} if name == "README.md" else {}, f"unlink {name}")
    assert (repo.path / "README.md").read_text() == "# calc\n"
    assert (await docs.run("GENERATE_DOCS", {"repo_path": path}))["modules"] == ["calc", "calc.ops"]


async def test_update_readme_writes_through_a_link_that_stays_inside(repo: Repo, agent: Callable[..., Agent]) -> None:
    """A README.md linked to a file inside the repository is read and updated through the link,
    which stays a link."""
    repo.commit({"docs/index.md": "# calc\n", "calc.py": CLEAN})
    _link(repo, "README.md", Path("docs/index.md"))
    result = await agent("documentation").run("UPDATE_README", {"repo_path": str(repo.path)})
    assert result["written"] is True
    assert (repo.path / "README.md").is_symlink()
    assert "`calc`: Arithmetic. (add)" in (repo.path / "docs" / "index.md").read_text()


async def test_review_does_not_lint_a_link_out_of_the_repository(
    repo: Repo, agent: Callable[..., Agent], tmp_path: Path
) -> None:
    """A change adding a .py link to a file outside is one error finding naming the link; ruff does
    not read the target (a link to /etc/passwd gave 237 ruff errors)."""
    outside = tmp_path / "passwd.py"
    outside.write_text("root:x:0:0:root:/root:/bin/bash\n" * 20)
    base = repo.commit({"calc.py": CLEAN})
    _link(repo, "leak.py", outside)
    _link(repo, "alias.py", Path("calc.py"))
    head = repo.git("rev-parse", "HEAD")
    result = await agent("code-review").run("REVIEW_CODE", {"repo_path": str(repo.path), "base": base, "head": head})
    assert [(f["file"], f["rule"]) for f in result["findings"]] == [("leak.py", "symlink-outside-repo")]
    assert result["approved"] is False
    assert str(outside) in result["findings"][0]["message"]


async def test_review_does_not_quote_a_file_ruff_could_not_read(
    repo: Repo, agent: Callable[..., Agent], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A repository whose ruff configuration extends a file outside it makes ruff fail quoting
    that file: the finding says ruff could not run and where to look, and quotes none of it
    (ruff's message, with the file's line, is in the agent's log only)."""
    secret = tmp_path / "secret.txt"
    secret.write_text('TOP SECRET: hunter2 = "x"\n')
    base = repo.commit({"calc.py": CLEAN})
    head = repo.commit({"ruff.toml": f'extend = "{secret}"\n', "calc.py": CLEAN + "\n"})
    result = await agent("code-review").run("REVIEW_CODE", {"repo_path": str(repo.path), "base": base, "head": head})
    failed = [f for f in result["findings"] if f["rule"] == "ruff/failed"]
    assert failed, result["findings"]
    assert "check the repository's ruff configuration" in failed[0]["message"]
    assert "hunter2" not in str(result)
    assert "hunter2" in caplog.text  # for the operator


async def test_generated_code_and_its_test_pass(repo: Repo, agent: Callable[..., Agent]) -> None:
    """GENERATE_CODE scaffolds a module and a test that pass the pipeline; it refuses to overwrite them."""
    repo.commit({"README.md": "# app\n"})
    payload = {"repo_path": str(repo.path), "module": "app.billing", "functions": ["invoice", "refund"]}
    dev = agent("feature-dev")
    result = await dev.run("GENERATE_CODE", {**payload, "description": "Billing."})
    assert sorted(result["written"]) == ["app/__init__.py", "app/billing.py", "tests/test_billing.py"]
    rev = repo.commit({}, "scaffold")
    pipeline = await agent("cicd").run("RUN_PIPELINE", {"repo_path": str(repo.path), "revision": rev})
    assert (pipeline["success"], pipeline["passed"]) == (True, 2), pipeline["log_tail"]
    with pytest.raises(Conflict) as exists:
        await dev.run("GENERATE_CODE", payload)
    assert exists.value.field == "module"


async def test_generated_code_comes_from_the_llm_when_it_parses(repo: Repo, agent: Callable[..., Agent]) -> None:
    """With an LLM brain, a module that parses and defines the functions replaces the template."""
    answer = "```python\ndef invoice():\n    return 42\n```"
    brain = ChatModelBrain(GenericFakeChatModel(messages=iter([AIMessage(answer)])))
    payload = {"repo_path": str(repo.path), "module": "billing", "functions": ["invoice"], "write": False}
    result = await agent("feature-dev", brain=brain).run("GENERATE_CODE", payload)
    assert result["generator"] == "llm"
    assert "return 42" in result["module_source"]
    assert result["written"] == []


async def test_refactor_fixes_and_formats_returning_the_diff(repo: Repo, agent: Callable[..., Agent]) -> None:
    """REFACTOR_CODE removes an unused import and reformats the file, returning the unified diff."""
    repo.commit({"messy.py": "import os\ndef f( a,b ):\n  return a+b\n"})
    result = await agent("feature-dev").run("REFACTOR_CODE", {"repo_path": str(repo.path), "files": ["messy.py"]})
    assert result["changed"] == ["messy.py"]
    assert "-import os" in result["diff"]
    assert "+def f(a, b):" in result["diff"]
    assert (repo.path / "messy.py").read_text() == "def f(a, b):\n    return a + b\n"
    with pytest.raises(InvalidInput) as escaped:
        await agent("feature-dev").run("REFACTOR_CODE", {"repo_path": str(repo.path), "files": ["../x.py"]})
    assert escaped.value.field == "files"


@pytest.mark.parametrize(
    ("agent_name", "request_type", "payload", "field", "says"),
    [
        ("cicd", "RUN_PIPELINE", {"command": ""}, "command", "give the command"),  # ran the default pytest
        ("cicd", "RUN_PIPELINE", {"command": []}, "command", "give the command"),
        ("cicd", "RUN_PIPELINE", {"command": "  "}, "command", "give the command"),
        ("cicd", "RUN_PIPELINE", {"timeout_s": "NaN"}, "timeout_s", "finite"),  # "less than or equal to 86400"
        ("infrastructure", "HEALTH_CHECK", {"agents": ["../x"]}, "agents.0", "pattern"),  # probed a Redis key
    ],
)
async def test_bad_payload_values_are_refused_naming_the_field(
    repo: Repo,
    agent: Callable[..., Agent],
    agent_name: str,
    request_type: str,
    payload: dict[str, Any],
    field: str,
    says: str,
) -> None:
    """Values that were taken for something else (an empty command for the default, NaN for a number
    too large, a path for an agent name) are a 422 naming the field and saying what is wrong."""
    base = {"repo_path": str(repo.path)} if agent_name == "cicd" else {}
    with pytest.raises(InvalidInput) as refused:
        await agent(agent_name).run(request_type, {**base, **payload})
    assert refused.value.field == field
    assert says in refused.value.message, refused.value.message


async def test_decompose_and_aggregate(agent: Callable[..., Agent]) -> None:
    """A deploy task decomposes into ordered steps with their dependencies; failures fail the aggregate."""
    orchestrator = agent("orchestrator")
    plan = await orchestrator.run(
        "DECOMPOSE_TASK", {"task": "review and deploy the PR", "context": {"repo_path": "/r", "base": "a"}}
    )
    steps = {s["id"]: s for s in plan["steps"]}
    assert list(steps) == ["review", "package", "deploy", "health"]
    assert steps["review"]["payload"] == {"repo_path": "/r", "base": "a"}
    assert steps["review"]["missing"] == ["head"]
    assert steps["deploy"]["depends_on"] == ["package"]
    results = [
        {"agent": "code-review", "status": "success", "payload": {"approved": False, "findings": [{"rule": "x"}]}},
        {"agent": "cicd", "status": "error", "error": {"code": "timeout"}},
    ]
    merged = await orchestrator.run("AGGREGATE_RESULTS", {"results": results})
    assert (merged["status"], merged["failed"], merged["rejected_by_checks"]) == ("failed", 1, 1)
    assert merged["findings"] == [{"rule": "x"}]
