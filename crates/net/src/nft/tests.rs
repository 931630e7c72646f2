//! Unit tests of the nftables planner against listings `nft -j` (1.0.6) produced on this
//! kernel (`testdata/`).

use super::*;
use nimbus_api::agent::{GroupPlan, InstancePlan, NetworkPlan, SubnetPlan};
use nimbus_api::{InstanceType, Protocol, PublishedPort, SecurityGroupRule};

const INET_JSON: &str = include_str!("testdata/inet.json");
const BRIDGE_JSON: &str = include_str!("testdata/bridge.json");

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_string()).collect()
}

#[test]
fn parses_a_listing_into_canonical_elements() {
    let st = parse_table(&INET, INET_JSON).unwrap();
    assert!(!st.unreadable);
    assert_eq!(
        st.layout,
        INET.layout(),
        "the listing has the current layout"
    );
    assert_eq!(st.elements["bridges"], set(&["\"ntryb100\""]));
    assert_eq!(st.elements["vpc_cidrs"], set(&["10.213.0.0/24"]));
    assert_eq!(
        st.elements["in_ports"],
        set(&[
            "10.213.0.5 . 0.0.0.0/0 . tcp . 80-90",
            "10.213.0.5 . 10.1.2.3 . udp . 53"
        ])
    );
    assert_eq!(
        st.elements["publish"],
        set(&["tcp . 8080 : 10.213.0.5 . 80"])
    );
    assert_eq!(st.elements["host_snat"], set(&["10.213.0.9 : 10.250.0.1"]));
    assert_eq!(st.elements["nodes4"], set(&["10.250.0.2"]));
    assert_eq!(st.elements["tunnel_ports"], set(&["4789"]));
    assert_eq!(
        st.elements["host_open"],
        set(&["tcp . 18400", "udp . 5353"])
    );
    let br = parse_table(&BRIDGE, BRIDGE_JSON).unwrap();
    assert_eq!(br.layout, BRIDGE.layout());
    assert_eq!(br.elements["port_ips"], set(&["\"nv1234\" . 10.213.0.5"]));
}

#[test]
fn same_elements_plan_nothing_and_changes_are_incremental() {
    let st = parse_table(&INET, INET_JSON).unwrap();
    let want = st.elements.clone();
    let (script, n) = plan_table(&INET, "ntry", Some(&st), Some(&want));
    assert_eq!((script.as_str(), n), ("", 0));
    let mut want2 = want.clone();
    want2
        .get_mut("in_ports")
        .unwrap()
        .remove("10.213.0.5 . 10.1.2.3 . udp . 53");
    want2
        .get_mut("in_ports")
        .unwrap()
        .insert("10.213.0.5 . 10.1.2.3 . udp . 5353".into());
    want2.get_mut("publish").unwrap().clear();
    let (script, n) = plan_table(&INET, "ntry", Some(&st), Some(&want2));
    assert_eq!(n, 3);
    assert_eq!(
        script,
        "delete element inet ntry in_ports { 10.213.0.5 . 10.1.2.3 . udp . 53 }\n\
         add element inet ntry in_ports { 10.213.0.5 . 10.1.2.3 . udp . 5353 }\n\
         delete element inet ntry publish { tcp . 8080 }\n"
    );
    assert!(
        !script.contains("table"),
        "no table is rebuilt for an element change"
    );
}

#[test]
fn missing_or_foreign_tables_are_replaced_atomically_and_empty_nodes_have_none() {
    let mut want = BTreeMap::new();
    want.insert("local4".to_string(), set(&["10.0.0.2"]));
    let (script, _) = plan_table(&INET, "t", None, Some(&want));
    assert!(
        script.starts_with("table inet t {}\ndelete table inet t\ntable inet t {\n"),
        "{script}"
    );
    assert!(
        script.ends_with("add element inet t local4 { 10.0.0.2 }\n"),
        "{script}"
    );
    let mut st = parse_table(&INET, INET_JSON).unwrap();
    st.layout.chains.insert("sg_ingress".into(), 99);
    let (script, _) = plan_table(&INET, "t", Some(&st), Some(&want));
    assert!(script.contains("delete table inet t"));
    let (script, _) = plan_table(&INET, "t", Some(&st), None);
    assert_eq!(script, "delete table inet t\n");
    let (script, _) = plan_table(&INET, "t", None, None);
    assert_eq!(script, "");
}

