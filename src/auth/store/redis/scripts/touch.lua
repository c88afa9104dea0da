-- KEYS: records; ARGV: matching last_used_at values (fixed-width RFC 3339 UTC,
-- so string order is time order). Only existing records, only forward.
for i, k in ipairs(KEYS) do
  local cur = redis.call('HGET', k, 'last_used_at')
  if cur and (cur == '' or cur < ARGV[i]) then
    redis.call('HSET', k, 'last_used_at', ARGV[i])
  end
end
return #KEYS
