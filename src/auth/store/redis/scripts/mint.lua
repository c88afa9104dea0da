-- KEYS: 1 record, 2 id index, 3 live zset, 4 expiry zset, 5 audit stream
-- ARGV: 1 hash hex, 2 ceiling ('' = none), 3 now ms, 4 created_at ms,
--       5 expires_at ms ('' = never), 6 audit maxlen, 7 id, 8 revoked_at ('' = live),
--       9 n = number of record arguments, 10..9+n record field/value pairs,
--       10+n.. audit entry field/value pairs
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then
  return redis.error_reply('KEYGATE duplicate key id or hash')
end
local now = tonumber(ARGV[3])
local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZREM', KEYS[4], id)
end
local live = redis.call('ZCARD', KEYS[3])
if ARGV[2] ~= '' and live >= tonumber(ARGV[2]) then
  return {0, live}
end
local n = tonumber(ARGV[9])
redis.call('HSET', KEYS[1], unpack(ARGV, 10, 9 + n))
redis.call('SET', KEYS[2], ARGV[1])
if ARGV[8] == '' and (ARGV[5] == '' or tonumber(ARGV[5]) > now) then
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[7])
  if ARGV[5] ~= '' then
    redis.call('ZADD', KEYS[4], ARGV[5], ARGV[7])
  end
  live = live + 1
end
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], '*', unpack(ARGV, 10 + n, #ARGV))
return {1, live}
