//! One connection to the app and one exchange on it: the request head and
//! body written with keygate's own framing ([`crate::h1`]), the response
//! head parsed, the response body streamed from the socket as the client
//! takes it. Every wait has a bound: a stalled write or a missing response
//! head (`upstream.timeout`), a client body that stops arriving
//! (`listen.body_timeout`), a response body that stops arriving
//! (`upstream.read_timeout`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::time::{Instant, Sleep};

use super::io::AppIo;
use super::pool::{Home, Pool, Return};
use super::UpstreamError;
use crate::error::BoxError;
use crate::h1::{self, Asked, BodyKind, ChunkDecoder, Decoded, Framing, ResponseHead};

/// Request body bytes sent in the same write as the head when already here.
const COALESCE_BYTES: usize = 16 * 1024;
/// Read buffer: first allocation, and the room made before each read.
const READ_INITIAL: usize = 8 * 1024;
const READ_CHUNK: usize = 32 * 1024;

/// The bounds of one exchange.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// A write that makes no progress, and the wait for the response head
    /// once the request is sent (`upstream.timeout`).
    pub timeout: Duration,
    /// Between two frames of the client's request body (`listen.body_timeout`).
    pub body_timeout: Duration,
    /// Between two reads of the response body (`upstream.read_timeout`).
    pub read_timeout: Duration,
}

/// An open connection to the app, with the bytes read but not yet used.
pub struct AppConn {
    io: AppIo,
    buf: BytesMut,
    idle_since: Instant,
    /// The read-timeout timer, kept across exchanges (allocated on first use).
    timer: Option<Pin<Box<Sleep>>>,
}

impl AppConn {
    pub fn new(io: AppIo) -> AppConn {
        AppConn {
            io,
            buf: BytesMut::new(),
            idle_since: Instant::now(),
            timer: None,
        }
    }

    pub fn idle_for(&self) -> Duration {
        self.idle_since.elapsed()
    }

    pub fn mark_idle(&mut self) {
        self.idle_since = Instant::now();
    }

    /// Usable after sitting idle: nothing buffered, not closed by the app.
    pub fn alive_while_idle(&mut self) -> bool {
        self.buf.is_empty() && self.io.alive_while_idle()
    }

    /// Drops the read buffer of an idle connection (it holds no bytes).
    pub fn release_buffer(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
        self.timer = None;
    }

    /// The socket and the bytes the app sent after its 101 head (a tunnel).
    pub fn into_tunnel(self) -> (AppIo, BytesMut) {
        (self.io, self.buf)
    }

