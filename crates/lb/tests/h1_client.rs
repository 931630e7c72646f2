//! The L7 proxy's own HTTP/1.1 client to backends, against scripted raw-TCP backends: chunked
//! responses split across writes, bodies delimited by the backend closing, HEAD/204/304,
//! interim 100 responses, `Expect: 100-continue`, malformed responses and upgrades (502),
//! large bodies streamed with backpressure both ways, pooled connections closed by the backend.
#![allow(missing_docs)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{client, listener, read_head, start_lb};
use nimbus_lb::{LbConfig, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a scripted backend answers to one request: pieces written with a short pause between
/// them, then the connection is kept or closed.
struct Reply {
    parts: Vec<Vec<u8>>,
    close: bool,
}

fn reply(s: &str) -> Reply {
    Reply {
        parts: vec![s.as_bytes().to_vec()],
        close: false,
    }
}

type Script = Arc<dyn Fn(&str, &[u8]) -> Reply + Send + Sync>;

/// A backend on raw TCP: reads each request head (and a `Content-Length` body), answers what
/// `script(head, body)` says. Returns its address and a count of accepted connections.
async fn scripted(script: Script) -> (SocketAddr, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&conns);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let script = Arc::clone(&script);
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
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end);
                    let len = head
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
                    let body: Vec<u8> = buf.drain(..len).collect();
                    let r = script(&head, &body);
                    for (i, p) in r.parts.iter().enumerate() {
                        if i > 0 {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        if s.write_all(p).await.is_err() {
                            return;
                        }
                    }
                    if r.close {
                        return;
                    }
                }
            });
        }
    });
    (addr, conns)
}

async fn lb_for(be: SocketAddr) -> (nimbus_lb::LoadBalancer, String) {
    let mut cfg = LbConfig::simple("h1", listener(Protocol::Http), vec![be]);
    // The failures provoked here must not eject the only backend.
    cfg.outlier.consecutive_errors = 1000;
    let (lb, _) = start_lb(cfg).await;
    let base = format!("http://{}", lb.addr(Protocol::Http).unwrap());
    (lb, base)
}

fn path(head: &str) -> &str {
    head.split(' ').nth(1).unwrap_or("")
}

