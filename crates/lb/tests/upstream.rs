//! Backend keep-alive connections of the L7 proxy: reuse across requests and client
//! connections, request and response bodies, backends that close idle connections.
#![allow(missing_docs)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{client, listener, start_lb};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use nimbus_lb::{LbConfig, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A hyper backend counting its TCP connections. `/echo` answers the request body; `/chunked`
/// answers a chunked body in three pieces; anything else answers `ok`.
async fn counting_backend() -> (SocketAddr, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&conns);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let body: http_body_util::combinators::BoxBody<Bytes, Infallible> =
                        match req.uri().path() {
                            "/echo" => {
                                let b = req.into_body().collect().await.unwrap().to_bytes();
                                http_body_util::Full::new(b).boxed()
                            }
                            "/chunked" => {
                                let parts = ["one,", "two,", "three"]
                                    .map(|p| Ok::<_, Infallible>(Frame::data(Bytes::from(p))));
                                StreamBody::new(futures::stream::iter(parts)).boxed()
                            }
                            _ => http_body_util::Full::new(Bytes::from("ok")).boxed(),
                        };
                    Ok::<_, Infallible>(Response::new(body))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, conns)
}

fn cfg(addr: SocketAddr) -> LbConfig {
    LbConfig::simple("up", listener(Protocol::Http), vec![addr])
}

#[tokio::test]
async fn one_backend_connection_serves_a_keep_alive_client_with_bodies() {
    let (be, conns) = counting_backend().await;
    let (lb, _) = start_lb(cfg(be)).await;
    let base = format!("http://{}", lb.addr(Protocol::Http).unwrap());
    let c = client();
    for i in 0..20 {
        let r = c.get(format!("{base}/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "ok");
        let body = format!("payload {i} ").repeat(1000);
        let r = c
            .post(format!("{base}/echo"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.text().await.unwrap(), body);
        let r = c.get(format!("{base}/chunked")).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "one,two,three");
    }
    // A streamed request body of unknown length (sent chunked to the backend).
    let parts = ["a", "bb", "ccc"].map(|p| Ok::<_, std::io::Error>(Bytes::from(p)));
    let r = c
        .post(format!("{base}/echo"))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(parts)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "abbccc");
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "all requests of one keep-alive client used one backend connection"
    );
}

#[tokio::test]
async fn backend_connections_outlive_their_client_connection() {
    let (be, conns) = counting_backend().await;
    let (lb, _) = start_lb(cfg(be)).await;
    let url = format!("http://{}/", lb.addr(Protocol::Http).unwrap());
    for _ in 0..12 {
        // A new client (and client connection) each time.
        let r = client().get(&url).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "ok");
        // Let the closed client connection hand its backend connection to the worker pool.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let workers = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as u64;
    let n = conns.load(Ordering::SeqCst);
    assert!(
        n <= workers,
        "12 client connections opened {n} backend connections (at most one per worker expected)"
    );
}

#[tokio::test]
async fn a_backend_closing_idle_connections_is_no_error() {
    // Answers one request per connection, then closes it without `Connection: close`.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let be = l.local_addr().unwrap();
    let conns = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&conns);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                tokio::time::sleep(Duration::from_millis(30)).await;
            });
        }
    });
    let (lb, _) = start_lb(cfg(be)).await;
    let url = format!("http://{}/", lb.addr(Protocol::Http).unwrap());
    let c = client();
    for _ in 0..5 {
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "ok");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(conns.load(Ordering::SeqCst), 5);
}
