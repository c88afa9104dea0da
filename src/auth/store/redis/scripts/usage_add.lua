-- KEYS: 1 flush marker, 2.. usage buckets (one hash per key and UTC hour)
-- ARGV: 1 marker TTL seconds, then per bucket: requests, refused, EXPIREAT unix seconds
-- Returns 1 (added) or 0 (this batch was already added: a retry after a lost reply).
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
for i = 2, #KEYS do
  local b = 2 + (i - 2) * 3
  if ARGV[b] ~= '0' then redis.call('HINCRBY', KEYS[i], 'requests', ARGV[b]) end
  if ARGV[b + 1] ~= '0' then redis.call('HINCRBY', KEYS[i], 'refused', ARGV[b + 1]) end
  redis.call('EXPIREAT', KEYS[i], ARGV[b + 2])
end
return 1
