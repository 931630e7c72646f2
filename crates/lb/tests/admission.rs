//! How backends enter and keep their place in the rotation, over real sockets: a new backend
//! is pending until its first probe (run at once) passes, a backend kept across an update keeps
//! its state, requests wait for a first probe under way instead of being refused.
#![allow(missing_docs)]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{listener, start_lb, tcp_echo, TestBackend};
use nimbus_lb::{
    BackendConfig, BackendStatus, HealthCheckConfig, HealthProbe, LbConfig, LoadBalancer, Protocol,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An HTTP check of `/health` every `interval_ms`, with the given thresholds.
fn check(interval_ms: u64, healthy: u32, unhealthy: u32) -> HealthCheckConfig {
    HealthCheckConfig {
        probe: HealthProbe::Http {
            path: "/health".into(),
            expect_status: 200,
        },
        interval_ms,
        timeout_ms: 500,
        healthy_threshold: healthy,
        unhealthy_threshold: unhealthy,
    }
}

fn cfg(backends: &[&TestBackend], health: Option<HealthCheckConfig>) -> LbConfig {
    let mut c = LbConfig::simple(
        "adm",
        listener(Protocol::Http),
        backends.iter().map(|b| b.addr).collect(),
    );
    for (bc, b) in c.pools[0].backends.iter_mut().zip(backends) {
        bc.name.clone_from(&b.name);
    }
    c.health_check = health;
    c
}

/// A client that opens a new connection per request, so every request is balanced anew.
fn fresh() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// `GET /`: the answering backend's name, or the status and body of a failure.
async fn get(c: &reqwest::Client, lb: &LoadBalancer) -> Result<String, String> {
    let url = format!("http://{}/", lb.addr(Protocol::Http).unwrap());
    let r = c.get(&url).send().await.map_err(|e| e.to_string())?;
    let status = r.status();
    let body = r.text().await.map_err(|e| e.to_string())?;
    if status == 200 {
        Ok(body)
    } else {
        Err(format!("{status}: {body}"))
    }
}

fn status(lb: &LoadBalancer, name: &str) -> BackendStatus {
    lb.backends()
        .into_iter()
        .find(|b| b.name == name && !b.draining)
        .unwrap_or_else(|| panic!("no backend {name}: {:?}", lb.backends()))
}

async fn until(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < within, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

#[tokio::test]
async fn a_new_backend_enters_on_its_first_probe_not_after_the_interval_or_threshold() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    // A 10 s interval and 3 passes to become healthy: only the immediate first probe, which
    // admits a new backend alone, can bring b in quickly.
    let health = Some(check(10_000, 3, 3));
    let (lb, _) = start_lb(cfg(&[&a], health.clone())).await;
    let c = fresh();
    assert_eq!(get(&c, &lb).await.as_deref(), Ok("a"));
    lb.update(cfg(&[&a, &b], health)).await.unwrap();
    let added = Instant::now();
    let mut seen = std::collections::BTreeSet::new();
    while !seen.contains("b") {
        assert!(
            added.elapsed() < Duration::from_secs(2),
            "b not served: {seen:?}"
        );
        seen.insert(get(&c, &lb).await.unwrap());
    }
    let took = added.elapsed();
    assert!(took < Duration::from_millis(300), "b served after {took:?}");
    let s = status(&lb, "b");
    assert!(s.healthy && !s.pending, "{s:?}");
}

#[tokio::test]
async fn a_pending_backend_gets_no_traffic_until_a_probe_passes() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    b.healthy.store(false, Ordering::SeqCst);
    let health = Some(check(10_000, 3, 1));
    let (lb, metrics) = start_lb(cfg(&[&a], health.clone())).await;
    lb.update(cfg(&[&a, &b], health)).await.unwrap();
    // Its first probes fail: pending, neither healthy nor a candidate.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let s = status(&lb, "b");
    assert!(s.pending && !s.healthy, "{s:?}");
    assert!(metrics
        .encode()
        .contains("nimbus_lb_backend_healthy{lb=\"adm\",backend=\"b\"} 0"));
    let c = fresh();
    for _ in 0..30 {
        assert_eq!(get(&c, &lb).await.as_deref(), Ok("a"));
    }
    assert_eq!(b.hits(), 0);
    // Probed again soon (not after the 10 s interval): in within a second of passing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.healthy.store(true, Ordering::SeqCst);
    let took = until("b healthy", Duration::from_secs(3), || {
        status(&lb, "b").healthy
    })
    .await;
    assert!(took <= Duration::from_millis(1_100), "b in after {took:?}");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        seen.insert(get(&c, &lb).await.unwrap());
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["a", "b"]);
}

