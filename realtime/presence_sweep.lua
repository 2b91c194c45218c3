-- Remove a topic's expired entries (their node stopped refreshing them) and publish one leave diff for them.
-- Safe to run on every node at once: the first run removes them, the others find nothing.
-- KEYS[1]: the topic's hash of entries (member id -> entry)
-- KEYS[2]: the topic's sorted set of expiries (member id -> expires at, seconds)
-- KEYS[3]: the index of topics with entries (topic -> earliest expiry)
-- ARGV[1]: topic
-- ARGV[2]: now, seconds (entries expiring at or before it are removed)
-- ARGV[3]: channel the topic's diffs are published on
-- ARGV[4]: at most this many entries per call
-- Returns the number of entries removed.
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[4]))
local entries = {}
for _, member in ipairs(gone) do
  local entry = redis.call('HGET', KEYS[1], member)
  if entry then
    entries[#entries + 1] = entry
    redis.call('HDEL', KEYS[1], member)
  end
  redis.call('ZREM', KEYS[2], member)
end
if #entries > 0 then
  redis.call('PUBLISH', ARGV[3], cmsgpack.pack(#entries) .. table.concat(entries))
end
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if first[1] then
  redis.call('ZADD', KEYS[3], first[2], ARGV[1])
else
  redis.call('ZREM', KEYS[3], ARGV[1])
end
return #gone
