-- KEYS: 1 record, 2 id index, 3 live zset, 4 expiry zset, 5 audit stream
-- ARGV: 1 hash hex, 2 ceiling ('' = none), 3 now ms, 4 created_at ms,
--       5 expires_at ms ('' = never), 6 audit maxlen,
--       7..14 id prefix name created_by created_at expires_at last_used_at revoked_at,
--       15..22 audit time actor action key_id prefix name client user_agent
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
redis.call('HSET', KEYS[1], 'id', ARGV[7], 'prefix', ARGV[8], 'name', ARGV[9],
  'created_by', ARGV[10], 'created_at', ARGV[11], 'expires_at', ARGV[12],
  'last_used_at', ARGV[13], 'revoked_at', ARGV[14])
redis.call('SET', KEYS[2], ARGV[1])
if ARGV[14] == '' and (ARGV[5] == '' or tonumber(ARGV[5]) > now) then
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[7])
  if ARGV[5] ~= '' then
    redis.call('ZADD', KEYS[4], ARGV[5], ARGV[7])
  end
  live = live + 1
end
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], '*',
  'time', ARGV[15], 'actor', ARGV[16], 'action', ARGV[17], 'key_id', ARGV[18],
  'prefix', ARGV[19], 'name', ARGV[20], 'client', ARGV[21], 'user_agent', ARGV[22])
return {1, live}