#[tokio::test]
async fn backends_kept_across_updates_keep_their_state_and_serve_without_a_gap() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let x = TestBackend::start("x").await;
    let health = Some(check(100, 2, 1));
    let (lb, _) = start_lb(cfg(&[&a, &b], health.clone())).await;
    until("a and b healthy", Duration::from_secs(2), || {
        lb.backends().iter().all(|s| s.healthy)
    })
    .await;
    b.healthy.store(false, Ordering::SeqCst);
    until("b unhealthy", Duration::from_secs(2), || {
        !status(&lb, "b").healthy
    })
    .await;

    // A stream of requests while x is added and removed 20 times, the weights change and the
    // health check's interval too: never a failure, never b.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = {
        let (stop, url) = (
            std::sync::Arc::clone(&stop),
            format!("http://{}/", lb.addr(Protocol::Http).unwrap()),
        );
        tokio::spawn(async move {
            let client = fresh();
            let mut got = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                got.push(match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => r.text().await.unwrap_or_default(),
                    Ok(r) => format!("status {}", r.status()),
                    Err(e) => format!("error {e}"),
                });
            }
            got
        })
    };
    for i in 0..20 {
        let mut next = if i % 2 == 0 {
            cfg(&[&a, &b, &x], health.clone())
        } else {
            cfg(&[&a, &b], health.clone())
        };
        next.pools[0].backends[0].weight = 1 + i;
        if let Some(h) = &mut next.health_check {
            h.interval_ms = 100 + u64::from(i % 3);
        }
        lb.update(next).await.unwrap();
        let s = status(&lb, "b");
        assert!(!s.healthy && !s.pending, "b kept unhealthy: {s:?}");
        assert!(status(&lb, "a").healthy, "a kept healthy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let got = stream.await.unwrap();
    assert!(got.len() > 20, "{got:?}");
    let bad: Vec<&String> = got.iter().filter(|g| *g != "a" && *g != "x").collect();
    assert!(bad.is_empty(), "{bad:?} among {} requests", got.len());
    assert_eq!(b.hits(), 0);

    // b comes back after `healthy_threshold` passes, like before the updates.
    b.healthy.store(true, Ordering::SeqCst);
    until("b back", Duration::from_secs(2), || {
        status(&lb, "b").healthy
    })
    .await;
}

#[tokio::test]
async fn without_a_health_check_a_new_backend_takes_traffic_at_once() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let (lb, _) = start_lb(cfg(&[&a], None)).await;
    lb.update(cfg(&[&a, &b], None)).await.unwrap();
    let s = status(&lb, "b");
    assert!(s.healthy && !s.pending, "{s:?}");
    let c = fresh();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..2 {
        seen.insert(get(&c, &lb).await.unwrap());
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["a", "b"]);
}

#[tokio::test]
async fn requests_to_a_new_lb_wait_for_the_first_probe_instead_of_failing() {
    let a = TestBackend::start("a").await;
    let (lb, _) = start_lb(cfg(&[&a], Some(check(10_000, 3, 3)))).await;
    // Sent right away, before the first probe has answered.
    let c = fresh();
    assert_eq!(get(&c, &lb).await.as_deref(), Ok("a"));

    // A backend whose first probe fails: refused at once, not held.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut dcfg = LbConfig::simple("dead", listener(Protocol::Http), vec![dead]);
    dcfg.health_check = Some(check(10_000, 1, 1));
    let (dlb, _) = start_lb(dcfg).await;
    let started = Instant::now();
    let r = get(&c, &dlb).await;
    assert!(
        r.as_ref().is_err_and(|e| e.contains("no healthy backend")),
        "{r:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );

    // The same for TCP: the connection is relayed once the first probe passed.
    let (echo, _t) = tcp_echo().await;
    let mut tcfg = LbConfig::simple("tcpadm", listener(Protocol::Tcp), vec![echo]);
    tcfg.health_check = Some(HealthCheckConfig {
        probe: HealthProbe::Tcp,
        ..check(10_000, 3, 3)
    });
    let (tlb, _) = start_lb(tcfg).await;
    let mut s = TcpStream::connect(tlb.addr(Protocol::Tcp).unwrap())
        .await
        .unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf))
        .await
        .expect("relayed")
        .unwrap();
    assert_eq!(&buf, b"ping");
    for l in [lb, dlb, tlb] {
        l.shutdown();
    }
}

#[tokio::test]
async fn an_address_taken_over_by_another_backend_is_probed_as_new() {
    let a = TestBackend::start("a").await;
    let addr = a.addr;
    let other = TestBackend::start("o").await;
    let health = Some(check(10_000, 3, 3));
    let (lb, _) = start_lb(cfg(&[&a, &other], health.clone())).await;
    let c = fresh();
    until("a healthy", Duration::from_secs(2), || {
        status(&lb, "a").healthy
    })
    .await;
    // a leaves (it drains), its address is given to a2 (an instance replaced at the same IP).
    lb.update(cfg(&[&other], health.clone())).await.unwrap();
    drop(a);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let a2 = TestBackend::start_on("a2", addr).await;
    let mut next = cfg(&[&other], health);
    next.pools[0].backends.push(BackendConfig {
        name: "a2".into(),
        addr,
        weight: 1,
    });
    lb.update(next).await.unwrap();
    let added = Instant::now();
    let mut seen = std::collections::BTreeSet::new();
    while !seen.contains("a2") {
        assert!(added.elapsed() < Duration::from_secs(2), "{seen:?}");
        seen.insert(get(&c, &lb).await.unwrap());
    }
    assert!(
        added.elapsed() < Duration::from_millis(300),
        "{:?}",
        added.elapsed()
    );
    assert!(!seen.contains("a"), "{seen:?}");
    let all = lb.backends();
    assert!(
        all.iter().any(|s| s.name == "a" && s.draining),
        "a still drains: {all:?}"
    );
    assert!(a2.hits() > 0);
}
