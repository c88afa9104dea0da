#!/usr/bin/env python3
"""Seed N org keys straight into keygate's Redis layout, fast.

Writes Redis protocol (RESP) for `redis-cli --pipe` on stdout and the
plaintext tokens, one a line, to TOKENS_FILE (for the wrk Lua script that
cycles through them). Each key gets what `keygate keys mint` would store
(see src/auth/store/redis.rs, "Data layout"):

  HSET keygate:{<slug>}:key:<sha256 hex> id prefix name created_by created_at
       expires_at last_used_at revoked_at
  SET  keygate:{<slug>}:id:<id> <sha256 hex>

The ids are not added to the `live` set, so `keygate keys list` and the mint
ceiling are not flooded by benchmark keys. Tokens have the real format:
prefix + 43 base62 characters + base62(CRC32(prefix + random)), so they pass
keygate's format check and reach the cache/store.

usage: seed_keys.py N TOKENS_FILE [--slug acme] [--prefix mok_]
"""

import argparse
import hashlib
import secrets
import sys
import zlib
from datetime import datetime, timezone

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
RANDOM_LEN = 43
CHECKSUM_LEN = 6
KEY_ID_LEN = 20


def checksum(body: bytes) -> str:
    n = zlib.crc32(body) & 0xFFFFFFFF
    out = []
    for _ in range(CHECKSUM_LEN):
        out.append(BASE62[n % 62])
        n //= 62
    return "".join(reversed(out))


def token(prefix: str) -> str:
    body = prefix + "".join(secrets.choice(ALNUM) for _ in range(RANDOM_LEN))
    return body + checksum(body.encode())


def resp(*args: str) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=int)
    ap.add_argument("tokens_file")
    ap.add_argument("--slug", default="acme")
    ap.add_argument("--prefix", default="mok_")
    a = ap.parse_args()

    base = "keygate:{%s}:" % a.slug
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"
    out = sys.stdout.buffer
    with open(a.tokens_file, "w") as tf:
        for i in range(a.n):
            t = token(a.prefix)
            h = hashlib.sha256(t.encode()).hexdigest()
            kid = "".join(secrets.choice(ALNUM) for _ in range(KEY_ID_LEN))
            out.write(
                resp(
                    "HSET", base + "key:" + h,
                    "id", kid,
                    "prefix", t[:12],
                    "name", "bench-%d" % i,
                    "created_by", "cli:bench",
                    "created_at", now,
                    "expires_at", "",
                    "last_used_at", "",
                    "revoked_at", "",
                )
            )
            out.write(resp("SET", base + "id:" + kid, h))
            tf.write(t + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
