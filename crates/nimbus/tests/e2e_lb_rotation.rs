//! End to end: how fast backends enter and how cleanly they leave a load balancer's rotation,
//! with real `nimbus up`, busybox `httpd` containers and the CLI.
//!
//! - An LB created right after its two backends were launched serves both within 1.5 s of the
//!   second `launch` returning `running` (a new backend is admitted by its first health probe,
//!   run at once).
//! - Under a constant request stream, launching a replacement and then deleting an old backend,
//!   three times, loses no request (the control plane takes a backend out of every LB before
//!   its process is signalled). From the second round on, the replacement gets the address of
//!   the backend deleted the round before, so the datapath must also make a reused address
//!   reach its new instance at once.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nimbus_testkit::{have, require, Cloud};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nimbus"))
}

fn deps() -> bool {
    require("root", nix::unistd::geteuid().is_root())
        && require("runc", have("runc"))
        && require("/bin/busybox", Path::new("/bin/busybox").exists())
        && require("nft", have("nft"))
}

/// Runs the CLI; panics with its output unless it succeeds. Returns stdout and stderr.
async fn cli(cloud: &Cloud, args: &[&str]) -> String {
    let o = tokio::process::Command::from(cloud.cli())
        .args(args)
        .output()
        .await
        .expect("run nimbus");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "nimbus {args:?} failed: {text}");
    text
}

/// `nimbus launch` of a busybox httpd on port 80 whose page is its own name, labelled `label`;
/// httpd starts `delay` after the container (an application that binds its port a moment after
/// it started). Returns when the CLI returned `running`.
async fn launch(cloud: &Cloud, name: &str, label: &str, delay: &str) -> Instant {
    let script = format!(
        "mkdir -p /www && echo {name} > /www/index.html && sleep {delay} && exec httpd -f -p 80 -h /www"
    );
    let out = cli(
        cloud,
        &[
            "launch", "busybox", name, "--cpus", "0.1", "--memory", "32M", "--label", label, "--",
            "sh", "-c", &script,
        ],
    )
    .await;
    let at = Instant::now();
    assert!(out.contains("running"), "{out}");
    at
}

