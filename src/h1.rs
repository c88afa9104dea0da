//! The HTTP/1.1 wire codec keygate writes and reads itself: pure functions
//! and state machines over byte slices, no I/O. Two stages share it, so that
//! where a message ends is decided by one piece of code:
//!
//! - the listener's head scan ([`crate::listener`]) follows client request
//!   bodies with [`ChunkDecoder`] to find every pipelined head;
//! - the upstream link ([`crate::upstream`]) encodes request heads with
//!   [`RequestHead`] and reads the app's responses with [`parse_response`]
//!   and [`ChunkDecoder`].
//!
//! Framing is computed, never copied (RFC 9112 §6): [`RequestHead`] takes the
//! body's [`Framing`] as a typed value and refuses `Content-Length` /
//! `Transfer-Encoding` among the fields it copies, so no client header can
//! frame (or un-frame) what the app parses.
//!
//! The decoders accept a strict subset of what RFC 9112 allows (CRLF line
//! ends, no bare LF, bounded sizes): on that subset they find exactly the
//! boundaries hyper's own decoder finds, and outside it they fail — a
//! caller that cannot follow a stream stops and closes, it never guesses.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

/// Most header fields accepted in a response.
pub const MAX_RESPONSE_HEADERS: usize = 100;
/// Largest response head accepted (status line and fields).
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Longest chunk extension accepted on one chunk-size line.
const MAX_CHUNK_EXT: usize = 4096;
/// Largest trailer section accepted.
const MAX_TRAILERS: usize = 64 * 1024;
/// Most hex digits in a chunk size (16 fill a u64).
const MAX_CHUNK_DIGITS: u8 = 16;

/// How a request body is delimited on the wire to the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body and no framing field (a `GET` without a body).
    Empty,
    /// `Content-Length: n` (also `0` for a body-less `POST`).
    Length(u64),
    /// `Transfer-Encoding: chunked`, the body re-encoded chunk by chunk.
    Chunked,
}

