//! A client connection's own plain-HTTP/1.1 link to the app, driven inline
//! by the request that uses it.
//!
//! hyper's client connection runs as a task of its own: every forwarded
//! request crosses two channels and wakes two extra tasks, and the head is
//! copied through hyper's buffers twice. For the common case — an HTTP/1
//! client's request without a body or with a `Content-Length`, to a
//! plain-HTTP app — keygate writes the request head itself in one `write`
//! (then streams the client's body, watching for an answer that comes before
//! the body is all sent), parses the response head with `httparse` (hyper's
//! parser), and streams the body straight from the socket into the client's
//! response. The link goes back to its client connection
//! ([`Home`]) the moment the response body is complete, ready for that
//! connection's next request; a link whose response did not end cleanly is
//! closed, never reused.
//!
//! Framing follows RFC 9112 §6.3: no body for `HEAD`, 1xx, 204 and 304;
//! `Transfer-Encoding` ending in `chunked` is decoded (trailers dropped);
//! otherwise `Content-Length` (every value identical, digits only); otherwise
//! the body runs to the end of the connection. Anything malformed is an error
//! (the client gets 502), and the link is dropped.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Most header fields accepted in a response (hyper's default).
const MAX_HEADERS: usize = 100;
/// Largest response head accepted (hyper's default buffer limit).
const MAX_HEAD: usize = 8192 + 4096 * 100;
/// Longest chunk-size line, and total trailer section, accepted.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 64 * 1024;
/// Request body bytes sent in the same write as the head when already here.
const COALESCE_BYTES: usize = 16 * 1024;
/// Read buffer: first allocation, and the room made before each body read.
const READ_INITIAL: usize = 8 * 1024;
const READ_CHUNK: usize = 32 * 1024;

/// Where a client connection keeps its idle link between requests.
pub type Home = Arc<Mutex<Option<Link>>>;

/// A client connection's right to an own link (counted against a cap), and
/// the connection itself once dialled.
pub struct Link {
    conn: Option<Conn>,
    count: Arc<AtomicUsize>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Link {
    /// A new (not yet connected) link while fewer than `cap` exist.
    pub fn lease(count: &Arc<AtomicUsize>, cap: usize) -> Option<Link> {
        if count.fetch_add(1, Ordering::AcqRel) < cap {
            Some(Link {
                conn: None,
                count: count.clone(),
            })
        } else {
            count.fetch_sub(1, Ordering::AcqRel);
            None
        }
    }

    /// Frees the read buffer of an idle link (a parked client connection's).
    pub fn release_buffer(&mut self) {
        if let Some(c) = &mut self.conn {
            if c.buf.is_empty() {
                c.buf = BytesMut::new();
            }
        }
    }

    /// Drops the connection if the app closed it (or sent something
    /// unsolicited) while it sat idle; a later send dials afresh.
    pub fn check_idle(&mut self) {
        if let Some(c) = &self.conn {
            let mut probe = [0u8; 1];
            match c.io.try_read(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                _ => self.conn = None,
            }
        }
    }
}

/// What the app is dialled at.
pub struct Target {
    /// `host:port`, resolved at each connect.
    pub addr: String,
    pub connect_timeout: Duration,
}

struct Conn {
    io: TcpStream,
    buf: BytesMut,
}

/// Why a round trip failed (all of them mean 502 to the client).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("connect to the app failed: {0}")]
    Connect(io::Error),
    #[error("connect to the app timed out")]
    ConnectTimeout,
    #[error("writing the request failed: {0}")]
    Write(io::Error),
    #[error("reading the response failed: {0}")]
    Read(io::Error),
    #[error("the app closed the connection before answering")]
    Closed,
    #[error("malformed response head: {0}")]
    Parse(httparse::Error),
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("invalid Content-Length in the response")]
    BadLength,
    #[error("the app answered 101 Switching Protocols to a request without an upgrade")]
    Unexpected101,
    #[error("the response body ended early or was malformed: {0}")]
    Body(&'static str),
    #[error("the client's request body failed: {0}")]
    RequestBody(BoxError),
}

impl LinkError {
    /// Failed before any byte of a response arrived on a reused connection:
    /// the app most likely closed it while idle.
    fn stale(&self) -> bool {
        matches!(self, LinkError::Write(_) | LinkError::Closed)
            || matches!(self, LinkError::Read(e) if e.kind() == io::ErrorKind::ConnectionReset)
    }
}

/// One request: its serialized head and, for a request with a
/// `Content-Length`, the client's body to stream after it.
pub struct Request<'a, B> {
    pub head: &'a [u8],
    /// `HEAD`: the response has no body whatever its headers say.
    pub head_method: bool,
    /// Safe to send again when a reused connection turns out dead (never
    /// with a body: it cannot be replayed).
    pub idempotent: bool,
    pub body: Option<B>,
}

