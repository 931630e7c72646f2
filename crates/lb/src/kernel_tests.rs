use super::*;
use crate::config::{BackendConfig, ListenerConfig};

fn be(slot: u16, addr: &str, weight: u32, available: bool) -> KernelBackend {
    KernelBackend {
        slot,
        addr: addr.parse().unwrap(),
        weight,
        available,
    }
}

fn plan(listeners: &[(Protocol, &str)], backends: Vec<KernelBackend>) -> KernelPlan {
    KernelPlan {
        table: "t_lb00000001".into(),
        listeners: listeners
            .iter()
            .map(|(p, a)| (*p, a.parse().unwrap()))
            .collect(),
        backends,
        by_client: false,
    }
}

fn cfg(alg: Algorithm, listen: &str, backends: &[&str]) -> LbConfig {
    let mut c = LbConfig::simple(
        "x",
        ListenerConfig {
            protocol: Protocol::Tcp,
            port: 80,
            bind: vec![listen.parse().unwrap()],
        },
        backends.iter().map(|b| b.parse().unwrap()).collect(),
    );
    c.pools[0].algorithm = alg;
    c
}

#[test]
fn weights_become_ranges_of_one_numgen() {
    let p = plan(
        &[(Protocol::Tcp, "10.0.0.1:80")],
        vec![
            be(0, "10.1.0.2:8080", 3, true),
            be(1, "10.1.0.3:8080", 1, false),
            be(2, "10.1.0.4:8080", 2, true),
        ],
    );
    let s = p.script();
    assert!(
        s.contains("numgen inc mod 5 vmap { 0-2 : jump b0, 3-4 : jump b2 }"),
        "{s}"
    );
    // The unavailable backend keeps its chain and counters (its flows still count) but gets
    // no new connections.
    assert!(s.contains("chain b1 {"), "{s}");
    assert!(s.contains("counter tx1 { }"), "{s}");
    assert!(s.contains(&format!(
        "ct mark set {:#010x} counter name \"n2\" dnat ip to 10.1.0.4:8080",
        p.mark(2)
    )));
    // Replaced whole in one transaction, also when absent.
    assert!(s.starts_with("table ip t_lb00000001 { }\ndelete table ip t_lb00000001\n"));
}

#[test]
fn no_available_backend_leaves_pick_empty() {
    let p = plan(
        &[(Protocol::Tcp, "10.0.0.1:80")],
        vec![be(0, "10.1.0.2:8080", 1, false)],
    );
    assert!(!p.script().contains("numgen"));
}

#[test]
fn loopback_clients_of_remote_backends_stay_in_user_space() {
    let p = plan(
        &[
            (Protocol::Tcp, "127.0.0.1:80"),
            (Protocol::Udp, "0.0.0.0:53"),
        ],
        vec![be(0, "10.1.0.2:8080", 1, true)],
    );
    let (pre, out) = p.entry_rules();
    assert_eq!(
        pre,
        vec!["fib daddr type local meta l4proto udp th dport 53 jump pick"]
    );
    assert_eq!(
        out,
        vec!["ip daddr != 127.0.0.0/8 fib daddr type local meta l4proto udp th dport 53 jump pick"]
    );
}

#[test]
fn loopback_backends_serve_local_clients_only() {
    let p = plan(
        &[
            (Protocol::Tcp, "127.0.0.1:80"),
            (Protocol::Tcp, "0.0.0.0:81"),
        ],
        vec![be(0, "127.0.0.1:8080", 1, true)],
    );
    let (pre, out) = p.entry_rules();
    assert!(pre.is_empty());
    assert_eq!(
        out,
        vec![
            "ip daddr 127.0.0.1 meta l4proto tcp th dport 80 jump pick",
            "fib daddr type local meta l4proto tcp th dport 81 jump pick"
        ]
    );
}

