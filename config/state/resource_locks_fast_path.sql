-- Resource locks, fast path (builds on resource_locks.sql).
--
-- An uncontended grant and release each run as one plain statement, written in
-- shared/lib/resource_lock.py (_FAST_GRANT_SQL, _FAST_RELEASE_SQL): a single
-- statement skips PL/pgSQL's per-statement overhead, which cost more than the
-- lock itself. Everything else (a first grant, the first grant after a server
-- start, an abandoned lease, contention, expiry) still goes through
-- resource_lock_grant below.
--
-- Releases used to NOTIFY every time. Now an acquirer that finds the lock held
-- stamps wanted_at on the row, and a release notifies only when wanted_at is
-- not older than the lease's grant: an uncontended lease sends no notification.
-- The acquirer tries the lock once more after stamping, so a release that
-- committed just before the stamp (and so did not notify) is not waited out.
-- A release keeps acquired_at so the comparison can be made after it.

ALTER TABLE resource_locks ADD COLUMN IF NOT EXISTS wanted_at timestamptz;

DROP FUNCTION IF EXISTS resource_lock_grant(text, bigint, text, double precision, double precision);

-- Take the lock on p_key for p_resource and bump its fencing token, in one
-- round trip. p_locked: this session already holds the advisory lock (the fast
-- path took it and found the row needs this function). When it is held by
-- another session, the holder's name, token and lease end come back instead
-- (granted = false); a holder past its TTL is expired first.
CREATE OR REPLACE FUNCTION resource_lock_grant(
    p_resource text, p_key bigint, p_owner text, p_ttl_s double precision, p_wait_s double precision,
    p_locked boolean
) RETURNS TABLE (granted boolean, token bigint, holder text, expires_at timestamptz, db_now timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    r resource_locks;
    v_got boolean;
    v_now timestamptz;
    v_start timestamptz := pg_postmaster_start_time();
    v_expires timestamptz;
BEGIN
    IF p_locked THEN
        v_got := true;
    ELSE
        v_got := pg_try_advisory_lock(p_key);
    END IF;
    IF NOT v_got THEN
        -- Nested, not one AND: SQL does not promise which operand runs first.
        IF resource_lock_expire_stale(p_resource) THEN
            v_got := pg_try_advisory_lock(p_key);
        END IF;
    END IF;
    IF NOT v_got THEN
        UPDATE resource_locks l SET wanted_at = clock_timestamp() WHERE l.resource_id = p_resource;
        v_got := pg_try_advisory_lock(p_key);  -- a release before the stamp did not notify
    END IF;
    IF NOT v_got THEN
        RETURN QUERY SELECT false, l.fence, l.owner, l.expires_at, clock_timestamp()
                       FROM resource_locks l WHERE l.resource_id = p_resource;
        IF NOT FOUND THEN  -- a first grant is committing
            RETURN QUERY SELECT false, NULL::bigint, NULL::text, NULL::timestamptz, clock_timestamp();
        END IF;
        RETURN;
    END IF;
    v_now := clock_timestamp();
    v_expires := v_now + p_ttl_s * interval '1 second';
    SELECT * INTO r FROM resource_locks l WHERE l.resource_id = p_resource FOR UPDATE;
    IF NOT FOUND THEN
        IF EXISTS (SELECT 1 FROM resource_locks l WHERE l.lock_key = p_key) THEN
            PERFORM pg_advisory_unlock(p_key);
            RAISE EXCEPTION 'lock key % of % collides with another resource', p_key, p_resource
                USING ERRCODE = 'unique_violation';
        END IF;
        PERFORM set_config('synchronous_commit', 'on', true);  -- the counter's first value must survive a crash
        INSERT INTO resource_locks (resource_id, lock_key, fence, fence_epoch, owner, backend_pid,
                                    acquired_at, expires_at, ttl_s)
        VALUES (p_resource, p_key, 1, v_start, p_owner, pg_backend_pid(), v_now, v_expires, p_ttl_s);
        r.fence := 1;
    ELSE
        IF r.owner IS NOT NULL THEN  -- the last holder's session ended without releasing
            INSERT INTO resource_lock_history (resource_id, token, owner, event, held_s, reason)
            VALUES (p_resource, r.fence, r.owner, 'abandoned',
                    extract(epoch FROM v_now - r.acquired_at), 'holder session ended');
        END IF;
        UPDATE resource_locks l
           SET fence = CASE WHEN l.fence_epoch = v_start THEN l.fence + 1
                            ELSE greatest(l.fence + 1, (extract(epoch FROM v_now) * 1000000)::bigint) END,
               fence_epoch = v_start, owner = p_owner, backend_pid = pg_backend_pid(),
               acquired_at = v_now, expires_at = v_expires, ttl_s = p_ttl_s, updated_at = v_now
         WHERE l.resource_id = p_resource
        RETURNING l.fence INTO r.fence;
    END IF;
    INSERT INTO resource_lock_history (resource_id, token, owner, event, wait_s)
    VALUES (p_resource, r.fence, p_owner, 'granted', p_wait_s);
    RETURN QUERY SELECT true, r.fence, p_owner, v_expires, v_now;
END $$;

-- Clear the lease of a locked row and record how it ended (expiry, forced
-- release, abandonment: always notified, these are rare). acquired_at is kept.
CREATE OR REPLACE FUNCTION resource_lock_end(r resource_locks, p_event text, p_reason text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE resource_locks
       SET owner = NULL, backend_pid = NULL, expires_at = NULL, ttl_s = NULL, updated_at = clock_timestamp()
     WHERE resource_id = r.resource_id;
    INSERT INTO resource_lock_history (resource_id, token, owner, event, held_s, reason)
    VALUES (r.resource_id, r.fence, r.owner, p_event,
            extract(epoch FROM clock_timestamp() - r.acquired_at), p_reason);
    PERFORM pg_notify('resource_lock_released', r.resource_id);
END $$;
