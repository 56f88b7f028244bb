"""parallel_docs' input rules, and how ``merge`` names and writes the parts: one flat file
per unit, always inside output_dir, none overwriting another."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from agent_orchestrator.workflows.parallel_docs import (
    PARALLEL_DOCS,
    _file_names,
    _file_stem,
    document,
    fan_out,
    merge,
    plan,
)
from shared.lib.connections import connection_lost
from shared.lib.errors import RequestRejected, ServiceUnavailable


def _part(unit: str, *, ok: bool = True) -> dict[str, Any]:
    if ok:
        return {"unit": unit, "ok": True, "instance": "documentation-1", "markdown": f"# {unit}\n"}
    return {"unit": unit, "ok": False, "error": "no such module", "instance": "documentation-1"}


async def _merge(repo: Path, out: Path, parts: list[dict[str, Any]]) -> dict[str, Any]:
    state: Any = {"input": {"repo_path": str(repo), "output_dir": str(out)}, "parts": parts}
    return await merge(state)


@pytest.mark.parametrize(
    ("unit", "stem"),
    [
        ("calc.ops", "calc.ops"),
        ("pkg/util", "pkg.util"),
        ("pkg/util.py", "pkg.util"),
        ("../good/pkg/util.py", "good.pkg.util"),
        ("/etc/passwd", "etc.passwd"),
        ("..\\..\\x", "x"),
        ("..", "_"),
        ("a b/c:d", "a_b.c_d"),
        ("guide", "guide"),
    ],
)
def test_a_units_file_stem_is_flat_and_never_dot_dot(unit: str, stem: str) -> None:
    """Path separators and dots map to single dots, other unsafe characters to '_'; no '..', no '/'."""
    assert _file_stem(unit) == stem


def test_a_long_unit_gets_a_cut_stem_that_stays_distinct() -> None:
    """A unit too long for a file name is cut and ends in a hash of the whole unit."""
    a, b = _file_stem("m" * 300 + "a"), _file_stem("m" * 300 + "b")
    assert len(a) <= 200
    assert a != b


def test_units_mapping_to_one_name_get_distinct_files() -> None:
    """Colliding stems (also by case, or with the index) get -2, -3... rather than overwriting."""
    names = _file_names(["pkg.util", "pkg/util", "pkg/util.py", "Index", "PKG.UTIL", "pkg.util-2"])
    assert names == ["pkg.util.md", "pkg.util-2.md", "pkg.util-3.md", "Index-2.md", "PKG.UTIL-4.md", "pkg.util-2-2.md"]
    assert len({n.casefold() for n in names}) == len(names)


async def test_merge_writes_every_part_flat_inside_output_dir(tmp_path: Path) -> None:
    """A path-style or '..' unit is written as one flat file inside output_dir, never beside it."""
    out = tmp_path / "in"
    units = ["../good/pkg/util.py", "pkg/util", "pkg.util"]
    update = await _merge(tmp_path / "good", out, [_part(u) for u in units])
    assert update["outcome"] == "succeeded", update["reason"]
    files = [Path(f) for f in update["result"]["files"]]
    assert [f.name for f in files] == ["index.md", "good.pkg.util.md", "pkg.util.md", "pkg.util-2.md"]
    assert all(f.resolve().is_relative_to(out.resolve()) and f.parent == out for f in files)
    assert sorted(p.name for p in tmp_path.rglob("*.md")) == sorted(f.name for f in files)
    assert (out / "pkg.util-2.md").read_text() == "# pkg/util\n"
    assert "- [pkg/util](pkg.util-2.md)\n" in (out / "index.md").read_text()


async def test_a_failed_part_keeps_its_name_from_the_others(tmp_path: Path) -> None:
    """File names are given over every part, so whether one fails does not rename another."""
    update = await _merge(tmp_path, tmp_path / "out", [_part("pkg.util", ok=False), _part("pkg/util")])
    assert [Path(f).name for f in update["result"]["files"]] == ["index.md", "pkg.util-2.md"]


async def test_merge_refuses_a_link_leading_out_of_output_dir(tmp_path: Path) -> None:
    """A symbolic link in output_dir named like a part is not written through; the run fails saying so."""
    out, outside = tmp_path / "out", tmp_path / "outside.md"
    out.mkdir()
    (out / "pkg.md").symlink_to(outside)
    update = await _merge(tmp_path, out, [_part("pkg")])
    assert update["outcome"] == "failed"
    assert "leads outside" in update["reason"]
    assert not outside.exists()


async def test_an_unwritable_output_dir_fails_the_run_with_a_reason(tmp_path: Path) -> None:
    """A write error fails the workflow with its reason and the parts' result, not a crash."""
    (tmp_path / "file").write_text("")
    update = await _merge(tmp_path, tmp_path / "file" / "out", [_part("pkg")])
    assert (update["outcome"], update["result"]["files"], update["result"]["parts"]) == ("failed", [], 1)
    assert "give an output_dir the orchestrator can write to" in update["reason"]


