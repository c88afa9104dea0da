//! Strict HTTP/1.1 message parsing (RFC 9112), for the test oracles: the
//! strict recording upstream parses what keygate sends the app with it, and
//! the smuggling and response-framing tests parse what keygate sends the
//! client. "Strict" means: anything a lenient parser would have to guess at
//! (bare LF or CR, obs-fold, whitespace before a colon, a second or a
//! list-valued Content-Length, Content-Length with Transfer-Encoding, a
//! transfer coding other than `chunked`, a chunk size that is not hex, a
//! missing CRLF after chunk data) is [`Parsed::Invalid`], never a guess.
//!
//! Pure functions over byte slices: the caller keeps the buffer and calls
//! again with more bytes while the answer is [`Parsed::Partial`].
#![allow(dead_code)]

/// Largest head either side accepts (keygate's own request limit is 64 KiB).
pub const MAX_HEAD: usize = 80 * 1024;
/// Longest chunk-size line or trailer line.
pub const MAX_LINE: usize = 8 * 1024;

/// One header (or trailer) field as it was on the wire: the name with its
/// case, the value without surrounding whitespace.
#[derive(Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub value: Vec<u8>,
}

impl std::fmt::Debug for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.name, String::from_utf8_lossy(&self.value))
    }
}

/// The values of every field named `name` (ASCII case-insensitive), in order.
pub fn values<'a>(fields: &'a [Field], name: &str) -> Vec<&'a [u8]> {
    fields
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case(name))
        .map(|f| f.value.as_slice())
        .collect()
}

/// The single value of `name` as text, `None` when absent.
pub fn value(fields: &[Field], name: &str) -> Option<String> {
    values(fields, name)
        .first()
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// The comma-separated tokens of every `Connection` field, lower-cased.
pub fn connection_tokens(fields: &[Field]) -> Vec<String> {
    values(fields, "connection")
        .into_iter()
        .flat_map(|v| v.split(|&b| b == b','))
        .map(|t| String::from_utf8_lossy(t.trim_ascii()).to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: String,
    pub target: String,
    pub fields: Vec<Field>,
}

#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub status: u16,
    pub reason: String,
    pub fields: Vec<Field>,
}

/// The outcome of parsing from the start of a buffer.
#[derive(Debug)]
pub enum Parsed<T> {
    /// More bytes are needed.
    Partial,
    /// A complete item, and the bytes it took.
    Complete(T, usize),
    /// The bytes can never become a valid item: why.
    Invalid(String),
}

/// How a message body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (responses only).
    Close,
}

pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The next CRLF-terminated line starting at `at`: `Ok(Some((line, next)))`,
/// `Ok(None)` when no CRLF has arrived yet, `Err` for a bare LF or CR or a
/// line longer than `max`.
fn line_at(buf: &[u8], at: usize, max: usize) -> Result<Option<(&[u8], usize)>, String> {
    let mut i = at;
    while i < buf.len() {
        match buf[i] {
            b'\n' => return Err(format!("bare LF at byte {i}")),
            b'\r' => {
                if i + 1 == buf.len() {
                    return Ok(None);
                }
                if buf[i + 1] != b'\n' {
                    return Err(format!("bare CR at byte {i}"));
                }
                return Ok(Some((&buf[at..i], i + 2)));
            }
            _ => {}
        }
        i += 1;
        if i - at > max {
            return Err(format!("line longer than {max} bytes"));
        }
    }
    Ok(None)
}

/// The lines of a head up to (not including) the empty line that ends it, and
/// the bytes the head took.
fn head_lines(buf: &[u8]) -> Parsed<Vec<&[u8]>> {
    let mut lines = Vec::new();
    let mut at = 0;
    loop {
        match line_at(buf, at, MAX_HEAD) {
            Err(e) => return Parsed::Invalid(e),
            Ok(None) => {
                return if buf.len() > MAX_HEAD {
                    Parsed::Invalid("head too large".into())
                } else {
                    Parsed::Partial
                }
            }
            Ok(Some((line, next))) => {
                at = next;
                if line.is_empty() {
                    if lines.is_empty() {
                        return Parsed::Invalid("empty line before the start line".into());
                    }
                    return Parsed::Complete(lines, at);
                }
                lines.push(line);
            }
        }
    }
}

/// `name ":" OWS value OWS`, strictly.
pub fn parse_field(line: &[u8]) -> Result<Field, String> {
    let show = || String::from_utf8_lossy(line).into_owned();
    if matches!(line.first(), Some(b' ' | b'\t')) {
        return Err(format!(
            "obs-fold (a line starting with whitespace): {:?}",
            show()
        ));
    }
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return Err(format!("field line without a colon: {:?}", show()));
    };
    let name = &line[..colon];
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(format!("invalid field name: {:?}", show()));
    }
    // OWS is SP and HTAB only (trim_ascii would also strip CR, LF, FF, VT).
    let raw = &line[colon + 1..];
    let start = raw
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(raw.len());
    let end = raw
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |e| e + 1);
    let value = &raw[start..end];
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(format!("control character in a field value: {:?}", show()));
    }
    Ok(Field {
        name: String::from_utf8_lossy(name).into_owned(),
        value: value.to_vec(),
    })
}