/// Send `req` on `link` (dialling when it has no connection) and return the
/// response with its body streaming from the link. The link goes back to
/// `home` when the response is complete and the connection reusable.
pub async fn send<B>(
    mut link: Link,
    target: &Target,
    home: &Home,
    mut req: Request<'_, B>,
) -> Result<Response<LinkBody>, LinkError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    // Decided before the first attempt takes the body: a body cannot be replayed.
    let replayable = req.idempotent && req.body.is_none();
    loop {
        let (mut conn, reused) = match link.conn.take() {
            Some(c) => (c, true),
            // Boxed: dialling (DNS included) is rare and its future large.
            None => (Box::pin(connect(target)).await?, false),
        };
        match conn.round_trip(&mut req).await {
            Ok((parts, framing, keep_alive)) => {
                link.conn = Some(conn);
                let mut body = LinkBody {
                    link: Some(link),
                    home: home.clone(),
                    framing,
                    keep_alive,
                };
                if body.framing == Framing::Length(0) {
                    body.finish();
                }
                return Ok(Response::from_parts(parts, body));
            }
            Err(e) if reused && replayable && e.stale() => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn connect(target: &Target) -> Result<Conn, LinkError> {
    let dial = async {
        let mut last = None;
        for addr in tokio::net::lookup_host(target.addr.as_str()).await? {
            match TcpStream::connect(addr).await {
                Ok(io) => {
                    io.set_nodelay(true)?;
                    return Ok(io);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("the app's host resolved to no address")))
    };
    match tokio::time::timeout(target.connect_timeout, dial).await {
        Ok(Ok(io)) => Ok(Conn {
            io,
            buf: BytesMut::new(),
        }),
        Ok(Err(e)) => Err(LinkError::Connect(e)),
        Err(_) => Err(LinkError::ConnectTimeout),
    }
}

impl Conn {
    async fn round_trip<B>(
        &mut self,
        req: &mut Request<'_, B>,
    ) -> Result<(http::response::Parts, Framing, bool), LinkError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        if self.buf.capacity() == 0 {
            self.buf.reserve(READ_INITIAL);
        }
        if let Some(body) = req.body.take() {
            // The app may answer before it has read the whole body (413,
            // 401…): that answer is relayed, and the connection is not
            // reused (the app did not read the rest).
            if let Some((parts, framing, _)) = self.send_with_body(req, body).await? {
                return Ok((parts, framing, false));
            }
        } else {
            self.io
                .write_all(req.head)
                .await
                .map_err(LinkError::Write)?;
        }
        loop {
            if !self.buf.is_empty() {
                if let Some(head) = self.parse_head(req.head_method)? {
                    return Ok(head);
                }
                if self.buf.len() >= MAX_HEAD {
                    return Err(LinkError::HeadTooLarge);
                }
            }
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(READ_INITIAL);
            }
            let n = self
                .io
                .read_buf(&mut self.buf)
                .await
                .map_err(LinkError::Read)?;
            if n == 0 {
                return Err(if self.buf.is_empty() {
                    LinkError::Closed
                } else {
                    LinkError::Read(io::ErrorKind::UnexpectedEof.into())
                });
            }
        }
    }

    /// Writes the head and streams `body` after it; `Some` when the app
    /// answered before the body was all sent.
    async fn send_with_body<B>(
        &mut self,
        req: &Request<'_, B>,
        mut body: B,
    ) -> Result<Option<(http::response::Parts, Framing, bool)>, LinkError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        use futures_util::FutureExt;
        use http_body_util::BodyExt;
        // The head and as much of the body as is already here go out in one
        // write (one segment and one wake-up of the app for a small body).
        let mut first = Vec::with_capacity(req.head.len() + 4096);
        first.extend_from_slice(req.head);
        let mut ended = false;
        while first.len() < COALESCE_BYTES {
            match body.frame().now_or_never() {
                None => break,
                Some(None) => {
                    ended = true;
                    break;
                }
                Some(Some(Err(e))) => return Err(LinkError::RequestBody(e.into())),
                Some(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        first.extend_from_slice(data);
                    }
                }
            }
        }
        if let Some(answer) = self.write_unless_answered(&first, req.head_method).await? {
            return Ok(Some(answer));
        }
        if ended {
            return Ok(None);
        }
        loop {
            let frame = tokio::select! {
                biased;
                answer = answered(&self.io, &mut self.buf, req.head_method) => {
                    return answer.map(Some)
                }
                frame = body.frame() => frame,
            };
            match frame {
                None => return Ok(None),
                Some(Err(e)) => return Err(LinkError::RequestBody(e.into())),
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        if let Some(answer) =
                            self.write_unless_answered(data, req.head_method).await?
                        {
                            return Ok(Some(answer));
                        }
                    }
                }
            }
        }
    }

    /// Writes all of `data` unless a complete response head arrives first.
    async fn write_unless_answered(
        &mut self,
        mut data: &[u8],
        head_method: bool,
    ) -> Result<Option<(http::response::Parts, Framing, bool)>, LinkError> {
        let Conn { io, buf } = self;
        while !data.is_empty() {
            tokio::select! {
                biased;
                answer = answered(io, buf, head_method) => return answer.map(Some),
                ready = io.writable() => {
                    ready.map_err(LinkError::Write)?;
                    match io.try_write(data) {
                        Ok(n) => data = &data[n..],
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(LinkError::Write(e)),
                    }
                }
            }
        }
        Ok(None)
    }

    /// A complete final response head at the start of the buffer, consumed;
    /// `None` when more bytes are needed. Interim (1xx) responses are skipped.
    fn parse_head(
        &mut self,
        head_method: bool,
    ) -> Result<Option<(http::response::Parts, Framing, bool)>, LinkError> {
        parse_head(&mut self.buf, head_method)
    }
}

