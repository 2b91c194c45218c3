-- Write one L2 cache entry into the slug's current generation, with a TTL.
-- KEYS[1]: the slug's generation counter
-- ARGV[1]: the entry key's prefix (`<prefix>l2:<slug>:`); the generation and ARGV[2] are appended
-- ARGV[2]: the entry's digest
-- ARGV[3]: the encoded entry (msgpack)
-- ARGV[4]: TTL, milliseconds
local gen = redis.call('GET', KEYS[1]) or '0'
redis.call('SET', ARGV[1] .. gen .. ':' .. ARGV[2], ARGV[3], 'PX', ARGV[4])
return 1