/// One `GET /` to `host`:`port`: the body on 200, else what went wrong.
async fn get(client: &reqwest::Client, host: &str, port: u16) -> Result<String, String> {
    match client
        .get(format!("http://{host}:{port}/"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
    {
        Ok(r) => {
            let status = r.status();
            let body = r.text().await.map_err(|e| format!("body: {e:?}"))?;
            if status == 200 {
                Ok(body.trim().to_string())
            } else {
                Err(format!("{status}: {}", body.trim()))
            }
        }
        Err(e) => Err(format!("{e:?}")),
    }
}

/// One round of the admission test: how the LB listens and probes, and how late httpd starts.
struct Round {
    protocol: &'static str,
    check: &'static str,
    delay: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_created_with_its_backends_serves_both_within_1_5_s() {
    if !deps() {
        return;
    }
    let cloud = Cloud::start(bin()).expect("nimbus up");
    let base = 18_600 + u16::from(cloud.slot()) * 8;
    let node_ip = cloud
        .client()
        .list_nodes()
        .await
        .unwrap()
        .remove(0)
        .underlay_ip;
    // A fresh connection per request, so every request is balanced anew.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let rounds = [
        Round {
            protocol: "http",
            check: "tcp",
            delay: "0",
        },
        Round {
            protocol: "http",
            check: "http:/index.html",
            delay: "0.3",
        },
        Round {
            protocol: "http",
            check: "tcp,interval=5s,healthy=3",
            delay: "0.3",
        },
        // TCP clients of the node's address are forwarded by the in-kernel L4 path.
        Round {
            protocol: "tcp",
            check: "tcp",
            delay: "0.3",
        },
        Round {
            protocol: "http",
            check: "http:/,interval=10s,healthy=2,unhealthy=1",
            delay: "0",
        },
        Round {
            protocol: "tcp",
            check: "http:/index.html,interval=3s",
            delay: "0",
        },
    ];
    let mut report = Vec::new();
    for (i, r) in rounds.iter().enumerate() {
        if std::env::var("ONLY_ROUND").is_ok_and(|v| v != i.to_string()) {
            continue;
        }
        let port = base + i as u16;
        let label = format!("app=r{i}");
        let (a, b) = (format!("r{i}a"), format!("r{i}b"));
        let what = format!(
            "round {i} ({}, {}, httpd after {} s)",
            r.protocol, r.check, r.delay
        );
        launch(&cloud, &a, &label, r.delay).await;
        let second_running = launch(&cloud, &b, &label, r.delay).await;
        cli(
            &cloud,
            &[
                "lb",
                "create",
                &format!("r{i}"),
                "--listen",
                &format!("{port}:80/{}", r.protocol),
                "--backend-label",
                &label,
                "--health-check",
                r.check,
            ],
        )
        .await;
        let created = second_running.elapsed();
        let host = if r.protocol == "tcp" {
            node_ip.as_str()
        } else {
            "127.0.0.1"
        };
        let mut seen = std::collections::BTreeSet::new();
        let mut errors = Vec::new();
        // Poll well past the bound so a failure says how late the second backend was.
        while seen.len() < 2 && second_running.elapsed() < Duration::from_secs(15) {
            match get(&client, host, port).await {
                Ok(body) => {
                    if seen.insert(body.clone()) {
                        report.push(format!(
                            "{what}: {body} served {} ms after the second launch",
                            second_running.elapsed().as_millis()
                        ));
                    }
                }
                Err(e) => {
                    if errors.len() < 5 {
                        errors.push(format!("{} ms: {e}", second_running.elapsed().as_millis()));
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        let both = second_running.elapsed();
        report.push(format!(
            "{what}: lb create returned after {} ms, both served after {} ms",
            created.as_millis(),
            both.as_millis()
        ));
        assert_eq!(
            seen.iter().map(String::as_str).collect::<Vec<_>>(),
            [a.as_str(), b.as_str()],
            "{what}: the LB did not serve both backends\n{}\nfirst errors: {errors:#?}\n{}",
            report.join("\n"),
            cloud.log()
        );
        assert!(
            both <= Duration::from_millis(1_500),
            "{what}: both backends served only after {} ms (bound 1500 ms)\n{}\nfirst errors: {errors:#?}\n{}",
            both.as_millis(),
            report.join("\n"),
            cloud.log()
        );
        cli(&cloud, &["lb", "delete", &format!("r{i}")]).await;
        cli(&cloud, &["delete", &a]).await;
        cli(&cloud, &["delete", &b]).await;
    }
    eprintln!("{}", report.join("\n"));
    cloud.shutdown();
}

/// What one request of the stream got.
struct Outcome {
    /// When it was sent, from the start of the stream.
    at: Duration,
    took: Duration,
    result: Result<String, String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_backend_replacement_under_load_loses_no_request() {
    if !deps() {
        return;
    }
    let cloud = Cloud::start(bin()).expect("nimbus up");
    let port = 18_600 + u16::from(cloud.slot()) * 8 + 7;
    let tcp_port = port - 1;
    let node_ip = cloud
        .client()
        .list_nodes()
        .await
        .unwrap()
        .remove(0)
        .underlay_ip;
    let label = "app=roll";
    launch(&cloud, "v0", label, "0").await;
    launch(&cloud, "v1", label, "0").await;
    cli(
        &cloud,
        &[
            "lb",
            "create",
            "roll",
            "--listen",
            &format!("{port}:80/http"),
            "--listen",
            &format!("{tcp_port}:80/tcp"),
            "--backend-label",
            label,
            "--health-check",
            "http:/index.html,interval=1s",
        ],
    )
    .await;
    // Both backends serve before the stream starts.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    for (host, port) in [("127.0.0.1", port), (node_ip.as_str(), tcp_port)] {
        let mut seen = std::collections::BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen.len() < 2 {
            assert!(
                Instant::now() < deadline,
                "LB on {host}:{port} never served v0 and v1: {seen:?}"
            );
            if let Ok(b) = get(&fresh, host, port).await {
                seen.insert(b);
            }
        }
    }

    // The stream, ~60 requests/s from each of three clients: HTTP reusing its connection to
    // the LB, HTTP with a new connection per request, and a new TCP connection per request to
    // the TCP listener on the node's address (forwarded by the kernel: no retry hides a
    // backend that is gone).
    let t0 = Instant::now();
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut streams = Vec::new();
    for (kind, client, host, port) in [
        (
            "http keep-alive",
            reqwest::Client::new(),
            "127.0.0.1".to_string(),
            port,
        ),
        ("http fresh", fresh.clone(), "127.0.0.1".to_string(), port),
        ("tcp fresh", fresh.clone(), node_ip.clone(), tcp_port),
    ] {
        let (outcomes, stop) = (Arc::clone(&outcomes), Arc::clone(&stop));
        streams.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(16));
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                let start = Instant::now();
                let result = get(&client, &host, port).await;
                outcomes.lock().unwrap().push(Outcome {
                    at: start - t0,
                    took: start.elapsed(),
                    result: result.map_err(|e| format!("{kind}: {e}")),
                });
            }
        }));
    }
    let mut events = Vec::new();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Problems other than lost requests, reported together at the end.
    let mut problems = Vec::new();
    for round in 0..3 {
        let (new, old) = (format!("v{}", round + 2), format!("v{round}"));
        events.push((t0.elapsed(), format!("launch {new}")));
        let running = launch(&cloud, &new, label, "0").await;
        events.push((t0.elapsed(), format!("{new} running")));
        // The replacement is in the rotation (it answered one request of the stream) soon
        // after `running`; the old backend is deleted 1 s after `running` either way, so the
        // stream's fate at the delete is observed even when it is not.
        let in_rotation = loop {
            let served = outcomes
                .lock()
                .unwrap()
                .iter()
                .any(|o| o.result.as_deref() == Ok(new.as_str()));
            if served || running.elapsed() > Duration::from_millis(1_500) {
                break served.then(|| running.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        match in_rotation {
            Some(after) => events.push((
                t0.elapsed(),
                format!("{new} served, {} ms after running", after.as_millis()),
            )),
            None => problems.push(format!(
                "replacement {new} served no request within 1.5 s of running"
            )),
        }
        tokio::time::sleep(Duration::from_millis(1_000).saturating_sub(running.elapsed())).await;
        events.push((t0.elapsed(), format!("delete {old}")));
        cli(&cloud, &["delete", &old]).await;
        events.push((t0.elapsed(), format!("{old} deleted")));
        tokio::time::sleep(Duration::from_millis(1_000)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in streams {
        s.await.unwrap();
    }
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    let total = outcomes.len();
    let mut served: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for o in &outcomes {
        if let Ok(b) = &o.result {
            *served.entry(b.clone()).or_default() += 1;
        }
    }
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    let timeline = events
        .iter()
        .map(|(t, e)| format!("{:>6} ms  {e}", t.as_millis()))
        .chain(failed.iter().map(|o| {
            format!(
                "{:>6} ms  FAILED after {} ms: {}",
                o.at.as_millis(),
                o.took.as_millis(),
                o.result.as_ref().err().map_or("", String::as_str)
            )
        }))
        .collect::<Vec<_>>();
    let mut timeline = timeline;
    timeline.sort_by_key(|l| {
        l.trim_start()
            .split(' ')
            .next()
            .and_then(|n| n.parse::<u64>().ok())
    });
    eprintln!(
        "{total} requests, {} failed, served by {served:?}\n{}",
        failed.len(),
        timeline.join("\n")
    );
    let backends = cli(&cloud, &["lb", "backends", "roll"]).await;
    eprintln!("{backends}");
    if total < 800 {
        problems.push(format!("the stream sent only {total} requests"));
    }
    if !failed.is_empty() {
        problems.push(format!("{} of {total} requests failed", failed.len()));
    }
    assert!(
        problems.is_empty(),
        "{}\nserved by {served:?}\n{backends}\n{}\n{}",
        problems.join("\n"),
        timeline.join("\n"),
        cloud.log()
    );
    cloud.shutdown();
}
