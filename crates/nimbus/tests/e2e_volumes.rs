//! End to end: volumes and storage pools through the real `nimbus` binary against a real
//! `nimbus up`: create, list, show, snapshot, resize, restore and delete, `-o json`, and every
//! bad input refused with one line on stderr, a non-zero exit and nothing changed. Volumes
//! have no data path yet, so `launch --volume` is refused after its checks.

use std::path::Path;
use std::process::Output;

use nimbus_testkit::{have, require, Cloud};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nimbus"))
}

fn deps() -> bool {
    require("root", nix::unistd::geteuid().is_root()) && require("runc", have("runc"))
}

fn run(cloud: &Cloud, args: &[&str]) -> Output {
    cloud.cli().args(args).output().expect("run nimbus")
}

fn ok(cloud: &Cloud, args: &[&str]) -> String {
    let o = run(cloud, args);
    assert!(
        o.status.success(),
        "nimbus {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs a verb that must fail: non-zero exit, one line on stderr containing `want`.
fn refused(cloud: &Cloud, args: &[&str], want: &str) {
    let o = run(cloud, args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "nimbus {args:?} succeeded");
    assert_eq!(err.trim_end().lines().count(), 1, "nimbus {args:?}: {err}");
    assert!(
        err.contains(want),
        "nimbus {args:?}: {err:?} lacks {want:?}"
    );
}

fn json(cloud: &Cloud, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(cloud, args)).expect("JSON output")
}

#[test]
fn volume_verbs_and_bad_input() {
    if !deps() {
        return;
    }
    let cloud = Cloud::start(bin()).expect("nimbus up");

    let out = ok(&cloud, &["storage", "pool", "list"]);
    assert!(out.contains("local"), "{out}");
    let pool = json(&cloud, &["storage", "pool", "show", "local", "-o", "json"]);
    assert_eq!(pool["driver"], "local");

    let out = ok(&cloud, &["volume", "create", "data", "--size", "10G"]);
    assert!(out.contains("10G in pool local"), "{out}");
    ok(
        &cloud,
        &[
            "volume",
            "create",
            "raw",
            "--size",
            "1G",
            "--shared",
            "--encrypted",
        ],
    );
    let v = json(&cloud, &["volume", "show", "data", "-o", "json"]);
    assert_eq!(v["size_bytes"], 10u64 << 30);
    assert_eq!(v["pool"], "local");
    assert_eq!(v["state"], "available");
    assert_eq!(v["version"], 1);
    let raw = json(&cloud, &["volume", "show", "raw", "-o", "json"]);
    assert_eq!(
        (raw["shared"].as_bool(), raw["encrypted"].as_bool()),
        (Some(true), Some(true))
    );

    ok(&cloud, &["volume", "snapshot", "data", "nightly"]);
    let out = ok(&cloud, &["volume", "resize", "data", "20G"]);
    assert!(out.contains("20G"), "{out}");
    let list = json(&cloud, &["volume", "list", "-o", "json"]);
    let names: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["data", "raw"]);
    let data = &list[0];
    assert_eq!(data["size_bytes"], 20u64 << 30);
    assert_eq!(data["snapshots"][0]["name"], "nightly");
    assert_eq!(data["snapshots"][0]["size_bytes"], 10u64 << 30);
    assert_eq!(data["version"], 3);
    let table = ok(&cloud, &["volume", "list"]);
    assert!(
        table.contains("nightly") && table.contains("shared"),
        "{table}"
    );

    // Bad input: each refused, nothing changed.
    let before = json(&cloud, &["volume", "list", "-o", "json"]);
    refused(
        &cloud,
        &["volume", "create", "z", "--size", "0"],
        "field size",
    );
    refused(
        &cloud,
        &["volume", "create", "z", "--size", "ten"],
        "invalid size",
    );
    refused(
        &cloud,
        &["volume", "create", "z", "--size", "17T"],
        "maximum",
    );
    refused(
        &cloud,
        &["volume", "create", "Z", "--size", "1G"],
        "field name",
    );
    refused(
        &cloud,
        &["volume", "create", "z", "--size", "1G", "--pool", "fast"],
        "storage pool \"fast\" not found",
    );
    refused(
        &cloud,
        &["volume", "create", "data", "--size", "1G"],
        "already exists",
    );
    refused(&cloud, &["volume", "resize", "data", "5G"], "cannot shrink");
    refused(
        &cloud,
        &["volume", "resize", "data", "nope"],
        "invalid size",
    );
    refused(
        &cloud,
        &["volume", "snapshot", "data", "nightly"],
        "already exists",
    );
    refused(
        &cloud,
        &["volume", "snapshot", "nope", "x"],
        "volume \"nope\" not found",
    );
    ok(&cloud, &["volume", "snapshot", "raw", "first"]);
    refused(
        &cloud,
        &["volume", "restore", "data", "raw@first"],
        "only its own snapshots",
    );
    refused(&cloud, &["volume", "restore", "data", "first"], "not found");
    refused(&cloud, &["volume", "show", "nope"], "not found");
    refused(&cloud, &["volume", "delete", "nope"], "not found");
    refused(&cloud, &["storage", "pool", "show", "fast"], "not found");
    refused(
        &cloud,
        &["launch", "busybox", "db", "--volume", "nope:/data"],
        "volume \"nope\" not found",
    );
    refused(
        &cloud,
        &["launch", "busybox", "db", "--volume", "raw:/data"],
        "only VMs",
    );
    refused(
        &cloud,
        &["launch", "busybox", "db", "--volume", "data"],
        "NAME:/PATH",
    );
    refused(
        &cloud,
        &["launch", "busybox", "db", "--volume", "data:/data"],
        "not attached to instances yet",
    );
    let mut after = json(&cloud, &["volume", "list", "-o", "json"]);
    // Only the snapshot of `raw` taken above changed it.
    after[1] = before[1].clone();
    assert_eq!(before, after);
    assert!(json(&cloud, &["list", "-o", "json"])
        .as_array()
        .unwrap()
        .is_empty());

    let v = json(&cloud, &["volume", "show", "data", "-o", "json"]);
    assert_eq!(v["version"], 3);
    let out = ok(&cloud, &["volume", "restore", "data", "nightly"]);
    assert!(out.contains("10G"), "{out}");
    ok(&cloud, &["volume", "delete", "data"]);
    ok(&cloud, &["volume", "rm", "raw"]);
    assert!(json(&cloud, &["volume", "list", "-o", "json"])
        .as_array()
        .unwrap()
        .is_empty());
    let events = ok(&cloud, &["events"]);
    for reason in ["Created", "Snapshotted", "Resized", "Restored", "Deleted"] {
        assert!(
            events
                .lines()
                .any(|l| l.contains("volume") && l.contains(reason)),
            "no volume {reason} event: {events}"
        );
    }
}
