-- Resource locks: leases over PostgreSQL session-level advisory locks.
--
-- The advisory lock is the truth: a lease exists while its holder's session
-- holds the lock on the resource's 64-bit key (the first 8 bytes of the
-- SHA-256 of the resource id, computed by the client). The row below carries
-- what the lock cannot: the holder's name, its TTL and the fencing counter.
-- Every change to a row is made by the session holding the lock, or after
-- the holder's session was terminated; never by unlocking from another
-- session.
--
-- Lock sessions run with synchronous_commit = off (a grant costs one round
-- trip, not one WAL flush). A crash can then lose the last grants' rows, so
-- a token can never be handed out twice, the counter jumps past the clock in
-- microseconds on the first grant after every server start (fence_epoch), and
-- a row's first grant commits synchronously. Rows are never deleted: the
-- counter lives here.

CREATE TABLE IF NOT EXISTS resource_locks (
    resource_id text PRIMARY KEY CHECK (length(resource_id) BETWEEN 1 AND 512),
    lock_key    bigint NOT NULL UNIQUE,  -- a collision is refused, never shared
    fence       bigint NOT NULL,         -- the last fencing token granted
    fence_epoch timestamptz NOT NULL,    -- pg_postmaster_start_time() when fence was written
    owner       text,                    -- the current holder; NULL when free
    backend_pid integer,                 -- the holder's session
    acquired_at timestamptz,
    expires_at  timestamptz,
    ttl_s       double precision,
    updated_at  timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 10);  -- each grant and release rewrites its row: room for HOT updates, short chains

