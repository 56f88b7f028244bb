"""Releases of an environment directory: unpack, switch ``current`` atomically,
keep the last N, roll back.

Layout of an environment::

    <env>/releases/<rev>/     one unpacked artifact per revision
    <env>/current -> releases/<rev>
    <env>/history.json        revisions in the order they were deployed (newest last)

Nothing is created before the request is known to be good: the revision, the
artifact (a readable tar whose every member the ``data`` extraction filter takes)
and ``keep_releases`` are checked first, so a refused deploy leaves no
``releases/`` behind. Directories are made with the process's umask (0755 under
the usual 022), so a service running as another user can read ``current/``.

``current`` is switched by creating a symlink under a temporary name and
``os.replace``-ing it over ``current``: a reader sees the old release or the new
one, never neither. A release is unpacked into a temporary directory and renamed
into place, so a half-unpacked release is never visible. Deploying a revision
that is already current changes nothing (idempotent per environment and
revision). A rollback walks back through the deploy order without rewriting
it, so rolling back twice from C in ``[A, B, C]`` reaches A. A deploy drops the
releases after the current one (those rolled back from), as an editor's redo
list goes on an edit: deploying C after rolling back from B to A gives ``[A, C]``,
so rolling C back reaches A, never the B rolled back as bad.

A deploy or rollback holds ``<env>/.deploy.lock`` (an ``flock``, see
:mod:`agents.work.file_lock`) from reading the environment's state to writing it
back, so concurrent calls on one machine, in one agent or several, run one after
the other: every answer describes the environment as that call left it, and
``current``, ``releases/`` and ``history.json`` agree. It is not the
``env:<environment>`` lease of PostgreSQL: the pr_deployment workflow holds that one
while it calls DEPLOY_SERVICE, and the agent taking it too would contend with its own
caller. A call waits for the lock at most until its deadline, then is refused as
``lock_contended`` naming the holder; a deploy already under way when its deadline
passes finishes (its caller is answered ``timeout``), since stopping it halfway would
leave the next holder a half-pruned environment.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import os
import re
import shutil
import tarfile
import uuid
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from agents.work.atomic import temp_beside, write_atomically
from agents.work.file_lock import run_locked
from shared.lib.errors import Conflict, InvalidInput, NotFound
from shared.lib.safe_input import clipped

__all__ = [
    "ENV_LOCK_WAIT_S",
    "ReleaseResult",
    "check_environment",
    "current_release",
    "deploy_release",
    "environment_dir",
    "release_history",
    "rollback",
]

_REV = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ENV = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
#: The lock file of an environment (hidden: not a release, not served).
_LOCK_FILE = ".deploy.lock"
#: How long a deploy or rollback waits for another one of its environment when no deadline bounds it.
ENV_LOCK_WAIT_S = 300.0


@dataclass(frozen=True)
class ReleaseResult:
    environment: str
    revision: str
    previous: str | None
    path: str
    changed: bool
    releases: list[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_environment(environment: str) -> str:
    """``environment`` if it is an absolute path or a name (``_ENV``); else a ValueError saying so."""
    if os.path.isabs(environment) or _ENV.match(environment):
        return environment
    raise ValueError(f"{clipped(environment)!r} must match {_ENV.pattern} or be an absolute path")


def environment_dir(environment: str, *, root: Path) -> Path:
    """``environment`` as a directory: an absolute path as given, a name under ``root``."""
    try:
        check_environment(environment)
    except ValueError as e:
        raise InvalidInput(f"environment: {e}", field="environment") from e
    return Path(environment) if os.path.isabs(environment) else root / environment


def current_release(env: Path) -> str | None:
    """The revision ``current`` points at, or None before the first deploy."""
    link = env / "current"
    return Path(os.readlink(link)).name if link.is_symlink() else None


def release_history(env: Path) -> list[str]:
    """Revisions in the order they were deployed, oldest first."""
    path = env / "history.json"
    return list(orjson.loads(path.read_bytes())) if path.is_file() else []


def _write_history(env: Path, history: list[str]) -> None:
    write_atomically(env / "history.json", orjson.dumps(history))


def _switch_current(env: Path, revision: str) -> None:
    tmp = temp_beside(env / "current")
    try:
        os.symlink(Path("releases") / revision, tmp)
        os.replace(tmp, env / "current")
    finally:
        tmp.unlink(missing_ok=True)


def _check_artifact(artifact: Path, env: Path, revision: str) -> None:
    """Refuse an artifact that is missing, not a readable tar, or has a member the ``data``
    filter would refuse (an absolute path, a link out of the release), before anything is
    created. Skipped when the release is already unpacked: it will not be read."""
    if not artifact.is_file():
        raise NotFound(f"artifact: {artifact} does not exist; package the revision first", field="artifact")
    destination = env / "releases" / revision
    if destination.is_dir():
        return
    with tarfile.open(artifact, "r:*") as tar:
        for member in tar:
            tarfile.data_filter(member, str(destination))


def _unpack(artifact: Path, releases: Path, revision: str) -> None:
    staging = releases / f".{revision}.{uuid.uuid4().hex[:12]}"  # hidden; os.mkdir honours the umask
    staging.mkdir()
    try:
        with tarfile.open(artifact, "r:*") as tar:
            tar.extractall(staging, filter="data")
        stamp = {"revision": revision, "artifact": str(artifact), "unpacked_at": datetime.now(UTC).isoformat()}
        (staging / ".release.json").write_bytes(orjson.dumps(stamp))
        os.rename(staging, releases / revision)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _after_deploy(history: list[str], previous: str | None, revision: str) -> list[str]:
    """The deploy order once ``revision`` replaced ``previous``: the releases after ``previous``
    (rolled back from) leave it, and ``revision`` comes last."""
    if previous in history:
        history = history[: history.index(previous) + 1]
    return [r for r in history if r != revision] + [revision]


def _prune(env: Path, history: list[str], *, keep: int) -> list[str]:
    """Drop every release directory that is not among the newest ``keep`` of the history (nor
    the current one); returns the kept history. Under the lock nothing else is being unpacked,
    so a directory the history does not name (left by a deploy that died before writing it, or
    its staging copy) goes too."""
    current = current_release(env)
    kept = history[-keep:]
    if current is not None and current not in kept:
        kept.insert(0, current)
    for entry in (env / "releases").iterdir():
        if entry.name not in kept:
            shutil.rmtree(entry, ignore_errors=True)
    return kept


def _deploy_sync(artifact: Path, env: Path, revision: str, keep: int) -> ReleaseResult:
    if not artifact.is_file():
        raise NotFound(f"artifact: {artifact} does not exist; package the revision first", field="artifact")
    releases = env / "releases"
    releases.mkdir(parents=True, exist_ok=True)
    previous = current_release(env)
    history = release_history(env)
    if previous == revision and (releases / revision).is_dir():
        return ReleaseResult(env.name, revision, previous, str(releases / revision), False, history)
    if not (releases / revision).is_dir():
        _unpack(artifact, releases, revision)
    _switch_current(env, revision)
    kept = _prune(env, _after_deploy(history, previous, revision), keep=keep)
    _write_history(env, kept)
    return ReleaseResult(env.name, revision, previous, str(releases / revision), True, kept)


async def _locked(env: Path, work: Callable[[], ReleaseResult], *, wait_s: float, holder: str) -> ReleaseResult:
    return await run_locked(env / _LOCK_FILE, work, wait_s=wait_s, holder=holder, resource=f"environment {env}")


async def deploy_release(
    artifact: Path, env: Path, revision: str, *, keep_releases: int = 5, wait_s: float = ENV_LOCK_WAIT_S
) -> ReleaseResult:
    """Unpack ``artifact`` as ``releases/<revision>`` of ``env`` and make it current, under the
    environment's lock (waiting for it at most ``wait_s``)."""
    if not _REV.match(revision):
        raise InvalidInput(f"revision: {revision!r} is not a valid release name", field="revision")
    if keep_releases < 1:
        raise InvalidInput("keep_releases must be at least 1", field="keep_releases")
    try:
        await asyncio.to_thread(_check_artifact, artifact, env, revision)
        await asyncio.to_thread(env.mkdir, parents=True, exist_ok=True)
        work = functools.partial(_deploy_sync, artifact, env, revision, keep_releases)
        return await _locked(env, work, wait_s=wait_s, holder=f"a deploy of {revision}")
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:  # a corrupt or truncated archive
        raise InvalidInput(f"artifact: {artifact} is not a readable tar archive ({e})", field="artifact") from e


