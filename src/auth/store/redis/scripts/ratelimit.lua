-- Rate-limit coordination (contract §11): one call per instance per tick.
-- KEYS[i]: keygate:{slug}:rl:<key id>:<window start, unix seconds>
-- ARGV: four per key, in KEYS order: limit, add, ask, ttl_ms
--   add: requests this instance let through without a reservation (store
--        was unreachable); always counted.
--   ask: how many more this instance wants to reserve; granted only up to
--        what is left of limit.
-- Returns, per key, {granted, total} (total: reserved by every instance).
local out = {}
for i, key in ipairs(KEYS) do
  local b = (i - 1) * 4
  local limit = tonumber(ARGV[b + 1])
  local add = tonumber(ARGV[b + 2])
  local ask = tonumber(ARGV[b + 3])
  local cur = tonumber(redis.call('GET', key) or '0')
  local grant = limit - cur - add
  if grant > ask then grant = ask end
  if grant < 0 then grant = 0 end
  local total = cur
  if add + grant > 0 then
    total = redis.call('INCRBY', key, add + grant)
    redis.call('PEXPIRE', key, ARGV[b + 4])
  end
  out[i] = {grant, total}
end
return out
