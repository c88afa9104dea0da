//! A malicious (or merely broken) app's response framing, case by case
//! (contract §3 step 6 and §12). Each case's answer is scripted byte for
//! byte (`common::scripted_upstream`), and is followed by a second request on
//! the same client connection, which must get its own correct answer — or,
//! where the contract says the client's response is aborted, the client
//! connection closes and a new connection is served. Every response the
//! client gets is parsed strictly (`common::h1_client`): keygate must never
//! pass on an ambiguous framing. Every case runs on both upstream paths
//! (`link::<case>`, `pool::<case>`; see `common::paths::pool_path`).
mod common;

use std::time::Duration;

use common::h1_client::{self, End, Reader, Response};
use common::kg::{self, HOST};
use common::paths::{self, Route};
use common::scripted_upstream::{write, ScriptedApp, Step};
use common::wire::Framing;
use keygate::auth::store::Store;
use keygate::config::Config;
use keygate::RunHandle;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Every wait for keygate is bounded by this (a hang becomes a failure).
const WAIT: Duration = Duration::from_secs(10);

struct Env {
    app: ScriptedApp,
    kg: RunHandle,
}

async fn env(route: Route, script: Vec<Step>, tweak: impl FnOnce(&mut Config)) -> Env {
    let app = ScriptedApp::start(script).await;
    let mut c = paths::on(route, kg::config(app.url()));
    // A case that leaves a response hanging must not make `stop` wait 30 s.
    c.listen.shutdown_grace = Duration::from_secs(1);
    tweak(&mut c);
    let kg = kg::start(c, Store::memory("acme")).await;
    Env { app, kg }
}

struct Client {
    rd: Reader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
}

impl Client {
    async fn connect(env: &Env) -> Client {
        let s = TcpStream::connect(env.kg.public_addr).await.unwrap();
        let (rd, wr) = s.into_split();
        Client {
            rd: Reader::new(rd),
            wr,
        }
    }

    async fn get(&mut self, path: &str) {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
        self.wr.write_all(req.as_bytes()).await.unwrap();
    }

    async fn response(&mut self) -> Result<Response, End> {
        self.rd.response(false, h1_client::deadline(WAIT)).await
    }

    /// Waits until the bytes received so far (raw, framing included) contain
    /// `needle`.
    async fn received(&mut self, needle: &[u8]) -> Result<(), End> {
        let deadline = h1_client::deadline(WAIT);
        while !self.rd.buf.windows(needle.len()).any(|w| w == needle) {
            if !self.rd.fill(deadline).await? {
                return Err(End::Closed);
            }
        }
        Ok(())
    }
}

/// The second request on the same connection gets its own answer.
async fn next_on_the_same_connection(c: &mut Client, what: &str) -> Result<(), String> {
    c.get("/next/1").await;
    match c.response().await {
        Ok(r) if r.status == 200 && r.body == b"next-1" => Ok(()),
        Ok(r) => Err(format!(
            "{what}: the next request on the same connection got {}",
            r.summary()
        )),
        Err(e) => Err(format!(
            "{what}: the next request on the same connection got no answer: {e}"
        )),
    }
}

/// A new client connection is served.
async fn a_new_connection_works(env: &Env, what: &str) -> Result<(), String> {
    let mut c = Client::connect(env).await;
    c.get("/next/2").await;
    match c.response().await {
        Ok(r) if r.status == 200 && r.body == b"next-2" => Ok(()),
        Ok(r) => Err(format!("{what}: a new connection got {}", r.summary())),
        Err(e) => Err(format!("{what}: a new connection got no answer: {e}")),
    }
}

/// The response is a 502 JSON answer from keygate.
fn bad_gateway(r: &Result<Response, End>, what: &str) -> Result<(), String> {
    match r {
        Ok(r)
            if r.status == 502
                && r.is_json()
                && r.json_error().is_some_and(|e| e.starts_with("bad gateway")) =>
        {
            Ok(())
        }
        Ok(r) => Err(format!(
            "{what}: expected keygate's 502 JSON, got {}",
            r.summary()
        )),
        Err(e) => Err(format!("{what}: expected keygate's 502 JSON, got {e}")),
    }
}