fn parse_fields(lines: &[&[u8]]) -> Result<Vec<Field>, String> {
    lines.iter().map(|l| parse_field(l)).collect()
}

/// A request head: `method SP target SP HTTP/1.1`, then fields. The target
/// must be origin-form (or `*`): keygate sends the app nothing else.
pub fn parse_request_head(buf: &[u8]) -> Parsed<RequestHead> {
    let (lines, used) = match head_lines(buf) {
        Parsed::Complete(l, u) => (l, u),
        Parsed::Partial => return Parsed::Partial,
        Parsed::Invalid(e) => return Parsed::Invalid(e),
    };
    let line = lines[0];
    let show = String::from_utf8_lossy(line).into_owned();
    let parts: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let [method, target, version] = parts[..] else {
        return Parsed::Invalid(format!("request line is not three words: {show:?}"));
    };
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Parsed::Invalid(format!("invalid method: {show:?}"));
    }
    if target.is_empty() || !target.iter().all(|&b| (0x21..=0x7e).contains(&b)) {
        return Parsed::Invalid(format!("invalid request target: {show:?}"));
    }
    if !(target.starts_with(b"/") || target == b"*") {
        return Parsed::Invalid(format!("request target not in origin-form: {show:?}"));
    }
    if version != b"HTTP/1.1" {
        return Parsed::Invalid(format!("not HTTP/1.1: {show:?}"));
    }
    let fields = match parse_fields(&lines[1..]) {
        Ok(f) => f,
        Err(e) => return Parsed::Invalid(e),
    };
    Parsed::Complete(
        RequestHead {
            method: String::from_utf8_lossy(method).into_owned(),
            target: String::from_utf8_lossy(target).into_owned(),
            fields,
        },
        used,
    )
}

/// A response head: `HTTP/1.1 SP 3DIGIT SP reason`, then fields.
pub fn parse_response_head(buf: &[u8]) -> Parsed<ResponseHead> {
    let (lines, used) = match head_lines(buf) {
        Parsed::Complete(l, u) => (l, u),
        Parsed::Partial => return Parsed::Partial,
        Parsed::Invalid(e) => return Parsed::Invalid(e),
    };
    let line = lines[0];
    let show = String::from_utf8_lossy(line).into_owned();
    let Some(rest) = line.strip_prefix(b"HTTP/1.1 ") else {
        return Parsed::Invalid(format!("status line is not HTTP/1.1: {show:?}"));
    };
    if rest.len() < 4 || rest[3] != b' ' || !rest[..3].iter().all(u8::is_ascii_digit) {
        return Parsed::Invalid(format!("invalid status line: {show:?}"));
    }
    let reason = &rest[4..];
    if reason
        .iter()
        .any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
    {
        return Parsed::Invalid(format!("control character in the reason: {show:?}"));
    }
    let status: u16 = std::str::from_utf8(&rest[..3]).unwrap().parse().unwrap();
    if !(100..=599).contains(&status) {
        return Parsed::Invalid(format!("status out of range: {show:?}"));
    }
    let fields = match parse_fields(&lines[1..]) {
        Ok(f) => f,
        Err(e) => return Parsed::Invalid(e),
    };
    Parsed::Complete(
        ResponseHead {
            status,
            reason: String::from_utf8_lossy(reason).into_owned(),
            fields,
        },
        used,
    )
}

/// A Content-Length value: 1*DIGIT, nothing else (no list, no sign).
fn length_value(v: &[u8]) -> Result<u64, String> {
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return Err(format!(
            "invalid Content-Length {:?}",
            String::from_utf8_lossy(v)
        ));
    }
    Ok(std::str::from_utf8(v).unwrap().parse().unwrap())
}

/// Body framing of a request. Exactly one Host is required too (RFC 9112
/// §3.2), since it is a property of the head a strict server checks first.
pub fn request_framing(fields: &[Field]) -> Result<Framing, String> {
    let hosts = values(fields, "host");
    if hosts.len() != 1 {
        return Err(format!("{} Host fields", hosts.len()));
    }
    message_framing(fields, false)
}

/// Body framing of a response to a request whose method is `HEAD` when
/// `head_request`.
pub fn response_framing(
    status: u16,
    fields: &[Field],
    head_request: bool,
) -> Result<Framing, String> {
    let te = values(fields, "transfer-encoding");
    if (100..200).contains(&status) || status == 204 {
        if !te.is_empty() {
            return Err(format!("Transfer-Encoding in a {status} response"));
        }
        if status == 204 && !values(fields, "content-length").is_empty() {
            return Err("Content-Length in a 204 response".into());
        }
        return Ok(Framing::None);
    }
    if head_request || status == 304 {
        // The fields describe the body a GET would have had; still one
        // unambiguous description.
        message_framing(fields, true)?;
        return Ok(Framing::None);
    }
    message_framing(fields, true)
}

