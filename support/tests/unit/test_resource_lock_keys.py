"""Lock keys and metric labels derived from resource ids."""

from __future__ import annotations

import hashlib

import pytest

from shared.lib.resource_lock import lock_key, resource_type


def test_key_is_first_eight_bytes_of_sha256_signed() -> None:
    """The key is the signed big-endian value of the first 8 bytes of SHA-256."""
    digest = hashlib.sha256(b"repo:acme/api").digest()
    assert lock_key("repo:acme/api") == int.from_bytes(digest[:8], "big", signed=True)


def test_keys_fit_a_postgres_bigint_and_use_both_signs() -> None:
    """Keys span the whole signed 64-bit range, so both halves of the space are used."""
    keys = [lock_key(f"env:{i}") for i in range(2000)]
    assert all(-(2**63) <= k < 2**63 for k in keys)
    assert any(k < 0 for k in keys)
    assert any(k > 2**32 for k in keys)  # wider than hashtext's 32 bits


def test_no_collisions_where_hashtext_would_collide() -> None:
    """100,000 ids get 100,000 distinct keys (a 32-bit hash collides with odds near 1 here)."""
    ids = [f"repo:org/project-{i}" for i in range(100_000)]
    assert len({lock_key(r) for r in ids}) == len(ids)


def test_key_is_stable_and_case_sensitive() -> None:
    """The same id always maps to the same key; ids differing in case do not share one."""
    assert lock_key("env:staging") == lock_key("env:staging")
    assert lock_key("env:staging") != lock_key("env:Staging")


@pytest.mark.parametrize(
    ("resource_id", "expected"),
    [
        ("repo:acme/api", "repo"),
        ("env:staging:eu", "env"),
        ("workflow.lease:123", "workflow.lease"),
        ("plain-id", "untyped"),
        ("Weird Prefix!:x", "other"),
        (":x", "other"),
        ("a" * 40 + ":x", "other"),
    ],
)
def test_resource_type_is_a_bounded_prefix(resource_id: str, expected: str) -> None:
    """The metrics label is the prefix before ':' when it is a short word, else a fixed bucket."""
    assert resource_type(resource_id) == expected
