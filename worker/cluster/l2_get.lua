-- Read one L2 cache entry in the slug's current generation (a purge bumps the generation).
-- KEYS[1]: the slug's generation counter
-- ARGV[1]: the entry key's prefix (`<prefix>l2:<slug>:`); the generation and ARGV[2] are appended
-- ARGV[2]: the entry's digest
-- Entry keys are built here, not passed in KEYS: fine on one Redis or Sentinel, not on Redis Cluster.
local gen = redis.call('GET', KEYS[1]) or '0'
return redis.call('GET', ARGV[1] .. gen .. ':' .. ARGV[2])