/// Resolves once the app has sent a complete response head (or closed, or
/// sent garbage) while the request is still being written; pending otherwise.
async fn answered(
    io: &TcpStream,
    buf: &mut BytesMut,
    head_method: bool,
) -> Result<(http::response::Parts, Framing, bool), LinkError> {
    loop {
        io.readable().await.map_err(LinkError::Read)?;
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(READ_INITIAL);
        }
        match io.try_read_buf(buf) {
            Ok(0) => return Err(LinkError::Read(io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => {
                if let Some(head) = parse_head(buf, head_method)? {
                    return Ok(head);
                }
                if buf.len() >= MAX_HEAD {
                    return Err(LinkError::HeadTooLarge);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(LinkError::Read(e)),
        }
    }
}

/// A complete final response head at the start of `buf`, consumed; `None`
/// when more bytes are needed. Interim (1xx) responses are skipped.
fn parse_head(
    buf: &mut BytesMut,
    head_method: bool,
) -> Result<Option<(http::response::Parts, Framing, bool)>, LinkError> {
    loop {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut fields);
        let len = match parsed.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(LinkError::Parse(e)),
        };
        let code = parsed.code.unwrap_or(0);
        if (100..200).contains(&code) {
            if code == 101 {
                return Err(LinkError::Unexpected101);
            }
            let _ = buf.split_to(len);
            if buf.is_empty() {
                return Ok(None);
            }
            continue;
        }
        let status =
            StatusCode::from_u16(code).map_err(|_| LinkError::Parse(httparse::Error::Status))?;
        let version = if parsed.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };

        // Where each field sits in the head; values become slices of the
        // head once it is split off the buffer (no copy).
        let base = buf.as_ptr() as usize;
        let span = |s: &[u8]| {
            let start = s.as_ptr() as usize - base;
            start..start + s.len()
        };
        let mut spans: [(std::ops::Range<usize>, std::ops::Range<usize>); MAX_HEADERS] =
            std::array::from_fn(|_| (0..0, 0..0));
        let count = parsed.headers.len();
        for (slot, h) in spans.iter_mut().zip(parsed.headers.iter()) {
            *slot = (span(h.name.as_bytes()), span(h.value));
        }
        let head: Bytes = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(count);
        for (name, value) in spans.into_iter().take(count) {
            let name = HeaderName::from_bytes(&head[name])
                .map_err(|_| LinkError::Parse(httparse::Error::HeaderName))?;
            let value = HeaderValue::from_maybe_shared(head.slice(value))
                .map_err(|_| LinkError::Parse(httparse::Error::HeaderValue))?;
            headers.append(name, value);
        }

        let (framing, keep_alive) = framing(&headers, version, code, head_method)?;
        let mut parts = Response::new(()).into_parts().0;
        parts.status = status;
        parts.version = version;
        parts.headers = headers;
        return Ok(Some((parts, framing, keep_alive)));
    }
}

