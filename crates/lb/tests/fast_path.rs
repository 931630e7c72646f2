//! The L7 fast path (HTTP/1.1 requests without a body served without hyper), over raw TCP on
//! both sides: request and response heads rewritten in one pass (hop-by-hop fields and the
//! names `Connection` lists dropped, forwarding headers set, the request id relayed), one keep-
//! alive connection mixing fast-path requests, pipelined ones and requests handed to hyper,
//! HTTP/1.0 and `Connection: close`, the response timeout of its per-connection timer,
//! protocol upgrades (WebSocket-style: 101 relayed, both connections spliced), and stopping
//! (idle connections closed at once, a request in flight answered with `Connection: close`).
#![allow(missing_docs)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{client, listener, start_lb, TestBackend};
use nimbus_lb::{LbConfig, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A raw-TCP backend that answers every request with its head as the body, plus the fields
/// `extra` (a few hop-by-hop ones among them); a body sent with `Content-Length` is appended.
async fn echo_backend(extra: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 65536];
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head: Vec<u8> = buf.drain(..end).collect();
                    let len = String::from_utf8_lossy(&head)
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap())
                        })
                        .unwrap_or(0);
                    while buf.len() < len {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let mut body = head;
                    body.extend(buf.drain(..len));
                    let mut resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{extra}\r\n",
                        body.len()
                    )
                    .into_bytes();
                    resp.extend_from_slice(&body);
                    if s.write_all(&resp).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Read one response with a `Content-Length` body (or until the connection closes).
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> (String, String) {
    let mut chunk = vec![0u8; 65536];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i + 4]).to_string();
            let len = head.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap())
            });
            if let Some(len) = len {
                if buf.len() >= i + 4 + len {
                    let body = String::from_utf8_lossy(&buf[i + 4..i + 4 + len]).to_string();
                    buf.drain(..i + 4 + len);
                    return (head, body);
                }
            }
        }
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("response within 5 s")
            .unwrap();
        if n == 0 {
            let all = String::from_utf8_lossy(buf).to_string();
            buf.clear();
            return (all, String::new());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn field<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .collect()
}

async fn lb_to(be: SocketAddr) -> (nimbus_lb::LoadBalancer, SocketAddr) {
    let (lb, _) = start_lb(LbConfig::simple("fast", listener(Protocol::Http), vec![be])).await;
    let addr = lb.addr(Protocol::Http).unwrap();
    (lb, addr)
}

#[tokio::test]
async fn request_and_response_heads_are_rewritten() {
    let be = echo_backend(
        "Connection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=9\r\nX-Request-Id: from-backend\r\nX-Kept: k\r\n",
    )
    .await;
    let (_lb, addr) = lb_to(be).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /a?x=1 HTTP/1.1\r\nHost: example.test\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\n\
          Keep-Alive: timeout=5\r\nTE: trailers\r\nX-Forwarded-For: 203.0.113.9\r\n\
          X-Forwarded-Proto: https\r\nX-Keep: 2\r\nContent-Length: 0\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let (head, sent) = read_response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    // What the backend got.
    assert!(sent.starts_with("GET /a?x=1 HTTP/1.1\r\n"), "{sent}");
    assert_eq!(field(&sent, "host"), ["example.test"]);
    assert_eq!(field(&sent, "x-keep"), ["2"]);
    for gone in ["x-drop", "keep-alive", "te", "connection"] {
        assert!(field(&sent, gone).is_empty(), "{gone} forwarded: {sent}");
    }
    assert_eq!(field(&sent, "x-forwarded-for"), ["203.0.113.9, 127.0.0.1"]);
    assert_eq!(field(&sent, "x-forwarded-proto"), ["http"]);
    let rid = field(&sent, "x-request-id");
    assert_eq!(rid.len(), 1);
    assert_eq!(rid[0].len(), 32);
    assert!(rid[0].bytes().all(|b| b.is_ascii_hexdigit()));
    // What the client got.
    assert_eq!(field(&head, "x-kept"), ["k"]);
    for gone in ["x-secret", "keep-alive", "connection"] {
        assert!(field(&head, gone).is_empty(), "{gone} relayed: {head}");
    }
    assert_eq!(field(&head, "x-request-id"), rid);
    assert_eq!(field(&head, "date").len(), 1, "a date is added: {head}");
    // A sane request id of the client's is kept both ways.
    s.write_all(b"GET / HTTP/1.1\r\nHost: h\r\nX-Request-Id: abc-123\r\n\r\n")
        .await
        .unwrap();
    let (head, sent) = read_response(&mut s, &mut buf).await;
    assert_eq!(field(&sent, "x-request-id"), ["abc-123"]);
    assert_eq!(field(&head, "x-request-id"), ["abc-123"]);
    assert_eq!(field(&sent, "x-forwarded-for"), ["127.0.0.1"]);
}

