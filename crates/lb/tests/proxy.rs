//! The L7 proxy over real sockets: balancing, health, TLS, routing, cache, bad input, hot swap.
#![allow(missing_docs)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{client, listener, raw, read_head, start_lb, TestBackend};
use nimbus_lb::{
    Algorithm, CacheConfig, HealthCheckConfig, HealthProbe, LbConfig, PoolConfig, Protocol,
    RouteConfig, RouteMatch, TlsConfig,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn cfg(backends: &[&TestBackend]) -> LbConfig {
    let mut c = LbConfig::simple(
        "t",
        listener(Protocol::Http),
        backends.iter().map(|b| b.addr).collect(),
    );
    for (bc, b) in c.pools[0].backends.iter_mut().zip(backends) {
        bc.name.clone_from(&b.name);
    }
    c
}

fn pool(name: &str, backends: &[&TestBackend]) -> PoolConfig {
    let mut c = cfg(backends).pools.remove(0);
    c.name = name.into();
    c
}

#[tokio::test]
async fn round_robin_spreads_within_ten_percent() {
    let bs = [
        TestBackend::start("a").await,
        TestBackend::start("b").await,
        TestBackend::start("c").await,
    ];
    let (lb, metrics) = start_lb(cfg(&[&bs[0], &bs[1], &bs[2]])).await;
    let url = format!("http://{}/", lb.addr(Protocol::Http).unwrap());
    let c = client();
    for _ in 0..1000 {
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    for b in &bs {
        let h = b.hits() as f64;
        assert!((h - 333.3).abs() <= 33.4, "{} got {h} of 1000", b.name);
    }
    let text = metrics.encode();
    assert!(text.contains("nimbus_lb_requests_total{lb=\"t\",backend=\"a\",class=\"2xx\"}"));
    assert!(text.contains("nimbus_lb_latency_seconds_bucket"));
}

#[tokio::test]
async fn least_connections_prefers_the_idle_backend() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let mut c = cfg(&[&a, &b]);
    c.pools[0].algorithm = Algorithm::LeastConnections;
    let (lb, _) = start_lb(c).await;
    let base = format!("http://{}", lb.addr(Protocol::Http).unwrap());
    let slow = tokio::spawn(client().get(format!("{base}/slow")).send());
    // Wait until one backend holds the slow request.
    let deadline = Instant::now() + Duration::from_secs(3);
    while a.path_hits("/slow") + b.path_hits("/slow") == 0 {
        assert!(Instant::now() < deadline, "slow request never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (busy, idle) = if a.path_hits("/slow") == 1 {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let c = client();
    for _ in 0..20 {
        let body = c
            .get(format!("{base}/"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(body, idle.name, "a quick request went to the busy backend");
    }
    assert_eq!(busy.path_hits("/"), 0);
    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
}

#[tokio::test]
async fn unhealthy_backend_drops_out_and_returns() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let mut c = cfg(&[&a, &b]);
    c.health_check = Some(HealthCheckConfig {
        probe: HealthProbe::Http {
            path: "/health".into(),
            expect_status: 200,
        },
        interval_ms: 100,
        timeout_ms: 200,
        healthy_threshold: 2,
        unhealthy_threshold: 2,
    });
    let (lb, metrics) = start_lb(c).await;
    let url = format!("http://{}/", lb.addr(Protocol::Http).unwrap());
    let http = client();
    b.healthy.store(false, std::sync::atomic::Ordering::SeqCst);
    // Threshold 2 x 100 ms interval: out within well under a second.
    let start = Instant::now();
    while lb
        .backends()
        .iter()
        .find(|s| s.name == "b")
        .unwrap()
        .healthy
    {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "b never marked unhealthy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        start.elapsed() < Duration::from_millis(1000),
        "took {:?}",
        start.elapsed()
    );
    assert!(metrics
        .encode()
        .contains("nimbus_lb_backend_healthy{lb=\"t\",backend=\"b\"} 0"));
    let before = b.hits();
    for _ in 0..50 {
        assert_eq!(
            http.get(&url).send().await.unwrap().text().await.unwrap(),
            "a"
        );
    }
    assert_eq!(b.hits(), before);
    b.healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    let start = Instant::now();
    while !lb
        .backends()
        .iter()
        .find(|s| s.name == "b")
        .unwrap()
        .healthy
    {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "b never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..10 {
        http.get(&url).send().await.unwrap();
    }
    assert!(b.hits() >= before + 4, "b gets traffic again");
}

#[tokio::test]
async fn dead_backends_are_skipped_then_503_with_a_clear_body() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let (lb, _) = start_lb(cfg(&[&a, &b])).await;
    let url = format!("http://{}/", lb.addr(Protocol::Http).unwrap());
    let http = client();
    drop(b); // connection refused from now on
    for _ in 0..10 {
        let r = http.get(&url).send().await.unwrap();
        assert_eq!(
            r.status(),
            200,
            "a connect failure is retried on another backend"
        );
        assert_eq!(r.text().await.unwrap(), "a");
    }
    drop(a);
    let start = Instant::now();
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body = r.text().await.unwrap();
    assert!(body.contains("load balancer t"), "{body}");
    assert!(start.elapsed() < Duration::from_secs(3));
    // Passive ejection: after enough failures the backends are ejected, still a quick 503.
    for _ in 0..10 {
        let r = http.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 503);
    }
    assert!(
        lb.backends().iter().all(|s| s.ejected),
        "{:?}",
        lb.backends()
    );
}

#[tokio::test]
async fn host_path_and_header_routing() {
    let api = TestBackend::start("api").await;
    let stat = TestBackend::start("static").await;
    let canary = TestBackend::start("canary").await;
    let def = TestBackend::start("default").await;
    let mut c = cfg(&[&def]);
    c.pools.push(pool("api", &[&api]));
    c.pools.push(pool("static", &[&stat]));
    c.pools.push(pool("canary", &[&canary]));
    c.routes = vec![
        RouteConfig {
            matcher: RouteMatch {
                header: Some(nimbus_lb::HeaderMatch {
                    name: "x-canary".into(),
                    value: "yes".into(),
                }),
                ..RouteMatch::default()
            },
            pool: "canary".into(),
        },
        RouteConfig {
            matcher: RouteMatch {
                path_prefix: Some("/api/".into()),
                ..RouteMatch::default()
            },
            pool: "api".into(),
        },
        RouteConfig {
            matcher: RouteMatch {
                host: Some("*.static.test".into()),
                ..RouteMatch::default()
            },
            pool: "static".into(),
        },
    ];
    let (lb, _) = start_lb(c).await;
    let base = format!("http://{}", lb.addr(Protocol::Http).unwrap());
    let http = client();
    let get = |path: &str, host: Option<&str>, canary: bool| {
        let mut r = http.get(format!("{base}{path}"));
        if let Some(h) = host {
            r = r.header("host", h);
        }
        if canary {
            r = r.header("x-canary", "yes");
        }
        async move { r.send().await.unwrap().text().await.unwrap() }
    };
    assert_eq!(get("/api/users", None, false).await, "api");
    assert_eq!(get("/apiary", None, false).await, "default");
    assert_eq!(
        get("/img.png", Some("cdn.static.test"), false).await,
        "static"
    );
    assert_eq!(get("/img.png", Some("static.test"), false).await, "default");
    assert_eq!(
        get("/api/users", Some("cdn.static.test"), true).await,
        "canary"
    );
    assert_eq!(get("/", None, false).await, "default");
}

#[tokio::test]
async fn forwarded_headers_and_request_id() {
    let a = TestBackend::start("a").await;
    let (lb, _) = start_lb(cfg(&[&a])).await;
    let url = format!("http://{}/", lb.addr(Protocol::Http).unwrap());
    let r = client()
        .get(&url)
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .unwrap();
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(rid.len(), 32);
    assert_eq!(
        a.header("x-forwarded-for").as_deref(),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(a.header("x-request-id").as_deref(), Some(rid.as_str()));
    assert_eq!(a.header("x-forwarded-proto").as_deref(), Some("http"));
    let r = client()
        .get(&url)
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    assert_eq!(a.header("x-request-id").as_deref(), Some("abc-123"));
}

#[tokio::test]
async fn sticky_cookie_pins_a_client() {
    let bs = [
        TestBackend::start("a").await,
        TestBackend::start("b").await,
        TestBackend::start("c").await,
    ];
    let mut c = cfg(&[&bs[0], &bs[1], &bs[2]]);
    c.sticky_cookie = Some("lb".into());
    let (lb, _) = start_lb(c).await;
    let url = format!("http://{}/", lb.addr(Protocol::Http).unwrap());
    let http = client();
    let r = http.get(&url).send().await.unwrap();
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let first = r.text().await.unwrap();
    for _ in 0..20 {
        let r = http
            .get(&url)
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert!(r.headers().get("set-cookie").is_none());
        assert_eq!(r.text().await.unwrap(), first);
    }
}

#[tokio::test]
async fn edge_cache_serves_hits_and_revalidates_after_expiry() {
    let a = TestBackend::start("a").await;
    let mut c = cfg(&[&a]);
    c.cache = Some(CacheConfig {
        max_bytes: 1 << 20,
        max_object_bytes: 64 << 10,
    });
    let (lb, metrics) = start_lb(c).await;
    let url = format!("http://{}/cache/x", lb.addr(Protocol::Http).unwrap());
    let http = client();
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.headers()["x-cache"], "MISS");
    assert_eq!(r.text().await.unwrap(), "cached-a");
    assert_eq!(a.path_hits("/cache/x"), 1);
    for _ in 0..5 {
        let r = http.get(&url).send().await.unwrap();
        assert_eq!(r.headers()["x-cache"], "HIT");
        assert_eq!(r.text().await.unwrap(), "cached-a");
    }
    assert_eq!(a.path_hits("/cache/x"), 1, "hits never touch the backend");
    // Client revalidation against a cached entry: 304 from the edge.
    let r = http
        .get(&url)
        .header("if-none-match", "\"v1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(a.path_hits("/cache/x"), 1);
    // HEAD is served from the GET entry.
    let r = http.head(&url).send().await.unwrap();
    assert_eq!(r.headers()["x-cache"], "HIT");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.headers()["x-cache"], "REVALIDATED");
    assert_eq!(r.text().await.unwrap(), "cached-a");
    assert_eq!(a.path_hits("/cache/x"), 2);
    assert_eq!(a.header("if-none-match").as_deref(), Some("\"v1\""));
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.headers()["x-cache"], "HIT");
    // Private responses and POSTs are never stored.
    let p = format!("http://{}/private", lb.addr(Protocol::Http).unwrap());
    http.get(&p).send().await.unwrap();
    http.get(&p).send().await.unwrap();
    assert_eq!(a.path_hits("/private"), 2);
    let text = metrics.encode();
    assert!(
        text.contains("nimbus_lb_cache_requests_total{lb=\"t\",result=\"hit\"} 8"),
        "{text}"
    );
    assert!(text.contains("nimbus_lb_cache_requests_total{lb=\"t\",result=\"revalidated\"} 1"));
}

#[tokio::test]
async fn malformed_and_oversized_requests_do_not_disturb_others() {
    let a = TestBackend::start("a").await;
    let (lb, _) = start_lb(cfg(&[&a])).await;
    let addr = lb.addr(Protocol::Http).unwrap();
    // A healthy keep-alive connection opened before the bad ones.
    let mut good = TcpStream::connect(addr).await.unwrap();
    good.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_head(&mut good).await.starts_with("HTTP/1.1 200"));
    let bad = raw(addr, b"GARBAGE\x01 / HTTP/1.1\r\n\r\n").await;
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    let bad = raw(addr, b"GET / HTTP/1.1\r\nHost x\r\n\r\n").await;
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40_000)
    );
    let bad = raw(addr, big.as_bytes()).await;
    assert!(bad.starts_with("HTTP/1.1 431"), "{bad}");
    let many = "X-H: v\r\n".repeat(200);
    let bad = raw(
        addr,
        format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert!(bad.starts_with("HTTP/1.1 431"), "{bad}");
    good.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_head(&mut good).await.starts_with("HTTP/1.1 200"));
    assert_eq!(a.hits(), 2, "bad requests never reach the backend");
}

