//! The revocation feed task: subscribe to the tenant's channel, forward
//! revocations, report the feed's loss (see the parent module's docs for why
//! pub/sub).

use std::sync::Arc;
use std::time::Duration;

use ::redis as rds;
use futures_util::StreamExt;
use rds::cluster::ClusterClient;
use rds::cluster_async::ClusterConnection;
use rds::{PushKind, RedisResult, Value};
use tokio::sync::mpsc;

use super::conn::Target;
use super::{FeedEvent, RedisStore};
use crate::auth::token::KeyHash;

/// Feed reconnect back-off.
const FEED_BACKOFF_MIN: Duration = Duration::from_millis(50);
const FEED_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often an idle feed checks that its connection is alive.
const FEED_PING_EVERY: Duration = Duration::from_secs(1);
/// Lower bound on feed connect/ping waits (a short `store.timeout` would
/// otherwise turn a briefly busy Redis into a feed loss).
const FEED_MIN_WAIT: Duration = Duration::from_secs(1);

/// What a feed subscription reads from.
enum Subscription {
    /// `SUBSCRIBE` on a standalone server or the Sentinel master.
    Plain(rds::aio::PubSubSink, rds::aio::PubSubStream),
    /// `SSUBSCRIBE` through a RESP3 cluster connection.
    Sharded(ClusterConnection, mpsc::UnboundedReceiver<rds::PushInfo>),
}

/// Why a feed session ended.
enum FeedEnd {
    /// The consumer went away: stop the task.
    Closed,
    /// The subscription dropped (reason for the log).
    Lost(String),
}

impl RedisStore {
    /// Start the revocation feed task (see the module docs).
    pub fn spawn_revocation_feed(self: &Arc<Self>, events: mpsc::UnboundedSender<FeedEvent>) {
        let this = Arc::clone(self);
        tokio::spawn(async move { this.feed_loop(events).await });
    }

    fn feed_wait(&self) -> Duration {
        self.timeout.max(FEED_MIN_WAIT)
    }

