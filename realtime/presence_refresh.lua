-- Push back the expiry of a node's own entries; report the ones that are gone (swept while the node was cut
-- off, or lost in a Redis restart) so the node can add them again.
-- KEYS[1]: the topic's hash of entries (member id -> entry)
-- KEYS[2]: the topic's sorted set of expiries (member id -> expires at, seconds)
-- KEYS[3]: the index of topics with entries (topic -> earliest expiry)
-- ARGV[1]: topic
-- ARGV[2]: expires at
-- ARGV[3]: keep, milliseconds: the keys' own expiry
-- ARGV[4]: the first member id; ARGV[5], ARGV[6], ...: more member ids
-- Returns the member ids that were not found.
local missing = {}
for i = 4, #ARGV do
  if redis.call('ZSCORE', KEYS[2], ARGV[i]) then
    redis.call('ZADD', KEYS[2], ARGV[2], ARGV[i])
  else
    missing[#missing + 1] = ARGV[i]
  end
end
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if first[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  redis.call('ZADD', KEYS[3], first[2], ARGV[1])
end
return missing
