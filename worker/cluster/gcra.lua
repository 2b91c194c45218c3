-- One GCRA (generic cell rate algorithm) step, atomic: admit `cost` requests now, or say when to retry.
-- KEYS[1]: the limit's key (holds the theoretical arrival time, TAT, in microseconds of the server clock)
-- ARGV[1]: emission interval, microseconds (period / limit)
-- ARGV[2]: burst tolerance, microseconds (emission interval * burst)
-- ARGV[3]: cost, requests to admit at once
-- Returns {allowed 0|1, remaining, retry_after_us, reset_after_us}.
-- The clock is the server's (TIME), so every node agrees on it; Redis >= 5 replicates the script's effects.
local emission = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then
  tat = now
end
local new_tat = tat + emission * cost
local allow_at = new_tat - tolerance
if now < allow_at then
  return {0, math.max(0, math.floor((now + tolerance - tat) / emission)), allow_at - now, tat - now}
end
local reset = new_tat - now
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.max(1, math.ceil(reset / 1000)))
return {1, math.max(0, math.floor((now + tolerance - new_tat) / emission)), 0, reset}