#[test]
fn desired_elements_from_a_map() {
    let map = NetworkMap {
        revision: 1,
        prefix: "nt".into(),
        mtu: 1450,
        vxlan_port: 4789,
        underlay_ip: "10.250.0.1".into(),
        networks: vec![NetworkPlan {
            id: "n".into(),
            project: "p".into(),
            name: "default".into(),
            vni: 100,
            cidr: "10.213.0.0/24".into(),
            subnets: vec![SubnetPlan {
                cidr: "10.213.0.0/24".into(),
                gateway: "10.213.0.1".into(),
            }],
            remote: vec![nimbus_api::agent::RemoteEndpoint {
                ip: "10.213.0.9".into(),
                mac: "0a:00:00:00:00:09".into(),
                underlay_ip: "10.250.0.2".into(),
            }],
        }],
        security_groups: vec![GroupPlan {
            key: "p/default".into(),
            rules: vec![SecurityGroupRule {
                id: "r1".into(),
                direction: Direction::Ingress,
                protocol: Protocol::Tcp,
                port_min: 22,
                port_max: 22,
                cidr: Some("0.0.0.0/0".into()),
                group: None,
                description: String::new(),
            }],
            members: vec!["10.213.0.2".into()],
        }],
        instances: vec![InstancePlan {
            id: "0f3c9e2a-1b2c-4d5e-8f90-123456789abc".into(),
            instance_type: InstanceType::Container,
            network: "n".into(),
            ip: "10.213.0.2".into(),
            mac: "0a:00:00:00:00:02".into(),
            groups: vec!["p/default".into()],
            publish: vec![PublishedPort {
                host_port: 8080,
                port: 80,
                protocol: Protocol::Tcp,
            }],
        }],
        nodes: vec!["10.250.0.2".into()],
    };
    let d = desired(&map, |_| "nv0f3c9e2a1b2c".into());
    assert!(!d.empty);
    assert_eq!(d.inet["bridges"], set(&["\"ntb100\""]));
    assert_eq!(d.inet["same_bridge"], set(&["\"ntb100\" . \"ntb100\""]));
    assert_eq!(d.inet["vpc_cidrs"], set(&["10.213.0.0/24"]));
    assert_eq!(d.inet["local4"], set(&["10.213.0.2"]));
    assert_eq!(
        d.inet["in_ports"],
        set(&["10.213.0.2 . 0.0.0.0/0 . tcp . 22"])
    );
    assert_eq!(d.inet["publish"], set(&["tcp . 8080 : 10.213.0.2 . 80"]));
    assert_eq!(
        d.bridge["port_ips"],
        set(&["\"nv0f3c9e2a1b2c\" . 10.213.0.2"])
    );
    let empty = desired(
        &NetworkMap {
            instances: vec![],
            ..map
        },
        |_| String::new(),
    );
    assert!(empty.empty);
}

/// Prints the skeletons; `testdata/` is regenerated from them when the layout changes:
/// `nft -f` them in a scratch namespace, add the elements the tests expect, `nft -j list table`.
#[test]
#[ignore = "helper for regenerating testdata"]
fn print_skeletons() {
    print!("{}", INET.skeleton("ntry"));
    print!("{}", BRIDGE.skeleton("ntry"));
}

#[test]
fn instances_reach_only_what_the_node_serves_them() {
    // The input hook drops what instances (arriving on a network bridge) send to any of the
    // node's own addresses, except replies, published ports (DNATed), the open LB ports and
    // ping.
    let skel = INET.skeleton("t");
    let chain = skel
        .split("chain host_in {")
        .nth(1)
        .and_then(|c| c.split('}').next())
        .expect("host_in chain");
    let rules: Vec<&str> = chain
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        rules,
        [
            "type filter hook input priority filter; policy accept;",
            "iifname != @bridges return",
            "ct state established,related accept",
            "ct status dnat accept",
            "meta l4proto . th dport @host_open accept",
            "icmp type echo-request accept",
            "counter drop",
        ]
    );
    let mut d = Desired::default();
    d.open_to_instances([
        (Protocol::Tcp, 8080),
        (Protocol::Udp, 53),
        (Protocol::Icmp, 0),
        (Protocol::All, 0),
        (Protocol::Tcp, 8080),
    ]);
    assert_eq!(d.inet["host_open"], set(&["tcp . 8080", "udp . 53"]));
    // Opening a port is an element change, not a new table.
    let st = parse_table(&INET, INET_JSON).unwrap();
    let mut want = st.elements.clone();
    want.insert("host_open".into(), set(&["tcp . 18400"]));
    let (script, n) = plan_table(&INET, "ntry", Some(&st), Some(&want));
    assert_eq!(n, 1);
    assert_eq!(
        script,
        "delete element inet ntry host_open { udp . 5353 }\n"
    );
}