/// How the response body is delimited, and whether the connection can carry
/// another request after it (RFC 9112 §6.3, §9.3).
fn framing(
    headers: &HeaderMap,
    version: Version,
    code: u16,
    head_method: bool,
) -> Result<(Framing, bool), LinkError> {
    let mut keep_alive = version == Version::HTTP_11;
    for v in headers.get_all(header::CONNECTION) {
        if v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
        {
            keep_alive = false;
        }
    }
    if head_method || code == 204 || code == 304 {
        return Ok((Framing::Length(0), keep_alive));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        let last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .rfind(|t| !t.is_empty());
        if headers.contains_key(header::CONTENT_LENGTH) {
            // Both: Transfer-Encoding wins, and the connection is not trusted after.
            keep_alive = false;
        }
        return Ok(match last {
            Some(t) if t.eq_ignore_ascii_case(b"chunked") => {
                (Framing::Chunked(Chunk::Size), keep_alive)
            }
            _ => (Framing::Close, false),
        });
    }
    let mut length: Option<u64> = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for t in v.as_bytes().split(|&b| b == b',') {
            let t = t.trim_ascii();
            if t.is_empty() || t.len() > 19 || !t.iter().all(u8::is_ascii_digit) {
                return Err(LinkError::BadLength);
            }
            let n: u64 = std::str::from_utf8(t)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or(LinkError::BadLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(LinkError::BadLength);
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => (Framing::Length(n), keep_alive),
        None => (Framing::Close, false),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes left.
    Length(u64),
    Chunked(Chunk),
    /// Until the app closes the connection.
    Close,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// This many bytes of chunk data left.
    Data(u64),
    /// Expecting the CRLF after chunk data.
    DataEnd,
    /// In the trailer section (this many bytes seen), up to the empty line.
    Trailers(usize),
}

/// The app's response body, read from the link as the client takes it.
pub struct LinkBody {
    link: Option<Link>,
    home: Home,
    framing: Framing,
    keep_alive: bool,
}

impl std::fmt::Debug for LinkBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkBody")
            .field("framing", &self.framing)
            .finish_non_exhaustive()
    }
}

impl LinkBody {
    /// The body is complete: the link goes home if it can carry another request.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let Some(link) = self.link.take() {
            let clean = link.conn.as_ref().is_some_and(|c| c.buf.is_empty());
            if self.keep_alive && clean {
                if let Ok(mut slot) = self.home.lock() {
                    *slot = Some(link);
                }
            }
        }
    }

    fn fail(&mut self, why: &'static str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.framing = Framing::Done;
        self.link = None;
        Poll::Ready(Some(Err(Box::new(LinkError::Body(why)))))
    }
}

impl Conn {
    /// Reads more of the body into the buffer; `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(READ_CHUNK);
        }
        loop {
            ready!(self.io.poll_read_ready(cx))?;
            match self.io.try_read_buf(&mut self.buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }
}

/// The next line in `buf`: `Some(Ok(len))` when it ends in CRLF at
/// `len` (the line takes `len + 2` bytes), `Some(Err(()))` for a bare LF.
fn line(buf: &[u8]) -> Option<Result<usize, ()>> {
    let lf = buf.iter().position(|&b| b == b'\n')?;
    Some(if lf > 0 && buf[lf - 1] == b'\r' {
        Ok(lf - 1)
    } else {
        Err(())
    })
}

/// The bytes the first line of `buf` takes, CRLF included (it has one).
fn line_len(buf: &[u8]) -> usize {
    buf.iter()
        .position(|&b| b == b'\n')
        .map_or(buf.len(), |lf| lf + 1)
}

/// `1a;name=value` → 26 (extensions ignored; hex digits only, at most 16).
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line
        .iter()
        .position(|&b| b == b';' || b == b' ' || b == b'\t')
        .unwrap_or(line.len());
    let (hex, rest) = line.split_at(digits);
    if hex.is_empty() || hex.len() > 16 {
        return None;
    }
    let rest = rest.trim_ascii_start();
    if !(rest.is_empty() || rest[0] == b';') {
        return None;
    }
    let s = std::str::from_utf8(hex).ok()?;
    if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

