//! Property tests of the parsers that take outside bytes: sizes, CIDRs, names, labels, and a
//! whole create-instance request. No input panics; values round-trip where that means
//! something.

use std::net::Ipv4Addr;

use nimbus_api::cidr::Cidr;
use nimbus_api::validate::{self, format_size, json_size, parse_size};
use nimbus_api::CreateInstanceRequest;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn sizes_never_panic_and_stay_in_bounds(s in "\\PC{0,30}") {
        if let Ok(n) = parse_size("memory", &s) {
            prop_assert!((1..=1_000_000_000_000_000_000).contains(&n), "{s:?} -> {n}");
        }
    }

    #[test]
    fn size_strings_of_digits_and_units_never_panic(s in "[0-9.]{0,25}[kKmMgGtTiIbB]{0,3}") {
        let _ = parse_size("memory", &s);
    }

    #[test]
    fn exact_sizes_round_trip(n in 1u64..1024, unit in 0usize..5, plain in 1u64..=1_000_000_000_000_000_000) {
        let (suffix, mult) = [("", 1u64), ("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)][unit];
        prop_assert_eq!(parse_size("memory", &format!("{n}{suffix}")).ok(), Some(n * mult));
        // Whole numbers are exact, also beyond 2^53 (no float rounding).
        prop_assert_eq!(parse_size("memory", &plain.to_string()).ok(), Some(plain));
        prop_assert!(parse_size("memory", &(1_000_000_000_000_000_001u64 + plain % 1000).to_string()).is_err());
    }

    #[test]
    fn formatted_sizes_parse_back_close(n in 1u64..(1 << 50)) {
        let back = parse_size("memory", &format_size(n)).expect("a formatted size parses");
        let err = (back as f64 - n as f64).abs() / n as f64;
        // One decimal of the unit: within 5%.
        prop_assert!(err <= 0.05, "{} -> {} -> {}", n, format_size(n), back);
    }

    #[test]
    fn json_sizes_never_panic(v in prop_oneof![
        any::<u64>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        "\\PC{0,20}".prop_map(serde_json::Value::from),
    ]) {
        if let Ok(n) = json_size("memory", &v) {
            prop_assert!((1..=1_000_000_000_000_000_000).contains(&n));
        }
    }

    #[test]
    fn cidrs_round_trip(addr in any::<u32>(), len in 0u8..=32) {
        let c = Cidr::new(Ipv4Addr::from(addr), len);
        let text = c.to_string();
        prop_assert_eq!(Cidr::parse(&text).expect("canonical text parses"), c);
        prop_assert!(c.contains(c.network()) && c.contains(c.last()));
        prop_assert_eq!(c.size(), 1u64 << (32 - u32::from(len)));
    }

    #[test]
    fn any_cidr_text_never_panics_and_what_parses_is_canonical(s in "\\PC{0,24}") {
        if let Ok(c) = Cidr::parse(&s) {
            prop_assert_eq!(Cidr::parse(&c.to_string()).expect("reparse"), c);
        }
    }

    #[test]
    fn cidr_like_text_never_panics(s in "[0-9]{1,4}(\\.[0-9]{1,4}){0,4}(/[0-9]{0,4})?") {
        let _ = Cidr::parse(&s);
    }

    #[test]
    fn names_follow_dns_label_rules(s in "\\PC{0,70}") {
        let ok = validate::name("name", &s).is_ok();
        let rule = !s.is_empty()
            && s.len() <= 63
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && s.as_bytes()[0].is_ascii_lowercase()
            && !s.ends_with('-');
        prop_assert_eq!(ok, rule, "{:?}", s);
    }

    #[test]
    fn valid_names_are_accepted(s in "[a-z]([a-z0-9-]{0,61}[a-z0-9])?") {
        prop_assert!(validate::name("name", &s).is_ok(), "{:?}", s);
    }

    #[test]
    fn labels_never_panic(k in "\\PC{0,70}", v in "\\PC{0,300}") {
        let _ = validate::label(&k, &v);
    }

    #[test]
    fn create_requests_never_panic(
        name in "\\PC{0,20}",
        cpus in prop::option::of(any::<f64>()),
        memory in prop::option::of(prop_oneof![
            any::<u64>().prop_map(serde_json::Value::from),
            "\\PC{0,12}".prop_map(serde_json::Value::from),
        ]),
        pids in prop::option::of(any::<u64>()),
    ) {
        let req = CreateInstanceRequest {
            name,
            image: "busybox".into(),
            cpus,
            memory,
            pids_limit: pids,
            ..CreateInstanceRequest::default()
        };
        if let Ok(d) = validate::create_instance("p", &req) {
            prop_assert!(d.spec.cpus >= 0.0 && d.spec.cpus <= 256.0);
            prop_assert!(d.spec.pids_limit >= 1 && d.spec.pids_limit <= validate::MAX_PIDS_LIMIT);
        }
    }
}