/// Why a message could not be encoded or decoded. Every variant means the
/// exchange fails (502 towards the client for a response, a closed
/// connection for a request stream); none is ever "guessed around".
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum H1Error {
    #[error("a framing header ({0}) among the fields to copy")]
    FramingHeader(&'static str),
    #[error("malformed response head ({0})")]
    Head(&'static str),
    #[error("response head larger than {MAX_RESPONSE_HEAD} bytes")]
    HeadTooLarge,
    #[error("invalid Content-Length in the response")]
    BadLength,
    #[error("a transfer coding other than chunked in the response")]
    TransferCoding,
    #[error("101 Switching Protocols to a request that asked for no upgrade")]
    Unexpected101,
    #[error("malformed chunked body ({0})")]
    Chunk(&'static str),
}

// ---------------------------------------------------------------------------
// Request heads
// ---------------------------------------------------------------------------

/// A request head being written to the app: request line, the forwarded
/// fields, then the framing keygate computed from the body.
pub struct RequestHead {
    buf: Vec<u8>,
}

impl RequestHead {
    /// `METHOD SP target SP HTTP/1.1`; `target` is origin-form.
    pub fn new(method: &Method, target: &str) -> RequestHead {
        let mut buf = Vec::with_capacity(512);
        buf.extend_from_slice(method.as_str().as_bytes());
        buf.push(b' ');
        buf.extend_from_slice(target.as_bytes());
        buf.extend_from_slice(b" HTTP/1.1\r\n");
        RequestHead { buf }
    }

    /// Copies one field. `Content-Length` and `Transfer-Encoding` are
    /// refused: the framing is [`RequestHead::finish`]'s argument, never a
    /// copied field. (Names and values are valid by construction: the http
    /// crate refuses CR, LF and NUL in both.)
    pub fn header(&mut self, name: &HeaderName, value: &HeaderValue) -> Result<(), H1Error> {
        if name == header::CONTENT_LENGTH {
            return Err(H1Error::FramingHeader("content-length"));
        }
        if name == header::TRANSFER_ENCODING {
            return Err(H1Error::FramingHeader("transfer-encoding"));
        }
        self.buf.extend_from_slice(name.as_str().as_bytes());
        self.buf.extend_from_slice(b": ");
        self.buf.extend_from_slice(value.as_bytes());
        self.buf.extend_from_slice(b"\r\n");
        Ok(())
    }

    /// The framing field for `framing`, then the end of the head.
    pub fn finish(mut self, framing: Framing) -> Vec<u8> {
        match framing {
            Framing::Empty => {}
            Framing::Length(n) => {
                self.buf.extend_from_slice(b"content-length: ");
                push_number(&mut self.buf, n, 10);
                self.buf.extend_from_slice(b"\r\n");
            }
            Framing::Chunked => self
                .buf
                .extend_from_slice(b"transfer-encoding: chunked\r\n"),
        }
        self.buf.extend_from_slice(b"\r\n");
        self.buf
    }
}

/// Appends `n` in base `radix` (10 or 16, lower-case) without allocating.
fn push_number(out: &mut Vec<u8>, mut n: u64, radix: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = DIGITS[(n % radix) as usize];
        n /= radix;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

/// Appends one chunk (`size CRLF data CRLF`) of a chunked body; empty `data`
/// writes nothing (a zero-size chunk would end the body).
pub fn encode_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    push_number(out, data.len() as u64, 16);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The last chunk and an empty trailer section (request trailers are dropped).
pub const CHUNKED_END: &[u8] = b"0\r\n\r\n";

// ---------------------------------------------------------------------------
// Response heads
// ---------------------------------------------------------------------------

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// No body: `HEAD`, 204, 304.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked (see [`ChunkDecoder`]).
    Chunked,
    /// Until the app closes the connection.
    UntilClose,
    /// 101 to a request that asked for an upgrade: the connection is a tunnel now.
    Upgrade,
}

/// What the request was, as far as the response's framing depends on it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Asked {
    /// `HEAD`: the response has no body whatever its fields say.
    pub head: bool,
    /// The request asked for an upgrade (a WebSocket keygate may tunnel).
    pub upgrade: bool,
}

/// A parsed final response head.
#[derive(Debug)]
pub struct ResponseHead {
    /// Status, version and fields. Framing fields are gone: the body's
    /// framing towards the client is computed from [`ResponseHead::body`]
    /// (kept only where there is no body: `HEAD`/304 say the length of what
    /// a `GET` would get).
    pub parts: http::response::Parts,
    pub body: BodyKind,
    /// The connection may carry another request after this response.
    pub keep_alive: bool,
}

/// Parses a complete final response head at the start of `buf` and consumes
/// it; `Ok(None)` when more bytes are needed. Interim responses (1xx other
/// than 101) are consumed and skipped.
pub fn parse_response(buf: &mut BytesMut, asked: Asked) -> Result<Option<ResponseHead>, H1Error> {
    loop {
        let mut fields = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        let mut parsed = httparse::Response::new(&mut fields);
        let len = match parsed.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => {
                if buf.len() >= MAX_RESPONSE_HEAD {
                    return Err(H1Error::HeadTooLarge);
                }
                return Ok(None);
            }
            Err(httparse::Error::TooManyHeaders) => return Err(H1Error::Head("too many fields")),
            Err(e) => return Err(H1Error::Head(httparse_reason(e))),
        };
        if len > MAX_RESPONSE_HEAD {
            return Err(H1Error::HeadTooLarge);
        }
        let code = parsed.code.unwrap_or(0);
        let status = StatusCode::from_u16(code).map_err(|_| H1Error::Head("status code"))?;
        let version = if parsed.version == Some(1) {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        if (100..200).contains(&code) && code != 101 {
            let _ = buf.split_to(len);
            continue;
        }
        if code == 101 && !asked.upgrade {
            return Err(H1Error::Unexpected101);
        }

        // Field spans relative to the head, so the values can share its bytes.
        let base = buf.as_ptr() as usize;
        let span = |s: &[u8]| {
            let start = s.as_ptr() as usize - base;
            start..start + s.len()
        };
        let count = parsed.headers.len();
        let mut spans: [(Range<usize>, Range<usize>); MAX_RESPONSE_HEADERS] =
            std::array::from_fn(|_| (0..0, 0..0));
        for (slot, h) in spans.iter_mut().zip(parsed.headers.iter()) {
            *slot = (span(h.name.as_bytes()), span(h.value));
        }
        let head: Bytes = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(count);
        for (name, value) in spans.into_iter().take(count) {
            let name =
                HeaderName::from_bytes(&head[name]).map_err(|_| H1Error::Head("field name"))?;
            let value = HeaderValue::from_maybe_shared(head.slice(value))
                .map_err(|_| H1Error::Head("field value"))?;
            headers.append(name, value);
        }
        let (body, keep_alive) = response_framing(&mut headers, version, code, asked)?;
        let mut parts = http::Response::new(()).into_parts().0;
        parts.status = status;
        parts.version = version;
        parts.headers = headers;
        return Ok(Some(ResponseHead {
            parts,
            body,
            keep_alive,
        }));
    }
}

fn httparse_reason(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "field name",
        httparse::Error::HeaderValue => "field value",
        httparse::Error::NewLine => "line ending",
        httparse::Error::Status => "status code",
        httparse::Error::Token => "token",
        httparse::Error::TooManyHeaders => "too many fields",
        httparse::Error::Version => "version",
    }
}

/// The response's body framing and whether the connection stays usable;
/// removes the framing fields from `headers` (RFC 9112 §6.3).
///
/// - `HEAD`, 204, 304: no body (`Content-Length` kept as information);
/// - `Transfer-Encoding`: exactly `chunked` (one coding, HTTP/1.1) or the
///   response is refused; with a `Content-Length` beside it, chunked wins,
///   the length is dropped and the connection is not reused;
/// - `Content-Length`: digits only, every value identical;
/// - neither: the body runs to the end of the connection.
pub fn response_framing(
    headers: &mut HeaderMap,
    version: Version,
    code: u16,
    asked: Asked,
) -> Result<(BodyKind, bool), H1Error> {
    let mut keep_alive = version == Version::HTTP_11;
    for v in headers.get_all(header::CONNECTION) {
        for t in v.as_bytes().split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            if t.eq_ignore_ascii_case(b"close") {
                keep_alive = false;
            } else if t.eq_ignore_ascii_case(b"keep-alive") && version == Version::HTTP_10 {
                keep_alive = true;
            }
        }
    }
    if code == 101 {
        return Ok((BodyKind::Upgrade, false));
    }
    if asked.head || code == 204 || code == 304 {
        if !content_length(headers).is_ok_and(|l| l.is_some()) {
            headers.remove(header::CONTENT_LENGTH);
        }
        headers.remove(header::TRANSFER_ENCODING);
        return Ok((BodyKind::Empty, keep_alive));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        let mut codings = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii);
        let only_chunked = codings
            .next()
            .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
            && codings.next().is_none();
        if !only_chunked || version != Version::HTTP_11 {
            return Err(H1Error::TransferCoding);
        }
        if headers.remove(header::CONTENT_LENGTH).is_some() {
            // Both: chunked frames the body; the connection is not trusted after.
            keep_alive = false;
        }
        headers.remove(header::TRANSFER_ENCODING);
        return Ok((BodyKind::Chunked, keep_alive));
    }
    match content_length(headers)? {
        Some(n) => {
            headers.remove(header::CONTENT_LENGTH);
            Ok((BodyKind::Length(n), keep_alive))
        }
        None => Ok((BodyKind::UntilClose, false)),
    }
}

