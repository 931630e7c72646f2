//! Test backends: small real HTTP servers, TCP and UDP echo servers.
#![allow(dead_code, missing_docs)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use nimbus_lb::{LbConfig, ListenerConfig, LoadBalancer, Metrics, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// A real HTTP/1.1 backend that answers with its name.
pub struct TestBackend {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    pub healthy: Arc<AtomicBool>,
    pub delay_ms: Arc<AtomicU64>,
    pub paths: Arc<Mutex<HashMap<String, u64>>>,
    pub last_headers: Arc<Mutex<Vec<(String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestBackend {
    pub async fn start(name: &str) -> Self {
        Self::start_on(name, "127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(name: &str, addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let healthy = Arc::new(AtomicBool::new(true));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let paths: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let last_headers: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let (n, h, hl, d, p, lh) = (
            name.to_string(),
            hits.clone(),
            healthy.clone(),
            delay_ms.clone(),
            paths.clone(),
            last_headers.clone(),
        );
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let (n, h, hl, d, p, lh) = (
                    n.clone(),
                    h.clone(),
                    hl.clone(),
                    d.clone(),
                    p.clone(),
                    lh.clone(),
                );
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (n, h, hl, d, p, lh) =
                            (n.clone(), h.clone(), hl.clone(), d.clone(), p.clone(), lh.clone());
                        async move {
                            Ok::<_, Infallible>(respond(&n, &h, &hl, &d, &p, &lh, req).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), svc)
                        .await;
                });
            }
        });
        Self {
            name: name.to_string(),
            addr,
            hits,
            healthy,
            delay_ms,
            paths,
            last_headers,
            task,
        }
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn path_hits(&self, path: &str) -> u64 {
        self.paths.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.last_headers
            .lock()
            .unwrap()
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }
}

async fn respond(
    name: &str,
    hits: &AtomicU64,
    healthy: &AtomicBool,
    delay: &AtomicU64,
    paths: &Mutex<HashMap<String, u64>>,
    last: &Mutex<Vec<(String, String)>>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if path == "/health" {
        let ok = healthy.load(Ordering::SeqCst);
        return Response::builder()
            .status(if ok { 200 } else { 503 })
            .body(Full::new(Bytes::from_static(b"health")))
            .unwrap();
    }
    hits.fetch_add(1, Ordering::SeqCst);
    *paths.lock().unwrap().entry(path.clone()).or_default() += 1;
    *last.lock().unwrap() = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let ms = if path == "/slow" {
        2_000
    } else {
        delay.load(Ordering::SeqCst)
    };
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if path.starts_with("/cache") {
        let inm = req
            .headers()
            .get("if-none-match")
            .and_then(|v| v.to_str().ok());
        if inm == Some("\"v1\"") {
            return Response::builder()
                .status(304)
                .header("etag", "\"v1\"")
                .header("cache-control", "max-age=1")
                .body(Full::new(Bytes::new()))
                .unwrap();
        }
        return Response::builder()
            .header("etag", "\"v1\"")
            .header("cache-control", "max-age=1")
            .header("x-backend", name)
            .body(Full::new(Bytes::from(format!("cached-{name}"))))
            .unwrap();
    }
    if path == "/private" {
        return Response::builder()
            .header("cache-control", "private, max-age=60")
            .body(Full::new(Bytes::from(name.to_string())))
            .unwrap();
    }
    Response::builder()
        .header("x-backend", name)
        .body(Full::new(Bytes::from(name.to_string())))
        .unwrap()
}

/// A TCP echo server.
pub async fn tcp_echo() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let t = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, t)
}

/// A UDP echo server that prefixes replies with a tag.
pub async fn udp_echo(tag: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    let t = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, peer)) = s.recv_from(&mut buf).await else {
                return;
            };
            let mut out = tag.as_bytes().to_vec();
            out.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&out, peer).await;
        }
    });
    (addr, t)
}

pub fn listener(protocol: Protocol) -> ListenerConfig {
    ListenerConfig {
        protocol,
        port: 0,
        bind: vec!["127.0.0.1".parse().unwrap()],
    }
}

pub async fn start_lb(cfg: LbConfig) -> (LoadBalancer, Arc<Metrics>) {
    let m = Arc::new(Metrics::new());
    (LoadBalancer::start(cfg, Arc::clone(&m)).await.unwrap(), m)
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Send raw bytes on a fresh connection and read the response head (until the connection closes
/// or a full head is read).
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_head(&mut s).await
}

pub async fn read_head(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut chunk)).await else {
            break;
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let t = String::from_utf8_lossy(&buf);
        if let Some(i) = t.find("\r\n\r\n") {
            // Read the body when content-length is given.
            let head = &t[..i];
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if buf.len() >= i + 4 + len {
                break;
            }
        }
    }
    String::from_utf8_lossy(&buf).to_string()
}
