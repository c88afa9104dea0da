//! A strict HTTP/1.1 response reader for raw client sockets: every read is
//! bounded by a deadline, every response is parsed by [`super::wire`]
//! (RFC 9112; a response with both Content-Length and Transfer-Encoding, a
//! bad chunk, a bare LF… is [`End::Invalid`]), and the reader knows which
//! responses have no body (to `HEAD`, 1xx, 204, 304).
#![allow(dead_code)]

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use super::wire::{self, Field, Framing, Parsed, ResponseHead};

/// One final response (interim 1xx responses before it in `interim`).
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub fields: Vec<Field>,
    pub framing: Framing,
    pub body: Vec<u8>,
    pub interim: Vec<u16>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<String> {
        wire::value(&self.fields, name)
    }
    pub fn headers(&self, name: &str) -> Vec<String> {
        wire::values(&self.fields, name)
            .into_iter()
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect()
    }
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The server said it closes the connection after this response.
    pub fn closes(&self) -> bool {
        wire::connection_tokens(&self.fields)
            .iter()
            .any(|t| t == "close")
            || self.framing == Framing::Close
    }
    /// The `"error"` string of a JSON body, if it is one.
    pub fn json_error(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        v["error"].as_str().map(str::to_owned)
    }
    pub fn is_json(&self) -> bool {
        self.header("content-type")
            .is_some_and(|c| c.starts_with("application/json"))
    }
    pub fn summary(&self) -> String {
        format!(
            "{} {:?} {}",
            self.status,
            self.fields,
            wire::show(&self.body, 200)
        )
    }
}

/// Why no (further) response could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The server closed the connection between responses.
    Closed,
    /// The server closed (or reset) the connection inside a response:
    /// what had arrived of it.
    Truncated(String),
    /// Nothing more arrived before the deadline.
    Timeout(String),
    /// The bytes are not a valid response.
    Invalid(String),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Closed => write!(f, "connection closed"),
            End::Truncated(s) => write!(f, "connection closed inside a response: {s}"),
            End::Timeout(s) => write!(f, "nothing more before the deadline: {s}"),
            End::Invalid(s) => write!(f, "malformed response: {s}"),
        }
    }
}

pub struct Reader<R> {
    rd: R,
    pub buf: Vec<u8>,
    eof: bool,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(rd: R) -> Reader<R> {
        Reader {
            rd,
            buf: Vec::new(),
            eof: false,
        }
    }

    pub fn into_inner(self) -> R {
        self.rd
    }

    /// Reads more bytes; `Ok(false)` at the end of the stream (or a reset).
    pub async fn fill(&mut self, deadline: Instant) -> Result<bool, End> {
        if self.eof {
            return Ok(false);
        }
        let mut tmp = [0u8; 16 * 1024];
        match tokio::time::timeout_at(deadline, self.rd.read(&mut tmp)).await {
            Err(_) => Err(End::Timeout(format!(
                "{} bytes buffered: {}",
                self.buf.len(),
                wire::show(&self.buf, 300)
            ))),
            Ok(Ok(0)) | Ok(Err(_)) => {
                self.eof = true;
                Ok(false)
            }
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&tmp[..n]);
                Ok(true)
            }
        }
    }

    /// Waits until the connection is closed by the server (bytes before the
    /// close are kept in `buf`); `Err` with the timeout when it stays open.
    pub async fn closed(&mut self, deadline: Instant) -> Result<(), End> {
        while self.fill(deadline).await? {}
        Ok(())
    }

    /// One response head (interim or final), consumed from the buffer.
    pub async fn head(&mut self, deadline: Instant) -> Result<ResponseHead, End> {
        loop {
            match wire::parse_response_head(&self.buf) {
                Parsed::Complete(h, used) => {
                    self.buf.drain(..used);
                    return Ok(h);
                }
                Parsed::Invalid(e) => {
                    return Err(End::Invalid(format!(
                        "{e} in {}",
                        wire::show(&self.buf, 300)
                    )))
                }
                Parsed::Partial => {
                    if !self.fill(deadline).await? {
                        return Err(if self.buf.is_empty() {
                            End::Closed
                        } else {
                            End::Truncated(format!("head {}", wire::show(&self.buf, 300)))
                        });
                    }
                }
            }
        }
    }

    /// The body of a response framed `framing`, consumed from the buffer.
    pub async fn body(&mut self, framing: Framing, deadline: Instant) -> Result<Vec<u8>, End> {
        match framing {
            Framing::None => Ok(Vec::new()),
            Framing::Length(n) => {
                let n = n as usize;
                while self.buf.len() < n {
                    if !self.fill(deadline).await? {
                        return Err(End::Truncated(format!(
                            "{} of {n} body bytes: {}",
                            self.buf.len(),
                            wire::show(&self.buf, 200)
                        )));
                    }
                }
                Ok(self.buf.drain(..n).collect())
            }
            Framing::Chunked => loop {
                match wire::decode_chunked(&self.buf) {
                    Parsed::Complete(c, used) => {
                        self.buf.drain(..used);
                        return Ok(c.body);
                    }
                    Parsed::Invalid(e) => return Err(End::Invalid(e)),
                    Parsed::Partial => {
                        if !self.fill(deadline).await? {
                            return Err(End::Truncated(format!(
                                "chunked body without its last chunk: {}",
                                wire::show(&self.buf, 200)
                            )));
                        }
                    }
                }
            },
            Framing::Close => {
                while self.fill(deadline).await? {}
                Ok(std::mem::take(&mut self.buf))
            }
        }
    }

    /// The next final response to a request (`head_request`: its method was
    /// HEAD), after any interim 1xx responses.
    pub async fn response(
        &mut self,
        head_request: bool,
        deadline: Instant,
    ) -> Result<Response, End> {
        let mut interim = Vec::new();
        loop {
            let head = self.head(deadline).await?;
            let framing =
                wire::response_framing(head.status, &head.fields, head_request).map_err(|e| {
                    End::Invalid(format!(
                        "{e} in a {} response {:?}",
                        head.status, head.fields
                    ))
                })?;
            if (100..200).contains(&head.status) && head.status != 101 {
                interim.push(head.status);
                continue;
            }
            let body = self.body(framing, deadline).await?;
            return Ok(Response {
                status: head.status,
                fields: head.fields,
                framing,
                body,
                interim,
            });
        }
    }
}

/// A deadline `secs` from now.
pub fn deadline(within: Duration) -> Instant {
    Instant::now() + within
}
