//! Writing responses to the client on the L7 fast path ([`super`]): closing a relayed head,
//! the body relay, responses made here and the splice after a protocol switch.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::BytesMut;
use http_body_util::BodyExt;
use hyper::body::Body;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::h1::{Framing, RelayHead};

/// After a `101 Switching Protocols`: send its head and what each side sent beyond its head
/// to the other, then relay both ways until either side closes.
pub(super) async fn splice<S>(
    io: &mut S,
    mut up: tokio::net::TcpStream,
    up_buf: BytesMut,
    client_buf: &mut BytesMut,
    head: &mut Vec<u8>,
    metrics: &crate::metrics::BackendMetrics,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    metrics.bytes_from_backend.inc_by(up_buf.len() as u64);
    metrics.bytes_to_backend.inc_by(client_buf.len() as u64);
    head.extend_from_slice(&up_buf);
    if io.write_all(head).await.is_err() || io.flush().await.is_err() {
        return;
    }
    if !client_buf.is_empty() {
        if up.write_all(client_buf).await.is_err() {
            return;
        }
        client_buf.clear();
    }
    if let Ok((to_backend, from_backend)) = tokio::io::copy_bidirectional(io, &mut up).await {
        metrics.bytes_to_backend.inc_by(to_backend);
        metrics.bytes_from_backend.inc_by(from_backend);
    }
}

/// Close the response head in `out`: `X-Request-Id`, `Date` if the backend sent none, the
/// framing field, `Connection: close` when closing, the blank line. True: the body goes to
/// the client with the chunked coding.
pub(super) fn finish_head(out: &mut Vec<u8>, head: &RelayHead, rid: &[u8], close: bool) -> bool {
    out.extend_from_slice(b"x-request-id: ");
    out.extend_from_slice(rid);
    out.extend_from_slice(b"\r\n");
    if !head.has_date {
        push_date(out);
    }
    let mut chunked = false;
    if head.status == http::StatusCode::SWITCHING_PROTOCOLS {
        out.extend_from_slice(b"\r\n");
        return false;
    }
    match head.framing {
        Framing::Length(n) => push_length(out, n),
        Framing::Chunked | Framing::Close => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            chunked = true;
        }
        Framing::Empty => {
            if let Some(n) = head.length.filter(|_| head.status.as_u16() != 204) {
                push_length(out, n);
            }
        }
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    chunked
}

fn push_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"content-length: ");
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut v = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    /// `date: <IMF-fixdate>\r\n` and the second it was made for.
    static DATE: std::cell::RefCell<(u64, Vec<u8>)> = const { std::cell::RefCell::new((u64::MAX, Vec::new())) };
}

fn push_date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            d.1.clear();
            d.1.extend_from_slice(b"date: ");
            d.1.extend_from_slice(httpdate::fmt_http_date(now).as_bytes());
            d.1.extend_from_slice(b"\r\n");
            d.0 = secs;
        }
        out.extend_from_slice(&d.1);
    });
}

/// Write the response head in `out` and the body to the client: the body bytes already read
/// go out with the head in one write. False if the client or the backend failed.
pub(super) async fn relay_body<S>(
    io: &mut S,
    body: &mut crate::upstream::UpBody,
    out: &mut Vec<u8>,
    chunked: bool,
    counter: &prometheus_client::metrics::counter::Counter,
) -> bool
where
    S: AsyncWrite + Unpin,
{
    // What is ready without waiting joins the head.
    let mut ended = false;
    {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        loop {
            match Pin::new(&mut *body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        counter.inc_by(d.len() as u64);
                        push_data(out, &d, chunked);
                    }
                }
                Poll::Ready(None) => {
                    ended = true;
                    break;
                }
                Poll::Ready(Some(Err(_))) => return false,
                Poll::Pending => break,
            }
            if out.len() >= 64 * 1024 {
                break;
            }
        }
    }
    if ended && chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    if io.write_all(out).await.is_err() {
        return false;
    }
    if !ended {
        loop {
            match body.frame().await {
                Some(Ok(f)) => {
                    let Ok(d) = f.into_data() else { continue };
                    counter.inc_by(d.len() as u64);
                    let w = if chunked {
                        out.clear();
                        push_data(out, &d, true);
                        io.write_all(out).await
                    } else {
                        io.write_all(&d).await
                    };
                    if w.is_err() {
                        return false;
                    }
                }
                None => break,
                Some(Err(_)) => return false,
            }
        }
        if chunked && io.write_all(b"0\r\n\r\n").await.is_err() {
            return false;
        }
    }
    io.flush().await.is_ok()
}

fn push_data(out: &mut Vec<u8>, d: &[u8], chunked: bool) {
    if d.is_empty() {
        return;
    }
    if chunked {
        out.extend_from_slice(format!("{:x}\r\n", d.len()).as_bytes());
        out.extend_from_slice(d);
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(d);
    }
}

/// A response made here (no backend answered): text, like [`crate::http`]'s.
pub(super) async fn reply<S: AsyncWrite + Unpin>(
    io: &mut S,
    status: u16,
    msg: String,
    rid: &[u8],
    close: bool,
) -> bool {
    let status = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY);
    let mut out = Vec::with_capacity(256 + msg.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: text/plain; charset=utf-8\r\nx-request-id: ");
    out.extend_from_slice(rid);
    out.extend_from_slice(b"\r\n");
    push_date(&mut out);
    push_length(&mut out, msg.len() as u64 + 1);
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(msg.as_bytes());
    out.push(b'\n');
    io.write_all(&out).await.is_ok() && io.flush().await.is_ok()
}