    /// Sends the request and reads the final response head. `Ok((head,
    /// early))`: `early` when the app answered before the whole request body
    /// was sent (the connection is then not reused).
    pub async fn round_trip<B>(
        &mut self,
        ex: &mut Exchange<B>,
        bounds: &Bounds,
    ) -> Result<(ResponseHead, bool), UpstreamError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        if self.buf.capacity() == 0 {
            self.buf.reserve(READ_INITIAL);
        }
        match ex.body.take() {
            None => {
                // Borrowed, not taken: a body-less request may be sent again.
                if let Some(answer) = self.write_watching(&ex.head, ex.asked, bounds).await? {
                    // Answered before the head was all written: never reused.
                    return Ok((answer, true));
                }
            }
            Some(body) => {
                if let Some(answer) = self.send_body(ex, body, bounds).await? {
                    return Ok((answer, true));
                }
            }
        }
        let answer = std::future::poll_fn(|cx| self.poll_answer(cx, ex.asked));
        match tokio::time::timeout(bounds.timeout, answer).await {
            Ok(head) => head.map(|h| (h, false)),
            Err(_) => Err(UpstreamError::HeadTimeout(bounds.timeout)),
        }
    }

    /// Streams the head and body; `Some(head)` when the app answered first.
    async fn send_body<B>(
        &mut self,
        ex: &mut Exchange<B>,
        mut body: B,
        bounds: &Bounds,
    ) -> Result<Option<ResponseHead>, UpstreamError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let mut framer = Framer::new(ex.framing);
        // The head and whatever of the body is already here, in one write
        // (taken: a request with a body is never sent again).
        let mut out = std::mem::take(&mut ex.head);
        let mut ended = false;
        while out.len() < COALESCE_BYTES {
            match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).now_or_never() {
                None => break,
                Some(None) => {
                    ended = true;
                    break;
                }
                Some(Some(frame)) => framer.frame(frame, &mut out)?,
            }
        }
        if ended {
            framer.end(&mut out)?;
        }
        if let Some(head) = self.write_watching(&out, ex.asked, bounds).await? {
            return Ok(Some(head));
        }
        let mut piece = Vec::new();
        while !ended {
            let next = self.next_frame_watching(&mut body, ex.asked, bounds.body_timeout);
            let frame = match next.await? {
                Watched::Answer(head) => return Ok(Some(head)),
                Watched::Frame(frame) => frame,
            };
            piece.clear();
            match frame {
                Some(frame) => framer.frame(frame, &mut piece)?,
                None => {
                    ended = true;
                    framer.end(&mut piece)?;
                }
            }
            if let Some(head) = self.write_watching(&piece, ex.asked, bounds).await? {
                return Ok(Some(head));
            }
        }
        Ok(None)
    }

    /// Writes (and flushes) all of `data` unless a complete response head
    /// arrives first; a write that makes no progress for `timeout` fails.
    async fn write_watching(
        &mut self,
        mut data: &[u8],
        asked: Asked,
        bounds: &Bounds,
    ) -> Result<Option<ResponseHead>, UpstreamError> {
        let mut flushed = false;
        let write = std::future::poll_fn(|cx| loop {
            if let Poll::Ready(answer) = self.poll_answer(cx, asked) {
                return Poll::Ready(answer.map(Some));
            }
            if data.is_empty() {
                if !flushed {
                    ready!(Pin::new(&mut self.io).poll_flush(cx)).map_err(UpstreamError::Write)?;
                    flushed = true;
                }
                return Poll::Ready(Ok(None));
            }
            match ready!(Pin::new(&mut self.io).poll_write(cx, data)) {
                Ok(0) => {
                    return Poll::Ready(Err(UpstreamError::Write(
                        std::io::ErrorKind::WriteZero.into(),
                    )))
                }
                Ok(n) => data = &data[n..],
                Err(e) => return Poll::Ready(Err(UpstreamError::Write(e))),
            }
        });
        match tokio::time::timeout(bounds.timeout, write).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::WriteStalled(bounds.timeout)),
        }
    }

    /// The client's next body frame (`None`: the body ended), unless the app
    /// answers first; no frame within `body_timeout` fails.
    async fn next_frame_watching<B>(
        &mut self,
        body: &mut B,
        asked: Asked,
        body_timeout: Duration,
    ) -> Result<Watched, UpstreamError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let next = std::future::poll_fn(|cx| {
            if let Poll::Ready(answer) = self.poll_answer(cx, asked) {
                return Poll::Ready(answer.map(Watched::Answer));
            }
            match ready!(Pin::new(&mut *body).poll_frame(cx)) {
                None => Poll::Ready(Ok(Watched::Frame(None))),
                Some(Ok(frame)) => Poll::Ready(Ok(Watched::Frame(Some(Ok(frame))))),
                Some(Err(e)) => Poll::Ready(Err(UpstreamError::RequestBody(e.into()))),
            }
        });
        match tokio::time::timeout(body_timeout, next).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::RequestBodyTimeout(body_timeout)),
        }
    }

    /// A complete final response head from the app, when one has arrived.
    fn poll_answer(
        &mut self,
        cx: &mut Context<'_>,
        asked: Asked,
    ) -> Poll<Result<ResponseHead, UpstreamError>> {
        loop {
            if !self.buf.is_empty() {
                match h1::parse_response(&mut self.buf, asked) {
                    Ok(Some(head)) => return Poll::Ready(Ok(head)),
                    Ok(None) => {}
                    Err(e) => return Poll::Ready(Err(UpstreamError::Protocol(e))),
                }
            }
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(READ_INITIAL);
            }
            match ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.io),
                cx,
                &mut self.buf
            )) {
                Ok(0) if self.buf.is_empty() => return Poll::Ready(Err(UpstreamError::Closed)),
                Ok(0) => {
                    return Poll::Ready(Err(UpstreamError::Read(
                        std::io::ErrorKind::UnexpectedEof.into(),
                    )))
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(UpstreamError::Read(e))),
            }
        }
    }

    /// Reads more of a response body; `Ok(0)` at the end of the stream. A
    /// read that waits longer than `timeout` since `since` fails.
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        since: Instant,
        timeout: Duration,
    ) -> Poll<Result<usize, &'static str>> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(READ_CHUNK);
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf) {
            Poll::Ready(Ok(n)) => Poll::Ready(Ok(n)),
            Poll::Ready(Err(_)) => Poll::Ready(Err("reading the response body failed")),
            Poll::Pending => {
                let deadline = since + timeout;
                loop {
                    if Instant::now() >= deadline {
                        return Poll::Ready(Err("the app stopped sending its response body"));
                    }
                    let timer = self
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                    if timer.deadline() != deadline {
                        timer.as_mut().reset(deadline);
                    }
                    match timer.as_mut().poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(()) => continue,
                    }
                }
            }
        }
    }
}

