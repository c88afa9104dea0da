//! Request smuggling through keygate: a differential oracle (contract §3,
//! steps 1 and 6; STYLE.md "Byte-level code: what our own bugs taught").
//!
//! Generated HTTP/1.1 client byte streams — several pipelined requests, each
//! naming itself in its path (`/o/<stream>/<n>`), with bodies by
//! Content-Length, by chunked coding (extensions, odd sizes, many chunks,
//! trailers) or none, requests hidden inside bodies, `Connection` headers
//! naming every header keygate knows, `PRI`/`HEAD`/`OPTIONS`/… methods,
//! `Expect: 100-continue`, upgrades, and interleaved heads keygate must
//! refuse — go through keygate, written in a few pieces split anywhere, to a
//! strict recording app (`common::strict_upstream`, raw TCP, RFC 9112 with
//! nothing guessed). Per stream:
//!
//! - (a) the app never fails to parse what keygate sent it;
//! - (b) every request the app got is exactly one generated request keygate
//!   should accept, in order, at most once, with exactly its (decoded) body,
//!   method, target and Host;
//! - (c) no request the app got has a path under `/cp/admin` (any case, any
//!   slashes, unreserved escapes decoded) or a principal header in any
//!   spelling other than the one keygate injects (`org-key:<id>` of the real
//!   key, on requests that carried it);
//! - (d) no must-refuse head (fragment, CL+TE, key + trailing whitespace,
//!   deny-prefix path, `//` path, Connection naming a framing header, …) is
//!   ever forwarded, wherever it sits in the stream;
//! - (e) liveness: a stream of clean requests has every one forwarded and
//!   answered, in order, by the app; in any stream the clean requests before
//!   the first doubtful one are;
//! - (f) the responses that reach the client are well-formed, one per
//!   request and in order (each names its request, or is a refusal with the
//!   status the contract gives), and a refused request never gets
//!   `100 Continue` first.
//!
//! Every property runs on both upstream paths: the connection's own link
//! (default config) and the shared pool (`common::paths::pool_path`).
//!
//! **Reproducing a failure.** Each property prints its seed (shown by the
//! test harness on failure, and in the panic message). One command replays
//! it: `PROPTEST_RNG_SEED=<seed> cargo test --test smuggling <test name>`.
//! Failing cases are also persisted, per property, under
//! `tests/smuggling-regressions/` and replayed first on every run (commit
//! them: they are the cases a fix must pass). Case counts: `SMUGGLING_CASES` (per property,
//! default below); the soak test (`cargo test --test smuggling -- --ignored`)
//! runs `SMUGGLING_SOAK_CASES` (default 5000) per property and path.
//! `PROPTEST_MAX_SHRINK_ITERS` / `PROPTEST_MAX_SHRINK_TIME` bound shrinking.
mod common;

use std::cell::Cell;
use std::net::SocketAddr;
use std::time::Duration;

use common::h1_client::{self, End, Reader, Response};
use common::kg::{self, Key, HOST};
use common::paths::{self, Route};
use common::strict_upstream::{Recorded, StrictUpstream};
use common::wire::{self, Framing};
use keygate::auth::store::Store;
use keygate::config::Config;
use keygate::RunHandle;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{
    Config as PtConfig, FileFailurePersistence, RngSeed, TestCaseError, TestRunner,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Streams per property and path in the ordinary run.
const DEFAULT_CASES: u32 = 500;
/// A stream's responses must all be in (or the connection closed) by then.
const STREAM_DEADLINE: Duration = Duration::from_secs(8);

const PRINCIPAL: &str = "x-molecule-principal";

// ---- the two upstream paths ------------------------------------------------------

fn route_config(route: Route, up: &StrictUpstream) -> Config {
    paths::on(route, kg::config(up.url()))
}

// ---- generated streams -----------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum M {
    Get,
    Post,
    Put,
    Patch,
    Delete,
    Options,
    Head,
    Pri,
}

impl M {
    fn as_str(self) -> &'static str {
        match self {
            M::Get => "GET",
            M::Post => "POST",
            M::Put => "PUT",
            M::Patch => "PATCH",
            M::Delete => "DELETE",
            M::Options => "OPTIONS",
            M::Head => "HEAD",
            M::Pri => "PRI",
        }
    }
}

/// What a body holds.
#[derive(Clone)]
enum Content {
    Bytes(Vec<u8>),
    /// A whole request (of kind `kind`) as body bytes, after `pad`.
    Smuggle {
        kind: u8,
        pad: Vec<u8>,
    },
}

impl std::fmt::Debug for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Content::Bytes(b) => write!(f, "Bytes({})", wire::show(b, 120)),
            Content::Smuggle { kind, pad } => {
                write!(
                    f,
                    "Smuggle {{ kind: {kind}, pad: {} }}",
                    wire::show(pad, 20)
                )
            }
        }
    }
}

#[derive(Debug, Clone)]
struct ChunkSpec {
    /// Chunk boundaries (scaled to the body length).
    cuts: Vec<u16>,
    /// Chunk extension forms, used in turn.
    exts: Vec<u8>,
    upper: bool,
    /// Leading zeros on every chunk size.
    zeros: u8,
    trailers: u8,
    /// `chunked`, `Chunked`, `CHUNKED`.
    spelling: u8,
}

