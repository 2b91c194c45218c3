-- Extend a lock's TTL only if the caller still owns it.
-- KEYS[1]: the lock's key
-- ARGV[1]: the owner's token
-- ARGV[2]: the new TTL, milliseconds (counted from now)
-- Returns 1 if extended, 0 if the lock had expired or belongs to another owner.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