    async fn feed_loop(self: Arc<Self>, events: mpsc::UnboundedSender<FeedEvent>) {
        let mut backoff = FEED_BACKOFF_MIN;
        // Whether the consumer has been told the feed is down.
        let mut told_lost = false;
        loop {
            let attempt = tokio::select! {
                _ = events.closed() => return,
                r = tokio::time::timeout(self.feed_wait(), self.subscribe()) => r,
            };
            match attempt {
                Ok(Ok(sub)) => {
                    if events.send(FeedEvent::Connected).is_err() {
                        return;
                    }
                    tracing::info!(redis = %self.location, "revocation feed connected");
                    told_lost = false;
                    backoff = FEED_BACKOFF_MIN;
                    match self.pump(sub, &events).await {
                        FeedEnd::Closed => return,
                        FeedEnd::Lost(why) => {
                            tracing::warn!(redis = %self.location, reason = %why, "revocation feed lost: cached keys are re-checked");
                            // The master may be gone (Sentinel failover): drop the
                            // command connection too, so the next call asks the
                            // sentinels instead of failing once on a dead master.
                            self.forget_connection(None).await;
                        }
                    }
                }
                Ok(Err(e)) => {
                    let e = self.describe(&e);
                    tracing::warn!(error = %e, "revocation feed cannot subscribe");
                }
                Err(_) => {
                    tracing::warn!(redis = %self.location, "revocation feed subscribe timed out")
                }
            }
            if !told_lost {
                if events.send(FeedEvent::Lost).is_err() {
                    return;
                }
                told_lost = true;
            }
            tokio::select! {
                _ = events.closed() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(FEED_BACKOFF_MAX);
        }
    }

    /// Connect a subscription to the tenant's revocation channel.
    async fn subscribe(&self) -> RedisResult<Subscription> {
        let channel = self.keys.channel();
        match &self.target {
            Target::Standalone { client, .. } => {
                let (mut sink, stream) = client.get_async_pubsub().await?.split();
                sink.subscribe(&channel).await?;
                Ok(Subscription::Plain(sink, stream))
            }
            Target::Sentinel { sentinel, .. } => {
                let client = sentinel.lock().await.async_get_client().await?;
                let (mut sink, stream) = client.get_async_pubsub().await?.split();
                sink.subscribe(&channel).await?;
                Ok(Subscription::Plain(sink, stream))
            }
            Target::Cluster { seeds, .. } => {
                let (tx, rx) = mpsc::unbounded_channel();
                let client = ClusterClient::builder(seeds.clone())
                    .use_protocol(rds::ProtocolVersion::RESP3)
                    .push_sender(tx)
                    .connection_timeout(self.feed_wait())
                    .response_timeout(self.feed_wait())
                    .build()?;
                let mut conn = client.get_async_connection().await?;
                conn.ssubscribe(&channel).await?;
                Ok(Subscription::Sharded(conn, rx))
            }
        }
    }

    /// Forward revocations until the subscription is lost or `events` closes.
    async fn pump(&self, sub: Subscription, events: &mpsc::UnboundedSender<FeedEvent>) -> FeedEnd {
        let mut tick = tokio::time::interval(FEED_PING_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate
        let wait = self.feed_wait();
        let forward = |payload: &[u8]| -> bool {
            let text = std::str::from_utf8(payload).ok();
            let event = match text.and_then(|t| t.strip_prefix(super::lifecycle::CHANGED_PREFIX)) {
                Some(hex) => KeyHash::from_hex(hex).map(FeedEvent::Changed),
                None => text.and_then(KeyHash::from_hex).map(FeedEvent::Revoked),
            };
            match event {
                Some(event) => events.send(event).is_ok(),
                None => {
                    tracing::warn!("revocation feed: ignoring a malformed message");
                    true
                }
            }
        };
        match sub {
            Subscription::Plain(mut sink, mut stream) => loop {
                tokio::select! {
                    _ = events.closed() => return FeedEnd::Closed,
                    msg = stream.next() => match msg {
                        Some(msg) => {
                            if !forward(msg.get_payload_bytes()) {
                                return FeedEnd::Closed;
                            }
                        }
                        None => return FeedEnd::Lost("connection closed".into()),
                    },
                    _ = tick.tick() => {
                        match tokio::time::timeout(wait, sink.ping::<Value>()).await {
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => return FeedEnd::Lost(format!("ping failed: {}", self.describe(&e))),
                            Err(_) => return FeedEnd::Lost("ping timed out".into()),
                        }
                    }
                }
            },
            Subscription::Sharded(mut conn, mut pushes) => loop {
                tokio::select! {
                    _ = events.closed() => return FeedEnd::Closed,
                    push = pushes.recv() => match push {
                        Some(p) => match p.kind {
                            PushKind::SMessage | PushKind::Message => {
                                let payload = match p.data.get(1) {
                                    Some(Value::BulkString(b)) => b.as_slice(),
                                    _ => &[],
                                };
                                if !forward(payload) {
                                    return FeedEnd::Closed;
                                }
                            }
                            PushKind::Disconnection | PushKind::SUnsubscribe => {
                                return FeedEnd::Lost(format!("{:?}", p.kind));
                            }
                            _ => {}
                        },
                        None => return FeedEnd::Lost("connection closed".into()),
                    },
                    _ = tick.tick() => {
                        let mut probe_cmd = rds::cmd("EXISTS");
                        probe_cmd.arg(self.keys.live());
                        let probe = probe_cmd.query_async::<i64>(&mut conn);
                        match tokio::time::timeout(wait, probe).await {
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => return FeedEnd::Lost(format!("probe failed: {}", self.describe(&e))),
                            Err(_) => return FeedEnd::Lost("probe timed out".into()),
                        }
                    }
                }
            },
        }
    }
}