/// The rest of a response whose head the client already has was cut off:
/// keygate closed the connection before the end of a body framed as it
/// announced, never sending a made-up end or broken framing.
async fn aborted(c: &mut Client, framing: Framing, what: &str) -> Result<(), String> {
    match c.rd.body(framing, h1_client::deadline(WAIT)).await {
        Err(End::Truncated(_)) => Ok(()),
        Ok(body) => Err(format!(
            "{what}: the client got a complete response ({} bytes) from a broken body",
            body.len()
        )),
        Err(e) => Err(format!(
            "{what}: expected the response to be cut off, got: {e}"
        )),
    }
}

fn report(failures: Vec<String>) {
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

// ---- the cases ---------------------------------------------------------------------

/// `Content-Length: 3` with `Transfer-Encoding: chunked` and a 5-byte chunked
/// body: framed by the chunks (RFC 9112 §6.3), the client gets the 5 bytes
/// and no Content-Length.
async fn content_length_with_chunked_is_framed_by_the_chunks(route: Route) {
    let env = env(
        route,
        vec![write(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n\
             5\r\nhello\r\n0\r\n\r\n",
        )],
        |_| {},
    )
    .await;
    let mut failures = Vec::new();
    let mut c = Client::connect(&env).await;
    c.get("/case").await;
    let what = format!("{route:?}: CL 3 + TE chunked");
    match c.response().await {
        Ok(r) => {
            if r.status != 200 || r.body != b"hello" {
                failures.push(format!("{what}: expected 200 hello, got {}", r.summary()));
            }
            if !r.headers("content-length").is_empty() {
                failures.push(format!(
                    "{what}: Content-Length reached the client: {}",
                    r.summary()
                ));
            }
            if let Err(e) = next_on_the_same_connection(&mut c, &what).await {
                failures.push(e);
            }
        }
        Err(e) => failures.push(format!("{what}: {e}")),
    }
    env.kg.stop().await;
    report(failures);
}

/// A response transfer coding other than `chunked` alone → 502.
async fn transfer_codings_other_than_chunked_are_502(route: Route) {
    let mut failures = Vec::new();
    for (coding, script) in [
        (
            "gzip, chunked",
            vec![write(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            )],
        ),
        (
            "chunked, gzip",
            vec![
                write("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nhello"),
                Step::Close,
            ],
        ),
        (
            "gzip",
            vec![
                write("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello"),
                Step::Close,
            ],
        ),
    ] {
        let env = env(route, script, |_| {}).await;
        let what = format!("{route:?}: Transfer-Encoding: {coding}");
        let mut c = Client::connect(&env).await;
        c.get("/case").await;
        let r = c.response().await;
        match bad_gateway(&r, &what) {
            Ok(()) => {
                if let Err(e) = next_on_the_same_connection(&mut c, &what).await {
                    failures.push(e);
                }
            }
            Err(e) => failures.push(e),
        }
        env.kg.stop().await;
    }
    report(failures);
}

/// A malformed chunk that arrives in the same write as the head → 502
/// (keygate never sends a head whose body it already holds as broken).
async fn a_malformed_chunk_with_the_head_is_502(route: Route) {
    let mut failures = Vec::new();
    for (name, body) in [
        ("chunk size not hex", "zz\r\nhello\r\n0\r\n\r\n"),
        ("chunk longer than its size", "5\r\nhelloXX\r\n0\r\n\r\n"),
        ("bare LF after the size", "5\nhello\r\n0\r\n\r\n"),
    ] {
        let env = env(
            route,
            vec![write(format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
            ))],
            |_| {},
        )
        .await;
        let what = format!("{route:?}: {name}, in the head's write");
        let mut c = Client::connect(&env).await;
        c.get("/case").await;
        let r = c.response().await;
        match bad_gateway(&r, &what) {
            Ok(()) => {
                if let Err(e) = next_on_the_same_connection(&mut c, &what).await {
                    failures.push(e);
                }
            }
            Err(e) => failures.push(e),
        }
        env.kg.stop().await;
    }
    report(failures);
}

