//! Property tests of the fast path's request-head parser: it takes the client's bytes as they
//! come. Any bytes: no panic, a parsed head never claims more bytes than it was given; a
//! well-formed head parses whole (and each of its strict prefixes asks for more), and the head
//! it writes for the backend is itself one well-formed request with the same method and target
//! and exactly one `x-forwarded-for` (no field of the client's can smuggle another request).

use std::fmt::Write as _;

use proptest::prelude::*;

use super::{parse_request, Bufs, Client, Parsed};
use crate::config::{LbConfig, ListenerConfig, Protocol};
use crate::runtime::Snapshot;

fn snapshot() -> Snapshot {
    Snapshot {
        cfg: LbConfig::simple(
            "p",
            ListenerConfig {
                protocol: Protocol::Http,
                port: 80,
                bind: Vec::new(),
            },
            vec!["10.0.0.2:80".parse().expect("addr")],
        ),
        pools: Vec::new(),
        route_pools: Vec::new(),
        tls: None,
        cache: None,
        http: hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new()),
    }
}

fn client() -> Client {
    Client {
        peer: "192.0.2.7:40000".parse().expect("addr"),
        peer_ip: "192.0.2.7".into(),
        tls: false,
    }
}

fn bufs() -> Bufs {
    Bufs {
        up: Vec::new(),
        out: Vec::new(),
        rid: Vec::new(),
    }
}

/// A well-formed request head the fast path takes (no body, no upgrade).
fn head() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec!["GET", "HEAD", "DELETE", "OPTIONS"]),
        "/[A-Za-z0-9/._~%-]{0,40}(\\?[A-Za-z0-9=&]{0,20})?",
        "[a-z][a-z0-9.-]{0,30}(:[0-9]{1,5})?",
        prop::collection::vec(("x-[a-z0-9-]{1,15}", "[!-~][ -~]{0,40}"), 0..8),
        prop::option::of("[ -~]{0,30}"),
    )
        .prop_map(|(method, target, host, fields, xff)| {
            let mut h = format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\n");
            for (n, v) in fields {
                let _ = write!(h, "{n}: {}\r\n", v.trim_end());
            }
            if let Some(x) = xff {
                let _ = write!(h, "X-Forwarded-For: {}\r\n", x.trim());
            }
            h.push_str("\r\n");
            h.into_bytes()
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_are_handled_without_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let (snap, client, mut b) = (snapshot(), client(), bufs());
        if let Parsed::Request(r) = parse_request(&bytes, &snap, &client, &mut b) {
            prop_assert!(r.len <= bytes.len());
        }
    }

    #[test]
    fn mangled_heads_are_handled_without_panic(
        h in head(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut h = h;
        let i = at.index(h.len());
        h[i] = byte;
        let (snap, client, mut b) = (snapshot(), client(), bufs());
        if let Parsed::Request(r) = parse_request(&h, &snap, &client, &mut b) {
            prop_assert!(r.len <= h.len());
        }
    }

    #[test]
    fn well_formed_heads_parse_whole_and_forward_one_request(h in head(), tail in "[ -~]{0,20}") {
        let (snap, client, mut b) = (snapshot(), client(), bufs());
        for cut in 0..h.len() {
            prop_assert!(
                matches!(parse_request(&h[..cut], &snap, &client, &mut b), Parsed::Partial),
                "prefix of {} bytes", cut
            );
        }
        // Bytes after the head (a pipelined request) are not part of it.
        let mut buf = h.clone();
        buf.extend_from_slice(tail.as_bytes());
        let Parsed::Request(r) = parse_request(&buf, &snap, &client, &mut b) else {
            return Err(TestCaseError::fail("a well-formed head was not parsed"));
        };
        prop_assert_eq!(r.len, h.len());
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut up = httparse::Request::new(&mut fields);
        let n = match up.parse(&b.up) {
            Ok(httparse::Status::Complete(n)) => n,
            other => return Err(TestCaseError::fail(format!("backend head {other:?}"))),
        };
        prop_assert_eq!(n, b.up.len(), "one request, nothing after it");
        let mut orig_fields = [httparse::EMPTY_HEADER; 64];
        let mut orig = httparse::Request::new(&mut orig_fields);
        let _ = orig.parse(&h);
        prop_assert_eq!(up.method, orig.method);
        prop_assert_eq!(up.path, orig.path);
        let xff = up
            .headers
            .iter()
            .filter(|f| f.name.eq_ignore_ascii_case("x-forwarded-for"))
            .count();
        prop_assert_eq!(xff, 1);
    }
}
