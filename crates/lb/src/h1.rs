//! The HTTP/1.1 wire format of backend connections (pure, no I/O): the request head written in
//! one buffer, the response head parsed with `httparse` into a [`HeaderMap`] whose values share
//! the read buffer, response body framing (RFC 9112 section 6.3) and the chunked decoder.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

/// Most header fields accepted in a backend response head.
pub(crate) const MAX_HEADERS: usize = 100;
/// Largest backend response head accepted.
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 4096;

/// A malformed backend response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ParseError {
    /// The response head is not valid HTTP/1.x.
    #[error("invalid response head: {0}")]
    Head(String),
    /// The response head exceeds [`MAX_HEAD_BYTES`] or [`MAX_HEADERS`].
    #[error("response head too large")]
    TooLarge,
    /// `Content-Length` is not a number, or two differ.
    #[error("invalid content-length")]
    ContentLength,
    /// The chunked body is malformed.
    #[error("invalid chunked body")]
    Chunked,
    /// The backend answered `101 Switching Protocols` to a request that asked for no upgrade
    /// (or on the hyper path, which relays no upgrades).
    #[error("protocol upgrades are not supported")]
    Upgrade,
}

/// How the request body is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReqFraming {
    /// No body: the headers go out as they are.
    None,
    /// A body of this length (`Content-Length` written by the encoder).
    Length(u64),
    /// A body of unknown length, sent with the chunked coding.
    Chunked,
}