enum Watched {
    Answer(ResponseHead),
    Frame(Option<Result<Frame<Bytes>, BoxError>>),
}

/// Encodes request body frames with the framing keygate chose, and holds
/// the body to it: a `Content-Length` body never sends more or fewer bytes
/// than its length; trailers are dropped.
struct Framer {
    framing: Framing,
    sent: u64,
}

impl Framer {
    fn new(framing: Framing) -> Framer {
        Framer { framing, sent: 0 }
    }

    fn frame(
        &mut self,
        frame: Result<Frame<Bytes>, impl Into<BoxError>>,
        out: &mut Vec<u8>,
    ) -> Result<(), UpstreamError> {
        let frame = frame.map_err(|e| UpstreamError::RequestBody(e.into()))?;
        let Some(data) = frame.data_ref() else {
            return Ok(()); // trailers
        };
        self.sent += data.len() as u64;
        match self.framing {
            Framing::Length(n) if self.sent > n => Err(UpstreamError::RequestBody(
                "the request body is longer than its length".into(),
            )),
            Framing::Length(_) => {
                out.extend_from_slice(data);
                Ok(())
            }
            Framing::Chunked => {
                h1::encode_chunk(out, data);
                Ok(())
            }
            Framing::Empty if data.is_empty() => Ok(()),
            Framing::Empty => Err(UpstreamError::RequestBody(
                "a request without a body sent body bytes".into(),
            )),
        }
    }

