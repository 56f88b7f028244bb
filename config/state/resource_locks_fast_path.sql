-- Resource locks, fast path (builds on resource_locks.sql).
--
-- An uncontended grant and release each run as one plain statement, written in
-- shared/lib/resource_lock.py (_FAST_GRANT_SQL, _FAST_RELEASE_SQL): a single
-- statement skips PL/pgSQL's per-statement overhead, which cost more than the
-- lock itself. When the fast grant cannot complete (a first grant, the first
-- grant after a server start, an abandoned lease) it hands the lock back and
-- resource_lock_grant does the rest; a lock held by another session goes
-- through resource_lock_want below.
--
-- Releases used to NOTIFY every time. Now an acquirer that finds the lock held
-- stamps wanted_at on the row before it tries, and a release notifies only when
-- wanted_at is not older than the lease's grant: an uncontended lease sends no
-- notification, and a release that committed just before the stamp is seen by
-- the try that follows it.

ALTER TABLE resource_locks ADD COLUMN IF NOT EXISTS wanted_at timestamptz;

-- Ask to be notified of the release of p_resource, then try to take it
-- (resource_lock_grant: granted, or the holder's name, token and lease end).
CREATE OR REPLACE FUNCTION resource_lock_want(
    p_resource text, p_key bigint, p_owner text, p_ttl_s double precision, p_wait_s double precision
) RETURNS TABLE (granted boolean, token bigint, holder text, expires_at timestamptz, db_now timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE resource_locks SET wanted_at = clock_timestamp() WHERE resource_id = p_resource;
    RETURN QUERY SELECT * FROM resource_lock_grant(p_resource, p_key, p_owner, p_ttl_s, p_wait_s);
END $$;
