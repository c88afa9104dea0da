//! A byte-level look at HTTP/1 request heads, for the few things the parser
//! normalises away before keygate sees the request (contract §3):
//!
//! - a `#fragment` in the request target (the `http` crate drops it) → 400;
//! - `Content-Length` together with `Transfer-Encoding` (hyper drops the
//!   `Content-Length`) → 400;
//! - an `Authorization` value holding an org key followed by whitespace
//!   (the parser trims it, the contract says nothing may follow the token) → 401.
//!
//! The connection feeds every byte it reads; the scanner follows the framing
//! of bodiless and `Content-Length` requests so pipelined heads are seen too,
//! and stops (until the connection is idle again) at a chunked body, an
//! upgrade or anything it does not recognise as a request line — it can only
//! ever flag a line of exactly the shape `METHOD SP target SP HTTP/1.x`.
//! A flagged head is matched to its parsed request by method and target.

use crate::error::Rejection;

/// Longest line the scanner keeps (longer lines keep their start: the header
/// name, and the target up to the 8 KiB limit plus slack).
const MAX_LINE: usize = 9 * 1024;

/// A head the scanner refuses, identified by `METHOD SP target-without-fragment`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flagged {
    pub fingerprint: Vec<u8>,
    pub rejection: Rejection,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    RequestLine,
    Headers,
    Skip(u64),
    Off,
}

#[derive(Default)]
struct Head {
    fingerprint: Vec<u8>,
    fragment: bool,
    content_lengths: u32,
    content_length: Option<u64>,
    transfer_encoding: bool,
    upgrade: bool,
    key_with_trailing_space: bool,
}

pub struct HeadScanner {
    key_prefix: Vec<u8>,
    state: State,
    line: Vec<u8>,
    /// The last byte of the current line before any `\r` (for trailing whitespace).
    last: u8,
    prev: u8,
    head: Head,
}

impl HeadScanner {
    pub fn new(key_prefix: &str) -> HeadScanner {
        HeadScanner {
            key_prefix: key_prefix.as_bytes().to_vec(),
            state: State::RequestLine,
            line: Vec::new(),
            last: 0,
            prev: 0,
            head: Head::default(),
        }
    }

    pub fn is_off(&self) -> bool {
        self.state == State::Off
    }

    /// Expect a request line next (the connection is idle between requests).
    pub fn restart(&mut self) {
        self.state = State::RequestLine;
        self.line.clear();
        self.head = Head::default();
    }

    pub fn stop(&mut self) {
        self.state = State::Off;
        self.line = Vec::new();
    }

    /// Scan `bytes` (as read from the connection); `flag` receives every head
    /// that must be refused.
    pub fn feed(&mut self, mut bytes: &[u8], flag: &mut impl FnMut(Flagged)) {
        while !bytes.is_empty() {
            match self.state {
                State::Off => return,
                State::Skip(n) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(bytes.len());
                    bytes = &bytes[take..];
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        State::RequestLine
                    } else {
                        State::Skip(left)
                    };
                }
                State::RequestLine | State::Headers => {
                    let (chunk, rest, ended) = match bytes.iter().position(|&b| b == b'\n') {
                        Some(i) => (&bytes[..i], &bytes[i + 1..], true),
                        None => (bytes, &[][..], false),
                    };
                    for &b in chunk {
                        self.prev = self.last;
                        self.last = b;
                    }
                    let room = MAX_LINE.saturating_sub(self.line.len());
                    self.line.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    bytes = rest;
                    if ended {
                        self.end_line(flag);
                    }
                }
            }
        }
    }

    fn end_line(&mut self, flag: &mut impl FnMut(Flagged)) {
        let mut line = std::mem::take(&mut self.line);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        let trailing = if self.last == b'\r' {
            self.prev
        } else {
            self.last
        };
        self.last = 0;
        self.prev = 0;
        match self.state {
            State::RequestLine => self.request_line(&line),
            State::Headers if line.is_empty() => self.end_head(flag),
            State::Headers => self.header_line(&line, trailing),
            State::Skip(_) | State::Off => {}
        }
        line.clear();
        if self.state != State::Off {
            self.line = line;
        }
    }

    fn request_line(&mut self, line: &[u8]) {
        if line.is_empty() {
            return; // empty lines before a request line are allowed
        }
        let mut parts = line.split(|&b| b == b' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return self.stop();
        };
        let shaped = !method.is_empty()
            && method.iter().all(u8::is_ascii_uppercase)
            && !target.is_empty()
            && (version == b"HTTP/1.1" || version == b"HTTP/1.0");
        if !shaped {
            return self.stop();
        }
        let fragment_at = target.iter().position(|&b| b == b'#');
        let mut fingerprint = Vec::with_capacity(method.len() + 1 + target.len());
        fingerprint.extend_from_slice(method);
        fingerprint.push(b' ');
        fingerprint.extend_from_slice(&target[..fragment_at.unwrap_or(target.len())]);
        self.head = Head {
            fingerprint,
            fragment: fragment_at.is_some(),
            ..Head::default()
        };
        self.state = State::Headers;
    }

    fn header_line(&mut self, line: &[u8], trailing: u8) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return;
        };
        let name = &line[..colon];
        let value = &line[colon + 1..];
        if name.eq_ignore_ascii_case(b"content-length") {
            self.head.content_lengths += 1;
            let v = value.trim_ascii();
            self.head.content_length = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok());
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.head.transfer_encoding = true;
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            self.head.upgrade = true;
        } else if name.eq_ignore_ascii_case(b"authorization")
            && !self.key_prefix.is_empty()
            && value
                .windows(self.key_prefix.len())
                .any(|w| w == self.key_prefix.as_slice())
            && (trailing == b' ' || trailing == b'\t')
        {
            self.head.key_with_trailing_space = true;
        }
    }

    fn end_head(&mut self, flag: &mut impl FnMut(Flagged)) {
        let head = std::mem::take(&mut self.head);
        let rejection = if head.fragment {
            Some(Rejection::BadTarget)
        } else if head.content_lengths > 0 && head.transfer_encoding {
            Some(Rejection::BadFraming)
        } else if head.key_with_trailing_space {
            Some(Rejection::Unauthorized)
        } else {
            None
        };
        if let Some(rejection) = rejection {
            flag(Flagged {
                fingerprint: head.fingerprint,
                rejection,
            });
        }
        self.state = if head.transfer_encoding || head.upgrade || head.content_lengths > 1 {
            State::Off
        } else if head.content_lengths == 1 {
            match head.content_length {
                Some(0) => State::RequestLine,
                Some(n) => State::Skip(n),
                None => State::Off,
            }
        } else {
            State::RequestLine
        };
    }
}