/// Append the request head (`METHOD target HTTP/1.1`, the headers, the blank line) to `out`.
/// With a body, any `Content-Length` in `headers` is replaced by the framing's.
pub(crate) fn encode_request_head(
    out: &mut Vec<u8>,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    framing: ReqFraming,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (k, v) in headers {
        if framing != ReqFraming::None && k == header::CONTENT_LENGTH {
            continue;
        }
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        ReqFraming::None => {}
        ReqFraming::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(n.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        ReqFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body: `HEAD`, 204, 304 or `Content-Length: 0`.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// The chunked transfer coding.
    Chunked,
    /// Until the backend closes the connection.
    Close,
}

/// A parsed response head.
#[derive(Debug)]
pub(crate) struct Head {
    /// The status (never 1xx).
    pub status: StatusCode,
    /// HTTP/1.0 or HTTP/1.1.
    pub version: Version,
    /// The end-to-end header fields: hop-by-hop ones (`Connection` and the names it lists,
    /// `Keep-Alive`, `Transfer-Encoding`, `TE`, `Trailer`, `Upgrade`, `Proxy-Connection`,
    /// `Proxy-Authenticate`) are dropped, and `Content-Length` too when `Transfer-Encoding` was
    /// present.
    pub headers: HeaderMap,
    /// How the body is delimited.
    pub framing: Framing,
    /// The connection may carry another request after this response.
    pub keep_alive: bool,
}

/// Parse the response head at the start of `buf` into `resp`: its length, `Ok(None)` while
/// incomplete, an error when malformed or over [`MAX_HEAD_BYTES`] (or [`MAX_HEADERS`] fields).
fn parse_head<'b>(
    resp: &mut httparse::Response<'_, 'b>,
    buf: &'b [u8],
) -> Result<Option<usize>, ParseError> {
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n > MAX_HEAD_BYTES => Err(ParseError::TooLarge),
        Ok(httparse::Status::Complete(n)) => Ok(Some(n)),
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => Err(ParseError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(ParseError::TooLarge),
        Err(e) => Err(ParseError::Head(e.to_string())),
    }
}

/// Parse a complete response head at the start of `buf`, skipping (and consuming) interim 1xx
/// responses. `Ok(None)`: more bytes are needed. On success the head's bytes are consumed
/// and `buf` holds what follows (the start of the body).
pub(crate) fn parse_response_head(
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<Option<Head>, ParseError> {
    loop {
        // (name start, name end, value start, value end) of each field, as offsets into buf.
        let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut fields);
        let base = buf.as_ptr() as usize;
        let Some(n) = parse_head(&mut resp, buf)? else {
            return Ok(None);
        };
        let code = resp.code.unwrap_or(0);
        let version = if resp.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        let count = resp.headers.len();
        for (s, h) in spans.iter_mut().zip(resp.headers.iter()) {
            let ns = h.name.as_ptr() as usize - base;
            let vs = h.value.as_ptr() as usize - base;
            // Offsets are below MAX_HEAD_BYTES (checked above), so they fit.
            #[allow(clippy::cast_possible_truncation)]
            {
                *s = (
                    ns as u32,
                    (ns + h.name.len()) as u32,
                    vs as u32,
                    (vs + h.value.len()) as u32,
                );
            }
        }
        if code == 101 {
            return Err(ParseError::Upgrade);
        }
        let status =
            StatusCode::from_u16(code).map_err(|_| ParseError::Head(format!("status {code}")))?;
        let raw = buf.split_to(n).freeze();
        if status.is_informational() {
            continue; // 100 Continue, 103 Early Hints: the final response follows.
        }
        let mut headers = HeaderMap::with_capacity(count);
        let mut hop = Hop::default();
        for &(ns, ne, vs, ve) in &spans[..count] {
            let name = HeaderName::from_bytes(&raw[ns as usize..ne as usize])
                .map_err(|_| ParseError::Head("invalid header name".into()))?;
            let value = &raw[vs as usize..ve as usize];
            if hop.note(&name, value) {
                continue;
            }
            let value = HeaderValue::from_maybe_shared(raw.slice(vs as usize..ve as usize))
                .map_err(|_| ParseError::Head("invalid header value".into()))?;
            headers.append(name, value);
        }
        for n in &hop.listed {
            headers.remove(n);
        }
        return head(status, version, headers, &hop, head_request).map(Some);
    }
}

/// What the hop-by-hop fields of a response said; the fields themselves are not kept.
#[derive(Default)]
struct Hop {
    close: bool,
    keep_alive: bool,
    te: bool,
    chunked: bool,
    /// Other names listed in `Connection` (hop-by-hop too).
    listed: Vec<HeaderName>,
}

impl Hop {
    /// Note a field; true if it is hop-by-hop (not to be relayed).
    fn note(&mut self, name: &HeaderName, value: &[u8]) -> bool {
        match name.as_str() {
            "connection" => {
                hop_connection(self, value);
                true
            }
            "transfer-encoding" => {
                // The last coding of the last field decides.
                self.te = true;
                self.chunked = last_coding_chunked(value);
                true
            }
            "keep-alive" | "proxy-connection" | "proxy-authenticate" | "te" | "trailer"
            | "upgrade" => true,
            _ => false,
        }
    }
}

fn head(
    status: StatusCode,
    version: Version,
    mut headers: HeaderMap,
    hop: &Hop,
    head_request: bool,
) -> Result<Head, ParseError> {
    let length = if hop.te {
        headers.remove(header::CONTENT_LENGTH);
        None
    } else {
        content_length(&headers)?
    };
    let (framing, keep_alive) = framing(status, version, hop, length, head_request);
    Ok(Head {
        status,
        version,
        headers,
        framing,
        keep_alive,
    })
}

/// The body framing (RFC 9112 section 6.3) and whether the connection may be reused.
fn framing(
    status: StatusCode,
    version: Version,
    hop: &Hop,
    length: Option<u64>,
    head_request: bool,
) -> (Framing, bool) {
    let keep_alive = if version == Version::HTTP_11 {
        !hop.close
    } else {
        hop.keep_alive && !hop.close
    };
    let framing =
        if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            Framing::Empty
        } else if hop.te {
            if hop.chunked {
                Framing::Chunked
            } else {
                Framing::Close
            }
        } else {
            match length {
                Some(0) => Framing::Empty,
                Some(n) => Framing::Length(n),
                None => Framing::Close,
            }
        };
    (framing, keep_alive && framing != Framing::Close)
}