@pytest.mark.parametrize("kind", ["missing", "file"])
async def test_a_repo_path_that_is_no_directory_fails_the_plan_naming_it(tmp_path: Path, kind: str) -> None:
    """Listing the modules of a repo_path that is no directory (missing, or a file) fails the run
    with a reason and an error naming input.repo_path, and sends no part (no raw OSError)."""
    repo = tmp_path / "repo"
    if kind == "file":
        repo.write_text("")
    state: Any = {"input": {"repo_path": str(repo)}}
    update = await plan(state)
    assert (update["outcome"], update["steps"]["plan"]["units"]) == ("failed", [])
    assert update["reason"].startswith(f"repo_path: {repo} is not a directory on the orchestrator's machine")
    assert [(e["code"], e["field"]) for e in update["errors"]] == [("not_found", "input.repo_path")]
    assert await fan_out({**state, **update}) == []


async def test_parts_failing_alike_give_their_error_as_the_reason(tmp_path: Path) -> None:
    """When every part failed with one error (a repo_path the agents do not find), the reason says it."""
    alike = [{**_part(u, ok=False), "error": "repo_path: /gone is not a directory"} for u in ("a", "b")]
    update = await _merge(tmp_path, tmp_path / "out", alike)
    assert update["reason"] == "every documentation part failed: repo_path: /gone is not a directory"
    update = await _merge(tmp_path, tmp_path / "out", [*alike, _part("c", ok=False)])
    assert update["reason"] == "every documentation part failed"


def test_duplicate_units_are_dropped_in_order() -> None:
    """Modules and doc types given twice are documented once, in the order first given."""
    given = PARALLEL_DOCS.validate_input({"repo_path": "/r", "modules": ["pkg", "b", "pkg"]})
    assert given["modules"] == ["pkg", "b"]
    assert PARALLEL_DOCS.validate_input({"repo_path": "/r", "doc_types": ["guide", "guide"]})["doc_types"] == ["guide"]


def test_spellings_of_one_module_are_one_unit_named_dotted() -> None:
    """A module dotted, as a path or as a file (``./``, ``__init__.py``) is one unit, named dotted;
    a spelling that does not name a module inside the repository is kept as given."""
    spellings = ["calc.ops", "calc/ops", "calc/ops.py", "./calc/ops.py", "calc/", "calc/__init__.py", "ops.py"]
    outside = ["../r/calc/stats.py", "/etc/x.py", "a.b.py", "calc..ops"]
    given = PARALLEL_DOCS.validate_input({"repo_path": "/r", "modules": spellings + outside})
    assert given["modules"] == ["calc.ops", "calc", "ops", *outside]


@pytest.mark.parametrize(
    ("data", "loc", "says"),
    [
        ({"output_dir": "docs/out"}, ("output_dir",), "give an absolute path"),
        ({"output_dir": ""}, ("output_dir",), "at least 1 character"),
        ({"modules": []}, ("modules",), "leave modules out to document every top-level module"),
        ({"doc_types": []}, ("doc_types",), "leave doc_types out"),
        ({"modules": [""]}, ("modules", 0), "at least 1 character"),
        ({"modules": ["pkg"], "doc_types": ["guide"]}, ("doc_types",), "give modules or doc_types, not both"),
        ({"doc_types": ["api", "manual"]}, ("doc_types",), "unknown doc_types ['manual']"),
    ],
)
def test_input_refused_names_the_field(data: dict[str, Any], loc: tuple[Any, ...], says: str) -> None:
    """A relative output_dir, an empty list, an empty module or both kinds of unit are refused, naming the field."""
    with pytest.raises(ValidationError) as e:
        PARALLEL_DOCS.validate_input({"repo_path": "/r", **data})
    first = e.value.errors()[0]
    assert (first["loc"], says in first["msg"]) == (loc, True), first


class _Calls:
    """Agent calls that fail as ``error`` says (the node's own handling is what is tested)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def call(self, agent: str, request_type: str, payload: dict[str, Any], **_: Any) -> Any:
        raise self.error


def _refused_by_redis() -> ServiceUnavailable:
    try:
        raise ConnectionRefusedError(111, "Connection refused")
    except ConnectionRefusedError as e:
        try:
            raise ServiceUnavailable("cannot reach Redis to send the request: refused; retry it") from e
        except ServiceUnavailable as unavailable:
            return unavailable


async def test_a_part_an_agent_failed_is_recorded_and_a_lost_server_hands_the_run_back() -> None:
    """An agent's refusal fails that part only; Redis out of reach is not the part's failure: the
    node raises, so the runner hands the run back to resume once Redis is back (it used to fail
    every part, for good, on an outage longer than the call's timeout)."""
    state: Any = {"unit": {"repo_path": "/r", "doc_type": "module", "module": "calc"}}

    def runtime(error: Exception) -> Any:
        return SimpleNamespace(context=SimpleNamespace(calls=_Calls(error)))

    refused = RequestRejected("documentation rejected GENERATE_DOCS: no such module", details={"served_by": "d-1"})
    out = await document(state, runtime(refused))
    assert out == {"parts": [{"unit": "calc", "ok": False, "error": refused.message, "instance": "d-1"}]}
    lost = _refused_by_redis()
    with pytest.raises(ServiceUnavailable) as raised:
        await document(state, runtime(lost))
    assert connection_lost(raised.value)
