//! Keep-alive HTTP/1.1 connections to the backends, with a small hand-written client.
//!
//! A request is sent by the task that serves its client connection: the request head goes out
//! in one buffer and one write, the response head is parsed with `httparse` ([`crate::h1`]),
//! and the response body ([`UpBody`]) reads the backend socket directly when hyper's server
//! polls it. There is no connection task, no channel and no extra wake-up between the client
//! and backend sides (hyper's client dispatcher hands each request and response over a channel).
//!
//! A connection belongs to one request until its response body has been read to its end; it
//! then goes back to its client connection's idle list ([`Upstreams`]), so a keep-alive client
//! reuses one backend connection per backend. A body dropped early, a response delimited by
//! the connection's close, `Connection: close` or bytes beyond the response close it instead.
//! When the client connection closes, its idle backend connections move to a per-worker-thread
//! pool (at most [`POOL_MAX`], idle at most [`POOL_IDLE`]) where the next client connection
//! of that worker picks them up. A reused connection the backend closed meanwhile is detected
//! before use when its closing is already known (cached readiness, no system call), else by an
//! end of stream before any response byte, and the request is then resent on a new connection
//! when it has no body.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::h1::{self, Chunk, Framing, ParseError, ReqFraming};

/// Idle backend connections kept per worker thread after their client connection closed.
pub(crate) const POOL_MAX: usize = 256;
/// How long a backend connection may sit in the worker pool.
pub(crate) const POOL_IDLE: Duration = Duration::from_secs(60);
/// Read buffer space made available before each read of a response head.
const READ_CHUNK: usize = 8 * 1024;
/// Read buffer space made available before each read of a response body.
const BODY_READ_CHUNK: usize = 64 * 1024;

/// Why a request to a backend failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// The TCP connection could not be made (the request never reached the backend).
    #[error("connect failed: {0}")]
    Connect(String),
    /// Reading from or writing to the backend failed.
    #[error("backend connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// The backend closed the connection before the response was complete.
    #[error("backend closed the connection before the response was complete")]
    Closed,
    /// The backend's response is not valid HTTP/1.1.
    #[error("invalid response from backend: {0}")]
    Parse(#[from] ParseError),
    /// The client's request body failed while it was being sent.
    #[error("client request body failed: {0}")]
    RequestBody(String),
}

impl UpstreamError {
    /// The request never reached the backend.
    pub(crate) fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_))
    }

    /// Why a backend was given up for another: `<backend>: connect failed` or `connection failed`
    /// (the text of the 502/503 body when every backend failed).
    pub(crate) fn retry_reason(&self, backend: &str) -> String {
        let what = if self.is_connect() {
            "connect failed"
        } else {
            "connection failed"
        };
        format!("{backend}: {what}")
    }
}

/// One backend connection and what has been read from it but not consumed.
pub(crate) struct UpConn {
    addr: SocketAddr,
    io: TcpStream,
    buf: BytesMut,
    /// Where request heads are encoded.
    wbuf: Vec<u8>,
}

impl UpConn {
    /// The socket and what was read from it beyond the response head (a connection that
    /// switched protocols).
    pub(crate) fn into_parts(self) -> (TcpStream, BytesMut) {
        (self.io, self.buf)
    }

    /// Still usable: the backend has not closed it nor sent anything unasked. Costs no system
    /// call unless the socket is marked readable.
    fn idle_ok(&self) -> bool {
        self.buf.is_empty()
            && matches!(self.io.try_read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    async fn read_more(&mut self) -> std::io::Result<usize> {
        self.buf.reserve(READ_CHUNK);
        self.io.read_buf(&mut self.buf).await
    }
}

/// A backend connection parked in the worker pool.
struct Parked {
    conn: UpConn,
    since: Instant,
}

thread_local! {
    static POOL: RefCell<Vec<Parked>> = const { RefCell::new(Vec::new()) };
}

fn pool_take(addr: SocketAddr) -> Option<UpConn> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        p.retain(|x| x.since.elapsed() < POOL_IDLE);
        while let Some(i) = p.iter().rposition(|x| x.conn.addr == addr) {
            let c = p.swap_remove(i).conn;
            if c.idle_ok() {
                return Some(c);
            }
        }
        None
    })
}

fn pool_put(items: impl Iterator<Item = UpConn>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        p.retain(|x| x.since.elapsed() < POOL_IDLE);
        let now = Instant::now();
        p.extend(items.map(|conn| Parked { conn, since: now }));
        if p.len() > POOL_MAX {
            let extra = p.len() - POOL_MAX;
            p.drain(..extra);
        }
    });
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The idle backend connections of one client connection, shared by its request handlers.
pub(crate) struct Upstreams {
    idle: Mutex<Vec<UpConn>>,
}

