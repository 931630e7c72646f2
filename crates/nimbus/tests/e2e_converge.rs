//! End to end with real runc containers: what `running` promises (the instance serves, from the
//! host and from other instances, the moment `launch` returns), how failures are retried (once
//! under `--restart never`, with a growing backoff otherwise, across agent restarts), and how
//! `exec` reports a command that cannot start.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use nimbus_api::InstanceState;
use nimbus_testkit::{eventually, have, require, Cloud};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nimbus"))
}

fn deps() -> bool {
    require("root", nix::unistd::geteuid().is_root())
        && require("runc", have("runc"))
        && require("/bin/busybox", Path::new("/bin/busybox").exists())
}

fn run(cloud: &Cloud, args: &[&str]) -> Output {
    cloud.cli().args(args).output().expect("run nimbus")
}

fn ok(cloud: &Cloud, args: &[&str]) -> String {
    let o = run(cloud, args);
    assert!(
        o.status.success(),
        "nimbus {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Small instances: many fit on a small test machine.
const SMALL: [&str; 4] = ["--cpus", "0.05", "--memory", "32M"];

fn launch(cloud: &Cloud, name: &str, extra: &[&str], command: &[&str]) -> Output {
    let mut args = vec!["launch", "busybox", name];
    args.extend(SMALL);
    args.extend(extra);
    args.push("--");
    args.extend(command);
    run(cloud, &args)
}

/// One HTTP/1.0 `GET /` with short timeouts: whether an HTTP answer came back.
fn http_answers(ip: &str, port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(addr) = format!("{ip}:{port}").parse() else {
        return false;
    };
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 5];
    s.read_exact(&mut head).is_ok() && &head == b"HTTP/"
}

/// The log without ANSI colour sequences.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Timestamps (seconds of the day) of the agent's log lines about a failed attempt to start
/// `name` (one per attempt: a warning or error carrying runc's reason, which names the missing
/// `/nope`).
fn start_failures(cloud: &Cloud, name: &str) -> Vec<f64> {
    let tag = format!("instance={name} ");
    plain(&cloud.log())
        .lines()
        .filter(|l| {
            (l.contains(" WARN ") || l.contains(" ERROR "))
                && l.contains("stat /nope: no such file or directory")
                && format!("{l} ").contains(&tag)
        })
        .filter_map(|line| {
            // 2026-01-02T03:04:05.678901Z ...
            let time = line.split_whitespace().next()?.split('T').nth(1)?;
            let fields: Vec<f64> = time
                .trim_end_matches('Z')
                .split(':')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            match fields[..] {
                [hours, minutes, seconds] => Some(hours * 3600.0 + minutes * 60.0 + seconds),
                _ => None,
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launched_instances_answer_the_host_and_other_instances_at_once() {
    if !deps() {
        return;
    }
    let cloud = Cloud::start(bin()).expect("nimbus up");
    let o = launch(&cloud, "peer", &[], &["sleep", "3600"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let mut reused = 0;
    let mut last_deleted_ip = None;
    for i in 0..20 {
        let name = format!("web{i}");
        let o = launch(&cloud, &name, &[], &["httpd", "-f", "-p", "80"]);
        let returned = Instant::now();
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success(),
            "launch {name}: {out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(out.contains(" running "), "{out}");
        let ip = out
            .split_whitespace()
            .skip_while(|w| *w != "ip")
            .nth(1)
            .expect("launch prints the address")
            .to_owned();
        if last_deleted_ip.as_deref() == Some(ip.as_str()) {
            reused += 1;
        }

        // From the host: answered within 200 ms of `launch` returning.
        let mut host = None;
        while returned.elapsed() < Duration::from_millis(200) {
            if http_answers(&ip, 80) {
                host = Some(returned.elapsed());
                break;
            }
        }
        assert!(
            host.is_some_and(|t| t <= Duration::from_millis(200)),
            "{name} ({ip}) did not answer the host within 200 ms of `launch` returning"
        );

        // From another instance: a probe sent within 200 ms of `launch` returning is answered
        // (the probe's own round trip through `nimbus exec` is not the instance's delay).
        let probe = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 1 {ip} 80");
        let mut answered_probe_sent_at = None;
        let deadline = returned + Duration::from_secs(15);
        while Instant::now() < deadline {
            let sent = returned.elapsed();
            let o = run(&cloud, &["exec", "peer", "--", "sh", "-c", &probe]);
            if String::from_utf8_lossy(&o.stdout).starts_with("HTTP/") {
                answered_probe_sent_at = Some(sent);
                break;
            }
        }
        let sent = answered_probe_sent_at
            .unwrap_or_else(|| panic!("{name} ({ip}) never answered the peer instance"));
        assert!(
            sent <= Duration::from_millis(200),
            "{name} ({ip}) answered the peer only to a probe sent {sent:?} after `launch` returned"
        );

        // Every other one is deleted: the next launch gets its address again, which the host
        // and the peer just talked to under another MAC.
        if i % 2 == 1 {
            ok(&cloud, &["delete", &name]);
            last_deleted_ip = Some(ip);
        }
    }
    assert!(reused >= 5, "addresses were reused {reused} times only");
    cloud.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_failure_under_restart_never_is_attempted_once() {
    if !deps() {
        return;
    }
    let mut cloud = Cloud::start(bin()).expect("nimbus up");
    let c = cloud.client();
    let o = launch(&cloud, "never1", &["--restart", "never"], &["/nope"]);
    assert!(!o.status.success(), "launching a missing command must fail");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no such file or directory"),
        "the runtime's reason: {err}"
    );
    let i = c.get_instance("never1").await.unwrap();
    assert_eq!(i.status.state, InstanceState::Failed);
    assert!(i.status.message.contains("/nope"), "{}", i.status.message);
    assert!(
        !i.status.message.contains("retrying"),
        "{}",
        i.status.message
    );

    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(start_failures(&cloud, "never1").len(), 1, "attempted once");
    assert_eq!(
        c.get_instance("never1").await.unwrap().status.state,
        InstanceState::Failed
    );

    // A restarted agent remembers it gave up.
    cloud.restart().expect("restart nimbus");
    let c = cloud.client();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        start_failures(&cloud, "never1").len(),
        1,
        "not attempted again after an agent restart"
    );
    assert_eq!(
        c.get_instance("never1").await.unwrap().status.state,
        InstanceState::Failed
    );

    // The user asks again: one more attempt.
    let o = run(&cloud, &["start", "never1"]);
    assert!(!o.status.success());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        start_failures(&cloud, "never1").len(),
        2,
        "one attempt per request"
    );
    cloud.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_starts_and_crash_loops_back_off() {
    if !deps() {
        return;
    }
    let cloud = Cloud::start(bin()).expect("nimbus up");
    let c = cloud.client();
    let began = Instant::now();
    for (name, policy, cmd) in [
        ("flaky", "on-failure", &["/nope"][..]),
        ("flaky2", "always", &["/nope"][..]),
        ("crashy", "always", &["sh", "-c", "exit 3"][..]),
    ] {
        let o = launch(&cloud, name, &["--restart", policy, "--no-wait"], cmd);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(began.elapsed())).await;

    // Backoff 0.2, 0.4, 0.8, 1.6, 3.2 s after each failed attempt (an attempt here creates
    // the container, fails in `runc create` and cleans up: a few hundred ms more): five or six
    // attempts in 10 s, with growing gaps, where retrying on every pass makes about twice as
    // many, evenly spaced.
    for name in ["flaky", "flaky2"] {
        let at = start_failures(&cloud, name);
        assert!(
            (4..=7).contains(&at.len()),
            "{name}: {} attempts in 10 s: {at:?}",
            at.len()
        );
        let gaps: Vec<f64> = at.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            gaps[3] >= 1.5 && gaps[3] >= 2.0 * gaps[0],
            "{name}: the gaps between attempts must grow: {gaps:?}"
        );
        let i = c.get_instance(name).await.unwrap();
        assert_eq!(i.status.state, InstanceState::Failed, "{name}");
        assert!(
            i.status.message.contains("retrying in"),
            "{}",
            i.status.message
        );
    }
    // Restarts are each detected within a pass (500 ms) and delayed by the backoff.
    let crashy = c.get_instance("crashy").await.unwrap();
    assert!(
        (3..=8).contains(&crashy.status.restart_count),
        "crashy restarted {} times in 10 s",
        crashy.status.restart_count
    );
    // It keeps being restarted.
    let more = eventually(Duration::from_secs(30), || async {
        c.get_instance("crashy")
            .await
            .ok()
            .filter(|i| i.status.restart_count > crashy.status.restart_count)
    })
    .await;
    assert!(more.is_some(), "always restarts again after the backoff");
    cloud.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_of_a_command_that_cannot_start_exits_like_a_shell() {
    if !deps() {
        return;
    }
    let cloud = Cloud::start(bin()).expect("nimbus up");
    let o = launch(&cloud, "box", &[], &["sleep", "3600"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (cmd, code, words) in [
        ("/nope", 127, "no such file or directory"),
        ("nope", 127, "executable file not found"),
        ("/etc/passwd", 126, "permission denied"),
    ] {
        let o = run(&cloud, &["exec", "box", "--", cmd]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(code), "exec {cmd}: {err}");
        assert!(err.contains(words), "exec {cmd}: {err}");
        assert!(!err.contains("internal"), "exec {cmd}: {err}");
    }
    // A command that runs still exits with its own code.
    let o = run(&cloud, &["exec", "box", "--", "sh", "-c", "exit 3"]);
    assert_eq!(o.status.code(), Some(3));
    cloud.shutdown();
}