def _rollback_sync(env: Path, to: str | None) -> ReleaseResult:
    history = release_history(env)
    current = current_release(env)
    if to is None:
        if current not in history or history.index(current) == 0:
            raise Conflict(f"{env.name} has no release before {current}; nothing to roll back to", resource=str(env))
        to = history[history.index(current) - 1]
    if not (env / "releases" / to).is_dir():
        raise NotFound(f"to: release {to} is not kept in {env.name}; pick one of {history}", field="to")
    _switch_current(env, to)
    return ReleaseResult(env.name, to, current, str(env / "releases" / to), to != current, history)


async def rollback(env: Path, *, to: str | None = None, wait_s: float = ENV_LOCK_WAIT_S) -> ReleaseResult:
    """Make the release before the current one (or ``to``) current again, under the
    environment's lock (waiting for it at most ``wait_s``)."""
    if to is not None and not _REV.match(to):  # "../x" would switch current out of releases/
        raise InvalidInput(f"to: {to!r} is not a release name; pick one of the environment's history", field="to")
    if not await asyncio.to_thread(os.path.islink, env / "current"):
        raise NotFound(f"environment: {env} has never been deployed", field="environment")
    work = functools.partial(_rollback_sync, env, to)
    return await _locked(env, work, wait_s=wait_s, holder=f"a rollback to {to or 'the previous release'}")
