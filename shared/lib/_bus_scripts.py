"""Lua scripts of the bus: each is one atomic round trip on keys of one agent (one hash slot)."""

from __future__ import annotations

__all__ = [
    "ADMIT",
    "ADMIT_ACCEPTED",
    "ADMIT_AS",
    "ADMIT_FULL",
    "ADMIT_IN_FLIGHT",
    "ADMIT_OFFLINE",
    "ADMIT_STORED",
    "CANCEL",
    "CANCEL_NOT_IN_FLIGHT",
    "CANCEL_PUBLISHED",
    "CANCEL_STORED",
    "FINISH",
    "HEARTBEAT",
    "IN_FLIGHT",
]

ADMIT_ACCEPTED, ADMIT_STORED, ADMIT_IN_FLIGHT, ADMIT_OFFLINE, ADMIT_FULL, ADMIT_AS = 0, 1, 2, 3, 4, 5
CANCEL_STORED, CANCEL_PUBLISHED, CANCEL_NOT_IN_FLIGHT = 0, 1, 2
#: What a response key holds while its request is in flight (ADMIT's marker, 'P' in the scripts).
IN_FLIGHT = b"P"

#: Admission of a request, in one round trip: a request id sent before under another
#: idempotency key is that request ({5, its key}: the caller admits it under that key, so it
#: gets that request's response and never runs twice); a stored response is returned
#: (idempotency), a duplicate still in flight is reported, an agent with no live consumer or
#: a full queue is refused, otherwise an in-flight marker is set, the request id recorded
#: with its key, and (with ARGV[5] == "x") the envelope is queued.
#: KEYS: response key, request stream, consumers zset, request id key.
#: ARGV: envelope JSON, marker TTL ms, stream max length, check liveness ("1"/"0"), "x" to
#: queue, request id key TTL ms, idempotency key.
ADMIT = """
local first = redis.call('GET', KEYS[4])
if first and first ~= ARGV[7] then return {5, first} end
local stored = redis.call('GET', KEYS[1])
if stored then
  if stored == 'P' then return {2, ''} end
  return {1, stored}
end
if ARGV[4] == '1' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if redis.call('ZCOUNT', KEYS[3], now, '+inf') == 0 then return {3, ''} end
end
if ARGV[5] == 'x' and redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[3]) then return {4, ''} end
redis.call('SET', KEYS[1], 'P', 'PX', ARGV[2])
redis.call('SET', KEYS[4], ARGV[7], 'PX', ARGV[6])
if ARGV[5] == 'x' then
  local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'e', ARGV[1])
  return {0, id}
end
return {0, ''}
"""

#: A cancel notice, sent only while its request is in flight: with a response stored the
#: request is over (the stored response is returned, nothing is published); with the
#: in-flight marker the notice is published on the agent's cancel channel (returns
#: {1, number of listening instances}); with neither (never admitted, or given up) {2, ''}.
#: KEYS: response key. ARGV: cancel channel, notice JSON.
CANCEL = """
local stored = redis.call('GET', KEYS[1])
if stored and stored ~= 'P' then return {0, stored} end
if not stored then return {2, ''} end
return {1, redis.call('PUBLISH', ARGV[1], ARGV[2])}
"""

#: A consumer's liveness: live until now + ARGV[2] ms on the server's clock (so
#: requesters and servers on different hosts agree); old members are pruned.
#: KEYS: consumers zset. ARGV: consumer name, lifetime ms ("0" removes it).
HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[2] == '0' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 86400000)
return now
"""

#: Finishing a batch of requests of one agent, atomically (a script runs alone, like
#: MULTI) and as one command with one reply (a MULTI of N items costs N+2 replies to
#: parse): per item store the response under its key with a TTL, publish it on the
#: requester's reply channel (if any) and XACK + XDEL its stream entry (if any).
#: KEYS: the agent's request streams (by band), then each item's response key.
#: ARGV: TTL s, group, number of streams, then per item: raw response, reply channel
#: ("" for none), stream index (1-based, "0" for none), entry id.
FINISH = """
local ttl, group, nstreams = ARGV[1], ARGV[2], tonumber(ARGV[3])
local a = 4
for i = nstreams + 1, #KEYS do
  local raw, channel, s, id = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 3]
  redis.call('SET', KEYS[i], raw, 'EX', ttl)
  if channel ~= '' then redis.call('PUBLISH', channel, raw) end
  if s > 0 then
    redis.call('XACK', KEYS[s], group, id)
    redis.call('XDEL', KEYS[s], id)
  end
  a = a + 4
end
return #KEYS - nstreams
"""