/// A malformed chunk sent after the head and a good chunk (released by the
/// test once the client has both) aborts the client's response; a new
/// connection is served.
async fn a_malformed_chunk_later_aborts_the_response(route: Route) {
    let env = env(
        route,
        vec![
            write("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"),
            Step::WaitRelease,
            write("zz\r\nmore\r\n0\r\n\r\n"),
        ],
        |_| {},
    )
    .await;
    let what = format!("{route:?}: a malformed chunk after the head");
    let mut failures = Vec::new();
    let mut c = Client::connect(&env).await;
    c.get("/case").await;
    match c.rd.head(h1_client::deadline(WAIT)).await {
        Ok(head) => {
            let framing = common::wire::response_framing(head.status, &head.fields, false);
            match (head.status, framing) {
                (200, Ok(framing)) => match c.received(b"hello").await {
                    Ok(()) => {
                        env.app.release();
                        if let Err(e) = aborted(&mut c, framing, &what).await {
                            failures.push(e);
                        }
                    }
                    Err(e) => failures.push(format!(
                        "{what}: the good chunk did not reach the client before the bad one: {e}"
                    )),
                },
                other => failures.push(format!("{what}: head {other:?} {:?}", head.fields)),
            }
        }
        Err(e) => failures.push(format!("{what}: no response head: {e}")),
    }
    env.app.release();
    if let Err(e) = a_new_connection_works(&env, &what).await {
        failures.push(e);
    }
    env.kg.stop().await;
    report(failures);
}

