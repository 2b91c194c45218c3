-- Release a lock only if the caller still owns it (its token is the stored value).
-- KEYS[1]: the lock's key
-- ARGV[1]: the owner's token
-- Returns 1 if released, 0 if the lock had expired or belongs to another owner.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
