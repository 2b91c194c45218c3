-- Add or replace one presence entry and publish the diff: the replaced entry leaves, the new one joins.
-- Re-adding the very same entry (a node restoring its own after a Redis restart) only refreshes its expiry.
-- KEYS[1]: the topic's hash of entries (member id -> entry, msgpack, opaque here)
-- KEYS[2]: the topic's sorted set of expiries (member id -> expires at, seconds)
-- KEYS[3]: the index of topics with entries (topic -> earliest expiry), read by the sweepers
-- ARGV[1]: topic
-- ARGV[2]: member id
-- ARGV[3]: entry
-- ARGV[4]: expires at
-- ARGV[5]: channel the topic's diffs are published on
-- ARGV[6]: keep, milliseconds: the keys' own expiry, a safety net for when every node is gone
-- Diff message: msgpack int n (the number of leaves), then n leave entries, then the join entries.
-- Returns 1 if a diff was published, 0 if the entry was already there.
local old = redis.call('HGET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[2])
local published = 0
if old ~= ARGV[3] then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
  if old then
    redis.call('PUBLISH', ARGV[5], cmsgpack.pack(1) .. old .. ARGV[3])
  else
    redis.call('PUBLISH', ARGV[5], cmsgpack.pack(0) .. ARGV[3])
  end
  published = 1
end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
redis.call('ZADD', KEYS[3], first[2], ARGV[1])
return published