/// `METHOD SP target` of a parsed request, as [`Flagged::fingerprint`] has it.
pub fn fingerprint_matches(fingerprint: &[u8], method: &http::Method, uri: &http::Uri) -> bool {
    let m = method.as_str().as_bytes();
    if fingerprint.len() <= m.len() || &fingerprint[..m.len()] != m || fingerprint[m.len()] != b' '
    {
        return false;
    }
    let target = &fingerprint[m.len() + 1..];
    if uri.scheme().is_some() {
        target == uri.to_string().as_bytes()
            || (uri.path() == "/" && target == uri.to_string().trim_end_matches('/').as_bytes())
    } else {
        uri.path_and_query()
            .is_some_and(|pq| pq.as_str().as_bytes() == target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&[u8]]) -> Vec<(String, Rejection)> {
        let mut s = HeadScanner::new("mok_");
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut |f: Flagged| {
                out.push((
                    String::from_utf8_lossy(&f.fingerprint).into_owned(),
                    f.rejection,
                ))
            });
        }
        out
    }

    fn one(bytes: &[u8]) -> Vec<(String, Rejection)> {
        scan(&[bytes])
    }

    #[test]
    fn fragments() {
        assert_eq!(
            one(b"GET /a#b HTTP/1.1\r\nHost: x\r\n\r\n"),
            vec![("GET /a".into(), Rejection::BadTarget)]
        );
        assert_eq!(
            one(b"\r\nGET /a?q=1#f HTTP/1.0\r\n\r\n"),
            vec![("GET /a?q=1".into(), Rejection::BadTarget)]
        );
        assert!(one(b"GET /a?x=%23 HTTP/1.1\r\nHost: x\r\n\r\n").is_empty());
        assert!(one(b"get /a#b HTTP/1.1\r\n\r\n").is_empty());
        assert!(one(b"GET /a#b HTTP/2.0\r\n\r\n").is_empty());
        assert!(one(b"GET /a#b HTTP/1.1 x\r\n\r\n").is_empty());
        assert!(one(b"hello #1 world\n").is_empty());
        // Split anywhere.
        let whole: &[u8] = b"GET /x#y HTTP/1.1\r\nHost: h\r\n\r\n";
        for i in 0..whole.len() {
            assert_eq!(scan(&[&whole[..i], &whole[i..]]).len(), 1, "split at {i}");
        }
    }

    #[test]
    fn content_length_with_transfer_encoding() {
        assert_eq!(
            one(b"POST /u HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
            vec![("POST /u".into(), Rejection::BadFraming)]
        );
        assert_eq!(
            one(b"POST /u HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 0\r\n\r\n"),
            vec![("POST /u".into(), Rejection::BadFraming)]
        );
        assert!(one(b"POST /u HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello").is_empty());
        assert!(one(b"POST /u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").is_empty());
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
            assert_eq!(
                one(&req),
                vec![("GET /a".into(), Rejection::Unauthorized)],
                "{v:?}"
            );
        }
        assert!(one(b"GET /a HTTP/1.1\r\nAuthorization: Bearer mok_abc\r\n\r\n").is_empty());
        assert!(one(b"GET /a HTTP/1.1\r\nAuthorization: Bearer other \r\n\r\n").is_empty());
        assert!(one(b"GET /a HTTP/1.1\r\nX-Note: mok_abc \r\n\r\n").is_empty());
    }

    #[test]
    fn pipelined_heads_and_bodies() {
        let flagged = one(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n\
              GET /b#x HTTP/1.1\r\nHost: h\r\n\r\n\
              POST /c HTTP/1.1\r\nContent-Length: 24\r\n\r\nGET /body#x HTTP/1.1\r\n\r\n\
              GET /d#y HTTP/1.1\r\n\r\n");
        assert_eq!(
            flagged,
            vec![
                ("GET /b".into(), Rejection::BadTarget),
                ("GET /d".into(), Rejection::BadTarget)
            ]
        );
        // A chunked body stops the scan (until the connection restarts it).
        assert!(one(
            b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nGET /x#y HTTP/1.1\r\n\r\n"
        )
        .is_empty());
    }

    #[test]
    fn fingerprints_match_parsed_requests() {
        let m = |fp: &str, method: http::Method, uri: &str| {
            fingerprint_matches(fp.as_bytes(), &method, &uri.parse().unwrap())
        };
        assert!(m("GET /a?q=1", http::Method::GET, "/a?q=1"));
        assert!(!m("GET /a", http::Method::GET, "/b"));
        assert!(!m("GET /a", http::Method::POST, "/a"));
        assert!(m("GET http://h/a", http::Method::GET, "http://h/a"));
        assert!(m("GET http://h", http::Method::GET, "http://h"));
    }
}