#[test]
fn eligibility() {
    let ok = cfg(Algorithm::Weighted, "0.0.0.0", &["10.0.0.2:80"]);
    assert_eq!(eligible(&ok), Ok(true));
    assert_eq!(
        eligible(&cfg(Algorithm::RoundRobin, "127.0.0.1", &["127.0.0.1:9"])),
        Ok(true)
    );
    for alg in [Algorithm::IpHash, Algorithm::ConsistentHash] {
        assert_eq!(eligible(&cfg(alg, "0.0.0.0", &["10.0.0.2:80"])), Ok(true));
    }
    assert_eq!(
        eligible(&cfg(
            Algorithm::LeastConnections,
            "0.0.0.0",
            &["10.0.0.2:80"]
        )),
        Err(Ineligible::Algorithm(Algorithm::LeastConnections))
    );
    assert_eq!(
        eligible(&cfg(Algorithm::RoundRobin, "::", &["10.0.0.2:80"])),
        Err(Ineligible::Ipv6)
    );
    assert_eq!(
        eligible(&cfg(
            Algorithm::RoundRobin,
            "0.0.0.0",
            &["10.0.0.2:80", "127.0.0.1:80"]
        )),
        Err(Ineligible::MixedLoopback)
    );
    let mut http = ok.clone();
    http.listeners[0].protocol = Protocol::Http;
    assert_eq!(eligible(&http), Ok(false));
    let mut many = ok;
    many.pools[0].backends = (0..=u32::from(MAX_SLOTS))
        .map(|i| BackendConfig {
            name: format!("b{i}"),
            addr: SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 80)),
            weight: 1,
        })
        .collect();
    assert_eq!(eligible(&many), Err(Ineligible::TooManyBackends));
}

#[test]
fn client_hash_covers_every_bucket_in_ranges() {
    let mut p = plan(
        &[(Protocol::Tcp, "0.0.0.0:80")],
        vec![
            be(3, "10.0.0.2:80", 1, true),
            be(9, "10.0.0.3:80", 1, true),
            be(5, "10.0.0.4:80", 1, false),
        ],
    );
    p.by_client = true;
    let script = p.script();
    let rule = script
        .lines()
        .find(|l| l.contains("jhash"))
        .expect("a jhash rule")
        .trim()
        .to_string();
    assert!(
        rule.starts_with("jhash ip saddr mod 256 seed 0x4e696d62 vmap { 0"),
        "{rule}"
    );
    assert!(!rule.contains("jump b5"), "unavailable backend in {rule}");
    // The ranges cover 0..=255 exactly once, in order.
    let body = rule.split_once('{').unwrap().1.trim_end_matches('}');
    let mut next = 0;
    for e in body.split(',') {
        let (range, _) = e.split_once(':').unwrap();
        let (a, b) = range
            .trim()
            .split_once('-')
            .map_or((range.trim(), range.trim()), |(a, b)| (a, b));
        assert_eq!(a.parse::<u32>().unwrap(), next, "{rule}");
        next = b.parse::<u32>().unwrap() + 1;
    }
    assert_eq!(next, BUCKETS);
    p.backends.iter_mut().for_each(|b| b.available = false);
    assert!(!p.script().contains("jhash"));
}

#[test]
fn client_hash_follows_weights_and_moves_only_what_changed() {
    let backends = vec![
        be(0, "10.0.0.2:80", 1, true),
        be(1, "10.0.0.3:80", 1, true),
        be(2, "10.0.0.4:80", 2, true),
    ];
    let mut p = plan(&[(Protocol::Tcp, "0.0.0.0:80")], backends);
    p.by_client = true;
    let before = p.bucket_owners();
    let share = |o: &[Option<u16>], s: u16| o.iter().filter(|x| **x == Some(s)).count();
    // Weight 2 gets about half of the buckets, weight 1 about a quarter each.
    assert!((96..=160).contains(&share(&before, 2)), "{before:?}");
    assert!((40..=90).contains(&share(&before, 0)), "{before:?}");
    assert!((40..=90).contains(&share(&before, 1)), "{before:?}");
    // Backend 1 leaves: only its buckets move, and they spread over the others.
    p.backends[1].available = false;
    let after = p.bucket_owners();
    for (b, a) in before.iter().zip(&after) {
        if *b == Some(1) {
            assert!(matches!(a, Some(0 | 2)));
        } else {
            assert_eq!(b, a);
        }
    }
    // It returns: exactly the old assignment.
    p.backends[1].available = true;
    assert_eq!(p.bucket_owners(), before);
}

#[test]
fn round_robin_ignores_weights() {
    assert_eq!(weight(Algorithm::RoundRobin, 7), 1);
    assert_eq!(weight(Algorithm::Weighted, 7), 7);
    assert_eq!(weight(Algorithm::IpHash, 7), 1);
    assert_eq!(weight(Algorithm::ConsistentHash, 7), 7);
}