    fn end(&mut self, out: &mut Vec<u8>) -> Result<(), UpstreamError> {
        match self.framing {
            Framing::Length(n) if self.sent != n => Err(UpstreamError::RequestBody(
                "the request body ended before its length".into(),
            )),
            Framing::Chunked => {
                out.extend_from_slice(h1::CHUNKED_END);
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// One request for [`AppConn::round_trip`].
pub struct Exchange<B> {
    /// The encoded head ([`h1::RequestHead`]), its framing chosen for `body`.
    pub head: Vec<u8>,
    pub framing: Framing,
    /// `None` when there is no body to send.
    pub body: Option<B>,
    pub asked: Asked,
}

/// Where a connection goes when its response body is complete.
pub struct Back {
    pub pool: Arc<Pool>,
    pub to: Return,
    pub home: Option<Arc<Home>>,
}

#[derive(Debug)]
enum State {
    Length(u64),
    Chunked(ChunkDecoder),
    UntilClose,
    Done,
}

/// The app's response body, read from its connection as the client takes
/// it. The connection goes back (home or pool) the moment the body is
/// complete if it can carry another request; anything odd closes it.
pub struct UpstreamBody {
    conn: Option<AppConn>,
    state: State,
    keep_alive: bool,
    back: Option<Back>,
    read_timeout: Duration,
    last_read: Instant,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl UpstreamBody {
    /// The body of `kind` on `conn` (whose buffer holds what followed the head).
    /// A chunked body whose first bytes are already broken is refused here,
    /// before its head is sent to the client.
    pub fn new(
        conn: AppConn,
        kind: BodyKind,
        keep_alive: bool,
        back: Back,
        read_timeout: Duration,
    ) -> Result<UpstreamBody, UpstreamError> {
        let state = match kind {
            BodyKind::Empty | BodyKind::Length(0) => State::Length(0),
            BodyKind::Length(n) => State::Length(n),
            BodyKind::Chunked => {
                let decoder = ChunkDecoder::new();
                decoder
                    .check_ahead(&conn.buf)
                    .map_err(UpstreamError::Protocol)?;
                State::Chunked(decoder)
            }
            BodyKind::UntilClose => State::UntilClose,
            BodyKind::Upgrade => State::Done,
        };
        let mut body = UpstreamBody {
            conn: Some(conn),
            state,
            keep_alive,
            back: Some(back),
            read_timeout,
            last_read: Instant::now(),
        };
        if matches!(body.state, State::Length(0)) {
            body.finish();
        }
        Ok(body)
    }

    /// The body is complete: the connection goes back if it can carry another request.
    fn finish(&mut self) {
        self.state = State::Done;
        if let (Some(conn), Some(back)) = (self.conn.take(), self.back.take()) {
            if self.keep_alive && conn.buf.is_empty() {
                back.pool.check_in(conn, back.to, back.home.as_deref());
            }
        }
    }

    fn fail(&mut self, why: &'static str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.state = State::Done;
        self.conn = None;
        Poll::Ready(Some(Err(Box::new(UpstreamError::Body(why)))))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if !conn.buf.is_empty() {
                match &mut this.state {
                    State::Done => return Poll::Ready(None),
                    State::Length(n) => {
                        let take = conn
                            .buf
                            .len()
                            .min(usize::try_from(*n).unwrap_or(usize::MAX));
                        let data = conn.buf.split_to(take).freeze();
                        *n -= take as u64;
                        if *n == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    State::UntilClose => {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    State::Chunked(decoder) => match decoder.decode(&conn.buf) {
                        Err(_) => return this.fail("malformed chunked body"),
                        Ok((used, Decoded::Data(range))) => {
                            let piece = conn.buf.split_to(used).freeze();
                            return Poll::Ready(Some(Ok(Frame::data(piece.slice(range)))));
                        }
                        Ok((used, Decoded::End)) => {
                            let _ = conn.buf.split_to(used);
                            this.finish();
                            return Poll::Ready(None);
                        }
                        Ok((used, Decoded::NeedMore)) => {
                            let _ = conn.buf.split_to(used);
                        }
                    },
                }
            } else if matches!(this.state, State::Done) {
                return Poll::Ready(None);
            } else if matches!(this.state, State::Length(0)) {
                this.finish();
                return Poll::Ready(None);
            }
            // Need more bytes.
            match ready!(conn.poll_fill(cx, this.last_read, this.read_timeout)) {
                Ok(0) if matches!(this.state, State::UntilClose) => {
                    this.state = State::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail("the app closed the connection mid-body"),
                Ok(_) => this.last_read = Instant::now(),
                Err(why) => return this.fail(why),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