#[tokio::test]
async fn config_swap_keeps_established_connections() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let mut c = cfg(&[&a]);
    c.limits.drain_timeout_ms = 200;
    let (lb, _) = start_lb(c.clone()).await;
    let addr = lb.addr(Protocol::Http).unwrap();
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let r = read_head(&mut conn).await;
    assert!(r.ends_with("\r\n\r\na"), "{r}");
    let mut c2 = cfg(&[&b]);
    c2.limits.drain_timeout_ms = 200;
    lb.update(c2).await.unwrap();
    assert_eq!(lb.addr(Protocol::Http), Some(addr), "listener kept");
    conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let r = read_head(&mut conn).await;
    assert!(
        r.ends_with("\r\n\r\nb"),
        "same connection, new backend: {r}"
    );
    let st = lb.backends();
    assert!(st.iter().any(|s| s.name == "a" && s.draining), "{st:?}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        lb.backends().iter().all(|s| s.name != "a"),
        "drained backend removed"
    );
    // Bad config is refused and changes nothing.
    let mut bad = cfg(&[&b]);
    bad.routes.push(RouteConfig {
        matcher: RouteMatch::default(),
        pool: "nope".into(),
    });
    assert!(lb.update(bad).await.is_err());
    conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_head(&mut conn).await.ends_with('b'));
}