#[derive(Debug, Clone)]
enum BodyFraming {
    None,
    /// `Content-Length` with `zeros` leading zeros.
    Length {
        zeros: u8,
    },
    Chunked(ChunkSpec),
    /// The same Content-Length twice (two fields, or `n, n`): keygate may
    /// refuse it, or forward it with one framing of its own.
    DupLength {
        list: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    None,
    /// `Authorization: Bearer <the real key>`.
    Key,
    /// `authorization: bearer <the real key>`.
    KeyLower,
    /// A bearer token without the key prefix (forwarded untouched).
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upgrade {
    H2c,
    WebSocket,
}

/// Heads keygate must refuse (contract §3), one per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Defect {
    Fragment,
    /// Content-Length before Transfer-Encoding.
    ClTe,
    TeCl,
    /// The real key followed by a space / a tab; two spaces after Bearer.
    KeySpace,
    KeyTab,
    KeyDoubleSpace,
    BadKey,
    /// One of [`DENY_SPELLINGS`].
    DenyPath(u8),
    /// `//o/…`: not a deny prefix, but `//` → 400.
    DoubleSlash,
    /// `//x/cp/admin/…` (a URL parser reads host `x`, path `/cp/admin`).
    DoubleSlashDeny,
    /// `Connection` naming one of [`FRAMING_NAMES`].
    ConnFraming(u8),
    TeGzipChunked,
    TeTwice,
    ForeignHost,
    NoHost,
    DupHost,
    Asterisk,
    Connect,
}

const DENY_SPELLINGS: [&str; 8] = [
    "/cp/admin",
    "/CP/Admin",
    "//cp/admin",
    "/cp//admin",
    "/cp/%61dmin",
    "/%63p/admin",
    "/cp/admin.json",
    "/cp/administrator",
];

const FRAMING_NAMES: [&str; 6] = [
    "content-length",
    "Content-Length",
    "transfer-encoding",
    "Transfer-Encoding",
    "host",
    "HOST",
];

/// Names a client may list in `Connection` on a request keygate forwards.
const SAFE_CONNECTION_NAMES: [&str; 14] = [
    "keep-alive",
    "te",
    "upgrade",
    "expect",
    "authorization",
    "x-molecule-principal",
    "x-forwarded-for",
    "x-request-id",
    "cookie",
    "x-custom",
    "trailer",
    "proxy-connection",
    "X-Molecule-Principal",
    "Keep-Alive",
];

/// Spellings of the principal header an app framework may fold together.
const SPOOF_NAMES: [&str; 5] = [
    "X-Molecule-Principal",
    "x-molecule-principal",
    "X_Molecule_Principal",
    "x.molecule.principal",
    "X-MOLECULE-PRINCIPAL",
];

const HOST_SPELLINGS: [&str; 4] = [
    HOST,
    "ACME.MoleculesAI.app",
    "acme.moleculesai.app:443",
    "acme.moleculesai.app.",
];

#[derive(Debug, Clone)]
struct ReqSpec {
    method: M,
    absolute: bool,
    query: bool,
    host: u8,
    framing: BodyFraming,
    content: Content,
    auth: Auth,
    conn: Vec<u8>,
    spoof: Option<u8>,
    cookie: bool,
    expect: bool,
    framing_first: bool,
    upgrade: Option<Upgrade>,
    defect: Option<Defect>,
}

#[derive(Debug, Clone)]
struct StreamSpec {
    reqs: Vec<ReqSpec>,
    /// Where the stream is cut into writes (per mille of its length).
    splits: Vec<u16>,
    /// The last request says `Connection: close`.
    close_last: bool,
}

fn method() -> impl Strategy<Value = M> {
    prop_oneof![
        3 => Just(M::Get),
        3 => Just(M::Post),
        1 => Just(M::Put),
        1 => Just(M::Patch),
        1 => Just(M::Delete),
        1 => Just(M::Options),
        1 => Just(M::Head),
        2 => Just(M::Pri),
    ]
}

fn content() -> impl Strategy<Value = Content> {
    prop_oneof![
        3 => vec(any::<u8>(), 0..48).prop_map(Content::Bytes),
        3 => "[ -~]{0,200}".prop_map(|s| Content::Bytes(s.into_bytes())),
        1 => (1usize..3000).prop_map(|n| Content::Bytes(vec![b'k'; n])),
        1 => (17_000usize..40_000)
            .prop_map(|n| Content::Bytes((0..n).map(|i| (i % 251) as u8).collect())),
        3 => (0u8..4, vec(any::<u8>(), 0..8)).prop_map(|(kind, pad)| Content::Smuggle { kind, pad }),
    ]
}

fn chunk_spec() -> impl Strategy<Value = ChunkSpec> {
    (
        vec(any::<u16>(), 0..12),
        vec(0u8..5, 1..4),
        any::<bool>(),
        prop_oneof![4 => Just(0u8), 1 => 1u8..3],
        prop_oneof![3 => Just(0u8), 1 => 1u8..3],
        0u8..3,
    )
        .prop_map(|(cuts, exts, upper, zeros, trailers, spelling)| ChunkSpec {
            cuts,
            exts,
            upper,
            zeros,
            trailers,
            spelling,
        })
}

fn body_framing(clean: bool) -> BoxedStrategy<BodyFraming> {
    let length =
        prop_oneof![5 => Just(0u8), 1 => 1u8..3].prop_map(|zeros| BodyFraming::Length { zeros });
    if clean {
        prop_oneof![
            2 => Just(BodyFraming::None),
            3 => length,
            3 => chunk_spec().prop_map(BodyFraming::Chunked),
        ]
        .boxed()
    } else {
        prop_oneof![
            2 => Just(BodyFraming::None),
            3 => length,
            3 => chunk_spec().prop_map(BodyFraming::Chunked),
            1 => any::<bool>().prop_map(|list| BodyFraming::DupLength { list }),
        ]
        .boxed()
    }
}

fn auth() -> impl Strategy<Value = Auth> {
    prop_oneof![
        3 => Just(Auth::None),
        3 => Just(Auth::Key),
        1 => Just(Auth::KeyLower),
        1 => Just(Auth::Other),
    ]
}

fn defect() -> impl Strategy<Value = Defect> {
    prop_oneof![
        3 => Just(Defect::Fragment),
        2 => Just(Defect::ClTe),
        1 => Just(Defect::TeCl),
        2 => Just(Defect::KeySpace),
        1 => Just(Defect::KeyTab),
        1 => Just(Defect::KeyDoubleSpace),
        1 => Just(Defect::BadKey),
        2 => (0..DENY_SPELLINGS.len() as u8).prop_map(Defect::DenyPath),
        1 => Just(Defect::DoubleSlash),
        1 => Just(Defect::DoubleSlashDeny),
        2 => (0..FRAMING_NAMES.len() as u8).prop_map(Defect::ConnFraming),
        1 => Just(Defect::TeGzipChunked),
        1 => Just(Defect::TeTwice),
        1 => Just(Defect::ForeignHost),
        1 => Just(Defect::NoHost),
        1 => Just(Defect::DupHost),
        1 => Just(Defect::Asterisk),
        1 => Just(Defect::Connect),
    ]
}

fn request(clean: bool) -> BoxedStrategy<ReqSpec> {
    let upgrade = if clean {
        Just(None).boxed()
    } else {
        prop::option::weighted(
            0.08,
            prop_oneof![Just(Upgrade::H2c), Just(Upgrade::WebSocket)],
        )
        .boxed()
    };
    let defect = if clean {
        Just(None).boxed()
    } else {
        prop::option::weighted(0.3, defect()).boxed()
    };
    (
        (
            method(),
            prop::bool::weighted(0.15),
            prop::bool::weighted(0.3),
            prop_oneof![4 => Just(0u8), 1 => 1u8..4],
            body_framing(clean),
            content(),
            auth(),
        ),
        (
            prop_oneof![3 => Just(Vec::new()), 1 => vec(0..SAFE_CONNECTION_NAMES.len() as u8, 1..4)],
            prop::option::weighted(0.2, 0..SPOOF_NAMES.len() as u8),
            prop::bool::weighted(0.2),
            prop::bool::weighted(0.15),
            any::<bool>(),
            upgrade,
            defect,
        ),
    )
        .prop_map(
            |(
                (method, absolute, query, host, framing, content, auth),
                (conn, spoof, cookie, expect, framing_first, upgrade, defect),
            )| ReqSpec {
                method,
                absolute,
                query,
                host,
                framing,
                content,
                auth,
                conn,
                spoof,
                cookie,
                expect,
                framing_first,
                upgrade,
                defect,
            },
        )
        .boxed()
}

fn stream(clean: bool) -> impl Strategy<Value = StreamSpec> {
    (
        vec(request(clean), 1..if clean { 6 } else { 8 }),
        vec(0u16..1000, 0..4),
        prop::bool::weighted(0.15),
    )
        .prop_map(|(reqs, splits, close_last)| StreamSpec {
            reqs,
            splits,
            close_last,
        })
}

// ---- generated requests as bytes ---------------------------------------------------

/// What keygate must do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Clean: forwarded, exactly once, with exactly its body.
    Forward,
    /// May be refused; if forwarded, exactly as a clean one.
    Either(&'static str),
    /// Never forwarded; if answered, with this status.
    Refuse { status: u16, why: &'static str },
}

impl Class {
    fn forwardable(self) -> bool {
        !matches!(self, Class::Refuse { .. })
    }
}

/// A generated request, built for stream `s`.
#[derive(Debug, Clone)]
struct Built {
    n: usize,
    wire: Vec<u8>,
    method: &'static str,
    /// The origin-form target the app must see.
    target: String,
    /// The Host value the app must see.
    host: String,
    body: Vec<u8>,
    class: Class,
    auth: Auth,
    /// Lower-cased names listed in its Connection header.
    conn: Vec<String>,
    cookie: bool,
    upgrade: Option<Upgrade>,
}

impl Built {
    fn head_request(&self) -> bool {
        self.method == "HEAD"
    }
}

fn smuggled(kind: u8, s: u64, n: usize) -> Vec<u8> {
    match kind {
        0 => format!(
            "POST /cp/admin/delete-tenant HTTP/1.1\r\nHost: {HOST}\r\n\
             X-Molecule-Principal: org-key:forged\r\nContent-Length: 0\r\n\r\n"
        ),
        1 => format!("GET /smuggled/{s}/{n} HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
        2 => format!("0\r\n\r\nGET /smuggled/{s}/{n} HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
        _ => format!(
            "POST /cp/admin/smuggled/{s}/{n} HTTP/1.1\r\nHost: {HOST}\r\n\
             Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ),
    }
    .into_bytes()
}

fn chunk_ext(form: u8) -> &'static str {
    match form {
        0 => "",
        1 => ";a=1",
        2 => ";name=\"quoted value\"",
        3 => " ;x",
        _ => ";x;y=z",
    }
}

fn encode_chunked(body: &[u8], c: &ChunkSpec) -> Vec<u8> {
    let mut cuts: Vec<usize> = c
        .cuts
        .iter()
        .map(|&x| (x as usize * body.len()) / 65536)
        .filter(|&x| x > 0 && x < body.len())
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut bounds = vec![0];
    bounds.extend(cuts);
    bounds.push(body.len());
    let mut out = Vec::new();
    let zeros = "0".repeat(c.zeros as usize);
    let mut i = 0;
    for w in bounds.windows(2) {
        let chunk = &body[w[0]..w[1]];
        if chunk.is_empty() {
            continue;
        }
        let size = if c.upper {
            format!("{:X}", chunk.len())
        } else {
            format!("{:x}", chunk.len())
        };
        let ext = chunk_ext(c.exts[i % c.exts.len()]);
        out.extend_from_slice(format!("{zeros}{size}{ext}\r\n").as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
        i += 1;
    }
    let ext = chunk_ext(c.exts[i % c.exts.len()]);
    out.extend_from_slice(format!("{zeros}0{ext}\r\n").as_bytes());
    for t in 0..c.trailers {
        out.extend_from_slice(format!("X-Trailer-{t}: t{t}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn simple_chunks() -> ChunkSpec {
    ChunkSpec {
        cuts: Vec::new(),
        exts: vec![0],
        upper: false,
        zeros: 0,
        trailers: 0,
        spelling: 0,
    }
}

fn build(s: u64, n: usize, spec: &ReqSpec, key: &Key, close: bool) -> Built {
    let defect = spec.defect;
    let mut method = spec.method.as_str();
    let marker = format!("/o/{s}/{n}");
    let path = match defect {
        Some(Defect::DenyPath(i)) => format!("{}{marker}", DENY_SPELLINGS[i as usize]),
        Some(Defect::DoubleSlash) => format!("/{marker}"),
        Some(Defect::DoubleSlashDeny) => format!("//x/cp/admin{marker}"),
        _ => marker,
    };
    let query = if spec.query {
        format!("?q={n}&x=a%2Fb")
    } else {
        String::new()
    };
    let target = format!("{path}{query}");
    let host_defect = matches!(
        defect,
        Some(Defect::ForeignHost | Defect::NoHost | Defect::DupHost)
    );
    let absolute = spec.absolute && !host_defect;
    let host = if absolute {
        HOST.to_string()
    } else {
        HOST_SPELLINGS[spec.host as usize % HOST_SPELLINGS.len()].to_string()
    };
    let mut wire_target = if absolute {
        format!("http://{HOST}{target}")
    } else {
        target.clone()
    };
    if defect == Some(Defect::Fragment) {
        wire_target.push_str("#frag");
    }
    match defect {
        Some(Defect::Asterisk) => {
            method = "OPTIONS";
            wire_target = "*".into();
        }
        Some(Defect::Connect) => {
            method = "CONNECT";
            wire_target = format!("{HOST}:443");
        }
        _ => {}
    }

    // The body and its framing (some defects need a particular framing).
    let content = match &spec.content {
        Content::Bytes(b) => b.clone(),
        Content::Smuggle { kind, pad } => {
            let mut b = pad.clone();
            b.extend_from_slice(&smuggled(*kind, s, n));
            b
        }
    };
    let mut framing = spec.framing.clone();
    let chunked_of = |f: &BodyFraming| match f {
        BodyFraming::Chunked(c) => c.clone(),
        _ => simple_chunks(),
    };
    match defect {
        Some(Defect::ClTe | Defect::TeCl | Defect::TeGzipChunked | Defect::TeTwice) => {
            framing = BodyFraming::Chunked(chunked_of(&framing));
        }
        Some(Defect::ConnFraming(i)) if i < 2 => {
            framing = BodyFraming::Length { zeros: 0 };
        }
        Some(Defect::ConnFraming(i)) if i < 4 => {
            framing = BodyFraming::Chunked(chunked_of(&framing));
        }
        Some(Defect::Connect | Defect::Asterisk) => framing = BodyFraming::None,
        // One doubt per request: a refused head has an unambiguous framing.
        Some(_) if matches!(framing, BodyFraming::DupLength { .. }) => {
            framing = BodyFraming::Length { zeros: 0 };
        }
        _ => {}
    }
    let body = match framing {
        BodyFraming::None => Vec::new(),
        _ => content,
    };
    let mut framing_lines = String::new();
    let mut encoded = Vec::new();
    match &framing {
        BodyFraming::None => {}
        BodyFraming::Length { zeros } => {
            framing_lines = format!(
                "Content-Length: {}{}\r\n",
                "0".repeat(*zeros as usize),
                body.len()
            );
            encoded = body.clone();
        }
        BodyFraming::DupLength { list } => {
            framing_lines = if *list {
                format!("Content-Length: {0}, {0}\r\n", body.len())
            } else {
                format!("Content-Length: {0}\r\nContent-Length: {0}\r\n", body.len())
            };
            encoded = body.clone();
        }
        BodyFraming::Chunked(c) => {
            encoded = encode_chunked(&body, c);
            let te = ["chunked", "Chunked", "CHUNKED"][c.spelling as usize % 3];
            framing_lines = match defect {
                Some(Defect::ClTe) => format!(
                    "Content-Length: {}\r\nTransfer-Encoding: {te}\r\n",
                    body.len()
                ),
                Some(Defect::TeCl) => format!(
                    "Transfer-Encoding: {te}\r\nContent-Length: {}\r\n",
                    encoded.len()
                ),
                Some(Defect::TeGzipChunked) => "Transfer-Encoding: gzip, chunked\r\n".into(),
                Some(Defect::TeTwice) => {
                    format!("Transfer-Encoding: {te}\r\nTransfer-Encoding: {te}\r\n")
                }
                _ => format!("Transfer-Encoding: {te}\r\n"),
            };
        }
    }

    // Connection tokens.
    let mut conn: Vec<String> = spec
        .conn
        .iter()
        .map(|&i| SAFE_CONNECTION_NAMES[i as usize].to_string())
        .collect();
    if let Some(Defect::ConnFraming(i)) = defect {
        conn.push(FRAMING_NAMES[i as usize].to_string());
    }
    let mut other = String::new();
    match spec.upgrade {
        Some(Upgrade::H2c) => {
            conn.push("Upgrade".into());
            conn.push("HTTP2-Settings".into());
            other.push_str("Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n");
        }
        Some(Upgrade::WebSocket) => {
            conn.push("Upgrade".into());
            other.push_str(
                "Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Version: 13\r\n",
            );
        }
        None => {}
    }
    if close {
        conn.push("close".into());
    }
    let lower: Vec<String> = conn.iter().map(|c| c.to_ascii_lowercase()).collect();
    if lower.iter().any(|c| c == "te") {
        other.push_str("TE: trailers\r\n");
    }
    if lower.iter().any(|c| c == "keep-alive") {
        other.push_str("Keep-Alive: timeout=5\r\n");
    }

    let token = &key.token;
    let auth_line = match defect {
        Some(Defect::KeySpace) => format!("Authorization: Bearer {token} \r\n"),
        Some(Defect::KeyTab) => format!("Authorization: Bearer {token}\t\r\n"),
        Some(Defect::KeyDoubleSpace) => format!("Authorization: Bearer  {token}\r\n"),
        Some(Defect::BadKey) => format!("Authorization: Bearer mok_notarealkey{s}x{n}\r\n"),
        _ => match spec.auth {
            Auth::None => String::new(),
            Auth::Key => format!("Authorization: Bearer {token}\r\n"),
            Auth::KeyLower => format!("authorization: bearer {token}\r\n"),
            Auth::Other => format!("Authorization: Bearer opaque-{s}-{n}\r\n"),
        },
    };
    let auth = match defect {
        Some(Defect::KeySpace | Defect::KeyTab | Defect::KeyDoubleSpace | Defect::BadKey) => {
            Auth::None
        }
        _ => spec.auth,
    };
    let host_lines = match defect {
        Some(Defect::ForeignHost) => "Host: evil.example\r\n".to_string(),
        Some(Defect::NoHost) => String::new(),
        Some(Defect::DupHost) => format!("Host: {host}\r\nHost: {host}\r\n"),
        _ => format!("Host: {host}\r\n"),
    };

    let mut head = format!("{method} {wire_target} HTTP/1.1\r\n");
    if spec.framing_first {
        head.push_str(&framing_lines);
    }
    head.push_str(&host_lines);
    head.push_str(&auth_line);
    if let Some(i) = spec.spoof {
        head.push_str(&format!("{}: org-key:forged\r\n", SPOOF_NAMES[i as usize]));
    }
    head.push_str(&format!("X-Custom: c{n}\r\n"));
    if spec.cookie {
        head.push_str(&format!("Cookie: session=s{n}\r\n"));
    }
    if spec.expect {
        head.push_str("Expect: 100-continue\r\n");
    }
    head.push_str(&other);
    if !conn.is_empty() {
        head.push_str(&format!("Connection: {}\r\n", conn.join(", ")));
    }
    if !spec.framing_first {
        head.push_str(&framing_lines);
    }
    head.push_str("\r\n");
    let mut wire = head.into_bytes();
    wire.extend_from_slice(&encoded);

    let class = match defect {
        Some(d) => Class::Refuse {
            status: match d {
                Defect::KeySpace | Defect::KeyTab | Defect::KeyDoubleSpace | Defect::BadKey => 401,
                Defect::DenyPath(_) => 403,
                Defect::ForeignHost => 421,
                Defect::Connect => 405,
                _ => 400,
            },
            why: match d {
                Defect::Fragment => "a #fragment in the target",
                Defect::ClTe | Defect::TeCl => "Content-Length with Transfer-Encoding",
                Defect::KeySpace => "a key followed by a space",
                Defect::KeyTab => "a key followed by a tab",
                Defect::KeyDoubleSpace => "two spaces before the key",
                Defect::BadKey => "an invalid key",
                Defect::DenyPath(_) => "a deny-prefix path",
                Defect::DoubleSlash => "a path starting with //",
                Defect::DoubleSlashDeny => "a //x/cp/admin path",
                Defect::ConnFraming(_) => "Connection naming a framing header or Host",
                Defect::TeGzipChunked => "Transfer-Encoding: gzip, chunked",
                Defect::TeTwice => "two Transfer-Encoding fields",
                Defect::ForeignHost => "a foreign Host",
                Defect::NoHost => "no Host",
                Defect::DupHost => "two Host fields",
                Defect::Asterisk => "an asterisk-form target",
                Defect::Connect => "CONNECT",
            },
        },
        None if matches!(spec.framing, BodyFraming::DupLength { .. }) => {
            Class::Either("a duplicated Content-Length")
        }
        None if spec.upgrade.is_some() => Class::Either("an upgrade request"),
        None => Class::Forward,
    };
    Built {
        n,
        wire,
        method,
        target,
        host,
        body,
        class,
        auth,
        conn: lower,
        cookie: spec.cookie,
        upgrade: spec.upgrade,
    }
}

// ---- one keygate and one app per property ----------------------------------------

struct Env {
    rt: tokio::runtime::Runtime,
    kg: Option<RunHandle>,
    up: StrictUpstream,
    key: Key,
    addr: SocketAddr,
    next_stream: Cell<u64>,
    /// Records and failures already checked by an earlier stream.
    records_seen: Cell<usize>,
    failures_seen: Cell<usize>,
}

impl Env {
    fn new(route: Route) -> Env {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (up, kg, key) = rt.block_on(async {
            let up = StrictUpstream::start().await;
            let kg = kg::start(route_config(route, &up), Store::memory("acme")).await;
            let key = kg::mint_key(&kg, Some("oracle")).await;
            (up, kg, key)
        });
        Env {
            addr: kg.public_addr,
            rt,
            kg: Some(kg),
            up,
            key,
            next_stream: Cell::new(0),
            records_seen: Cell::new(0),
            failures_seen: Cell::new(0),
        }
    }

    fn stop(mut self) {
        if let Some(kg) = self.kg.take() {
            self.rt.block_on(kg.stop());
        }
    }
}

/// The `(stream, n)` a recorded target names (`/o/<s>/<n>` anywhere).
fn marker(target: &str) -> Option<(u64, usize)> {
    let at = target.find("/o/")?;
    let mut it = target[at + 3..].split(|c: char| !c.is_ascii_digit());
    let s = it.next()?.parse().ok()?;
    let n = it.next()?.parse().ok()?;
    Some((s, n))
}

/// The matching view of a recorded path (contract §3 step 3): unreserved
/// escapes decoded, slashes merged, lower-cased.
fn matching_view(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let mut c = b[i];
        if c == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&path[i + 1..i + 3], 16) {
                if v.is_ascii_alphanumeric() || b"-_~.".contains(&v) {
                    c = v;
                    i += 2;
                }
            }
        }
        if !(c == b'/' && out.last() == Some(&b'/')) {
            out.push(c.to_ascii_lowercase());
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `a_b.C` → `a-b-c`.
fn folded(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            '_' | '.' => '-',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

/// (c) for any request the app received.
fn check_record_safe(r: &Recorded, key: &Key, failures: &mut Vec<String>) {
    if matching_view(r.path()).starts_with("/cp/admin") {
        failures.push(format!(
            "(c) the app received a deny-prefix path: {} {} (seq {})",
            r.method, r.target, r.seq
        ));
    }
    let principals: Vec<&wire::Field> = r
        .fields
        .iter()
        .filter(|f| folded(&f.name) == PRINCIPAL)
        .collect();
    let injected = format!("org-key:{}", key.id);
    let ok = principals.is_empty()
        || (principals.len() == 1
            && principals[0].name == PRINCIPAL
            && principals[0].value == injected.as_bytes());
    if !ok {
        failures.push(format!(
            "(c) the app received principal headers other than keygate's one \
             `{PRINCIPAL}: {injected}`: {principals:?} on {} {}",
            r.method, r.target
        ));
    }
}

/// (b) what the app received for generated request `b`.
fn check_record_matches(r: &Recorded, b: &Built, key: &Key, failures: &mut Vec<String>) {
    let n = b.n;
    if let Class::Refuse { why, .. } = b.class {
        failures.push(format!(
            "(d) request {n} ({why}) must be refused, but the app received it: {} {}",
            r.method, r.target
        ));
        return;
    }
    if r.method != b.method {
        failures.push(format!(
            "(b) request {n}: the app received method {}, the client sent {}",
            r.method, b.method
        ));
    }
    if r.target != b.target {
        failures.push(format!(
            "(b) request {n}: the app received target {:?}, expected {:?}",
            r.target, b.target
        ));
    }
    if r.body != b.body {
        failures.push(format!(
            "(b) request {n}: the app received a body of {} bytes {} ({:?} framing), \
             the client sent {} bytes {}",
            r.body.len(),
            wire::show(&r.body, 120),
            r.framing,
            b.body.len(),
            wire::show(&b.body, 120)
        ));
    }
    let hosts = r.values("host");
    if hosts != [b.host.clone()] {
        failures.push(format!(
            "(b) request {n}: the app received Host {hosts:?}, expected [{:?}]",
            b.host
        ));
    }
    let principal = r.values(PRINCIPAL);
    let keyed = matches!(b.auth, Auth::Key | Auth::KeyLower);
    if keyed {
        if principal != [format!("org-key:{}", key.id)] {
            failures.push(format!(
                "(c) request {n} carried the real key: the app must see exactly \
                 `{PRINCIPAL}: org-key:{}`, it saw {principal:?}",
                key.id
            ));
        }
        if !r.values("authorization").is_empty() {
            failures.push(format!(
                "request {n}: the org key's Authorization reached the app"
            ));
        }
    } else if !principal.is_empty() {
        failures.push(format!(
            "(c) request {n} carried no key, yet the app saw {PRINCIPAL} {principal:?}"
        ));
    }
    let listed = |name: &str| b.conn.iter().any(|c| c == name);
    let custom = r.values("x-custom");
    if listed("x-custom") {
        if !custom.is_empty() {
            failures.push(format!(
                "request {n}: X-Custom is named in Connection but reached the app"
            ));
        }
    } else if custom != [format!("c{n}")] {
        failures.push(format!(
            "request {n}: the app received X-Custom {custom:?}, expected [\"c{n}\"]"
        ));
    }
    if b.cookie && listed("cookie") && !r.values("cookie").is_empty() {
        failures.push(format!(
            "request {n}: Cookie is named in Connection but reached the app"
        ));
    }
    if b.auth == Auth::Other && listed("authorization") && !r.values("authorization").is_empty() {
        failures.push(format!(
            "request {n}: Authorization is named in Connection but reached the app"
        ));
    }
    let websocket = b.upgrade == Some(Upgrade::WebSocket) && b.method == "GET";
    let upgrades = r.values("upgrade");
    if !(upgrades.is_empty() || websocket && upgrades == ["websocket"]) {
        failures.push(format!(
            "request {n}: an upgrade keygate does not tunnel reached the app: Upgrade {upgrades:?}"
        ));
    }
    for hop in ["te", "keep-alive", "proxy-connection", "http2-settings"] {
        if !r.values(hop).is_empty() {
            failures.push(format!(
                "request {n}: hop-by-hop {hop} reached the app: {:?}",
                r.values(hop)
            ));
        }
    }
}

/// (f) and (e) for the `k`-th response.
fn check_response(
    k: usize,
    resp: &Response,
    b: &Built,
    recorded: &[&Recorded],
    failures: &mut Vec<String>,
) {
    if resp.interim.iter().any(|&s| s != 100) {
        failures.push(format!(
            "(f) response {k}: unexpected interim responses {:?}",
            resp.interim
        ));
    }
    if let Some(named) = resp.header("x-oracle-target") {
        if !b.class.forwardable() {
            // Reported by the record check too; this says the client got it.
            failures.push(format!(
                "(d) request {k} must be refused, but the client got the app's answer ({named})"
            ));
            return;
        }
        if named != b.target {
            failures.push(format!(
                "(f) response {k} is the app's answer to {named:?}, but request {k} is {:?}: \
                 the responses are out of step with the requests",
                b.target
            ));
            return;
        }
        if resp.status != 200 || (!b.head_request() && resp.body != named.as_bytes()) {
            failures.push(format!(
                "(f) response {k} is the app's answer but altered: {}",
                resp.summary()
            ));
        }
        if !recorded
            .iter()
            .any(|r| marker(&r.target).map(|m| m.1) == Some(k))
        {
            failures.push(format!(
                "(f) response {k} names {named:?} but the app has no such request on record"
            ));
        }
        return;
    }
    // keygate's own answer, or the parser's bare one.
    if let Class::Refuse { .. } = b.class {
        if resp.interim.contains(&100) {
            failures.push(format!(
                "(f) refused request {k} got 100 Continue before its refusal"
            ));
        }
    }
    if resp.status < 400 {
        failures.push(format!(
            "(f) response {k} is neither the app's answer nor a refusal: {}",
            resp.summary()
        ));
        return;
    }
    match b.class {
        Class::Forward => failures.push(format!(
            "(e) clean request {k} was not forwarded; keygate answered {}",
            resp.summary()
        )),
        Class::Refuse { status, why } if resp.status != status => failures.push(format!(
            "(f) request {k} ({why}) must be refused with {status}, keygate answered {}",
            resp.summary()
        )),
        _ => {}
    }
    if resp.is_json() {
        let error_ok = b.head_request() || resp.json_error().is_some();
        if !error_ok || resp.header("x-request-id").is_none() {
            failures.push(format!(
                "(f) response {k}: keygate's JSON refusal lacks \"error\" or X-Request-Id: {}",
                resp.summary()
            ));
        }
    } else if ![400, 414, 431].contains(&resp.status) {
        failures.push(format!(
            "(f) response {k}: a refusal that is not keygate's JSON (only the parser's bare \
             400/414/431 may be): {}",
            resp.summary()
        ));
    }
}

/// Sends one generated stream and checks every invariant; `Err` with a full
/// report when one fails.
async fn run_stream(env: &Env, spec: &StreamSpec) -> Result<(), String> {
    let s = env.next_stream.get();
    env.next_stream.set(s + 1);
    let count = spec.reqs.len();
    let built: Vec<Built> = spec
        .reqs
        .iter()
        .enumerate()
        .map(|(i, r)| build(s, i, r, &env.key, spec.close_last && i + 1 == count))
        .collect();
    let wire: Vec<u8> = built.iter().flat_map(|b| b.wire.iter().copied()).collect();
    let mut cuts: Vec<usize> = spec
        .splits
        .iter()
        .map(|&x| x as usize * wire.len() / 1000)
        .filter(|&x| x > 0 && x < wire.len())
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut pieces = Vec::new();
    let mut at = 0;
    for c in cuts.into_iter().chain([wire.len()]) {
        pieces.push(&wire[at..c]);
        at = c;
    }

    let stream = TcpStream::connect(env.addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (rd, mut wr) = stream.into_split();
    let deadline = h1_client::deadline(STREAM_DEADLINE);
    let writer = async {
        let last = pieces.len() - 1;
        for (i, piece) in pieces.iter().enumerate() {
            if wr.write_all(piece).await.is_err() {
                return false;
            }
            if i < last {
                // Pacing, not synchronisation: gives keygate a chance to read
                // each piece on its own (a split that lands in one read is
                // still a valid case; no assertion depends on it).
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        true
    };
    let reader = async {
        let mut reader = Reader::new(rd);
        let mut resps = Vec::new();
        for b in &built {
            match reader.response(b.head_request(), deadline).await {
                Ok(r) => {
                    let closes = r.closes();
                    resps.push(r);
                    if closes {
                        return (resps, Some(End::Closed), reader.buf);
                    }
                }
                Err(e) => return (resps, Some(e), reader.buf),
            }
        }
        (resps, None, reader.buf)
    };
    let (_wrote, (resps, end, leftover)) = tokio::join!(writer, reader);
    drop(wr);
    // The link path: the client is gone, keygate drops its link, the app sees
    // it close. Either path: wait until the app has parsed all it was sent.
    env.up.settle(Duration::from_secs(2)).await;

    let all = env.up.records();
    let new_records = &all[env.records_seen.get()..];
    env.records_seen.set(all.len());
    let all_failures = env.up.failures();
    let new_failures = &all_failures[env.failures_seen.get()..];
    env.failures_seen.set(all_failures.len());

    let mut failures: Vec<String> = Vec::new();
    for f in new_failures {
        failures.push(format!(
            "(a) the app could not parse what keygate sent: {f}"
        ));
    }
    let mut mine: Vec<&Recorded> = Vec::new();
    for r in new_records {
        check_record_safe(r, &env.key, &mut failures);
        match marker(&r.target) {
            Some((rs, _)) if rs == s && !r.target.contains("/smuggled/") => mine.push(r),
            Some((rs, _)) if rs < s && !r.target.contains("/smuggled/") => failures.push(format!(
                "(b) a request of stream {rs} reached the app only during stream {s}: {} {}",
                r.method, r.target
            )),
            _ => failures.push(format!(
                "(b) the app received a request the client never sent as one: {} {} \
                 (fields {:?}, body {})",
                r.method,
                r.target,
                r.fields,
                wire::show(&r.body, 100)
            )),
        }
    }
    let mut last: Option<usize> = None;
    for r in &mine {
        let (_, k) = marker(&r.target).unwrap();
        if k >= count {
            failures.push(format!(
                "(b) the app received request {k} of a {count}-request stream"
            ));
            continue;
        }
        if last.is_some_and(|l| k <= l) {
            failures.push(format!(
                "(b) request {k} reached the app twice or out of order (after {last:?})"
            ));
        }
        last = Some(k);
        check_record_matches(r, &built[k], &env.key, &mut failures);
    }
    for (k, resp) in resps.iter().enumerate() {
        check_response(k, resp, &built[k], &mine, &mut failures);
    }
    // (e) the clean requests before the first doubtful one are all served.
    let prefix = built
        .iter()
        .position(|b| b.class != Class::Forward)
        .unwrap_or(count);
    let closed_by_client = built[..prefix]
        .iter()
        .position(|b| b.conn.iter().any(|c| c == "close"))
        .map_or(prefix, |i| i + 1);
    let prefix = prefix.min(closed_by_client);
    for k in 0..prefix {
        let answered = resps
            .get(k)
            .and_then(|r| r.header("x-oracle-target"))
            .is_some();
        if !answered {
            failures.push(format!(
                "(e) clean request {k} (in the clean prefix 0..{prefix}) got no answer from \
                 the app; the client saw {} response(s), then: {}",
                resps.len(),
                end.as_ref().map_or("-".to_string(), |e| e.to_string())
            ));
            break;
        }
    }
    match &end {
        Some(End::Invalid(e)) => failures.push(format!("(f) malformed response: {e}")),
        Some(End::Timeout(e)) => failures.push(format!(
            "keygate neither answered request {} nor closed the connection within {:?} ({e})",
            resps.len(),
            STREAM_DEADLINE
        )),
        Some(End::Truncated(e)) => {
            failures.push(format!("(f) response {} was cut off: {e}", resps.len()))
        }
        Some(End::Closed) | None => {}
    }
    if end.is_none() && !leftover.is_empty() {
        failures.push(format!(
            "(f) bytes after the last response: {}",
            wire::show(&leftover, 300)
        ));
    }
    if failures.is_empty() {
        return Ok(());
    }
    let mut report = format!("stream {s}:\n");
    for f in &failures {
        report.push_str(&format!("  - {f}\n"));
    }
    report.push_str("requests:\n");
    for b in &built {
        report.push_str(&format!(
            "  [{}] {:?}: {}\n",
            b.n,
            b.class,
            wire::show(&b.wire, 700)
        ));
    }
    report.push_str(&format!(
        "written in {} piece(s)\nresponses:\n",
        pieces.len()
    ));
    for (k, r) in resps.iter().enumerate() {
        report.push_str(&format!("  [{k}] {}\n", r.summary()));
    }
    report.push_str(&format!(
        "  then: {}\napp received:\n",
        end.as_ref().map_or("-".to_string(), |e| e.to_string())
    ));
    for r in new_records {
        report.push_str(&format!(
            "  seq {} conn {}: {} {} {:?} body {}\n",
            r.seq,
            r.conn,
            r.method,
            r.target,
            r.fields,
            wire::show(&r.body, 100)
        ));
    }
    Err(report)
}

// ---- running the properties --------------------------------------------------------

fn env_u32(name: &str) -> Option<u32> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn run_property(name: &str, persisted: &'static str, route: Route, clean: bool, cases: u32) {
    let env = Env::new(route);
    let mut config = PtConfig::default();
    if std::env::var("PROPTEST_CASES").is_err() {
        config.cases = cases;
    }
    if std::env::var("PROPTEST_MAX_SHRINK_ITERS").is_err() {
        config.max_shrink_iters = 300;
    }
    if std::env::var("PROPTEST_MAX_SHRINK_TIME").is_err() {
        config.max_shrink_time = 60_000;
    }
    config.source_file = Some(file!());
    config.failure_persistence = Some(Box::new(FileFailurePersistence::Direct(persisted)));
    let seed = match config.rng_seed {
        RngSeed::Fixed(seed) => seed,
        RngSeed::Random => {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(std::process::id() as u64);
            h.finish()
        }
    };
    config.rng_seed = RngSeed::Fixed(seed);
    let ignored = if name == "soak" { " -- --ignored" } else { "" };
    let reproduce = format!("PROPTEST_RNG_SEED={seed} cargo test --test smuggling {name}{ignored}");
    eprintln!(
        "{name}: {} cases; reproduce with: {reproduce}",
        config.cases
    );
    let started = std::time::Instant::now();
    if std::env::var("SMUGGLING_SURVEY").is_ok() {
        config.failure_persistence = None;
        config.max_shrink_iters = 0;
        let mut runner = TestRunner::new(config);
        survey(name, &env, &mut runner, clean);
        env.stop();
        return;
    }
    let mut runner = TestRunner::new(config);
    let result = runner.run(&stream(clean), |spec| {
        env.rt
            .block_on(run_stream(&env, &spec))
            .map_err(TestCaseError::fail)
    });
    eprintln!("{name}: done in {:?}", started.elapsed());
    env.stop();
    if let Err(e) = result {
        panic!("{name} failed; reproduce with: {reproduce}\n{e}");
    }
}

/// `SMUGGLING_SURVEY=1`: run every case without stopping at the first
/// failure and print each kind of failure seen (digits folded), how often,
/// and one full report for it. For reading, not for CI: it never fails.
fn survey(name: &str, env: &Env, runner: &mut TestRunner, clean: bool) {
    use std::collections::BTreeMap;
    let kinds: std::cell::RefCell<BTreeMap<String, (usize, String)>> = Default::default();
    let streams = Cell::new(0usize);
    let failed = Cell::new(0usize);
    let _ = runner.run(&stream(clean), |spec| {
        streams.set(streams.get() + 1);
        if let Err(report) = env.rt.block_on(run_stream(env, &spec)) {
            failed.set(failed.get() + 1);
            let mut k = kinds.borrow_mut();
            for line in report.lines().filter(|l| l.starts_with("  - ")) {
                let mut text = line[4..].to_string();
                if let Some(i) = text.find("): ").filter(|_| text.starts_with("(a)")) {
                    text = format!("(a) {}", &text[i + 3..]);
                }
                for stop in ["received it", "got the app's answer", "keygate answered"] {
                    if let Some(i) = text.find(stop) {
                        text.truncate(i + stop.len());
                    }
                }
                let cut = text.find(['"', '[', '{']).unwrap_or(text.len());
                let kind: String = text[..cut]
                    .chars()
                    .map(|c| if c.is_ascii_digit() { 'N' } else { c })
                    .take(110)
                    .collect();
                let e = k.entry(kind).or_insert((0, report.clone()));
                e.0 += 1;
            }
        }
        Ok(())
    });
    eprintln!(
        "{name}: survey of {} streams, {} failed",
        streams.get(),
        failed.get()
    );
    for (kind, (count, _)) in kinds.borrow().iter() {
        eprintln!("  {count:5} x {kind}");
    }
    if std::env::var("SMUGGLING_SURVEY").as_deref() == Ok("1") {
        return;
    }
    for (kind, (count, example)) in kinds.borrow().iter() {
        let example: String = example.chars().take(3000).collect();
        eprintln!("\n=== {count} x {kind}\n{example}");
    }
}

fn cases() -> u32 {
    env_u32("SMUGGLING_CASES").unwrap_or(DEFAULT_CASES)
}

#[test]
fn clean_streams_are_forwarded_whole_over_the_link() {
    run_property(
        "clean_streams_are_forwarded_whole_over_the_link",
        "tests/smuggling-regressions/clean_link.txt",
        Route::Link,
        true,
        cases(),
    );
}

#[test]
fn clean_streams_are_forwarded_whole_over_the_pool() {
    run_property(
        "clean_streams_are_forwarded_whole_over_the_pool",
        "tests/smuggling-regressions/clean_pool.txt",
        Route::Pool,
        true,
        cases(),
    );
}

#[test]
fn mixed_streams_never_smuggle_over_the_link() {
    run_property(
        "mixed_streams_never_smuggle_over_the_link",
        "tests/smuggling-regressions/mixed_link.txt",
        Route::Link,
        false,
        cases(),
    );
}

#[test]
fn mixed_streams_never_smuggle_over_the_pool() {
    run_property(
        "mixed_streams_never_smuggle_over_the_pool",
        "tests/smuggling-regressions/mixed_pool.txt",
        Route::Pool,
        false,
        cases(),
    );
}

#[test]
#[ignore = "soak: cargo test --test smuggling -- --ignored (SMUGGLING_SOAK_CASES per property and path)"]
fn soak() {
    let n = env_u32("SMUGGLING_SOAK_CASES").unwrap_or(5000);
    for (name, persisted, route, clean) in [
        (
            "soak",
            "tests/smuggling-regressions/clean_link.txt",
            Route::Link,
            true,
        ),
        (
            "soak",
            "tests/smuggling-regressions/clean_pool.txt",
            Route::Pool,
            true,
        ),
        (
            "soak",
            "tests/smuggling-regressions/mixed_link.txt",
            Route::Link,
            false,
        ),
        (
            "soak",
            "tests/smuggling-regressions/mixed_pool.txt",
            Route::Pool,
            false,
        ),
    ] {
        run_property(name, persisted, route, clean, n);
    }
}

// ---- the oracle's own parts ------------------------------------------------------

#[test]
fn the_strict_parser_refuses_what_a_lenient_one_would_guess() {
    use wire::{decode_chunked, parse_request_head, request_framing, Parsed};
    let head = |b: &[u8]| match parse_request_head(b) {
        Parsed::Complete(h, _) => request_framing(&h.fields).map(|_| ()),
        Parsed::Partial => Err("partial".into()),
        Parsed::Invalid(e) => Err(e),
    };
    assert!(head(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").is_ok());
    assert!(head(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 005\r\n\r\n").is_ok());
    for bad in [
        &b"GET / HTTP/1.1\nHost: h\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: h\r\n\n",
        b"GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n",
        b"\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : h\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: h\r\n\r\n",
        b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /  HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nHost: h\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x01b\r\n\r\n",
    ] {
        assert!(head(bad).is_err(), "accepted {:?}", String::from_utf8_lossy(bad));
    }
    let chunked = |b: &[u8]| match decode_chunked(b) {
        Parsed::Complete(c, used) => Ok((c.body, used)),
        Parsed::Partial => Err("partial".to_string()),
        Parsed::Invalid(e) => Err(e),
    };
    assert_eq!(
        chunked(b"5;a=1;b=\"x y\"\r\nhello\r\n0\r\nX-T: 1\r\n\r\nNEXT").unwrap(),
        (b"hello".to_vec(), 35)
    );
    assert_eq!(
        chunked(b"0005 ;x\r\nhello\r\n0\r\n\r\n").unwrap().0,
        b"hello"
    );
    assert_eq!(chunked(b"5\r\nhel").unwrap_err(), "partial");
    for bad in [
        &b"zz\r\nhello\r\n0\r\n\r\n"[..],
        b"5\nhello\r\n0\r\n\r\n",
        b"5\r\nhelloX\r\n0\r\n\r\n",
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"5 \r\nhello\r\n0\r\n\r\n",
        b"11111111111111111\r\n",
        b"5\r\nhello\r\n0\r\n folded\r\n\r\n",
    ] {
        assert!(
            chunked(bad).is_err(),
            "accepted {:?}",
            String::from_utf8_lossy(bad)
        );
    }
    assert!(matching_view("//CP/%61dmin/x").starts_with("/cp/admin"));
    assert!(!matching_view("/cp/adm").starts_with("/cp/admin"));
    assert_eq!(marker("/cp/admin/o/12/3?q=1"), Some((12, 3)));
}

#[test]
fn generated_requests_are_what_they_claim() {
    // The builder's own output, parsed by the strict parser (what a correct
    // proxy would pass on): clean requests parse to exactly their body.
    let key = Key {
        token: "mok_test".into(),
        id: "id".into(),
    };
    let mut runner = TestRunner::deterministic();
    for _ in 0..500 {
        let spec = stream(true).new_tree(&mut runner).unwrap().current();
        for (i, r) in spec.reqs.iter().enumerate() {
            let b = build(7, i, r, &key, false);
            let mut wire_bytes = b.wire.clone();
            if r.absolute {
                continue; // absolute-form: the strict app only takes origin-form
            }
            wire_bytes.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n");
            let (head, used) = match wire::parse_request_head(&wire_bytes) {
                wire::Parsed::Complete(h, u) => (h, u),
                other => panic!("{other:?}: {}", wire::show(&b.wire, 500)),
            };
            let framing = request_framing_for_test(&head.fields);
            let body = match framing {
                Framing::None => Vec::new(),
                Framing::Length(n) => wire_bytes[used..used + n as usize].to_vec(),
                Framing::Chunked => match wire::decode_chunked(&wire_bytes[used..]) {
                    wire::Parsed::Complete(c, _) => c.body,
                    other => panic!("{other:?}: {}", wire::show(&b.wire, 500)),
                },
                Framing::Close => unreachable!(),
            };
            assert_eq!(body, b.body, "{}", wire::show(&b.wire, 500));
            assert_eq!(marker(&head.target), Some((7, i)));
        }
    }
}

fn request_framing_for_test(fields: &[wire::Field]) -> Framing {
    // Host spellings vary; the framing rules are the strict ones.
    wire::request_framing(fields).unwrap_or_else(|e| panic!("{e}: {fields:?}"))
}

// ---- raw-byte repros of the known holes ----------------------------------------------

struct Raw {
    up: StrictUpstream,
    kg: RunHandle,
    key: Key,
}

async fn raw_env(route: Route, tweak: impl FnOnce(&mut Config)) -> Raw {
    let up = StrictUpstream::start().await;
    let mut c = route_config(route, &up);
    tweak(&mut c);
    let kg = kg::start(c, Store::memory("acme")).await;
    let key = kg::mint_key(&kg, Some("raw")).await;
    Raw { up, kg, key }
}

/// Sends `bytes` on a fresh connection and reads up to `expect` responses
/// (none to a HEAD); stops at a close.
async fn exchange(addr: SocketAddr, bytes: &[u8], expect: usize) -> (Vec<Response>, Option<End>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let (rd, _wr) = s.split();
    let mut reader = Reader::new(rd);
    let deadline = h1_client::deadline(Duration::from_secs(10));
    let mut out = Vec::new();
    for _ in 0..expect {
        match reader.response(false, deadline).await {
            Ok(r) => {
                let closes = r.closes();
                out.push(r);
                if closes {
                    return (out, Some(End::Closed));
                }
            }
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}

impl Raw {
    /// Waits until the app has parsed everything, then: its parse failures
    /// and (c) violations since record `since`, and what it received since.
    async fn received_since(&self, since: usize, problems: &mut Vec<String>) -> Vec<Recorded> {
        self.up.settle(Duration::from_secs(2)).await;
        for f in self.up.failures() {
            let text = format!("(a) the app could not parse what keygate sent: {f}");
            if !problems.contains(&text) {
                problems.push(text);
            }
        }
        let records = self.up.records();
        let new = records[since.min(records.len())..].to_vec();
        for r in &new {
            check_record_safe(r, &self.key, problems);
        }
        new
    }
}

/// `Err` unless `r` is keygate's JSON refusal with `status`.
fn refusal(r: &Response, status: u16) -> Result<(), String> {
    if r.status == status && r.is_json() && r.json_error().is_some() {
        Ok(())
    } else {
        Err(format!(
            "expected keygate's JSON {status}, got {}",
            r.summary()
        ))
    }
}

/// The smuggle of the CRITICAL issue: a request naming `Content-Length` (or
/// another framing header, or Host) in `Connection`, with a whole request as
/// its body. keygate must answer 400 JSON; the app sees nothing, or only the
/// harmless request with exactly its body.
async fn connection_naming_framing_or_host_is_400(route: Route) {
    let raw = raw_env(route, |_| {}).await;
    let mut failures = Vec::new();
    let inner = format!(
        "POST /cp/admin/delete-tenant HTTP/1.1\r\nHost: {HOST}\r\n\
         X-Molecule-Principal: org-key:forged\r\nContent-Length: 0\r\n\r\n"
    );
    assert_eq!(inner.len(), 126, "the issue's body");
    for named in [
        "content-length",
        "Content-Length",
        "transfer-encoding",
        "host",
    ] {
        let (framing, body) = if named.eq_ignore_ascii_case("transfer-encoding") {
            (
                "Transfer-Encoding: chunked\r\n".to_string(),
                format!("{:x}\r\n{inner}\r\n0\r\n\r\n", inner.len()),
            )
        } else {
            (
                format!("Content-Length: {}\r\n", inner.len()),
                inner.clone(),
            )
        };
        let bytes = format!(
            "POST /harmless HTTP/1.1\r\nHost: {HOST}\r\nConnection: {named}\r\n{framing}\r\n{body}"
        );
        let before = raw.up.record_count();
        let (resps, end) = exchange(raw.kg.public_addr, bytes.as_bytes(), 1).await;
        let what = format!("{route:?}: Connection: {named}");
        match resps.first() {
            Some(r) => {
                if let Err(e) = refusal(r, 400) {
                    failures.push(format!("{what}: {e}"));
                }
            }
            None => failures.push(format!("{what}: no response ({end:?})")),
        }
        let mut problems = Vec::new();
        for rec in raw.received_since(before, &mut problems).await {
            if !(rec.target == "/harmless" && rec.body == inner.as_bytes()) {
                problems.push(format!(
                    "the app received {} {} with body {}",
                    rec.method,
                    rec.target,
                    wire::show(&rec.body, 200)
                ));
            }
        }
        failures.extend(problems.into_iter().map(|p| format!("{what}: {p}")));
    }
    raw.kg.stop().await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// What follows a first request on the same connection must be judged.
async fn followers_are_judged(
    route: Route,
    first: &str,
    first_path: &str,
    raw: &Raw,
    failures: &mut Vec<String>,
) {
    let token = &raw.key.token;
    let followers = [
        (
            "a #fragment",
            format!("GET /after#frag HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
            400,
        ),
        (
            "CL + TE",
            format!(
                "POST /after HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\n\
                 Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            400,
        ),
        (
            "a key followed by a space",
            format!(
                "GET /after HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token} \r\n\r\n"
            ),
            401,
        ),
    ];
    for (what, follower, status) in followers {
        let before = raw.up.record_count();
        let bytes = format!("{first}{follower}");
        let (resps, end) = exchange(raw.kg.public_addr, bytes.as_bytes(), 2).await;
        let what = format!("{route:?}: {what} after {first_path}");
        match resps.first() {
            Some(r) if r.header("x-oracle-target").as_deref() == Some(first_path) => {}
            other => failures.push(format!(
                "{what}: the first request was not answered by the app: {:?} {end:?}",
                other.map(Response::summary)
            )),
        }
        match resps.get(1) {
            None => {}
            Some(r) if r.status == status && r.is_json() => {}
            Some(r) => failures.push(format!(
                "{what}: must be refused with {status}, got {}",
                r.summary()
            )),
        }
        self_check_no_follower(raw, before, first_path, failures, &what).await;
    }
}

/// After a `PRI` request (an ordinary HTTP/1.1 request), after a chunked one,
/// and after two identical `Content-Length: 0`, every pipelined head is
/// still judged: a fragment, CL+TE or a key + space is refused, never
/// forwarded.
async fn heads_after_pri_chunked_and_duplicate_lengths_are_judged(route: Route) {
    let raw = raw_env(route, |_| {}).await;
    let mut failures = Vec::new();
    let firsts = [
        (format!("PRI /x HTTP/1.1\r\nHost: {HOST}\r\n\r\n"), "/x"),
        (
            format!(
                "POST /c HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n\
                 5\r\nhello\r\n0\r\n\r\n"
            ),
            "/c",
        ),
    ];
    for (first, path) in &firsts {
        followers_are_judged(route, first, path, &raw, &mut failures).await;
    }
    // Two identical Content-Length: 0 — keygate may refuse that request too;
    // the fragment after it must never be forwarded.
    let first = format!(
        "POST /z HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n"
    );
    let bytes = format!("{first}GET /after#frag HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    let before = raw.up.record_count();
    let (resps, _) = exchange(raw.kg.public_addr, bytes.as_bytes(), 2).await;
    if let Some(r) = resps.get(1) {
        if r.status != 400 {
            failures.push(format!(
                "{route:?}: a fragment after two Content-Length: 0 must be 400: {}",
                r.summary()
            ));
        }
    }
    self_check_no_follower(
        &raw,
        before,
        "/z",
        &mut failures,
        "after two Content-Length: 0",
    )
    .await;
    raw.kg.stop().await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

async fn self_check_no_follower(
    raw: &Raw,
    before: usize,
    first: &str,
    failures: &mut Vec<String>,
    what: &str,
) {
    let mut problems = Vec::new();
    for rec in raw.received_since(before, &mut problems).await {
        if rec.path() != first {
            problems.push(format!(
                "the app received {} {} (never to be forwarded)",
                rec.method, rec.target
            ));
        }
    }
    failures.extend(problems.into_iter().map(|p| format!("{what}: {p}")));
}

/// `PRI /public#x HTTP/1.1` is an ordinary request with a fragment: 400.
async fn pri_with_a_fragment_is_400(route: Route) {
    let raw = raw_env(route, |_| {}).await;
    let mut failures = Vec::new();
    let bytes = format!("PRI /public#x HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    let (resps, end) = exchange(raw.kg.public_addr, bytes.as_bytes(), 1).await;
    match resps.first() {
        Some(r) => {
            if let Err(e) = refusal(r, 400) {
                failures.push(e);
            }
        }
        None => failures.push(format!("no response ({end:?})")),
    }
    for r in raw.received_since(0, &mut failures).await {
        failures.push(format!("forwarded: {} {}", r.method, r.target));
    }
    raw.kg.stop().await;
    assert!(
        failures.is_empty(),
        "{route:?}: PRI /public#x:\n{}",
        failures.join("\n")
    );
}

/// A client that trickles a head, one field every 50 ms, is disconnected at
/// `listen.header_timeout` (300 ms here; the bound checked is 3 s), also
/// after a `PRI` request on the same connection.
async fn trickled_head_after_pri_is_closed_at_header_timeout(route: Route) {
    let raw = raw_env(route, |c| {
        c.listen.header_timeout = Duration::from_millis(300)
    })
    .await;
    let mut failures = Vec::new();
    for method in ["GET", "PRI"] {
        let mut s = TcpStream::connect(raw.kg.public_addr).await.unwrap();
        let first = format!("{method} /first HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
        s.write_all(first.as_bytes()).await.unwrap();
        let (rd, mut wr) = s.into_split();
        let mut reader = Reader::new(rd);
        let r = reader
            .response(false, h1_client::deadline(Duration::from_secs(10)))
            .await
            .unwrap_or_else(|e| panic!("{method} /first: {e}"));
        assert_eq!(
            r.header("x-oracle-target").as_deref(),
            Some("/first"),
            "{method} /first: {}",
            r.summary()
        );
        let started = tokio::time::Instant::now();
        let trickle = async {
            // The client's behaviour (a slow head), not synchronisation.
            if wr.write_all(b"GET /slow HTTP/1.1\r\n").await.is_err() {
                return;
            }
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if wr.write_all(b"X-Trickle: 1\r\n").await.is_err() {
                    return;
                }
            }
        };
        let closed = async {
            let deadline = started + Duration::from_secs(3);
            reader.closed(deadline).await
        };
        let result = tokio::select! {
            r = closed => r,
            _ = trickle => Err(End::Timeout("the trickle ended first".into())),
        };
        if let Err(e) = result {
            failures.push(format!(
                "{route:?}: after {method} /first, a head trickled for {:?} is still open \
                 (header_timeout 300ms): {e}",
                started.elapsed()
            ));
        }
    }
    for r in raw.received_since(0, &mut failures).await {
        if r.path() != "/first" {
            failures.push(format!("forwarded: {} {}", r.method, r.target));
        }
    }
    raw.kg.stop().await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A path starting with `//` that no deny prefix refuses → 400 ambiguous
/// path, over HTTP/1.1 and HTTP/2; `//cp/admin` → 403.
async fn double_slash_paths(route: Route) {
    let raw = raw_env(route, |_| {}).await;
    let mut failures = Vec::new();
    for (path, status, error) in [
        ("//x", 400, "bad request: ambiguous path"),
        ("//x/cp/admin", 400, "bad request: ambiguous path"),
        ("//o/1/2?q=1", 400, "bad request: ambiguous path"),
        ("//cp/admin", 403, "forbidden"),
        ("//CP/Admin/x", 403, "forbidden"),
    ] {
        let bytes = format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
        let (resps, end) = exchange(raw.kg.public_addr, bytes.as_bytes(), 1).await;
        match resps.first() {
            Some(r) if r.status == status && r.json_error().as_deref() == Some(error) => {}
            other => failures.push(format!(
                "HTTP/1.1 GET {path}: expected {status} {error:?}, got {:?} {end:?}",
                other.map(Response::summary)
            )),
        }
        let mut send = kg::h2_client(raw.kg.public_addr).await;
        let req = http::Request::builder()
            .uri(format!("http://{HOST}{path}"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), kg::h2_send(&mut send, req))
            .await
            .expect("an HTTP/2 answer within 10 s");
        match got {
            Ok((s, _, body)) => {
                let e = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_owned));
                if s != status || e.as_deref() != Some(error) {
                    failures.push(format!(
                        "HTTP/2 GET {path}: expected {status} {error:?}, got {s} {body:?}"
                    ));
                }
            }
            Err(e) => failures.push(format!("HTTP/2 GET {path}: {e}")),
        }
    }
    for r in raw.received_since(0, &mut failures).await {
        failures.push(format!("forwarded: {} {}", r.method, r.target));
    }
    raw.kg.stop().await;
    assert!(failures.is_empty(), "{route:?}:\n{}", failures.join("\n"));
}

on_both_paths!(
    connection_naming_framing_or_host_is_400,
    heads_after_pri_chunked_and_duplicate_lengths_are_judged,
    pri_with_a_fragment_is_400,
    trickled_head_after_pri_is_closed_at_header_timeout,
    double_slash_paths,
);