impl Upstreams {
    /// A new, empty set.
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            idle: Mutex::new(Vec::new()),
        })
    }

    /// An idle connection to `addr`: this client connection's own, else one from the worker pool.
    fn take(&self, addr: SocketAddr) -> Option<UpConn> {
        {
            let mut idle = lock(&self.idle);
            while let Some(i) = idle.iter().rposition(|c| c.addr == addr) {
                let c = idle.swap_remove(i);
                if c.idle_ok() {
                    return Some(c);
                }
            }
        }
        pool_take(addr)
    }

    /// The client connection is done: park its idle backend connections in the worker pool.
    pub(crate) fn release(&self) {
        let idle = std::mem::take(&mut *lock(&self.idle));
        pool_put(idle.into_iter());
    }

    async fn connect(addr: SocketAddr, connect_timeout: Duration) -> Result<UpConn, UpstreamError> {
        let io = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(UpstreamError::Connect(e.to_string())),
            Err(_) => {
                return Err(UpstreamError::Connect(format!(
                    "no answer within {} ms",
                    connect_timeout.as_millis()
                )))
            }
        };
        let _ = io.set_nodelay(true);
        Ok(UpConn {
            addr,
            io,
            buf: BytesMut::new(),
            wbuf: Vec::with_capacity(1024),
        })
    }

    /// Send `req` (origin-form URI, `Host` set, hop-by-hop headers removed) to the backend at
    /// `addr` over an idle keep-alive connection or a new one, and read the response head. A
    /// reused connection that turns out closed before any response byte arrived is replaced
    /// transparently when the request has no body.
    pub(crate) async fn send<B>(
        self: &Arc<Self>,
        addr: SocketAddr,
        req: Request<B>,
        connect_timeout: Duration,
    ) -> Result<Response<UpBody>, UpstreamError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let (parts, mut body) = req.into_parts();
        let framing = if body.is_end_stream() {
            ReqFraming::None
        } else {
            body.size_hint()
                .exact()
                .map_or(ReqFraming::Chunked, ReqFraming::Length)
        };
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let head_request = parts.method == Method::HEAD;
        loop {
            let (mut c, reused) = match self.take(addr) {
                Some(c) => (c, true),
                None => (Self::connect(addr, connect_timeout).await?, false),
            };
            let retry = reused && framing == ReqFraming::None;
            // The connection's write buffer is reused from request to request.
            let mut head = std::mem::take(&mut c.wbuf);
            head.clear();
            h1::encode_request_head(&mut head, &parts.method, target, &parts.headers, framing);
            let written = c.io.write_all(&head).await;
            c.wbuf = head;
            if let Err(e) = written {
                if retry {
                    continue;
                }
                return Err(e.into());
            }
            if framing != ReqFraming::None {
                send_body(&mut c.io, &mut body, framing == ReqFraming::Chunked).await?;
            }
            let h = match read_head(&mut c, |b| h1::parse_response_head(b, head_request)).await {
                Ok(h) => h,
                Err(ReadHeadError::Nothing(_)) if retry => continue,
                Err(ReadHeadError::Nothing(e) | ReadHeadError::Other(e)) => return Err(e),
            };
            let mut resp = Response::new(UpBody::new(self, c, h.framing, h.keep_alive));
            *resp.status_mut() = h.status;
            *resp.version_mut() = h.version;
            *resp.headers_mut() = h.headers;
            return Ok(resp);
        }
    }
}

impl Upstreams {
    /// Send a complete request head without a body (`head`, as encoded by the caller) to the
    /// backend at `addr` over an idle keep-alive connection or a new one, and read the
    /// response head with `parse` (which sees the connection's read buffer and consumes the
    /// head from it). A reused connection that turns out closed before any response byte
    /// arrived is replaced transparently. The connection is returned with the parsed head; make
    /// it a body with [`Upstreams::body`].
    pub(crate) async fn send_head<T>(
        self: &Arc<Self>,
        addr: SocketAddr,
        head: &[u8],
        connect_timeout: Duration,
        mut parse: impl FnMut(&mut BytesMut) -> Result<Option<T>, ParseError>,
    ) -> Result<(UpConn, T), UpstreamError> {
        loop {
            let (mut c, reused) = match self.take(addr) {
                Some(c) => (c, true),
                None => (Self::connect(addr, connect_timeout).await?, false),
            };
            if let Err(e) = c.io.write_all(head).await {
                if reused {
                    continue;
                }
                return Err(e.into());
            }
            match read_head(&mut c, &mut parse).await {
                Ok(h) => return Ok((c, h)),
                Err(ReadHeadError::Nothing(_)) if reused => {}
                Err(ReadHeadError::Nothing(e) | ReadHeadError::Other(e)) => return Err(e),
            }
        }
    }

    /// The body of a response whose head [`Upstreams::send_head`] read from `conn`.
    pub(crate) fn body(
        self: &Arc<Self>,
        conn: UpConn,
        framing: Framing,
        keep_alive: bool,
    ) -> UpBody {
        UpBody::new(self, conn, framing, keep_alive)
    }
}

/// Write the request body: as it comes (a known length) or in chunks.
async fn send_body<B>(io: &mut TcpStream, body: &mut B, chunked: bool) -> Result<(), UpstreamError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| UpstreamError::RequestBody(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers are not forwarded
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            out.clear();
            out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            out.extend_from_slice(&data);
            out.extend_from_slice(b"\r\n");
            io.write_all(&out).await?;
        } else {
            io.write_all(&data).await?;
        }
    }
    if chunked {
        io.write_all(b"0\r\n\r\n").await?;
    }
    Ok(())
}

