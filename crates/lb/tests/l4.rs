//! L4 TCP and UDP proxies over real sockets.
#![allow(missing_docs)]

mod common;

use std::time::{Duration, Instant};

use common::{listener, start_lb, tcp_echo, udp_echo};
use nimbus_lb::{LbConfig, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

#[tokio::test]
async fn tcp_proxy_round_robins_connections_and_moves_bytes() {
    let (e1, _t1) = tcp_echo().await;
    let (e2, _t2) = tcp_echo().await;
    let (lb, metrics) = start_lb(LbConfig::simple(
        "l4",
        listener(Protocol::Tcp),
        vec![e1, e2],
    ))
    .await;
    let addr = lb.addr(Protocol::Tcp).unwrap();
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    for _ in 0..4 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let (mut r, mut w) = s.split();
        let send = async {
            w.write_all(&payload).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let recv = r.read_to_end(&mut got);
        let ((), n) = tokio::join!(send, recv);
        n.unwrap();
        assert_eq!(got, payload);
    }
    let text = metrics.encode();
    for b in ["b0", "b1"] {
        assert!(
            text.contains(&format!(
                "nimbus_lb_requests_total{{lb=\"l4\",backend=\"{b}\",class=\"2xx\"}} 2"
            )),
            "{text}"
        );
    }
}

/// A reader that stalls fills every buffer on the path (the relay's pipes and both sockets'
/// queues); the relay must resume when it reads again, lose nothing, and also answer many small
/// request/response exchanges promptly (no lost wake-up between them).
#[tokio::test]
async fn tcp_relay_survives_backpressure_and_small_exchanges() {
    let (e1, _t1) = tcp_echo().await;
    let (lb, _) = start_lb(LbConfig::simple("l4bp", listener(Protocol::Tcp), vec![e1])).await;
    let addr = lb.addr(Protocol::Tcp).unwrap();
    let payload: Vec<u8> = (0..24_000_000u32).map(|i| (i % 253) as u8).collect();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let recv = async {
        // Stall long enough for the echo path to back up completely.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut got = Vec::with_capacity(payload.len());
        r.read_to_end(&mut got).await.unwrap();
        got
    };
    let ((), got) =
        tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(send, recv) })
            .await
            .expect("relay stalled under backpressure");
    assert_eq!(got.len(), payload.len());
    assert!(got == payload, "bytes differ after backpressure");

    let mut s = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    for i in 0..200u32 {
        let msg = i.to_be_bytes();
        s.write_all(&msg).await.unwrap();
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf))
            .await
            .expect("small exchange stalled")
            .unwrap();
        assert_eq!(buf, msg);
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "200 small exchanges took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn tcp_connections_to_a_removed_backend_drain_then_close() {
    let (e1, _t1) = tcp_echo().await;
    let (e2, _t2) = tcp_echo().await;
    let mut cfg = LbConfig::simple("drain", listener(Protocol::Tcp), vec![e1]);
    cfg.limits.drain_timeout_ms = 300;
    let (lb, _) = start_lb(cfg.clone()).await;
    let addr = lb.addr(Protocol::Tcp).unwrap();
    let mut old = TcpStream::connect(addr).await.unwrap();
    old.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    old.read_exact(&mut buf).await.unwrap();
    let mut next = cfg.clone();
    next.pools[0].backends[0].addr = e2;
    next.pools[0].backends[0].name = "b1".into();
    lb.update(next).await.unwrap();
    let removed = Instant::now();
    // Still works during the drain window.
    old.write_all(b"pong").await.unwrap();
    old.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    // Then closed by the proxy.
    let n = tokio::time::timeout(Duration::from_secs(3), old.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0);
    assert!(removed.elapsed() >= Duration::from_millis(250));
    // New connections go to the new backend.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"new!").await.unwrap();
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"new!");
    assert!(lb
        .backends()
        .iter()
        .any(|b| b.name == "b1" && b.active == 1));
}

#[tokio::test]
async fn tcp_with_no_backend_closes_the_connection() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (lb, _) = start_lb(LbConfig::simple(
        "dead",
        listener(Protocol::Tcp),
        vec![dead],
    ))
    .await;
    let mut s = TcpStream::connect(lb.addr(Protocol::Tcp).unwrap())
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)));
}

#[tokio::test]
async fn udp_proxy_keeps_a_session_per_client() {
    let (u1, _t1) = udp_echo("one:").await;
    let (u2, _t2) = udp_echo("two:").await;
    let (lb, _) = start_lb(LbConfig::simple(
        "udp",
        listener(Protocol::Udp),
        vec![u1, u2],
    ))
    .await;
    let addr = lb.addr(Protocol::Udp).unwrap();
    let mut tags = Vec::new();
    for _ in 0..2 {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut first = None;
        for i in 0..5 {
            c.send_to(format!("m{i}").as_bytes(), addr).await.unwrap();
            let mut buf = [0u8; 64];
            let (n, from) = tokio::time::timeout(Duration::from_secs(2), c.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(from, addr, "replies come from the LB address");
            let s = String::from_utf8_lossy(&buf[..n]).to_string();
            let (tag, msg) = s.split_once(':').unwrap();
            assert_eq!(msg, format!("m{i}"));
            assert_eq!(
                *first.get_or_insert(tag.to_string()),
                tag,
                "same client, same backend"
            );
        }
        tags.push(first.unwrap());
    }
    assert_ne!(
        tags[0], tags[1],
        "two clients, round robin over two backends"
    );
}