#[tokio::test]
async fn one_connection_mixes_fast_pipelined_and_hyper_served_requests() {
    let be = echo_backend("").await;
    let (_lb, addr) = lb_to(be).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let (_, sent) = read_response(&mut s, &mut buf).await;
    assert!(sent.starts_with("GET /1 "), "{sent}");
    // Two requests in one write: two responses, in order.
    s.write_all(b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\nHEAD /3 HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let (_, sent) = read_response(&mut s, &mut buf).await;
    assert!(sent.starts_with("GET /2 "), "{sent}");
    // HEAD: the backend's length is relayed, no body follows (the echo backend sends one
    // anyway, which the proxy must not pass on: the next response starts right after).
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
    }
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    buf.drain(..end);
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert_eq!(field(&head, "content-length").len(), 1, "{head}");
    // A request with a body: served by hyper from here on, on the same connection.
    s.write_all(b"POST /4 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .unwrap();
    let (head, sent) = read_response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}{sent}");
    assert!(sent.starts_with("POST /4 "), "{sent}");
    assert!(sent.ends_with("\r\n\r\nhello"), "{sent}");
    s.write_all(b"GET /5 HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let (_, sent) = read_response(&mut s, &mut buf).await;
    assert!(sent.starts_with("GET /5 "), "{sent}");
}

#[tokio::test]
async fn http10_and_connection_close_end_the_connection_after_the_response() {
    let be = echo_backend("").await;
    let (_lb, addr) = lb_to(be).await;
    for req in [
        &b"GET /c HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"[..],
        &b"GET /d HTTP/1.0\r\n\r\n"[..],
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(req).await.unwrap();
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all))
            .await
            .expect("the proxy closes the connection")
            .unwrap();
        let all = String::from_utf8_lossy(&all);
        assert!(all.starts_with("HTTP/1."), "{all}");
        assert!(all.contains(" 200 OK\r\n"), "{all}");
        assert!(all.contains("\r\n\r\nGET /"), "{all}");
    }
}

#[tokio::test]
async fn response_timeout_is_504_and_the_connection_serves_on() {
    let a = TestBackend::start("a").await;
    let mut cfg = LbConfig::simple("fast-timeout", listener(Protocol::Http), vec![a.addr]);
    cfg.limits.response_timeout_ms = 300;
    cfg.outlier.consecutive_errors = 1000;
    let (lb, _) = start_lb(cfg).await;
    let url = format!("http://{}/", lb.addr(Protocol::Http).unwrap());
    let c = client();
    for _ in 0..3 {
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "a");
        a.delay_ms.store(1_000, std::sync::atomic::Ordering::SeqCst);
        let t = Instant::now();
        let r = c.get(&url).send().await.unwrap();
        let took = t.elapsed();
        assert_eq!(r.status(), 504);
        assert!(r
            .text()
            .await
            .unwrap()
            .contains("did not answer within 300 ms"));
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_millis(900),
            "{took:?}"
        );
        a.delay_ms.store(0, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A raw-TCP backend that accepts a WebSocket-style upgrade on `/ws` (answering 101, then
/// echoing every byte back prefixed by `>`, after sending `hello` first) and answers a plain
/// 200 to anything else. Each request head it got is sent on `heads`.
async fn upgrade_backend(heads: tokio::sync::mpsc::UnboundedSender<String>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let heads = heads.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 4096];
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end);
                    let _ = heads.send(head.clone());
                    if !head.starts_with("GET /ws ") {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain")
                            .await;
                        continue;
                    }
                    // 101 and the first bytes of the new protocol in one write.
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                              Connection: Upgrade\r\nSec-WebSocket-Accept: acc\r\n\r\nhello",
                        )
                        .await;
                    // Echo what follows (including bytes that came with the head).
                    let mut pending = std::mem::take(&mut buf);
                    loop {
                        if !pending.is_empty() {
                            let mut out = b">".to_vec();
                            out.append(&mut pending);
                            if s.write_all(&out).await.is_err() {
                                return;
                            }
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => pending.extend_from_slice(&chunk[..n]),
                        }
                        if pending.ends_with(b"bye") {
                            return; // the backend ends the session
                        }
                    }
                }
            });
        }
    });
    addr
}

