-- KEYS: 1 id index, 2 record, 3 live zset, 4 expiry zset, 5 audit stream, 6 channel
-- ARGV: 1 id, 2 hash hex, 3 revoked_at, 4 now ms, 5 audit maxlen, 6 publish command,
--       7.. audit entry field/value pairs
-- Returns false (no live key with that id) or {hash hex, published 1|0, publish error}.
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return false end
if not redis.call('ZSCORE', KEYS[3], ARGV[1]) then return false end
local exp = redis.call('ZSCORE', KEYS[4], ARGV[1])
if exp and tonumber(exp) <= tonumber(ARGV[4]) then return false end
local revoked = redis.call('HGET', KEYS[2], 'revoked_at')
if not revoked or revoked ~= '' then return false end
redis.call('HSET', KEYS[2], 'revoked_at', ARGV[3])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[5], '*', unpack(ARGV, 7, #ARGV))
-- The revocation is committed above; a failed publication must not turn it
-- into an error reply (the caller would report a failure for a revoked key,
-- and a retry would find it already revoked), so it is reported instead.
local published = redis.pcall(ARGV[6], KEYS[6], ARGV[2])
if type(published) == 'table' and published.err then
  return {ARGV[2], 0, published.err}
end
return {ARGV[2], 1, ''}
