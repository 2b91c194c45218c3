-- Remove one presence entry and publish its leave diff (nothing happens if it is not there).
-- KEYS[1]: the topic's hash of entries (member id -> entry)
-- KEYS[2]: the topic's sorted set of expiries (member id -> expires at, seconds)
-- KEYS[3]: the index of topics with entries (topic -> earliest expiry)
-- ARGV[1]: topic
-- ARGV[2]: member id
-- ARGV[3]: channel the topic's diffs are published on
-- Returns 1 if the entry was removed, else 0.
local old = redis.call('HGET', KEYS[1], ARGV[2])
if not old then
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], cmsgpack.pack(1) .. old)
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if first[1] then
  redis.call('ZADD', KEYS[3], first[2], ARGV[1])
else
  redis.call('ZREM', KEYS[3], ARGV[1])
end
return 1