#[tokio::test]
async fn http2_prior_knowledge() {
    let a = TestBackend::start("a").await;
    let (lb, _) = start_lb(cfg(&[&a])).await;
    let url = format!("http://{}/", lb.addr(Protocol::Http).unwrap());
    let c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.text().await.unwrap(), "a");
    assert!(
        a.header("host").is_some(),
        "authority becomes Host for the HTTP/1.1 backend"
    );
}

#[tokio::test]
async fn https_termination_with_a_generated_certificate() {
    let a = TestBackend::start("a").await;
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let mut c = cfg(&[&a]);
    c.listeners = vec![listener(Protocol::Https)];
    c.tls = Some(TlsConfig {
        cert_pem: ck.cert.pem(),
        key_pem: ck.key_pair.serialize_pem(),
        cipher_suites: Vec::new(),
    });
    let (lb, _) = start_lb(c.clone()).await;
    let port = lb.addr(Protocol::Https).unwrap().port();
    let root = reqwest::Certificate::from_pem(ck.cert.pem().as_bytes()).unwrap();
    for h2 in [false, true] {
        let mut b = reqwest::Client::builder()
            .add_root_certificate(root.clone())
            .resolve("localhost", ([127, 0, 0, 1], port).into());
        if !h2 {
            b = b.http1_only();
        }
        let r = b
            .build()
            .unwrap()
            .get(format!("https://localhost:{port}/"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.version(),
            if h2 {
                reqwest::Version::HTTP_2
            } else {
                reqwest::Version::HTTP_11
            }
        );
        assert_eq!(r.text().await.unwrap(), "a");
    }
    assert_eq!(a.header("x-forwarded-proto").as_deref(), Some("https"));
    // TLS 1.3 is negotiated (and 1.2 refused).
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls12 = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn = tokio_rustls::TlsConnector::from(Arc::new(tls12));
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    assert!(
        conn.connect(name, tcp).await.is_err(),
        "TLS 1.2 must be refused"
    );
    // A key that does not match the certificate is refused.
    let other = rcgen::KeyPair::generate().unwrap();
    c.tls = Some(TlsConfig {
        cert_pem: ck.cert.pem(),
        key_pem: other.serialize_pem(),
        cipher_suites: Vec::new(),
    });
    let err = lb.update(c).await.unwrap_err().to_string();
    assert!(err.contains("does not match"), "{err}");
}

/// TLS 1.3 handshake with a client offering `suites` (in that preference order); the suite
/// negotiated, or `None` when the handshake fails.
async fn negotiated_suite(
    port: u16,
    root: &rcgen::CertifiedKey,
    suites: Vec<rustls::SupportedCipherSuite>,
) -> Option<rustls::CipherSuite> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.cert.der().clone()).unwrap();
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = suites;
    let cc = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cc))
        .connect(name, tcp)
        .await
        .ok()?;
    tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite())
}