/// The value of every `Content-Length` field (comma lists included), when
/// all are identical runs of digits; `Ok(None)` when there is none.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, H1Error> {
    let mut length: Option<u64> = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for t in v.as_bytes().split(|&b| b == b',') {
            let n = parse_digits(t.trim_ascii()).ok_or(H1Error::BadLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(H1Error::BadLength);
            }
            length = Some(n);
        }
    }
    Ok(length)
}

/// A non-empty run of ASCII digits as a u64 (no sign, no overflow).
pub fn parse_digits(t: &[u8]) -> Option<u64> {
    if t.is_empty() {
        return None;
    }
    t.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

// ---------------------------------------------------------------------------
// Chunked bodies
// ---------------------------------------------------------------------------

/// Where a chunked body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Expecting the first hex digit of a chunk size.
    Start,
    /// In the hex digits (value so far, digits so far).
    Size(u64, u8),
    /// Whitespace after the size.
    SizeWs(u64),
    /// In a chunk extension (bytes so far).
    Ext(u64, usize),
    /// Expecting the LF of the size line.
    SizeLf(u64),
    /// This many data bytes left.
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    /// Expecting the LF of the final empty line.
    EndLf,
    Done,
}

/// What [`ChunkDecoder::decode`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// Chunk data at this range of the input (everything before its end is consumed).
    Data(Range<usize>),
    /// The input is used up; more bytes are needed.
    NeedMore,
    /// The body is complete (trailers skipped).
    End,
}