fn message_framing(fields: &[Field], response: bool) -> Result<Framing, String> {
    let te = values(fields, "transfer-encoding");
    let cl = values(fields, "content-length");
    if !te.is_empty() {
        if !cl.is_empty() {
            return Err("Content-Length together with Transfer-Encoding".into());
        }
        if te.len() != 1 || !te[0].eq_ignore_ascii_case(b"chunked") {
            let all: Vec<String> = te
                .iter()
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect();
            return Err(format!("Transfer-Encoding other than one chunked: {all:?}"));
        }
        return Ok(Framing::Chunked);
    }
    match cl.len() {
        0 if response => Ok(Framing::Close),
        0 => Ok(Framing::None),
        1 => length_value(cl[0]).map(Framing::Length),
        n => Err(format!("{n} Content-Length fields")),
    }
}

/// A decoded chunked body.
#[derive(Debug, Clone, Default)]
pub struct Chunked {
    pub body: Vec<u8>,
    pub chunks: usize,
    pub trailers: Vec<Field>,
}

/// `*( BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ] )`.
fn chunk_ext_ok(mut s: &[u8]) -> bool {
    fn bws(s: &[u8]) -> &[u8] {
        let n = s.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
        &s[n..]
    }
    fn token(s: &[u8]) -> Option<&[u8]> {
        let n = s.iter().take_while(|&&b| is_tchar(b)).count();
        (n > 0).then(|| &s[n..])
    }
    fn quoted(s: &[u8]) -> Option<&[u8]> {
        let mut i = 1;
        while i < s.len() {
            match s[i] {
                b'"' => return Some(&s[i + 1..]),
                b'\\' => {
                    let c = *s.get(i + 1)?;
                    if c != b'\t' && c != b' ' && !(0x21..=0x7e).contains(&c) && c < 0x80 {
                        return None;
                    }
                    i += 2;
                }
                b'\t' | b' ' | 0x21 | 0x23..=0x5b | 0x5d..=0x7e | 0x80..=0xff => i += 1,
                _ => return None,
            }
        }
        None
    }
    loop {
        if s.is_empty() {
            return true;
        }
        s = bws(s);
        let Some(rest) = s.strip_prefix(b";") else {
            return false;
        };
        let Some(rest) = token(bws(rest)) else {
            return false;
        };
        s = rest;
        let after = bws(s);
        if let Some(v) = after.strip_prefix(b"=") {
            let v = bws(v);
            let next = if v.first() == Some(&b'"') {
                quoted(v)
            } else {
                token(v)
            };
            let Some(next) = next else {
                return false;
            };
            s = next;
        }
    }
}

/// A chunked body from the start of `buf`, strictly (RFC 9112 §7.1).
pub fn decode_chunked(buf: &[u8]) -> Parsed<Chunked> {
    let mut out = Chunked::default();
    let mut at = 0;
    loop {
        let (line, next) = match line_at(buf, at, MAX_LINE) {
            Err(e) => return Parsed::Invalid(format!("chunk-size line: {e}")),
            Ok(None) => return Parsed::Partial,
            Ok(Some(l)) => l,
        };
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        let show = String::from_utf8_lossy(line).into_owned();
        if digits == 0 || digits > 16 || !chunk_ext_ok(&line[digits..]) {
            return Parsed::Invalid(format!("invalid chunk-size line {show:?}"));
        }
        let size = u64::from_str_radix(std::str::from_utf8(&line[..digits]).unwrap(), 16)
            .expect("hex digits");
        at = next;
        if size == 0 {
            // trailer-section CRLF
            loop {
                let (line, next) = match line_at(buf, at, MAX_LINE) {
                    Err(e) => return Parsed::Invalid(format!("trailer section: {e}")),
                    Ok(None) => return Parsed::Partial,
                    Ok(Some(l)) => l,
                };
                at = next;
                if line.is_empty() {
                    return Parsed::Complete(out, at);
                }
                match parse_field(line) {
                    Ok(f) => out.trailers.push(f),
                    Err(e) => return Parsed::Invalid(format!("trailer: {e}")),
                }
            }
        }
        let Ok(size) = usize::try_from(size) else {
            return Parsed::Invalid(format!("chunk size {size} too large"));
        };
        if buf.len() < at + size + 2 {
            return Parsed::Partial;
        }
        out.body.extend_from_slice(&buf[at..at + size]);
        out.chunks += 1;
        at += size;
        if &buf[at..at + 2] != b"\r\n" {
            return Parsed::Invalid(format!(
                "chunk data not followed by CRLF (chunk of {size} bytes)"
            ));
        }
        at += 2;
    }
}

/// Printable form of bytes for failure messages (at most `max` bytes).
pub fn show(bytes: &[u8], max: usize) -> String {
    let cut = bytes.len().min(max);
    let mut s = format!("{:?}", String::from_utf8_lossy(&bytes[..cut]));
    if cut < bytes.len() {
        s.push_str(&format!("… (+{} bytes)", bytes.len() - cut));
    }
    s
}
