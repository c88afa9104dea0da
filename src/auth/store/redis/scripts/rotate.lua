-- KEYS: 1 old id index, 2 old record, 3 live zset, 4 expiry zset, 5 new record,
--       6 new id index, 7 audit stream, 8 channel
-- ARGV: 1 old id, 2 old hash hex, 3 now ms, 4 grace end ms, 5 grace end RFC 3339,
--       6 expected rotated_to of the old record ('' = never rotated),
--       7 new id, 8 new hash hex, 9 new created_at ms, 10 new expires_at ms ('' = never),
--       11 audit maxlen, 12 publish command, 13 "expiry changed" message,
--       14 n = number of record arguments, 15..14+n new record field/value pairs,
--       15+n.. audit entry field/value pairs
-- Returns false (no live key with that id, or it was rotated since the caller
-- read it) or {old expires_at RFC 3339, published 1|0, publish error}.
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return false end
if not redis.call('ZSCORE', KEYS[3], ARGV[1]) then return false end
local now = tonumber(ARGV[3])
local exp = redis.call('ZSCORE', KEYS[4], ARGV[1])
if exp and tonumber(exp) <= now then return false end
local f = redis.call('HMGET', KEYS[2], 'revoked_at', 'rotated_to', 'expires_at')
if not f[1] or f[1] ~= '' then return false end
-- Compare-and-set: of two rotations that read the same state, one wins.
if (f[2] or '') ~= ARGV[6] then return false end
if redis.call('EXISTS', KEYS[5]) == 1 or redis.call('EXISTS', KEYS[6]) == 1 then
  return redis.error_reply('KEYGATE duplicate key id or hash')
end
local old_exp = f[3] or ''
if not exp or tonumber(ARGV[4]) < tonumber(exp) then
  redis.call('HSET', KEYS[2], 'expires_at', ARGV[5])
  redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
  old_exp = ARGV[5]
end
redis.call('HSET', KEYS[2], 'rotated_to', ARGV[7])
local n = tonumber(ARGV[14])
redis.call('HSET', KEYS[5], unpack(ARGV, 15, 14 + n))
redis.call('SET', KEYS[6], ARGV[8])
redis.call('ZADD', KEYS[3], ARGV[9], ARGV[7])
if ARGV[10] ~= '' then
  redis.call('ZADD', KEYS[4], ARGV[10], ARGV[7])
end
redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[11], '*', unpack(ARGV, 15 + n, #ARGV))
local published = redis.pcall(ARGV[12], KEYS[8], ARGV[13])
if type(published) == 'table' and published.err then
  return {old_exp, 0, published.err}
end
return {old_exp, 1, ''}
