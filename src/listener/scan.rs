//! A byte-level judge of every HTTP/1 request head on a connection, for
//! what the parser hides (contract §3):
//!
//! - a `#fragment` in the request target (the `http` crate drops it) → 400;
//! - `Content-Length` together with `Transfer-Encoding`, or a
//!   `Transfer-Encoding` that is not one `chunked` (hyper drops the length,
//!   or decodes what the gate then refuses) → 400;
//! - an `Authorization` value holding an org key followed by whitespace
//!   (the parser trims it; nothing may follow the token) → 401.
//!
//! The connection feeds it every byte it reads, before hyper sees them. It
//! follows the framing exactly (bodiless, `Content-Length`, chunked — with
//! the same strict decoder the upstream link uses, [`crate::h1`]), so it
//! finds every pipelined head, and yields one [`Verdict`] per head, in
//! order. The connection pairs the n-th head hyper parses with the n-th
//! verdict and checks its fingerprint (method and raw target); a head with
//! no matching verdict is never served. Where the scanner cannot follow
//! (a framing hyper would refuse, `CONNECT`, anything it cannot parse) it
//! is **lost**: it yields no more verdicts, so every later head on the
//! connection is refused and the connection closed — it fails closed,
//! never open.

use crate::error::Rejection;
use crate::h1::{self, ChunkDecoder, Decoded};

/// Longest header line the scanner keeps (longer lines keep their start).
const MAX_LINE: usize = 9 * 1024;

/// What the scanner decided about one request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// [`fingerprint`] of the head's method and target (without fragment).
    pub fingerprint: u64,
    /// The refusal the head earns for what only the bytes show.
    pub refusal: Option<Rejection>,
}

/// FNV-1a of `method SP target`: what pairs a verdict with a parsed head.
pub fn fingerprint(method: &[u8], target: &[u8]) -> u64 {
    let mut h = Fnv::new();
    h.feed(method);
    h.feed(b" ");
    h.feed(target);
    h.0
}

/// The fingerprint of a request hyper parsed (`http` keeps an origin-form
/// target's bytes as received; other forms are compared in their printed
/// form, and any difference fails closed).
pub fn parsed_fingerprint(method: &http::Method, uri: &http::Uri) -> u64 {
    match (uri.scheme(), uri.path_and_query()) {
        (None, Some(pq)) if uri.authority().is_none() => {
            fingerprint(method.as_str().as_bytes(), pq.as_str().as_bytes())
        }
        _ => fingerprint(method.as_str().as_bytes(), uri.to_string().as_bytes()),
    }
}

#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[derive(Debug, Clone)]
enum State {
    /// Between messages.
    Idle,
    /// Empty lines before a request line (RFC 9112 §2.2): already a head,
    /// as far as the header timeout goes.
    Leading,
    /// In the request line: method, target, version.
    Method,
    Target,
    Version,
    /// In the header section.
    Headers,
    /// In a body of this many bytes.
    Length(u64),
    Chunked(ChunkDecoder),
    /// Cannot follow the stream: no more verdicts.
    Lost,
    /// The connection stopped speaking HTTP/1 (a tunnel): nothing to judge.
    Off,
}

#[derive(Default)]
struct Head {
    hash: u64,
    fragment: bool,
    method_len: usize,
    connect: bool,
    version: Vec<u8>,
    content_lengths: u32,
    content_length: Option<u64>,
    bad_length: bool,
    transfer_encodings: u32,
    chunked: bool,
    key_with_trailing_space: bool,
}

pub struct HeadScanner {
    key_prefix: Vec<u8>,
    state: State,
    line: Vec<u8>,
    hash: Fnv,
    head: Head,
}

impl HeadScanner {
    pub fn new(key_prefix: &str) -> HeadScanner {
        HeadScanner {
            key_prefix: key_prefix.as_bytes().to_vec(),
            state: State::Idle,
            line: Vec::new(),
            hash: Fnv::new(),
            head: Head::default(),
        }
    }

    /// A request head is in progress (or the scanner is lost and whatever
    /// arrives is treated as one): the header timeout applies.
    pub fn in_head(&self) -> bool {
        matches!(
            self.state,
            State::Leading
                | State::Method
                | State::Target
                | State::Version
                | State::Headers
                | State::Lost
        )
    }

    pub fn is_lost(&self) -> bool {
        matches!(self.state, State::Lost)
    }

    /// The connection became a tunnel (101): nothing more to judge.
    pub fn stop(&mut self) {
        self.state = State::Off;
        self.line = Vec::new();
    }

