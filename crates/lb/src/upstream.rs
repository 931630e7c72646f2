//! Keep-alive HTTP/1.1 connections to the backends, driven inside the client connection's task.
//!
//! A pooled client such as hyper-util's runs every backend connection in its own task and hands
//! each request to it over channels: two extra task wake-ups per request. Here each client
//! connection owns its backend connections ([`Upstreams`]) and polls them from its own task
//! ([`Driver::drive`]), so a request is written to the backend and its response read in the same
//! task that serves the client. A connection is leased for one request and returns to its client
//! connection's idle list when the response body ends ([`Lease`]), so a keep-alive client reuses
//! one backend connection for all its requests. When the client connection closes, its idle
//! backend connections move to a per-worker-thread pool (at most [`POOL_MAX`], idle at most
//! [`POOL_IDLE`]) where the next client connection of that worker picks them up.

use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::http::ReqBody;

/// Idle backend connections kept per worker thread after their client connection closed.
pub(crate) const POOL_MAX: usize = 256;
/// How long a backend connection may sit in the worker pool.
pub(crate) const POOL_IDLE: Duration = Duration::from_secs(60);

type Sender = SendRequest<ReqBody>;
type ConnFuture = Pin<Box<Connection<TokioIo<TcpStream>, ReqBody>>>;

/// Why a request to a backend failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// The TCP connection could not be made (the request never reached the backend).
    #[error("connect failed: {0}")]
    Connect(String),
    /// The connection failed while sending the request or reading the response.
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

impl UpstreamError {
    /// The request never reached the backend.
    pub(crate) fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_))
    }
}

/// The sending half of one backend connection.
struct IdleSender {
    id: u64,
    addr: SocketAddr,
    sender: Sender,
}

/// The connection half, polled by the client connection's [`Driver`].
struct Driven {
    id: u64,
    addr: SocketAddr,
    conn: ConnFuture,
}

/// A backend connection parked in the worker pool.
struct Parked {
    addr: SocketAddr,
    sender: Sender,
    conn: ConnFuture,
    since: Instant,
}

thread_local! {
    static POOL: RefCell<Vec<Parked>> = const { RefCell::new(Vec::new()) };
}

fn pool_take(addr: SocketAddr) -> Option<Parked> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        p.retain(|x| x.since.elapsed() < POOL_IDLE && !x.sender.is_closed());
        let i = p.iter().rposition(|x| x.addr == addr)?;
        Some(p.swap_remove(i))
    })
}

fn pool_put(items: impl Iterator<Item = Parked>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        p.retain(|x| x.since.elapsed() < POOL_IDLE && !x.sender.is_closed());
        p.extend(items);
        if p.len() > POOL_MAX {
            let extra = p.len() - POOL_MAX;
            p.drain(..extra);
        }
    });
}

/// The backend connections of one client connection, shared by its request handlers.
pub(crate) struct Upstreams {
    idle: Mutex<Vec<IdleSender>>,
    adopt: mpsc::UnboundedSender<Driven>,
    next_id: std::sync::atomic::AtomicU64,
}

/// How many times [`Driver::drive`] polls again at once when its futures woke each other.
const REPOLLS: usize = 8;

/// Wakes the client connection's task, except while that task polls its futures: then it only
/// notes the wake-up and [`Driver::drive`] polls again at once. A request handed to a backend
/// connection, or a response handed back to the client connection, wakes a future of the same
/// task; this saves those wake-ups their trip through the scheduler.
struct LoopWaker {
    polling: AtomicBool,
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for LoopWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        if !self.polling.load(Ordering::SeqCst) {
            if let Some(w) = lock(&self.task).as_ref() {
                w.wake_by_ref();
            }
        }
    }
}

/// Polls the backend connections of one client connection; lives in that connection's task.
pub(crate) struct Driver {
    rx: mpsc::UnboundedReceiver<Driven>,
    conns: Vec<Driven>,
    ups: Arc<Upstreams>,
}

/// One backend connection leased for one request; goes back to the idle list with
/// [`Lease::release`] once the response body has been read to its end.
pub(crate) struct Lease {
    ups: Arc<Upstreams>,
    sender: Option<IdleSender>,
}