CREATE TABLE IF NOT EXISTS resource_lock_history (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    resource_id text NOT NULL,
    token       bigint NOT NULL,
    owner       text NOT NULL,
    event       text NOT NULL
                CHECK (event IN ('granted', 'released', 'expired', 'force_released', 'abandoned')),
    wait_s      double precision,  -- granted: how long the acquirer waited
    held_s      double precision,  -- the other events: how long the lease was held
    reason      text,
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX IF NOT EXISTS resource_lock_history_resource ON resource_lock_history (resource_id, id);

-- Leases that have not ended, with who really holds each key: state is held,
-- expired (TTL passed, holder not yet ended) or abandoned (session gone).
-- Operators read this; pg_locks is scanned once, not per row.
CREATE OR REPLACE VIEW resource_lock_status AS
WITH held AS (
    SELECT (l.classid::bigint << 32) | l.objid::bigint AS lock_key, l.pid
      FROM pg_locks l
     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
)
SELECT r.resource_id, r.owner, r.fence AS token, r.acquired_at, r.expires_at, r.ttl_s,
       h.pid AS holder_pid,
       CASE WHEN h.pid IS DISTINCT FROM r.backend_pid THEN 'abandoned'
            WHEN r.expires_at < clock_timestamp() THEN 'expired'
            ELSE 'held' END AS state
  FROM resource_locks r
  LEFT JOIN held h ON h.lock_key = r.lock_key
 WHERE r.owner IS NOT NULL;

-- The session holding the advisory lock on p_key in this database, if any.
CREATE OR REPLACE FUNCTION resource_lock_holder_pid(p_key bigint) RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT l.pid FROM pg_locks l
     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND l.classid = ((p_key >> 32) & 4294967295)::oid
       AND l.objid = (p_key & 4294967295)::oid
     LIMIT 1
$$;

-- Clear the lease of a locked row and record how it ended.
CREATE OR REPLACE FUNCTION resource_lock_end(r resource_locks, p_event text, p_reason text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE resource_locks
       SET owner = NULL, backend_pid = NULL, acquired_at = NULL, expires_at = NULL, ttl_s = NULL,
           updated_at = clock_timestamp()
     WHERE resource_id = r.resource_id;
    INSERT INTO resource_lock_history (resource_id, token, owner, event, held_s, reason)
    VALUES (r.resource_id, r.fence, r.owner, p_event,
            extract(epoch FROM clock_timestamp() - r.acquired_at), p_reason);
    PERFORM pg_notify('resource_lock_released', r.resource_id);
END $$;

-- Expire the lease on p_resource if its TTL passed: terminate the holder's
-- session (which frees the advisory lock) and record the expiry. True when
-- the lock was freed this way.
CREATE OR REPLACE FUNCTION resource_lock_expire_stale(p_resource text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    r resource_locks;
BEGIN
    SELECT * INTO r FROM resource_locks WHERE resource_id = p_resource FOR UPDATE;
    IF NOT FOUND OR r.owner IS NULL OR r.expires_at > clock_timestamp() THEN
        RETURN false;
    END IF;
    IF resource_lock_holder_pid(r.lock_key) IS DISTINCT FROM r.backend_pid THEN
        RETURN false;  -- the holder's session is gone, or a new grant is committing
    END IF;
    IF NOT pg_terminate_backend(r.backend_pid, 2000) THEN
        RETURN false;
    END IF;
    PERFORM resource_lock_end(r, 'expired', format('ttl of %ss passed without renewal', r.ttl_s));
    RETURN true;
END $$;

-- Take the lock on p_key for p_resource and bump its fencing token, in one
-- round trip. When it is held, the holder's name, token and lease end come
-- back instead (granted = false); a holder past its TTL is expired first.
CREATE OR REPLACE FUNCTION resource_lock_grant(
    p_resource text, p_key bigint, p_owner text, p_ttl_s double precision, p_wait_s double precision
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
    v_got := pg_try_advisory_lock(p_key);
    IF NOT v_got THEN
        -- Nested, not one AND: SQL does not promise which operand runs first.
        IF resource_lock_expire_stale(p_resource) THEN
            v_got := pg_try_advisory_lock(p_key);
        END IF;
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

-- Release (or, with p_event = 'expired', expire) the caller's own lease. The
-- row must still name this session and token: a stale holder gets false and
-- frees nothing.
CREATE OR REPLACE FUNCTION resource_lock_release(
    p_resource text, p_key bigint, p_token bigint, p_event text, p_reason text
) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    r resource_locks;
BEGIN
    SELECT * INTO r FROM resource_locks l
     WHERE l.resource_id = p_resource AND l.fence = p_token AND l.backend_pid = pg_backend_pid()
       AND l.owner IS NOT NULL
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM resource_lock_end(r, p_event, p_reason);
    PERFORM pg_advisory_unlock(p_key);
    RETURN true;
END $$;

-- Extend the caller's own lease. NULL when it is no longer the caller's, or
-- when its TTL already passed (the lease is then expired here and now).
CREATE OR REPLACE FUNCTION resource_lock_renew(
    p_resource text, p_key bigint, p_token bigint, p_ttl_s double precision
) RETURNS timestamptz
LANGUAGE plpgsql AS $$
DECLARE
    v_expires timestamptz;
BEGIN
    UPDATE resource_locks l
       SET expires_at = clock_timestamp() + p_ttl_s * interval '1 second', ttl_s = p_ttl_s,
           updated_at = clock_timestamp()
     WHERE l.resource_id = p_resource AND l.fence = p_token AND l.backend_pid = pg_backend_pid()
       AND l.owner IS NOT NULL AND l.expires_at > clock_timestamp()
    RETURNING l.expires_at INTO v_expires;
    IF NOT FOUND THEN
        PERFORM resource_lock_release(p_resource, p_key, p_token, 'expired', 'renewed after its ttl');
    END IF;
    RETURN v_expires;
END $$;

-- For operators: end the lease on p_resource whoever holds it, by terminating
-- the holder's session. Returns the holder and token it ended (no row: not locked).
CREATE OR REPLACE FUNCTION resource_lock_force_release(p_resource text, p_reason text)
RETURNS TABLE (owner text, token bigint, acquired_at timestamptz, expires_at timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    r resource_locks;
    v_pid integer;
BEGIN
    SELECT * INTO r FROM resource_locks l WHERE l.resource_id = p_resource FOR UPDATE;
    IF NOT FOUND OR r.owner IS NULL THEN
        RETURN;
    END IF;
    v_pid := resource_lock_holder_pid(r.lock_key);
    IF v_pid = pg_backend_pid() THEN
        PERFORM pg_advisory_unlock(r.lock_key);
    ELSIF v_pid IS DISTINCT FROM r.backend_pid AND v_pid IS NOT NULL THEN
        RAISE EXCEPTION 'the lock on % is changing hands; try again', p_resource
            USING ERRCODE = 'lock_not_available';
    ELSIF v_pid IS NOT NULL AND NOT pg_terminate_backend(v_pid, 5000) THEN
        RAISE EXCEPTION 'the holder session % of % did not end within 5 s', v_pid, p_resource
            USING ERRCODE = 'lock_not_available';
    END IF;
    PERFORM resource_lock_end(r, 'force_released', p_reason);
    RETURN QUERY SELECT r.owner, r.fence, r.acquired_at, r.expires_at;
END $$;

-- Expire every lease whose TTL passed more than p_grace_s ago, and clear rows
-- whose holder's session ended without releasing. Returns how many expired.
CREATE OR REPLACE FUNCTION resource_lock_expire_overdue(p_grace_s double precision) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    r resource_locks;
    v_expired integer := 0;
BEGIN
    FOR r IN SELECT * FROM resource_locks l
              WHERE l.owner IS NOT NULL
                AND l.expires_at < clock_timestamp() - p_grace_s * interval '1 second'
                FOR UPDATE SKIP LOCKED
    LOOP
        IF resource_lock_holder_pid(r.lock_key) IS NULL THEN
            PERFORM resource_lock_end(r, 'abandoned', 'holder session ended');
        ELSIF resource_lock_expire_stale(r.resource_id) THEN
            v_expired := v_expired + 1;
        END IF;
    END LOOP;
    RETURN v_expired;
END $$;