    /// Scans `bytes` as read from the connection; `verdict` receives one
    /// verdict per complete head, in order.
    pub fn feed(&mut self, mut bytes: &[u8], verdict: &mut impl FnMut(Verdict)) {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Off | State::Lost => return,
                State::Length(n) => {
                    let take = usize::try_from(*n).unwrap_or(usize::MAX).min(bytes.len());
                    *n -= take as u64;
                    bytes = &bytes[take..];
                    if *n == 0 {
                        self.state = State::Idle;
                    }
                }
                State::Chunked(decoder) => match decoder.decode(bytes) {
                    Ok((used, found)) => {
                        bytes = &bytes[used..];
                        if found == Decoded::End {
                            self.state = State::Idle;
                        }
                    }
                    Err(_) => self.lose(),
                },
                State::Idle | State::Leading => {
                    let b = bytes[0];
                    if b == b'\r' || b == b'\n' {
                        bytes = &bytes[1..];
                        self.state = State::Leading;
                        continue;
                    }
                    self.head = Head::default();
                    self.hash = Fnv::new();
                    self.state = State::Method;
                }
                State::Method => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    if b == b' ' && self.head.method_len > 0 {
                        self.head.connect = self.line == b"CONNECT";
                        self.line.clear();
                        self.hash.feed(b" ");
                        self.state = State::Target;
                    } else if is_tchar(b) && self.head.method_len < 32 {
                        self.head.method_len += 1;
                        self.line.push(b);
                        self.hash.feed(&[b]);
                    } else {
                        self.lose();
                    }
                }
                State::Target => {
                    // Up to the space before the version; the fragment is not hashed.
                    let end = bytes
                        .iter()
                        .position(|&b| b == b' ' || b <= 0x20 || b == 0x7f)
                        .unwrap_or(bytes.len());
                    let (part, rest) = bytes.split_at(end);
                    if !self.head.fragment {
                        match part.iter().position(|&b| b == b'#') {
                            Some(i) => {
                                self.hash.feed(&part[..i]);
                                self.head.fragment = true;
                            }
                            None => self.hash.feed(part),
                        }
                    }
                    bytes = rest;
                    if let Some(&b) = bytes.first() {
                        bytes = &bytes[1..];
                        if b == b' ' {
                            self.head.hash = self.hash.0;
                            self.line.clear();
                            self.state = State::Version;
                        } else {
                            self.lose();
                        }
                    }
                }
                State::Version | State::Headers => {
                    let (chunk, rest, ended) = match bytes.iter().position(|&b| b == b'\n') {
                        Some(i) => (&bytes[..i], &bytes[i + 1..], true),
                        None => (bytes, &[][..], false),
                    };
                    let room = MAX_LINE.saturating_sub(self.line.len());
                    self.line.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    bytes = rest;
                    if ended {
                        self.end_line(verdict);
                    }
                }
            }
        }
    }

    fn lose(&mut self) {
        self.state = State::Lost;
        self.line = Vec::new();
    }

    fn end_line(&mut self, verdict: &mut impl FnMut(Verdict)) {
        let mut line = std::mem::take(&mut self.line);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        match self.state {
            State::Version => {
                if line == b"HTTP/1.1" || line == b"HTTP/1.0" {
                    self.head.version = line.clone();
                    self.state = State::Headers;
                } else {
                    self.lose();
                }
            }
            State::Headers if line.is_empty() => self.end_head(verdict),
            State::Headers => self.header_line(&line),
            _ => {}
        }
        line.clear();
        if !matches!(self.state, State::Lost | State::Off) {
            self.line = line;
        }
    }

    fn header_line(&mut self, line: &[u8]) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return self.lose(); // hyper refuses it too
        };
        let name = &line[..colon];
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return self.lose();
        }
        let raw = &line[colon + 1..];
        let value = raw.trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") {
            self.head.content_lengths += 1;
            match (h1::parse_digits(value), self.head.content_length) {
                (Some(n), None) => self.head.content_length = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => self.head.bad_length = true,
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.head.transfer_encodings += 1;
            self.head.chunked = value.eq_ignore_ascii_case(b"chunked");
        } else if name.eq_ignore_ascii_case(b"authorization")
            && !self.key_prefix.is_empty()
            && raw
                .windows(self.key_prefix.len())
                .any(|w| w == self.key_prefix.as_slice())
            && matches!(raw.last(), Some(b' ' | b'\t'))
        {
            self.head.key_with_trailing_space = true;
        }
    }

    fn end_head(&mut self, verdict: &mut impl FnMut(Verdict)) {
        let head = std::mem::take(&mut self.head);
        let http10 = head.version == b"HTTP/1.0";
        let te = head.transfer_encodings > 0;
        let framing_ok = !(te
            && (head.content_lengths > 0
                || http10
                || head.transfer_encodings > 1
                || !head.chunked));
        let refusal = if head.fragment {
            Some(Rejection::BadTarget)
        } else if !framing_ok {
            Some(Rejection::BadFraming)
        } else if head.key_with_trailing_space {
            Some(Rejection::Unauthorized)
        } else {
            None
        };
        verdict(Verdict {
            fingerprint: head.hash,
            refusal,
        });
        self.state = if head.connect || head.bad_length || !framing_ok {
            State::Lost
        } else if te {
            State::Chunked(ChunkDecoder::new())
        } else {
            match head.content_length {
                Some(n) if n > 0 => State::Length(n),
                _ => State::Idle,
            }
        };
        if matches!(self.state, State::Lost) {
            self.line = Vec::new();
        }
    }
}

