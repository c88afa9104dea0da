#!/usr/bin/env python3
"""Hold N idle keep-alive HTTP/1.1 connections open to a proxy.

Opens N connections to HOST:PORT (loopback only), sends one request on each
(with the given Host and Authorization headers), reads its response whole,
and keeps the connection open. Then prints one line
`ready open=<n> ok=<2xx count> failed=<n>` on stdout and holds every
connection until stdin is closed, a line is read from it, or HOLD seconds
have passed, whichever comes first; then closes them all and exits.

usage: idle_conns.py PORT N --host-header H [--token T] [--hold 120]
"""

import argparse
import asyncio
import resource
import sys

CONNECT_CONCURRENCY = 256


async def one(port, req, sem, stats, conns):
    async with sem:
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        except (OSError, asyncio.TimeoutError):
            stats["failed"] += 1
            return
        try:
            w.write(req)
            await w.drain()
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if length:
                await asyncio.wait_for(r.readexactly(length), 10)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError, ValueError, IndexError):
            stats["failed"] += 1
            w.close()
            return
        stats["open"] += 1
        if 200 <= status < 300:
            stats["ok"] += 1
        conns.append(w)


async def wait_release(hold):
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), hold)
    except asyncio.TimeoutError:
        pass


async def main_async(a):
    headers = ["GET /api/x HTTP/1.1", "Host: " + a.host_header]
    if a.token:
        headers.append("Authorization: Bearer " + a.token)
    req = ("\r\n".join(headers) + "\r\n\r\n").encode()
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
    stats = {"open": 0, "ok": 0, "failed": 0}
    conns = []
    await asyncio.gather(*(one(a.port, req, sem, stats, conns) for _ in range(a.n)))
    print("ready open=%d ok=%d failed=%d" % (stats["open"], stats["ok"], stats["failed"]), flush=True)
    await wait_release(a.hold)
    for w in conns:
        w.close()
    return 0 if stats["failed"] == 0 else 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("n", type=int)
    ap.add_argument("--host-header", required=True)
    ap.add_argument("--token", default="")
    ap.add_argument("--hold", type=float, default=120.0)
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = a.n + 1024
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return asyncio.run(main_async(a))


if __name__ == "__main__":
    sys.exit(main())