enum ReadHeadError {
    /// The connection ended or failed before any response byte (safe to resend on another).
    Nothing(UpstreamError),
    Other(UpstreamError),
}

async fn read_head<T>(
    c: &mut UpConn,
    mut parse: impl FnMut(&mut BytesMut) -> Result<Option<T>, ParseError>,
) -> Result<T, ReadHeadError> {
    let mut received = false;
    loop {
        if !c.buf.is_empty() {
            received = true;
            match parse(&mut c.buf) {
                Ok(Some(h)) => return Ok(h),
                Ok(None) => {}
                Err(e) => return Err(ReadHeadError::Other(e.into())),
            }
        }
        match c.read_more().await {
            Ok(0) if received => return Err(ReadHeadError::Other(UpstreamError::Closed)),
            Ok(0) => return Err(ReadHeadError::Nothing(UpstreamError::Closed)),
            Ok(_) => {}
            Err(e) if received => return Err(ReadHeadError::Other(e.into())),
            Err(e) => return Err(ReadHeadError::Nothing(e.into())),
        }
    }
}

/// How much of the response body is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Left {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

/// A backend response body read straight from its connection, which goes back to the client
/// connection's idle list as soon as the body's last byte is read (if it may be reused).
pub(crate) struct UpBody {
    conn: Option<UpConn>,
    left: Left,
    keep_alive: bool,
    ups: Arc<Upstreams>,
}

impl UpBody {
    fn new(ups: &Arc<Upstreams>, conn: UpConn, framing: Framing, keep_alive: bool) -> Self {
        let left = match framing {
            Framing::Empty => Left::Done,
            Framing::Length(n) => Left::Length(n),
            Framing::Chunked => Left::Chunked(Chunk::Size),
            Framing::Close => Left::UntilClose,
        };
        let mut b = Self {
            conn: Some(conn),
            left,
            keep_alive,
            ups: Arc::clone(ups),
        };
        if b.left == Left::Done {
            b.finish();
        } else if let Left::Chunked(_) = b.left {
            // A malformed start surfaces on the first poll.
            let _ = b.advance_chunks();
        }
        b
    }

    /// The body ended: the connection goes back to the idle list if it can carry another
    /// request, else it is closed.
    fn finish(&mut self) {
        self.left = Left::Done;
        if let Some(c) = self.conn.take() {
            if self.keep_alive && c.buf.is_empty() {
                lock(&self.ups.idle).push(c);
            }
        }
    }

    fn advance_chunks(&mut self) -> Result<(), ParseError> {
        let (Left::Chunked(st), Some(c)) = (&mut self.left, self.conn.as_mut()) else {
            return Ok(());
        };
        h1::chunk_advance(st, &mut c.buf)?;
        if *st == Chunk::Done {
            self.finish();
        }
        Ok(())
    }

    /// Data already buffered, if the body is at a point where data comes next.
    fn buffered_data(&mut self) -> Option<Bytes> {
        let c = self.conn.as_mut()?;
        if c.buf.is_empty() {
            return None;
        }
        let data = match &mut self.left {
            Left::Length(n) => {
                let d = h1::take_data(&mut c.buf, n);
                if *n == 0 {
                    self.finish();
                }
                d
            }
            Left::Chunked(Chunk::Data(n)) => {
                let d = h1::take_data(&mut c.buf, n);
                if *n == 0 {
                    self.left = Left::Chunked(Chunk::DataEnd);
                }
                // Consume what follows the data if it is here (often the last chunk); an
                // error there is reported by the next poll.
                let _ = self.advance_chunks();
                d
            }
            Left::UntilClose => c.buf.split().freeze(),
            Left::Chunked(_) | Left::Done => return None,
        };
        Some(data)
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = &mut *self;
        loop {
            if let Err(e) = this.advance_chunks() {
                this.fail();
                return Poll::Ready(Some(Err(e.into())));
            }
            if this.left == Left::Done {
                return Poll::Ready(None);
            }
            if let Some(d) = this.buffered_data() {
                return Poll::Ready(Some(Ok(Frame::data(d))));
            }
            if this.left == Left::Done {
                return Poll::Ready(None);
            }
            let Some(c) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            c.buf.reserve(BODY_READ_CHUNK);
            let n = match ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut c.io),
                cx,
                &mut c.buf
            )) {
                Ok(n) => n,
                Err(e) => {
                    this.fail();
                    return Poll::Ready(Some(Err(e.into())));
                }
            };
            if n == 0 {
                if this.left == Left::UntilClose {
                    this.left = Left::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                this.fail();
                return Poll::Ready(Some(Err(UpstreamError::Closed)));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.left == Left::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Left::Length(n) => SizeHint::with_exact(n),
            Left::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl UpBody {
    /// The body failed: the connection is closed.
    fn fail(&mut self) {
        self.left = Left::Done;
        self.conn = None;
    }
}
