//! The store's Lua scripts and the one way they run (`EVALSHA`, then `EVAL`
//! on `NOSCRIPT`). The bodies live beside this file in `scripts/*.lua`, each
//! headed by its KEYS and ARGV.

use ::redis as rds;
use rds::{Cmd, ErrorKind, FromRedisValue, RedisResult, Script, ServerErrorKind, ToRedisArgs};

use super::conn::Conn;

pub(super) const MINT: &str = include_str!("scripts/mint.lua");
pub(super) const REVOKE: &str = include_str!("scripts/revoke.lua");
pub(super) const TOUCH: &str = include_str!("scripts/touch.lua");
pub(super) const ROTATE: &str = include_str!("scripts/rotate.lua");
pub(super) const USAGE_ADD: &str = include_str!("scripts/usage_add.lua");
pub(super) const RATELIMIT: &str = include_str!("scripts/ratelimit.lua");

/// One of the store's Lua scripts. Scripts run only through
/// [`super::RedisStore::eval`], which is where the rule for a node that does not
/// know the script lives, so a new script gets it by being a `Lua`.
pub(super) struct Lua {
    body: &'static str,
    /// SHA-1 hex of `body`, the name `EVALSHA` uses.
    sha: String,
}

impl Lua {
    pub(super) fn new(body: &'static str) -> Lua {
        Lua {
            body,
            sha: Script::new(body).get_hash().to_string(),
        }
    }

    /// A call of this script; add its keys and arguments in order.
    pub(super) fn prepare(&self) -> LuaCall<'_> {
        LuaCall {
            lua: self,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }
}

/// The keys and arguments of one script call.
pub(super) struct LuaCall<'a> {
    lua: &'a Lua,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl LuaCall<'_> {
    pub(super) fn key(&mut self, key: impl ToRedisArgs) -> &mut Self {
        key.write_redis_args(&mut self.keys);
        self
    }

    pub(super) fn arg(&mut self, arg: impl ToRedisArgs) -> &mut Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    /// `EVALSHA <sha>`, or with `body` `EVAL <script>`, then the keys and
    /// arguments. Both are routed alike on a cluster: by the first key, so to
    /// the tenant's shard.
    fn command(&self, body: bool) -> Cmd {
        let mut cmd = if body {
            let mut c = rds::cmd("EVAL");
            c.arg(self.lua.body);
            c
        } else {
            let mut c = rds::cmd("EVALSHA");
            c.arg(&self.lua.sha);
            c
        };
        cmd.arg(self.keys.len())
            .arg(self.keys.as_slice())
            .arg(self.args.as_slice());
        cmd
    }

    /// `EVALSHA`; on `NOSCRIPT` (the node's script cache is empty: it
    /// restarted, it is a replica promoted by a failover — Redis does not
    /// replicate the script cache —, or `SCRIPT FLUSH`), `EVAL` with the
    /// body on the same route, which runs the script and caches it on that
    /// node. `NOSCRIPT` means nothing ran, so sending it again is safe.
    ///
    /// Not [`rds::Script::invoke_async`]: on `NOSCRIPT` it sends
    /// `SCRIPT LOAD` and then `EVALSHA` again. `SCRIPT LOAD` has no key, so
    /// the cluster client fans it out to every node it knows (all-nodes
    /// route, every answer awaited), and in redis 1.8 the legs of a fan-out
    /// are queued where the connection's task only looks when something else
    /// wakes it (`dispatch_pending` drains them with `try_recv`; no waker is
    /// registered). Right after a restart of the tenant's master that took
    /// 180–480 ms instead of about 1 ms; with the default 250 ms
    /// `store.timeout` the mint that paid it first got through, and the
    /// revoke that followed (a list, a `GET`, then its own script, paying
    /// it again) answered 503, as did the `last_used_at` write-behind.
    pub(super) async fn invoke<T: FromRedisValue>(&self, conn: &mut Conn) -> RedisResult<T> {
        match self.command(false).query_async(conn).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.command(true).query_async(conn).await
            }
            other => other,
        }
    }
}
