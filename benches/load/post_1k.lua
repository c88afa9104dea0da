-- wrk script: POST a 1 KiB body (the request-body path through keygate's own links).
-- taskset -c 0 wrk -t1 -c64 -d4s -s benches/load/post_1k.lua -H 'Host: acme.moleculesai.app' http://127.0.0.1:<port>/x
wrk.method = "POST"
wrk.body = string.rep("x", 1024)
wrk.headers["Content-Type"] = "application/octet-stream"