#[tokio::test]
async fn chunked_close_delimited_and_bodyless_responses_are_relayed() {
    let (be, conns) = scripted(Arc::new(|head: &str, _: &[u8]| match path(head) {
        // Chunk sizes, an extension and a trailer, split at awkward places across writes.
        "/chunked" => Reply {
            parts: vec![
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel".to_vec(),
                b"lo\r\n7;x=y\r\n, worl".to_vec(),
                b"d\r\n0\r\nx-trailer: t\r\n".to_vec(),
                b"\r\n".to_vec(),
            ],
            close: false,
        },
        // No length: the body ends when the backend closes.
        "/close" => Reply {
            parts: vec![
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ".to_vec(),
                b"close".to_vec(),
            ],
            close: true,
        },
        "/nocontent" => reply("HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n"),
        "/notmodified" => reply("HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\n\r\n"),
        "/interim" => Reply {
            parts: vec![
                b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(),
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal".to_vec(),
            ],
            close: false,
        },
        // HEAD: the length of the body a GET would get, and no body.
        _ if head.starts_with("HEAD ") => reply("HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"),
        _ => reply("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    }))
    .await;
    let (_lb, base) = lb_for(be).await;
    let c = client();
    let get = |p: &str| c.get(format!("{base}{p}")).send();

    let r = get("/chunked").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "hello, world");
    let r = get("/interim").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "final");
    let r = get("/nocontent").await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["x-a"], "1");
    let r = get("/notmodified").await.unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(r.headers()["etag"], "\"e\"");
    let r = c.head(format!("{base}/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "1000");
    assert_eq!(r.bytes().await.unwrap().len(), 0);
    let r = get("/").await.unwrap();
    assert_eq!(r.text().await.unwrap(), "ok");
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "chunked, interim, 204, 304 and HEAD responses left the backend connection reusable"
    );

    let r = get("/close").await.unwrap();
    assert_eq!(r.text().await.unwrap(), "until close");
    let r = get("/").await.unwrap();
    assert_eq!(r.text().await.unwrap(), "ok");
    assert_eq!(
        conns.load(Ordering::SeqCst),
        2,
        "a close-delimited response used up its connection"
    );
}

#[tokio::test]
async fn malformed_responses_and_upgrades_are_502_and_the_connection_dropped() {
    let (be, conns) = scripted(Arc::new(|head: &str, _: &[u8]| match path(head) {
        "/garbage" => reply("NOT HTTP AT ALL\r\n\r\n"),
        "/length" => reply("HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\nx"),
        "/upgrade" => reply("HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"),
        "/truncated" => Reply {
            parts: vec![b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc".to_vec()],
            close: true,
        },
        "/badchunk" => reply("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
        _ => reply("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    }))
    .await;
    let (_lb, base) = lb_for(be).await;
    let c = client();
    for p in ["/garbage", "/length", "/upgrade"] {
        // A request with a body is sent once: 502 naming the backend.
        let r = c.post(format!("{base}{p}")).body("x").send().await.unwrap();
        assert_eq!(r.status(), 502, "{p}");
        assert!(r.text().await.unwrap().contains("502 Bad Gateway"), "{p}");
        // One without is tried on the other backends first: with only this one, 503.
        let r = c.get(format!("{base}{p}")).send().await.unwrap();
        assert_eq!(r.status(), 503, "{p}");
    }
    // The head was fine, the body is not: the client's response is cut short (or, when the
    // proxy had not sent the head yet, the connection is closed without one).
    for p in ["/truncated", "/badchunk"] {
        match c.get(format!("{base}{p}")).send().await {
            Ok(r) => {
                assert_eq!(r.status(), 200, "{p}");
                let e = r.bytes().await.expect_err("the body should fail");
                assert!(!e.is_timeout(), "{p}: failed only by the client's timeout");
            }
            Err(e) => assert!(!e.is_timeout(), "{p}: {e}"),
        }
    }
    let before = conns.load(Ordering::SeqCst);
    let r = client().get(format!("{base}/")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "ok");
    assert!(
        conns.load(Ordering::SeqCst) > before,
        "a failed connection is never reused"
    );
}

#[tokio::test]
async fn expect_100_continue_gets_its_interim_response_and_the_body_arrives() {
    let (be, _) = scripted(Arc::new(|_: &str, body: &[u8]| {
        reply(&format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{}",
            body.len(),
            String::from_utf8_lossy(body)
        ))
    }))
    .await;
    let (lb, _base) = lb_for(be).await;
    let mut s = TcpStream::connect(lb.addr(Protocol::Http).unwrap())
        .await
        .unwrap();
    s.write_all(
        b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("100 Continue within 5 s")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100 Continue"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    s.write_all(b"payload").await.unwrap();
    let r = read_head(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.ends_with("\r\n\r\npayload"), "{r}");
}

#[tokio::test]
async fn large_bodies_stream_with_backpressure_both_ways() {
    // Larger than every socket buffer on the way can hold (tcp_rmem allows up to 32 MiB).
    const BIG: usize = 128 << 20;
    let written = Arc::new(AtomicU64::new(0));
    // A backend that sends BIG bytes in 64 KiB writes, counting what the proxy accepted.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let be = l.local_addr().unwrap();
    let w = Arc::clone(&written);
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut req = vec![0u8; 4096];
        let _ = s.read(&mut req).await.unwrap();
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        let piece = vec![b'z'; 64 << 10];
        for _ in 0..BIG / piece.len() {
            if s.write_all(&piece).await.is_err() {
                return;
            }
            w.fetch_add(piece.len() as u64, Ordering::SeqCst);
        }
    });
    let (lb, _) = lb_for(be).await;
    let mut s = TcpStream::connect(lb.addr(Protocol::Http).unwrap())
        .await
        .unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = s.read(&mut buf).await.unwrap();
    // The client reads nothing more for a while: the proxy must stop reading the backend.
    let mut last = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = written.load(Ordering::SeqCst);
        if now == last {
            break;
        }
        last = now;
    }
    let stalled = written.load(Ordering::SeqCst);
    assert!(
        stalled < (100 << 20) as u64,
        "the proxy buffered {stalled} bytes for a client that does not read"
    );
    let mut chunk = vec![0u8; 1 << 20];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("body within 60 s")
            .unwrap();
        if n == 0 {
            break;
        }
        got += n;
        let head_len = String::from_utf8_lossy(&buf[..buf.len().min(200)])
            .find("\r\n\r\n")
            .map_or(0, |i| i + 4);
        if got >= head_len + BIG && head_len > 0 {
            break;
        }
    }
    assert_eq!(written.load(Ordering::SeqCst), BIG as u64);
}

#[tokio::test]
async fn chunked_uploads_of_unknown_length_arrive_whole() {
    // A backend that decodes a chunked request body and answers its length and checksum.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let be = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut data = Vec::new();
        let mut chunk = vec![0u8; 65536];
        // Read until the terminating last chunk.
        while !data.ends_with(b"\r\n0\r\n\r\n") {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "proxy closed mid-body");
            data.extend_from_slice(&chunk[..n]);
        }
        let i = data.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&data[..i]).to_ascii_lowercase();
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        let mut rest = &data[i + 4..];
        let mut body = Vec::new();
        loop {
            let eol = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap(), 16).unwrap();
            rest = &rest[eol + 2..];
            if size == 0 {
                break;
            }
            body.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        let sum: u64 = body.iter().map(|&b| u64::from(b)).sum();
        let answer = format!("{} {sum}", body.len());
        let r = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{answer}",
            answer.len()
        );
        s.write_all(r.as_bytes()).await.unwrap();
    });
    let (_lb, base) = lb_for(be).await;
    let pieces: Vec<Result<Bytes, std::io::Error>> = (0..256u32)
        .map(|i| Ok(Bytes::from(vec![(i % 251) as u8; 16 << 10])))
        .collect();
    let expected_sum: u64 = (0..256u64).map(|i| (i % 251) * (16 << 10)).sum();
    let r = client()
        .post(format!("{base}/upload"))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(pieces)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.text().await.unwrap(),
        format!("{} {expected_sum}", 256 * (16 << 10))
    );
}

#[tokio::test]
async fn a_pooled_connection_the_backend_closed_is_not_used_for_a_request_with_a_body() {
    // Answers one request per connection, then closes it without `Connection: close`.
    let (be, conns) = scripted(Arc::new(|_: &str, body: &[u8]| Reply {
        parts: vec![format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{}",
            body.len(),
            String::from_utf8_lossy(body)
        )
        .into_bytes()],
        close: true,
    }))
    .await;
    let (_lb, base) = lb_for(be).await;
    let c = client();
    for i in 0..4 {
        // The body cannot be resent, so the proxy must notice the closed connection first.
        let body = format!("body {i}");
        let r = c
            .post(format!("{base}/"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(conns.load(Ordering::SeqCst), 4);
}