impl Lease {
    /// The response ended cleanly: the connection may carry the next request.
    pub(crate) fn release(mut self) {
        if let Some(s) = self.sender.take() {
            lock(&self.ups.idle).push(s);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Upstreams {
    /// A new, empty set and the driver that polls its connections.
    pub(crate) fn new() -> (Arc<Self>, Driver) {
        let (tx, rx) = mpsc::unbounded_channel();
        let ups = Arc::new(Self {
            idle: Mutex::new(Vec::new()),
            adopt: tx,
            next_id: std::sync::atomic::AtomicU64::new(0),
        });
        let driver = Driver {
            rx,
            conns: Vec::new(),
            ups: Arc::clone(&ups),
        };
        (ups, driver)
    }

    fn id(&self) -> u64 {
        self.next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// An idle connection to `addr`: this client connection's own, else one from the worker pool.
    fn take(&self, addr: SocketAddr) -> Option<IdleSender> {
        {
            let mut idle = lock(&self.idle);
            idle.retain(|s| !s.sender.is_closed());
            if let Some(i) = idle.iter().rposition(|s| s.addr == addr) {
                return Some(idle.swap_remove(i));
            }
        }
        let p = pool_take(addr)?;
        let id = self.id();
        self.adopt
            .send(Driven {
                id,
                addr,
                conn: p.conn,
            })
            .ok()?;
        Some(IdleSender {
            id,
            addr,
            sender: p.sender,
        })
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        connect_timeout: Duration,
    ) -> Result<IdleSender, UpstreamError> {
        let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(UpstreamError::Connect(e.to_string())),
            Err(_) => {
                return Err(UpstreamError::Connect(format!(
                    "no answer within {} ms",
                    connect_timeout.as_millis()
                )))
            }
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await?;
        let id = self.id();
        self.adopt
            .send(Driven {
                id,
                addr,
                conn: Box::pin(conn),
            })
            .map_err(|_| UpstreamError::Connect("client connection closed".into()))?;
        Ok(IdleSender { id, addr, sender })
    }

    /// Send `req` (origin-form URI, `Host` set) to the backend at `addr` over an idle keep-alive
    /// connection or a new one. A reused connection that turns out closed before the request
    /// was written is replaced transparently.
    pub(crate) async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        mut req: Request<ReqBody>,
        connect_timeout: Duration,
    ) -> Result<(Response<Incoming>, Lease), UpstreamError> {
        loop {
            let (mut s, reused) = match self.take(addr) {
                Some(s) => (s, true),
                None => (self.connect(addr, connect_timeout).await?, false),
            };
            if let Err(e) = s.sender.ready().await {
                if reused {
                    continue;
                }
                return Err(e.into());
            }
            match s.sender.try_send_request(req).await {
                Ok(resp) => {
                    return Ok((
                        resp,
                        Lease {
                            ups: Arc::clone(self),
                            sender: Some(s),
                        },
                    ))
                }
                Err(mut e) => match e.take_message() {
                    Some(r) if reused => req = r,
                    _ => return Err(e.into_error().into()),
                },
            }
        }
    }
}

impl Driver {
    fn poll_conns(&mut self, cx: &mut Context<'_>) {
        while let Poll::Ready(Some(c)) = self.rx.poll_recv(cx) {
            self.conns.push(c);
        }
        self.conns.retain_mut(|c| match c.conn.as_mut().poll(cx) {
            Poll::Pending => true,
            Poll::Ready(r) => {
                if let Err(e) = r {
                    tracing::debug!(backend = %c.addr, error = %e, "backend connection ended with an error");
                }
                false
            }
        });
    }

    /// Run the client connection `server` to completion while polling the backend connections
    /// its requests use.
    pub(crate) async fn drive<F: Future + Unpin>(&mut self, mut server: F) -> F::Output {
        let lw = Arc::new(LoopWaker {
            polling: AtomicBool::new(false),
            woken: AtomicBool::new(false),
            task: Mutex::new(None),
        });
        let waker = Waker::from(Arc::clone(&lw));
        std::future::poll_fn(|cx| {
            {
                let mut t = lock(&lw.task);
                if !t.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *t = Some(cx.waker().clone());
                }
            }
            let mut inner_cx = Context::from_waker(&waker);
            for _ in 0..REPOLLS {
                lw.woken.store(false, Ordering::SeqCst);
                lw.polling.store(true, Ordering::SeqCst);
                self.poll_conns(&mut inner_cx);
                let r = Pin::new(&mut server).poll(&mut inner_cx);
                if r.is_pending() {
                    // A request handled just now may have queued a request on a backend
                    // connection: write it in this same poll.
                    self.poll_conns(&mut inner_cx);
                }
                lw.polling.store(false, Ordering::SeqCst);
                if r.is_ready() {
                    return r;
                }
                if !lw.woken.load(Ordering::SeqCst) {
                    return Poll::Pending;
                }
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await
    }

    /// The client connection is done: park its idle backend connections in the worker pool.
    pub(crate) fn release(mut self) {
        while let Ok(c) = self.rx.try_recv() {
            self.conns.push(c);
        }
        let idle = std::mem::take(&mut *lock(&self.ups.idle));
        let now = Instant::now();
        let mut conns = std::mem::take(&mut self.conns);
        pool_put(idle.into_iter().filter_map(|s| {
            let i = conns.iter().position(|c| c.id == s.id)?;
            let c = conns.swap_remove(i);
            (!s.sender.is_closed()).then_some(Parked {
                addr: s.addr,
                sender: s.sender,
                conn: c.conn,
                since: now,
            })
        }));
    }
}