/// RFC 9110 token characters (what httparse accepts in a method or field name).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&[u8]]) -> (Vec<Verdict>, bool) {
        let mut s = HeadScanner::new("mok_");
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut |v| out.push(v));
        }
        (out, s.is_lost())
    }

    fn refusals(bytes: &[u8]) -> Vec<Option<Rejection>> {
        scan(&[bytes]).0.into_iter().map(|v| v.refusal).collect()
    }

    fn fp(method: &str, target: &str) -> u64 {
        fingerprint(method.as_bytes(), target.as_bytes())
    }

    #[test]
    fn every_head_gets_a_verdict_with_its_fingerprint() {
        let (v, lost) = scan(&[b"GET /a?q=1 HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.0\r\n\r\n"]);
        assert!(!lost);
        assert_eq!(
            v,
            vec![
                Verdict {
                    fingerprint: fp("GET", "/a?q=1"),
                    refusal: None
                },
                Verdict {
                    fingerprint: fp("POST", "/b"),
                    refusal: None
                },
            ]
        );
        let uri: http::Uri = "/a?q=1".parse().unwrap();
        assert_eq!(
            parsed_fingerprint(&http::Method::GET, &uri),
            fp("GET", "/a?q=1")
        );
        let abs: http::Uri = "http://h/a".parse().unwrap();
        assert_eq!(
            parsed_fingerprint(&http::Method::GET, &abs),
            fp("GET", "http://h/a")
        );
        let star: http::Uri = "*".parse().unwrap();
        assert_eq!(
            parsed_fingerprint(&http::Method::OPTIONS, &star),
            fp("OPTIONS", "*")
        );
        // lower-case methods are tokens too (hyper parses them).
        assert_eq!(scan(&[b"get /a HTTP/1.1\r\n\r\n"]).0.len(), 1);
    }

    #[test]
    fn fragments() {
        assert_eq!(
            refusals(b"GET /a#b HTTP/1.1\r\nHost: x\r\n\r\n"),
            vec![Some(Rejection::BadTarget)]
        );
        let (v, _) = scan(&[b"\r\nGET /a?q=1#f HTTP/1.0\r\n\r\n"]);
        assert_eq!(v[0].fingerprint, fp("GET", "/a?q=1"));
        assert_eq!(v[0].refusal, Some(Rejection::BadTarget));
        assert_eq!(
            refusals(b"GET /a?x=%23 HTTP/1.1\r\nHost: x\r\n\r\n"),
            vec![None]
        );
        assert_eq!(
            refusals(b"PRI /public#x HTTP/1.1\r\n\r\n"),
            vec![Some(Rejection::BadTarget)]
        );
        // Split anywhere.
        let whole: &[u8] = b"GET /x#y HTTP/1.1\r\nHost: h\r\n\r\n";
        for i in 0..whole.len() {
            let (v, lost) = scan(&[&whole[..i], &whole[i..]]);
            assert_eq!(v.len(), 1, "split at {i}");
            assert_eq!(
                v[0],
                Verdict {
                    fingerprint: fp("GET", "/x"),
                    refusal: Some(Rejection::BadTarget)
                }
            );
            assert!(!lost);
        }
    }

    #[test]
    fn framing_refusals_and_loss() {
        for bad in [
            &b"POST /u HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST /u HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 0\r\n\r\n",
            b"POST /u HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST /u HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /u HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let (v, lost) = scan(&[bad]);
            assert_eq!(v.len(), 1);
            assert_eq!(
                v[0].refusal,
                Some(Rejection::BadFraming),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
            assert!(lost, "nothing after it is judged");
        }
        for lost_after in [
            &b"POST /u HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"[..],
            b"POST /u HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
            b"POST /u HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            b"CONNECT h:443 HTTP/1.1\r\nHost: h\r\n\r\n",
        ] {
            let (v, lost) = scan(&[lost_after, b"GET /a#x HTTP/1.1\r\n\r\n"]);
            assert_eq!(v.len(), 1, "{:?}", String::from_utf8_lossy(lost_after));
            assert!(lost);
        }
        for garbage in [
            &b"GET  /a HTTP/1.1\r\n\r\n"[..],
            b"GET /a HTTP/2.0\r\n\r\n",
            b"GET /a HTTP/1.1 x\r\n\r\n",
            b"hello #1 world\n",
            b"GET /a HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET /a HTTP/1.1\r\n folded: x\r\n\r\n",
            b"GET /a HTTP/1.1\r\nbad name: x\r\n\r\n",
            b"G\x01T /a HTTP/1.1\r\n\r\n",
        ] {
            let (v, lost) = scan(&[garbage]);
            assert!(
                v.is_empty() && lost,
                "{:?}",
                String::from_utf8_lossy(garbage)
            );
        }
        // Identical lengths are one length.
        let (v, lost) = scan(&[b"POST /u HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\nGET /a#x HTTP/1.1\r\n\r\n"]);
        assert!(!lost);
        assert_eq!(
            v.iter().map(|v| v.refusal).collect::<Vec<_>>(),
            vec![None, Some(Rejection::BadTarget)]
        );
    }

    #[test]
    fn key_followed_by_whitespace() {
        for v in [
            &b"Bearer mok_abc "[..],
            b"Bearer mok_abc\t",
            b"Bearer mok_abc  ",
            b"bearer mok_abc \t",
        ] {
            let mut req = b"GET /a HTTP/1.1\r\nAuthorization: ".to_vec();
            req.extend_from_slice(v);
            req.extend_from_slice(b"\r\nHost: h\r\n\r\n");
            assert_eq!(refusals(&req), vec![Some(Rejection::Unauthorized)], "{v:?}");
        }
        assert_eq!(
            refusals(b"GET /a HTTP/1.1\r\nAuthorization: Bearer mok_abc\r\n\r\n"),
            vec![None]
        );
        assert_eq!(
            refusals(b"GET /a HTTP/1.1\r\nAuthorization: Bearer other \r\n\r\n"),
            vec![None]
        );
        assert_eq!(
            refusals(b"GET /a HTTP/1.1\r\nX-Note: mok_abc \r\n\r\n"),
            vec![None]
        );
    }

    #[test]
    fn pipelined_heads_through_every_body_framing() {
        let stream: &[u8] = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n\
              GET /b#x HTTP/1.1\r\nHost: h\r\n\r\n\
              POST /c HTTP/1.1\r\nContent-Length: 24\r\n\r\nGET /body#x HTTP/1.1\r\n\r\n\
              POST /d HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
              5;ext\r\nGET /\r\n0\r\nx-t: GET /t#x HTTP/1.1\r\n\r\n\
              PRI /e HTTP/1.1\r\n\r\n\
              GET /f#y HTTP/1.1\r\n\r\n";
        let want = vec![
            (fp("GET", "/a"), None),
            (fp("GET", "/b"), Some(Rejection::BadTarget)),
            (fp("POST", "/c"), None),
            (fp("POST", "/d"), None),
            (fp("PRI", "/e"), None),
            (fp("GET", "/f"), Some(Rejection::BadTarget)),
        ];
        for step in [1, 2, 5, 13, stream.len()] {
            let chunks: Vec<&[u8]> = stream.chunks(step).collect();
            let (v, lost) = scan(&chunks);
            assert!(!lost, "step {step}");
            assert_eq!(
                v.iter()
                    .map(|v| (v.fingerprint, v.refusal))
                    .collect::<Vec<_>>(),
                want,
                "step {step}"
            );
        }
        // A broken chunked body loses the stream.
        let (v, lost) = scan(&[b"POST /d HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nGET /x#y HTTP/1.1\r\n\r\n"]);
        assert_eq!(v.len(), 1);
        assert!(lost);
    }

    #[test]
    fn in_head_tracks_the_header_timeout_window() {
        let mut s = HeadScanner::new("mok_");
        let mut sink = |_| {};
        assert!(!s.in_head());
        s.feed(b"GET /a HT", &mut sink);
        assert!(s.in_head());
        s.feed(b"TP/1.1\r\nContent-Length: 3\r\n\r\n", &mut sink);
        assert!(!s.in_head(), "in the body");
        s.feed(b"abc", &mut sink);
        assert!(!s.in_head(), "between messages");
        s.feed(b"P", &mut sink);
        assert!(s.in_head(), "a new head began");
        let mut s = HeadScanner::new("mok_");
        s.feed(b"\r\n", &mut sink);
        assert!(s.in_head(), "empty lines count towards the header timeout");
        s.stop();
        assert!(!s.in_head());
    }
}