/// A response head parsed by [`parse_response_relay`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RelayHead {
    /// The status (never 1xx).
    pub status: StatusCode,
    /// How the body is delimited.
    pub framing: Framing,
    /// The backend connection may carry another request after this response.
    pub keep_alive: bool,
    /// The `Content-Length` (absent when `Transfer-Encoding` was present).
    pub length: Option<u64>,
    /// The backend sent a `Date` field.
    pub has_date: bool,
}

/// Like [`parse_response_head`], but instead of building a [`HeaderMap`] append the head to
/// relay to an HTTP/1.1 client to `out`: the status line and the end-to-end fields as they
/// came (hop-by-hop ones, the names `Connection` lists, `Content-Length` and `X-Request-Id`
/// left out), without the closing blank line: the caller adds its own fields, the framing
/// field and the blank line. Nothing is appended unless a final head is complete.
///
/// With `upgrade` (the request asked for a protocol upgrade), a `101 Switching Protocols` is a
/// final head: relayed with its `Upgrade` field and `Connection: upgrade`, framing
/// [`Framing::Empty`], not `keep_alive` (the connection now carries the new protocol).
/// Otherwise a 101 is [`ParseError::Upgrade`].
pub(crate) fn parse_response_relay(
    buf: &mut BytesMut,
    head_request: bool,
    upgrade: bool,
    out: &mut Vec<u8>,
) -> Result<Option<RelayHead>, ParseError> {
    loop {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut fields);
        let Some(n) = parse_head(&mut resp, buf)? else {
            return Ok(None);
        };
        let code = resp.code.unwrap_or(0);
        let switching = code == 101;
        if switching && !upgrade {
            return Err(ParseError::Upgrade);
        }
        let status =
            StatusCode::from_u16(code).map_err(|_| ParseError::Head(format!("status {code}")))?;
        if status.is_informational() && !switching {
            buf.advance(n);
            continue; // 100 Continue, 103 Early Hints: the final response follows.
        }
        let version = if resp.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // First pass: the hop-by-hop fields and the framing.
        let mut hop = Hop::default();
        let mut length: Option<u64> = None;
        let mut has_date = false;
        for h in resp.headers.iter() {
            let name = h.name;
            if name.eq_ignore_ascii_case("connection") {
                hop_connection(&mut hop, h.value);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                hop.te = true;
                hop.chunked = last_coding_chunked(h.value);
            } else if name.eq_ignore_ascii_case("content-length") {
                let n = parse_length(h.value)?;
                if length.is_some_and(|l| l != n) {
                    return Err(ParseError::ContentLength);
                }
                length = Some(n);
            } else if name.eq_ignore_ascii_case("date") {
                has_date = true;
            }
        }
        if hop.te {
            length = None;
        }
        // Second pass: the fields relayed.
        let reason = resp
            .reason
            .filter(|r| !r.is_empty())
            .or_else(|| status.canonical_reason())
            .unwrap_or("");
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(reason.as_bytes());
        out.extend_from_slice(b"\r\n");
        for h in resp.headers.iter() {
            if relayed(h.name, &hop) {
                out.extend_from_slice(h.name.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(h.value);
                out.extend_from_slice(b"\r\n");
            }
        }
        let (framing, keep_alive) = if switching {
            let proto = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("upgrade"))
                .ok_or_else(|| ParseError::Head("101 without Upgrade".into()))?;
            out.extend_from_slice(b"upgrade: ");
            out.extend_from_slice(proto.value);
            out.extend_from_slice(b"\r\nconnection: upgrade\r\n");
            (Framing::Empty, false)
        } else {
            framing(status, version, &hop, length, head_request)
        };
        buf.advance(n);
        return Ok(Some(RelayHead {
            status,
            framing,
            keep_alive,
            length,
            has_date,
        }));
    }
}

/// Whether a response field is relayed to the client by [`parse_response_relay`].
fn relayed(name: &str, hop: &Hop) -> bool {
    const DROPPED: [&str; 10] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "x-request-id",
    ];
    !DROPPED.iter().any(|d| name.eq_ignore_ascii_case(d))
        && !hop
            .listed
            .iter()
            .any(|l| name.eq_ignore_ascii_case(l.as_str()))
}

