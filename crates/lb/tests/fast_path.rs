//! The L7 fast path (HTTP/1.1 requests without a body served without hyper), over raw TCP on
//! both sides: request and response heads rewritten in one pass (hop-by-hop fields and the
//! names `Connection` lists dropped, forwarding headers set, the request id relayed), one keep-
//! alive connection mixing fast-path requests, pipelined ones and requests handed to hyper,
//! HTTP/1.0 and `Connection: close`, and the response timeout of its per-connection timer.
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