#[tokio::test]
async fn https_cipher_suites_restrict_what_is_negotiated() {
    use rustls::crypto::ring::cipher_suite as cs;
    let a = TestBackend::start("a").await;
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let mut c = cfg(&[&a]);
    c.listeners = vec![listener(Protocol::Https)];
    c.tls = Some(TlsConfig {
        cert_pem: ck.cert.pem(),
        key_pem: ck.key_pair.serialize_pem(),
        cipher_suites: Vec::new(),
    });
    let (lb, _) = start_lb(c.clone()).await;
    let port = lb.addr(Protocol::Https).unwrap().port();
    let prefer_256 = || vec![cs::TLS13_AES_256_GCM_SHA384, cs::TLS13_AES_128_GCM_SHA256];
    // Unrestricted, the client's first choice wins.
    assert_eq!(
        negotiated_suite(port, &ck, prefer_256()).await,
        Some(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384)
    );
    // Restricted to AES-128-GCM: chosen although the client prefers AES-256-GCM, and a client
    // without it is refused.
    c.tls.as_mut().unwrap().cipher_suites = vec!["TLS_AES_128_GCM_SHA256".into()];
    lb.update(c.clone()).await.unwrap();
    assert_eq!(
        negotiated_suite(port, &ck, prefer_256()).await,
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
    );
    assert_eq!(
        negotiated_suite(port, &ck, vec![cs::TLS13_AES_256_GCM_SHA384]).await,
        None
    );
    // Unknown and repeated names are refused.
    for bad in [
        vec!["TLS_AES_128_CCM_SHA256".to_string()],
        vec![
            "TLS_AES_128_GCM_SHA256".into(),
            "TLS_AES_128_GCM_SHA256".into(),
        ],
    ] {
        c.tls.as_mut().unwrap().cipher_suites = bad;
        let err = lb.update(c.clone()).await.unwrap_err().to_string();
        assert!(err.contains("cipher suite"), "{err}");
    }
    // The JSON form the proxy reads.
    let json = serde_json::to_value(c.tls.as_ref().unwrap()).unwrap();
    assert!(json.get("cipher_suites").is_some());
    c.tls.as_mut().unwrap().cipher_suites.clear();
    let json = serde_json::to_value(c.tls.as_ref().unwrap()).unwrap();
    assert!(json.get("cipher_suites").is_none(), "omitted when empty");
}
