-- The live entries of a topic (expiring after now), read atomically.
-- KEYS[1]: the topic's hash of entries (member id -> entry)
-- KEYS[2]: the topic's sorted set of expiries (member id -> expires at, seconds)
-- ARGV[1]: now, seconds
-- Returns the entries (msgpack), in no particular order.
local live = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf')
local out = {}
for i = 1, #live, 1000 do
  local chunk = redis.call('HMGET', KEYS[1], unpack(live, i, math.min(i + 999, #live)))
  for _, entry in ipairs(chunk) do
    if entry then
      out[#out + 1] = entry
    end
  end
end
return out
