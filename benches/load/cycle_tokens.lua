-- wrk script: each request carries the next token from $TOKENS_FILE (one a
-- line), cycling; the thread stops itself after $STOP_AFTER responses
-- (default: one per token), so with -t1 every token is used once.
--   TOKENS_FILE=... STOP_AFTER=... wrk -t1 -c64 -d60s -s cycle_tokens.lua \
--     -H 'Host: acme.moleculesai.app' http://127.0.0.1:PORT/api/x
-- Non-2xx responses are counted by wrk itself ("Non-2xx or 3xx responses").
local tokens = {}
for line in io.lines(os.getenv("TOKENS_FILE")) do
  tokens[#tokens + 1] = line
end
local stop_after = tonumber(os.getenv("STOP_AFTER") or "") or #tokens
local next_token = 0
local seen = 0

-- wrk.format uses wrk.headers (the -H flags) only when given no headers, so
-- copy them (Host above all) into each request's table.
request = function()
  next_token = next_token % #tokens + 1
  local h = {}
  for k, v in pairs(wrk.headers) do
    h[k] = v
  end
  h["Authorization"] = "Bearer " .. tokens[next_token]
  return wrk.format(nil, nil, h)
end

response = function(status, headers, body)
  seen = seen + 1
  if seen >= stop_after then
    wrk.thread:stop()
  end
end