/// A strict decoder of `Transfer-Encoding: chunked`: hex sizes of at most 16
/// digits, optional whitespace and extensions, CRLF everywhere (a bare LF
/// is an error), trailers skipped up to [`MAX_TRAILERS`] bytes.
#[derive(Debug, Clone)]
pub struct ChunkDecoder {
    state: ChunkState,
    trailer_bytes: usize,
}

impl Default for ChunkDecoder {
    fn default() -> Self {
        ChunkDecoder::new()
    }
}

impl ChunkDecoder {
    pub fn new() -> ChunkDecoder {
        ChunkDecoder {
            state: ChunkState::Start,
            trailer_bytes: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Consumes framing bytes of `input` until chunk data, the end of the
    /// body or the end of the input; returns how many bytes were consumed
    /// (data included) and what was found.
    pub fn decode(&mut self, input: &[u8]) -> Result<(usize, Decoded), H1Error> {
        use ChunkState as S;
        let mut i = 0;
        while i < input.len() {
            if let S::Data(left) = self.state {
                let take = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(input.len() - i);
                let left = left - take as u64;
                self.state = if left == 0 { S::DataCr } else { S::Data(left) };
                return Ok((i + take, Decoded::Data(i..i + take)));
            }
            if self.state == S::Done {
                return Ok((i, Decoded::End));
            }
            let b = input[i];
            i += 1;
            self.state = match (self.state, b) {
                (S::Start, b) => S::Size(u64::from(hex(b).ok_or(H1Error::Chunk("chunk size"))?), 1),
                (S::Size(n, d), b) if hex(b).is_some() => {
                    if d >= MAX_CHUNK_DIGITS {
                        return Err(H1Error::Chunk("chunk size too long"));
                    }
                    let v = n
                        .checked_mul(16)
                        .and_then(|n| n.checked_add(u64::from(hex(b).unwrap_or(0))))
                        .ok_or(H1Error::Chunk("chunk size overflow"))?;
                    S::Size(v, d + 1)
                }
                (S::Size(n, _) | S::SizeWs(n), b' ' | b'\t') => S::SizeWs(n),
                (S::Size(n, _) | S::SizeWs(n), b';') => S::Ext(n, 0),
                (S::Size(n, _) | S::SizeWs(n) | S::Ext(n, _), b'\r') => S::SizeLf(n),
                (S::Ext(n, len), b) if b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80 => {
                    if len >= MAX_CHUNK_EXT {
                        return Err(H1Error::Chunk("chunk extension too long"));
                    }
                    S::Ext(n, len + 1)
                }
                (S::SizeLf(0), b'\n') => S::TrailerStart,
                (S::SizeLf(n), b'\n') => S::Data(n),
                (S::DataCr, b'\r') => S::DataLf,
                (S::DataLf, b'\n') => S::Start,
                (S::DataCr | S::DataLf, _) => {
                    return Err(H1Error::Chunk("chunk data overruns its size"))
                }
                (S::TrailerStart, b'\r') => S::EndLf,
                (S::TrailerStart | S::TrailerLine, b'\r' | b'\n') if b == b'\n' => {
                    return Err(H1Error::Chunk("bare LF in the trailer section"))
                }
                (S::TrailerLine, b'\r') => S::TrailerLf,
                (S::TrailerStart | S::TrailerLine, _) => {
                    self.trailer_bytes += 1;
                    if self.trailer_bytes > MAX_TRAILERS {
                        return Err(H1Error::Chunk("trailer section too large"));
                    }
                    S::TrailerLine
                }
                (S::TrailerLf, b'\n') => S::TrailerStart,
                (S::EndLf, b'\n') => S::Done,
                _ => return Err(H1Error::Chunk("chunk framing")),
            };
        }
        if self.state == S::Done {
            return Ok((i, Decoded::End));
        }
        Ok((i, Decoded::NeedMore))
    }

    /// Whether `input` (the bytes that came with a response head) holds a
    /// framing error already, without consuming anything: a response whose
    /// body is known to be broken is refused before its head is sent.
    pub fn check_ahead(&self, mut input: &[u8]) -> Result<(), H1Error> {
        let mut probe = self.clone();
        while !input.is_empty() {
            let (used, found) = probe.decode(input)?;
            input = &input[used..];
            if matches!(found, Decoded::End | Decoded::NeedMore) {
                break;
            }
        }
        Ok(())
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn framing(
        pairs: &[(&str, &str)],
        v: Version,
        code: u16,
        head: bool,
    ) -> Result<(BodyKind, bool), H1Error> {
        let mut h = headers(pairs);
        response_framing(
            &mut h,
            v,
            code,
            Asked {
                head,
                upgrade: false,
            },
        )
    }

    #[test]
    fn request_heads_carry_computed_framing_only() {
        let mut h = RequestHead::new(&Method::POST, "/a?b");
        h.header(&header::HOST, &HeaderValue::from_static("x"))
            .unwrap();
        assert_eq!(
            h.header(&header::CONTENT_LENGTH, &HeaderValue::from_static("5")),
            Err(H1Error::FramingHeader("content-length"))
        );
        assert_eq!(
            h.header(
                &header::TRANSFER_ENCODING,
                &HeaderValue::from_static("chunked")
            ),
            Err(H1Error::FramingHeader("transfer-encoding"))
        );
        assert_eq!(
            h.finish(Framing::Length(12345)),
            b"POST /a?b HTTP/1.1\r\nhost: x\r\ncontent-length: 12345\r\n\r\n".to_vec()
        );
        let h = RequestHead::new(&Method::GET, "/");
        assert_eq!(h.finish(Framing::Empty), b"GET / HTTP/1.1\r\n\r\n".to_vec());
        let h = RequestHead::new(&Method::PUT, "/u");
        assert_eq!(
            h.finish(Framing::Chunked),
            b"PUT /u HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n".to_vec()
        );
        let h = RequestHead::new(&Method::POST, "/");
        assert!(h
            .finish(Framing::Length(0))
            .ends_with(b"content-length: 0\r\n\r\n"));
        let h = RequestHead::new(&Method::POST, "/");
        assert!(h
            .finish(Framing::Length(u64::MAX))
            .ends_with(b"content-length: 18446744073709551615\r\n\r\n"));
    }

    #[test]
    fn chunks_encode() {
        let mut out = Vec::new();
        encode_chunk(&mut out, b"hello world, 26 bytes long");
        encode_chunk(&mut out, b"");
        out.extend_from_slice(CHUNKED_END);
        assert_eq!(
            out,
            b"1a\r\nhello world, 26 bytes long\r\n0\r\n\r\n".to_vec()
        );
        let mut d = ChunkDecoder::new();
        let (used, found) = d.decode(&out).unwrap();
        assert_eq!(found, Decoded::Data(4..30));
        let (_, found) = d.decode(&out[used..]).unwrap();
        assert_eq!(found, Decoded::End);
    }

    #[test]
    fn framing_follows_rfc9112() {
        let v11 = Version::HTTP_11;
        let cl = &[("content-length", "5")][..];
        assert_eq!(
            framing(cl, v11, 200, false).unwrap(),
            (BodyKind::Length(5), true)
        );
        assert_eq!(
            framing(cl, v11, 200, true).unwrap(),
            (BodyKind::Empty, true)
        );
        assert_eq!(
            framing(cl, v11, 304, false).unwrap(),
            (BodyKind::Empty, true)
        );
        assert_eq!(
            framing(cl, v11, 204, false).unwrap(),
            (BodyKind::Empty, true)
        );
        assert_eq!(
            framing(cl, Version::HTTP_10, 200, false).unwrap(),
            (BodyKind::Length(5), false)
        );
        assert_eq!(
            framing(
                &[("content-length", "5"), ("connection", "keep-alive")],
                Version::HTTP_10,
                200,
                false
            )
            .unwrap(),
            (BodyKind::Length(5), true)
        );
        let same = &[("content-length", "5, 5"), ("content-length", "5")][..];
        assert_eq!(
            framing(same, v11, 200, false).unwrap(),
            (BodyKind::Length(5), true)
        );
        for bad in ["5, 6", "+5", "-1", "0x5", "", "5 5", "99999999999999999999"] {
            assert_eq!(
                framing(&[("content-length", bad)], v11, 200, false),
                Err(H1Error::BadLength),
                "{bad:?}"
            );
        }
        assert_eq!(
            framing(&[("transfer-encoding", "chunked")], v11, 200, false).unwrap(),
            (BodyKind::Chunked, true)
        );
        assert_eq!(
            framing(&[("transfer-encoding", "Chunked")], v11, 200, false).unwrap(),
            (BodyKind::Chunked, true)
        );
        for bad in [
            "gzip, chunked",
            "chunked, gzip",
            "gzip",
            "chunked, chunked",
            "identity",
            "",
        ] {
            assert_eq!(
                framing(&[("transfer-encoding", bad)], v11, 200, false),
                Err(H1Error::TransferCoding),
                "{bad:?}"
            );
        }
        assert_eq!(
            framing(
                &[
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", "chunked")
                ],
                v11,
                200,
                false
            ),
            Err(H1Error::TransferCoding)
        );
        assert_eq!(
            framing(
                &[("transfer-encoding", "chunked")],
                Version::HTTP_10,
                200,
                false
            ),
            Err(H1Error::TransferCoding)
        );
        // CL + TE: chunked wins, the length goes, the connection is not reused.
        let mut h = headers(&[("transfer-encoding", "chunked"), ("content-length", "3")]);
        assert_eq!(
            response_framing(&mut h, v11, 200, Asked::default()).unwrap(),
            (BodyKind::Chunked, false)
        );
        assert!(
            h.get(header::CONTENT_LENGTH).is_none() && h.get(header::TRANSFER_ENCODING).is_none()
        );
        assert_eq!(
            framing(&[], v11, 200, false).unwrap(),
            (BodyKind::UntilClose, false)
        );
        assert_eq!(
            framing(
                &[("content-length", "0"), ("connection", "keep-alive, Close")],
                v11,
                200,
                false
            )
            .unwrap(),
            (BodyKind::Length(0), false)
        );
        // The length of a HEAD answer is information, kept; framing fields of bodies go.
        let mut h = headers(&[("content-length", "42")]);
        response_framing(
            &mut h,
            v11,
            200,
            Asked {
                head: true,
                upgrade: false,
            },
        )
        .unwrap();
        assert_eq!(h.get(header::CONTENT_LENGTH).unwrap(), "42");
        let mut h = headers(&[("content-length", "42")]);
        response_framing(&mut h, v11, 200, Asked::default()).unwrap();
        assert!(h.get(header::CONTENT_LENGTH).is_none());
    }

    #[test]
    fn response_heads_parse_and_skip_interim() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: b\r\n\r\nokREST"[..],
        );
        let head = parse_response(&mut buf, Asked::default()).unwrap().unwrap();
        assert_eq!(head.parts.status, 200);
        assert_eq!(head.body, BodyKind::Length(2));
        assert_eq!(head.parts.headers.get("x-a").unwrap(), "b");
        assert_eq!(&buf[..], b"okREST");
        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-le"[..]);
        assert!(parse_response(&mut partial, Asked::default())
            .unwrap()
            .is_none());
        let mut upgrade =
            BytesMut::from(&b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n"[..]);
        assert_eq!(
            parse_response(&mut upgrade.clone(), Asked::default()).unwrap_err(),
            H1Error::Unexpected101
        );
        let head = parse_response(
            &mut upgrade,
            Asked {
                head: false,
                upgrade: true,
            },
        )
        .unwrap()
        .unwrap();
        assert_eq!(head.body, BodyKind::Upgrade);
        for bad in [
            &b"HTTP/1.1 2000 OK\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n x: folded\r\n\r\n",
            b"HTTP/2.0 200 OK\r\n\r\n",
        ] {
            assert!(
                parse_response(&mut BytesMut::from(bad), Asked::default()).is_err(),
                "{bad:?}"
            );
        }
        let mut huge = BytesMut::from(&b"HTTP/1.1 200 OK\r\n"[..]);
        huge.extend_from_slice(&vec![b'a'; MAX_RESPONSE_HEAD]);
        assert_eq!(
            parse_response(&mut huge, Asked::default()).unwrap_err(),
            H1Error::HeadTooLarge
        );
    }

    /// Decodes `input` fed in pieces of `step` bytes; the data and whether it ended.
    fn decode_all(input: &[u8], step: usize) -> Result<(Vec<u8>, bool, usize), H1Error> {
        let mut d = ChunkDecoder::new();
        let mut data = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut consumed_total = 0;
        for piece in input.chunks(step.max(1)) {
            pending.extend_from_slice(piece);
            loop {
                let (used, found) = d.decode(&pending)?;
                if let Decoded::Data(r) = &found {
                    data.extend_from_slice(&pending[r.clone()]);
                }
                pending.drain(..used);
                consumed_total += used;
                match found {
                    Decoded::End => return Ok((data, true, consumed_total)),
                    Decoded::NeedMore => break,
                    Decoded::Data(_) => {}
                }
            }
        }
        Ok((data, false, consumed_total))
    }

    #[test]
    fn chunked_bodies_decode_strictly() {
        let good: &[(&[u8], &[u8])] = &[
            (b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"5;ext=1\r\nhello\r\n0;x\r\n\r\n", b"hello"),
            (b"5 ;a=b\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"5\t\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"A\r\n0123456789\r\n1\r\nx\r\n0\r\n\r\n", b"0123456789x"),
            (b"0\r\nx-trailer: 1\r\ny: 2\r\n\r\n", b""),
            (b"0000000000000005\r\nhello\r\n0\r\n\r\n", b"hello"),
        ];
        for (input, want) in good {
            for step in [1, 2, 3, 7, input.len()] {
                let (data, ended, used) = decode_all(input, step).unwrap();
                assert_eq!(
                    &data,
                    want,
                    "{:?} step {step}",
                    String::from_utf8_lossy(input)
                );
                assert!(ended);
                assert_eq!(used, input.len(), "everything consumed, nothing beyond");
            }
        }
        // What follows the body is not consumed.
        let (_, ended, used) = decode_all(b"0\r\n\r\nGET / HTTP/1.1\r\n", 100).unwrap();
        assert!(ended);
        assert_eq!(used, 5);
        let bad: &[&[u8]] = &[
            b"g\r\n",
            b"\r\n",
            b" 5\r\nhello\r\n",
            b"+5\r\nhello\r\n",
            b"0x5\r\nhello\r\n",
            b"5\nhello\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhelloX\r\n",
            b"5 5\r\nhello\r\n",
            b"5;a\nb\r\n",
            b"5;\x01\r\n",
            b"0\r\nx: 1\n\r\n",
            b"0\r\n\n",
            b"00000000000000005\r\n",
            b"ffffffffffffffff0\r\n",
        ];
        for input in bad {
            assert!(
                decode_all(input, 100).is_err(),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        let mut big = b"0\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_TRAILERS + 1));
        assert!(decode_all(&big, 1000).is_err());
    }

    #[test]
    fn check_ahead_sees_errors_without_consuming() {
        let d = ChunkDecoder::new();
        assert!(d.check_ahead(b"5\r\nhel").is_ok());
        assert!(d.check_ahead(b"5\r\nhello\r\n0\r\n\r\n").is_ok());
        assert!(d.check_ahead(b"zz\r\n").is_err());
        assert!(d.check_ahead(b"5\r\nhello!!").is_err());
        assert!(d.check_ahead(b"").is_ok());
    }
}