/// A head, then nothing, ever: the client's response is aborted after
/// `upstream.read_timeout` (contract §12; 300 ms here, 5 s allowed), and a
/// new connection is served.
async fn a_stalled_body_is_aborted_after_read_timeout(route: Route) {
    let env = env(
        route,
        vec![
            write("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Step::Stall,
        ],
        |c| {
            c.upstream.read_timeout = Duration::from_millis(300);
        },
    )
    .await;
    let what = format!("{route:?}: a body that stalls after the head");
    let mut failures = Vec::new();
    let mut c = Client::connect(&env).await;
    c.get("/case").await;
    match c.rd.head(h1_client::deadline(WAIT)).await {
        Ok(head) => match common::wire::response_framing(head.status, &head.fields, false) {
            Ok(framing) => match c
                .rd
                .body(framing, h1_client::deadline(Duration::from_secs(5)))
                .await
            {
                Err(End::Truncated(_)) => {}
                other => failures.push(format!(
                    "{what}: the response was not aborted within 5 s \
                     (upstream.read_timeout 300ms): {other:?}"
                )),
            },
            Err(e) => failures.push(format!("{what}: {e}")),
        },
        Err(e) => failures.push(format!("{what}: no response head: {e}")),
    }
    drop(c);
    if let Err(e) = a_new_connection_works(&env, &what).await {
        failures.push(e);
    }
    env.kg.stop().await;
    report(failures);
}

/// A streaming answer (server-sent events): the head, and the first event,
/// reach the client before the test lets the app send the rest — a head is
/// never held back for body bytes. Chunked, close-delimited, and a head
/// sent alone; then the next request on the same connection.
async fn a_streaming_head_and_first_event_arrive_before_the_rest(route: Route) {
    const HEAD: &str =
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n";
    let mut failures = Vec::new();
    for (name, script, first) in [
        (
            "chunked",
            vec![
                write(format!(
                    "{HEAD}Transfer-Encoding: chunked\r\n\r\nd\r\ndata: first\n\n\r\n"
                )),
                Step::WaitRelease,
                write("e\r\ndata: second\n\n\r\n0\r\n\r\n"),
            ],
            Some(&b"data: first"[..]),
        ),
        (
            "close-delimited",
            vec![
                write(format!("{HEAD}\r\ndata: first\n\n")),
                Step::WaitRelease,
                write("data: second\n\n"),
                Step::Close,
            ],
            Some(&b"data: first"[..]),
        ),
        (
            "head alone",
            vec![
                write(format!("{HEAD}Transfer-Encoding: chunked\r\n\r\n")),
                Step::WaitRelease,
                write("d\r\ndata: first\n\n\r\ne\r\ndata: second\n\n\r\n0\r\n\r\n"),
            ],
            None,
        ),
    ] {
        let env = env(route, script, |_| {}).await;
        let what = format!("{route:?}: event stream, {name}");
        let mut c = Client::connect(&env).await;
        c.get("/case").await;
        let head = match c.rd.head(h1_client::deadline(WAIT)).await {
            Ok(h) => h,
            Err(e) => {
                failures.push(format!(
                    "{what}: the head did not reach the client before the rest was released: {e}"
                ));
                env.app.release();
                env.kg.stop().await;
                continue;
            }
        };
        if let Some(first) = first {
            if let Err(e) = c.received(first).await {
                failures.push(format!(
                    "{what}: the first event did not reach the client before the rest was \
                     released: {e}"
                ));
            }
        }
        env.app.release();
        match common::wire::response_framing(head.status, &head.fields, false) {
            Ok(framing) => match c.rd.body(framing, h1_client::deadline(WAIT)).await {
                Ok(body) if body == b"data: first\n\ndata: second\n\n" => {
                    if let Err(e) = next_on_the_same_connection(&mut c, &what).await {
                        failures.push(e);
                    }
                }
                Ok(body) => {
                    failures.push(format!("{what}: body {:?}", String::from_utf8_lossy(&body)))
                }
                Err(e) => failures.push(format!("{what}: {e}")),
            },
            Err(e) => failures.push(format!("{what}: {e} in {:?}", head.fields)),
        }
        env.kg.stop().await;
    }
    report(failures);
}

/// `101 Switching Protocols` to a request that asked for no upgrade → 502,
/// never a tunnel; the next request on the connection is served.
async fn switching_protocols_to_a_plain_request_is_502(route: Route) {
    let env = env(
        route,
        vec![
            write("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"),
            Step::Stall,
        ],
        |_| {},
    )
    .await;
    let what = format!("{route:?}: 101 to a plain GET");
    let mut failures = Vec::new();
    let mut c = Client::connect(&env).await;
    c.get("/case").await;
    let r = c.response().await;
    match bad_gateway(&r, &what) {
        Ok(()) => {
            if let Err(e) = next_on_the_same_connection(&mut c, &what).await {
                failures.push(e);
            }
        }
        Err(e) => failures.push(e),
    }
    env.kg.stop().await;
    report(failures);
}

/// An answer with `Connection: close` (the app then closes): the client's
/// connection stays usable; keygate dials the app anew for the next request.
async fn connection_close_from_the_app_then_the_next_request_works(route: Route) {
    let env = env(
        route,
        vec![
            write("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"),
            Step::Close,
        ],
        |_| {},
    )
    .await;
    let what = format!("{route:?}: Connection: close from the app");
    let mut failures = Vec::new();
    let mut c = Client::connect(&env).await;
    c.get("/case").await;
    match c.response().await {
        Ok(r) if r.status == 200 && r.body == b"ok" => {
            if r.closes() {
                failures.push(format!(
                    "{what}: the app's Connection: close reached the client: {}",
                    r.summary()
                ));
            }
            if let Err(e) = next_on_the_same_connection(&mut c, &what).await {
                failures.push(e);
            }
            if env.app.connections() != 2 {
                failures.push(format!(
                    "{what}: {} connections to the app, expected 2",
                    env.app.connections()
                ));
            }
        }
        Ok(r) => failures.push(format!("{what}: {}", r.summary())),
        Err(e) => failures.push(format!("{what}: {e}")),
    }
    env.kg.stop().await;
    report(failures);
}

on_both_paths!(
    content_length_with_chunked_is_framed_by_the_chunks,
    transfer_codings_other_than_chunked_are_502,
    a_malformed_chunk_with_the_head_is_502,
    a_malformed_chunk_later_aborts_the_response,
    a_stalled_body_is_aborted_after_read_timeout,
    a_streaming_head_and_first_event_arrive_before_the_rest,
    switching_protocols_to_a_plain_request_is_502,
    connection_close_from_the_app_then_the_next_request_works,
);