impl Body for LinkBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.link.as_mut().and_then(|l| l.conn.as_mut()) else {
                return Poll::Ready(None);
            };
            match this.framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(n) | Framing::Chunked(Chunk::Data(n)) => {
                    if !conn.buf.is_empty() {
                        let take = conn.buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                        let data = conn.buf.split_to(take).freeze();
                        let left = n - take as u64;
                        match this.framing {
                            Framing::Length(_) => {
                                this.framing = Framing::Length(left);
                                if left == 0 {
                                    this.finish();
                                }
                            }
                            _ => {
                                this.framing = Framing::Chunked(if left == 0 {
                                    Chunk::DataEnd
                                } else {
                                    Chunk::Data(left)
                                });
                            }
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::Close => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::Chunked(Chunk::Size) => {
                    if let Some(end) = line(&conn.buf) {
                        let Some(size) = end.ok().and_then(|end| chunk_size(&conn.buf[..end]))
                        else {
                            return this.fail("invalid chunk size");
                        };
                        let _ = conn.buf.split_to(line_len(&conn.buf));
                        this.framing = Framing::Chunked(if size == 0 {
                            Chunk::Trailers(0)
                        } else {
                            Chunk::Data(size)
                        });
                        continue;
                    }
                    if conn.buf.len() > MAX_CHUNK_LINE {
                        return this.fail("chunk-size line too long");
                    }
                }
                Framing::Chunked(Chunk::DataEnd) => {
                    if let Some(end) = line(&conn.buf) {
                        if end != Ok(0) {
                            return this.fail("chunk data longer than its size");
                        }
                        let _ = conn.buf.split_to(2);
                        this.framing = Framing::Chunked(Chunk::Size);
                        continue;
                    }
                    if conn.buf.len() > 2 {
                        return this.fail("chunk data longer than its size");
                    }
                }
                Framing::Chunked(Chunk::Trailers(seen)) => {
                    if let Some(end) = line(&conn.buf) {
                        let Ok(end) = end else {
                            return this.fail("bare LF in the trailer section");
                        };
                        let used = end + 2;
                        let _ = conn.buf.split_to(used);
                        if end == 0 {
                            this.finish();
                            return Poll::Ready(None);
                        }
                        if seen + used > MAX_TRAILERS {
                            return this.fail("trailer section too large");
                        }
                        this.framing = Framing::Chunked(Chunk::Trailers(seen + used));
                        continue;
                    }
                    if seen + conn.buf.len() > MAX_TRAILERS {
                        return this.fail("trailer section too large");
                    }
                }
            }
            // Need more bytes.
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if this.framing == Framing::Close => {
                    this.framing = Framing::Done;
                    this.link = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail("the app closed the connection mid-body"),
                Ok(_) => {}
                Err(_) => return this.fail("reading the body failed"),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
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

    #[test]
    fn framing_follows_rfc9112() {
        let v11 = Version::HTTP_11;
        let cl = headers(&[("content-length", "5")]);
        assert_eq!(
            framing(&cl, v11, 200, false).unwrap(),
            (Framing::Length(5), true)
        );
        assert_eq!(
            framing(&cl, v11, 200, true).unwrap(),
            (Framing::Length(0), true)
        );
        assert_eq!(
            framing(&cl, v11, 304, false).unwrap(),
            (Framing::Length(0), true)
        );
        assert_eq!(
            framing(&cl, Version::HTTP_10, 200, false).unwrap(),
            (Framing::Length(5), false)
        );
        let same = headers(&[("content-length", "5, 5"), ("content-length", "5")]);
        assert_eq!(
            framing(&same, v11, 200, false).unwrap(),
            (Framing::Length(5), true)
        );
        for bad in ["5, 6", "+5", "-1", "0x5", "", "5 5", "99999999999999999999"] {
            let h = headers(&[("content-length", bad)]);
            assert!(framing(&h, v11, 200, false).is_err(), "{bad:?}");
        }
        let te = headers(&[("transfer-encoding", "gzip, chunked")]);
        assert_eq!(
            framing(&te, v11, 200, false).unwrap(),
            (Framing::Chunked(Chunk::Size), true)
        );
        let te_cl = headers(&[("transfer-encoding", "chunked"), ("content-length", "3")]);
        assert_eq!(
            framing(&te_cl, v11, 200, false).unwrap(),
            (Framing::Chunked(Chunk::Size), false)
        );
        let te_gzip = headers(&[("transfer-encoding", "chunked, gzip")]);
        assert_eq!(
            framing(&te_gzip, v11, 200, false).unwrap(),
            (Framing::Close, false)
        );
        assert_eq!(
            framing(&HeaderMap::new(), v11, 200, false).unwrap(),
            (Framing::Close, false)
        );
        let close = headers(&[("content-length", "0"), ("connection", "keep-alive, Close")]);
        assert_eq!(
            framing(&close, v11, 200, false).unwrap(),
            (Framing::Length(0), false)
        );
    }

    #[test]
    fn chunk_sizes_are_strict_hex() {
        assert_eq!(chunk_size(b"1a"), Some(26));
        assert_eq!(chunk_size(b"1A;name=value"), Some(26));
        assert_eq!(chunk_size(b"0"), Some(0));
        assert_eq!(chunk_size(b"10 ;x"), Some(16));
        for bad in [&b""[..], b"g", b"+1", b"0x1", b"1 2", b"11111111111111111"] {
            assert_eq!(chunk_size(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