#[test]
fn marks_identify_table_and_slot() {
    let a = mark("a_lb00000001", 5);
    assert_eq!(a & 0xff00_0000, MARK_TAG);
    assert_eq!(a & 0xfff, 5);
    assert_eq!(
        mark("a_lb00000001", 0) & MARK_TABLE_MASK,
        a & MARK_TABLE_MASK
    );
}

#[test]
fn counters_parse() {
    let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
      {"counter": {"family": "ip", "name": "n0", "table": "t", "handle": 8, "packets": 6, "bytes": 360}},
      {"counter": {"family": "ip", "name": "tx0", "table": "t", "handle": 10, "packets": 24, "bytes": 1296}},
      {"counter": {"family": "ip", "name": "rx0", "table": "t", "handle": 12, "packets": 20, "bytes": 999}},
      {"counter": {"family": "ip", "name": "n12", "table": "t", "handle": 9, "packets": 2, "bytes": 120}}]}"#;
    let c = parse_counters(json).unwrap();
    assert_eq!(
        c[&0],
        SlotCounters {
            connections: 6,
            bytes_to: 1296,
            bytes_from: 999
        }
    );
    assert_eq!(c[&12].connections, 2);
    assert!(parse_counters("not json").is_err());
}

#[test]
fn conntrack_counts_established_and_udp_flows_of_this_table() {
    let base = mark("t_lb00000001", 0);
    let other = mark("t_lb00000002", 0) ^ 0x1000; // a different table id
    let text = format!(
        "ipv4     2 tcp      6 431999 ESTABLISHED src=127.0.0.1 dst=127.0.0.1 sport=1 dport=80 src=127.0.0.1 dst=127.0.0.1 sport=8080 dport=1 [ASSURED] mark={} zone=0 use=2\n\
         ipv4     2 tcp      6 119 TIME_WAIT src=127.0.0.1 dst=127.0.0.1 sport=2 dport=80 src=127.0.0.1 dst=127.0.0.1 sport=8080 dport=2 [ASSURED] mark={} zone=0 use=2\n\
         ipv4     2 udp      17 29 src=127.0.0.1 dst=127.0.0.1 sport=3 dport=53 src=127.0.0.1 dst=127.0.0.1 sport=5353 dport=3 mark={} zone=0 use=2\n\
         ipv4     2 tcp      6 431999 ESTABLISHED src=1.1.1.1 dst=2.2.2.2 sport=1 dport=80 src=2.2.2.2 dst=1.1.1.1 sport=80 dport=1 [ASSURED] mark={} zone=0 use=2\n\
         ipv4     2 tcp      6 431999 ESTABLISHED src=1.1.1.1 dst=2.2.2.2 sport=1 dport=80 src=2.2.2.2 dst=1.1.1.1 sport=80 dport=1 [ASSURED] mark=0 zone=0 use=2\n",
        base,
        base,
        base | 3,
        other
    );
    let c = count_conntrack(&text, base);
    assert_eq!(c.get(&0), Some(&1));
    assert_eq!(c.get(&3), Some(&1));
    assert_eq!(c.len(), 2);
}

#[test]
fn kernel_forwarded_tcp_gets_an_implicit_health_check() {
    let mut c = cfg(Algorithm::RoundRobin, "0.0.0.0", &["10.0.0.2:80"]);
    assert_eq!(
        effective_health_check(&c),
        None,
        "relayed: passive ejection works"
    );
    c.kernel_l4 = Some("p".into());
    assert_eq!(
        effective_health_check(&c),
        Some(HealthCheckConfig::default())
    );
    let configured = HealthCheckConfig {
        interval_ms: 123,
        ..HealthCheckConfig::default()
    };
    c.health_check = Some(configured.clone());
    assert_eq!(effective_health_check(&c), Some(configured));
    c.health_check = None;
    c.listeners[0].protocol = Protocol::Udp;
    assert_eq!(effective_health_check(&c), None, "no TCP probe for UDP");
    c.listeners[0].protocol = Protocol::Tcp;
    c.pools[0].algorithm = Algorithm::LeastConnections;
    assert_eq!(effective_health_check(&c), None, "relayed again");
}