/// Note the tokens of a `Connection` field.
fn hop_connection(hop: &mut Hop, value: &[u8]) {
    for t in value.split(|&b| b == b',') {
        let t = t.trim_ascii();
        if t.eq_ignore_ascii_case(b"close") {
            hop.close = true;
        } else if t.eq_ignore_ascii_case(b"keep-alive") {
            hop.keep_alive = true;
        } else if let Ok(n) = HeaderName::from_bytes(t) {
            hop.listed.push(n);
        }
    }
}

/// The last coding of a `Transfer-Encoding` field is `chunked`.
fn last_coding_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// One `Content-Length` field: every comma-separated element the same decimal number.
fn parse_length(value: &[u8]) -> Result<u64, ParseError> {
    let mut found = None;
    for part in value.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return Err(ParseError::ContentLength);
        }
        let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        if found.is_some_and(|f| f != n) {
            return Err(ParseError::ContentLength);
        }
        found = Some(n);
    }
    found.ok_or(ParseError::ContentLength)
}

/// The `Content-Length`, if any: every value (and comma-separated element) must be the same
/// decimal number.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ParseError> {
    let mut found = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        let n = parse_length(v.as_bytes())?;
        if found.is_some_and(|f| f != n) {
            return Err(ParseError::ContentLength);
        }
        found = Some(n);
    }
    Ok(found)
}

/// Where the chunked decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// This many data bytes of the current chunk remain.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty line.
    Trailers,
    /// The body has ended.
    Done,
}

/// Consume chunk-size lines, chunk ends and trailers from `buf` until data bytes are next
/// (`Chunk::Data` with `buf` non-empty), more input is needed, or the body ended.
pub(crate) fn chunk_advance(state: &mut Chunk, buf: &mut BytesMut) -> Result<(), ParseError> {
    loop {
        match *state {
            Chunk::Data(_) | Chunk::Done => return Ok(()),
            Chunk::DataEnd => {
                if buf.starts_with(b"\r\n") {
                    buf.advance(2);
                } else if buf.starts_with(b"\n") {
                    buf.advance(1);
                } else if buf.is_empty() || &buf[..] == b"\r" {
                    return Ok(());
                } else {
                    return Err(ParseError::Chunked);
                }
                *state = Chunk::Size;
            }
            Chunk::Size | Chunk::Trailers => {
                let Some(pos) = buf.iter().position(|&b| b == b'\n') else {
                    return if buf.len() > MAX_LINE {
                        Err(ParseError::Chunked)
                    } else {
                        Ok(())
                    };
                };
                if pos > MAX_LINE {
                    return Err(ParseError::Chunked);
                }
                // The line is consumed only once understood, so an error stays an error.
                let line = buf[..pos].strip_suffix(b"\r").unwrap_or(&buf[..pos]);
                if *state == Chunk::Trailers {
                    if line.is_empty() {
                        *state = Chunk::Done;
                    }
                    buf.advance(pos + 1);
                    continue; // trailer fields are dropped
                }
                let digits = line
                    .split(|&b| b == b';')
                    .next()
                    .unwrap_or_default()
                    .trim_ascii();
                if digits.is_empty() || digits.len() > 15 {
                    return Err(ParseError::Chunked);
                }
                let mut size = 0u64;
                for &d in digits {
                    let v = match d {
                        b'0'..=b'9' => d - b'0',
                        b'a'..=b'f' => d - b'a' + 10,
                        b'A'..=b'F' => d - b'A' + 10,
                        _ => return Err(ParseError::Chunked),
                    };
                    size = size * 16 + u64::from(v);
                }
                buf.advance(pos + 1);
                *state = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
        }
    }
}

/// Take up to `remaining` buffered body bytes.
pub(crate) fn take_data(buf: &mut BytesMut, remaining: &mut u64) -> Bytes {
    let n = usize::try_from(*remaining).map_or(buf.len(), |r| r.min(buf.len()));
    *remaining -= n as u64;
    buf.split_to(n).freeze()
}

#[cfg(test)]
#[path = "h1_tests.rs"]
mod tests;