async fn read_exact_text(s: &mut TcpStream, want: &str) {
    let mut got = vec![0u8; want.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
        .await
        .expect("bytes within 5 s")
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&got), want);
}

#[tokio::test]
async fn upgrades_are_relayed_and_both_connections_spliced() {
    let (tx, mut heads) = tokio::sync::mpsc::unbounded_channel();
    let be = upgrade_backend(tx).await;
    let (_lb, addr) = lb_to(be).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    // A refused upgrade is a normal response and the connection serves on.
    s.write_all(
        b"GET /plain HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let (head, body) = read_response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert_eq!(body, "plain");
    let sent = heads.recv().await.unwrap();
    assert_eq!(field(&sent, "upgrade"), ["websocket"], "{sent}");
    // The upgrade, with the first client frame right behind the head.
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: k\r\nSec-WebSocket-Version: 13\r\n\r\nearly",
    )
    .await
    .unwrap();
    let sent = heads.recv().await.unwrap();
    assert_eq!(field(&sent, "upgrade"), ["websocket"], "{sent}");
    assert_eq!(field(&sent, "connection"), ["upgrade"], "{sent}");
    assert_eq!(field(&sent, "sec-websocket-key"), ["k"], "{sent}");
    assert_eq!(field(&sent, "x-forwarded-for"), ["127.0.0.1"], "{sent}");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    assert!(
        head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{head}"
    );
    assert_eq!(field(&head, "upgrade"), ["websocket"], "{head}");
    assert_eq!(field(&head, "connection"), ["upgrade"], "{head}");
    assert_eq!(field(&head, "sec-websocket-accept"), ["acc"], "{head}");
    assert!(field(&head, "content-length").is_empty(), "{head}");
    assert!(field(&head, "transfer-encoding").is_empty(), "{head}");
    // Both ways, raw bytes (what the backend sent with its 101 first).
    read_exact_text(&mut s, "hello>early").await;
    s.write_all(b"\x01\x02hi").await.unwrap();
    read_exact_text(&mut s, ">\x01\x02hi").await;
    // The backend ends the session: the client connection closes.
    s.write_all(b"bye").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("closed after the backend closed")
        .unwrap();
    assert!(rest.is_empty(), "{rest:?}");
}

#[tokio::test]
async fn a_101_to_a_request_that_asked_no_upgrade_is_still_refused() {
    let (tx, _heads) = tokio::sync::mpsc::unbounded_channel();
    let be = upgrade_backend(tx).await;
    let (_lb, addr) = lb_to(be).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let (head, body) = read_response(&mut s, &mut buf).await;
    // A failed backend response: a bodyless GET is tried on the other backends (none), 503.
    assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
    assert!(
        body.contains("all backends") && body.contains("connection failed"),
        "{body}"
    );
}

#[tokio::test]
async fn stopping_closes_idle_connections_and_finishes_requests_in_flight() {
    let a = TestBackend::start("a").await;
    let mut cfg = LbConfig::simple("fast-stop", listener(Protocol::Http), vec![a.addr]);
    cfg.limits.drain_timeout_ms = 5_000;
    let (lb, _) = start_lb(cfg).await;
    let addr = lb.addr(Protocol::Http).unwrap();
    let mut idle = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut idle, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    a.delay_ms.store(700, std::sync::atomic::Ordering::SeqCst);
    let mut busy = TcpStream::connect(addr).await.unwrap();
    busy.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopped = Instant::now();
    lb.shutdown();
    // The idle keep-alive connection is closed at once, without a response.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), idle.read_to_end(&mut rest))
        .await
        .expect("the idle connection is closed at once")
        .unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    assert!(stopped.elapsed() < Duration::from_millis(400));
    // The request in flight gets its response, marked as the connection's last.
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), busy.read_to_end(&mut all))
        .await
        .expect("the busy connection is closed after its response")
        .unwrap();
    let all = String::from_utf8_lossy(&all);
    assert!(all.starts_with("HTTP/1.1 200 OK\r\n"), "{all}");
    assert_eq!(field(&all, "connection"), ["close"], "{all}");
    assert!(all.ends_with("\r\n\r\na"), "{all}");
}
