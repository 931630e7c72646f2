//! The driver conformance suite: what every [`Driver`] (container, VM) must do.
//!
//! Each check is a pub async fn taking the driver, a spec factory and [`SuiteOptions`]; they
//! panic (assert) on failure, so call them from tests. [`run_all`] runs every check. Commands
//! are POSIX `sh` + busybox applets only, so a VM driver (commands via the guest agent) can run
//! the same suite with generous timeouts.
//!
//! Instance ids are fresh UUIDs; every check deletes what it created, also when it fails
//! midway only where practical (the test harness should delete leftovers from `list()`).

use std::time::{Duration, Instant};

use super::{Driver, DriverError, RuntimeSpec, RuntimeState};

/// Builds the spec of instance `id` running `command` (main process).
pub type MakeSpec<'a> = dyn Fn(&str, Vec<String>) -> RuntimeSpec + Send + Sync + 'a;

/// Timeouts of the suite.
#[derive(Debug, Clone, Copy)]
pub struct SuiteOptions {
    /// Upper bound for anything to happen (start, an exec, output to show up in the log).
    pub timeout: Duration,
    /// Grace period passed to `stop`.
    pub grace: Duration,
}

impl Default for SuiteOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            grace: Duration::from_secs(5),
        }
    }
}

/// A fresh instance id.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

/// A main process that prints `marker`, then runs until SIGTERM (exits 0 on it).
pub fn long_running(marker: &str) -> Vec<String> {
    sh(&format!(
        "trap 'exit 0' TERM; echo {marker}; while true; do sleep 1; done"
    ))
}

/// Polls `state` until `pred` holds or `timeout` passes; returns the last state.
pub async fn wait_state(
    d: &dyn Driver,
    id: &str,
    timeout: Duration,
    pred: impl Fn(&RuntimeState) -> bool,
) -> RuntimeState {
    let deadline = Instant::now() + timeout;
    loop {
        let s = d.state(id).await.expect("state");
        if pred(&s) || Instant::now() >= deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls the instance's log until it contains `needle`; returns whether it did.
pub async fn wait_log(d: &dyn Driver, id: &str, needle: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let log = std::fs::read(d.log_path(id)).unwrap_or_default();
        if String::from_utf8_lossy(&log).contains(needle) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn exec(
    d: &dyn Driver,
    id: &str,
    script: &str,
    o: &SuiteOptions,
) -> nimbus_api::ExecResponse {
    d.exec(id, &sh(script), o.timeout)
        .await
        .unwrap_or_else(|e| panic!("exec {script:?} in {id}: {e}"))
}

/// create → start → Running with a pid → exec (output + exit code) → log shows the main
/// process's output → stop → Exited → start again → Running → a file written before the stop
/// survives → delete → Absent and gone from `list()`.
pub async fn lifecycle(d: &dyn Driver, make_spec: &MakeSpec<'_>, o: &SuiteOptions) {
    let id = new_id();
    let marker = format!("conformance-{}", &id[..8]);
    let spec = make_spec(&id, long_running(&marker));
    d.create(&spec).await.expect("create");
    assert_eq!(d.state(&id).await.unwrap(), RuntimeState::Created);
    assert!(d.list().await.unwrap().contains(&id), "list() after create");

    let pid = d.start(&id).await.expect("start");
    assert!(pid > 0);
    let s = wait_state(d, &id, o.timeout, |s| {
        matches!(s, RuntimeState::Running { .. })
    })
    .await;
    assert!(
        matches!(s, RuntimeState::Running { .. }),
        "after start: {s:?}"
    );

    let r = exec(d, &id, "echo hi; exit 3", o).await;
    assert_eq!(r.stdout, "hi\n");
    assert_eq!(r.exit_code, 3);
    let r = exec(d, &id, "echo oops >&2", o).await;
    assert_eq!((r.exit_code, r.stderr.as_str()), (0, "oops\n"));
    assert!(
        wait_log(d, &id, &marker, o.timeout).await,
        "log {} lacks the main process output {marker}",
        d.log_path(&id).display()
    );

    let r = exec(d, &id, "echo persisted > /conformance-persist && sync", o).await;
    assert_eq!(r.exit_code, 0, "write file: {r:?}");

    d.stop(&id, o.grace).await.expect("stop");
    let s = wait_state(d, &id, o.timeout, |s| {
        matches!(s, RuntimeState::Exited { .. })
    })
    .await;
    assert!(
        matches!(s, RuntimeState::Exited { .. }),
        "after stop: {s:?}"
    );
    d.stop(&id, o.grace).await.expect("stop is idempotent");

    let pid2 = d.start(&id).await.expect("start again");
    assert!(pid2 > 0);
    let s = wait_state(d, &id, o.timeout, |s| {
        matches!(s, RuntimeState::Running { .. })
    })
    .await;
    assert!(
        matches!(s, RuntimeState::Running { .. }),
        "after restart: {s:?}"
    );
    let r = exec(d, &id, "cat /conformance-persist", o).await;
    assert_eq!(r.stdout, "persisted\n", "file survives stop/start");

    d.delete(&id).await.expect("delete");
    assert_eq!(d.state(&id).await.unwrap(), RuntimeState::Absent);
    assert!(
        !d.list().await.unwrap().contains(&id),
        "list() after delete"
    );
}

/// The main process's exit code is reported (`sh -c 'exit 7'` → `Exited { code: Some(7) }`).
pub async fn main_exit_code(d: &dyn Driver, make_spec: &MakeSpec<'_>, o: &SuiteOptions) {
    let id = new_id();
    d.create(&make_spec(&id, sh("echo bye; exit 7")))
        .await
        .expect("create");
    d.start(&id).await.expect("start");
    let s = wait_state(d, &id, o.timeout, |s| {
        matches!(s, RuntimeState::Exited { .. })
    })
    .await;
    assert_eq!(s, RuntimeState::Exited { code: Some(7) });
    assert!(wait_log(d, &id, "bye", o.timeout).await, "log shows output");
    d.delete(&id).await.expect("delete");
}

/// create twice is a no-op; delete twice is a no-op; delete of a never-created id is a no-op.
pub async fn idempotence(d: &dyn Driver, make_spec: &MakeSpec<'_>, o: &SuiteOptions) {
    let id = new_id();
    let spec = make_spec(&id, long_running("idem"));
    d.create(&spec).await.expect("create");
    d.create(&spec).await.expect("create again");
    assert_eq!(d.state(&id).await.unwrap(), RuntimeState::Created);
    d.delete(&id).await.expect("delete");
    d.delete(&id).await.expect("delete again");
    assert_eq!(d.state(&id).await.unwrap(), RuntimeState::Absent);
    d.delete(&new_id()).await.expect("delete of unknown id");
    // Re-create after delete works.
    d.create(&spec).await.expect("re-create");
    let pid = d.start(&id).await.expect("start");
    assert!(pid > 0);
    let pid_again = d.start(&id).await.expect("start of a running instance");
    assert_eq!(
        pid, pid_again,
        "start of a running instance returns its pid"
    );
    d.delete(&id).await.expect("delete running");
    assert_eq!(d.state(&id).await.unwrap(), RuntimeState::Absent);
    let _ = o;
}

/// exec on a created-but-not-started or stopped instance is `NotRunning`.
pub async fn exec_not_running(d: &dyn Driver, make_spec: &MakeSpec<'_>, o: &SuiteOptions) {
    let id = new_id();
    d.create(&make_spec(&id, long_running("nr")))
        .await
        .expect("create");
    let err = d.exec(&id, &sh("true"), o.timeout).await.unwrap_err();
    assert!(
        matches!(err, DriverError::NotRunning(_)),
        "created: {err:?}"
    );
    d.start(&id).await.expect("start");
    d.stop(&id, o.grace).await.expect("stop");
    let err = d.exec(&id, &sh("true"), o.timeout).await.unwrap_err();
    assert!(
        matches!(err, DriverError::NotRunning(_)),
        "stopped: {err:?}"
    );
    d.delete(&id).await.expect("delete");
}

/// An exec that outlives its timeout fails with `Timeout`, and the instance keeps running.
pub async fn exec_timeout(d: &dyn Driver, make_spec: &MakeSpec<'_>, o: &SuiteOptions) {
    let id = new_id();
    d.create(&make_spec(&id, long_running("to")))
        .await
        .expect("create");
    d.start(&id).await.expect("start");
    let err = d
        .exec(&id, &sh("sleep 30"), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(err, DriverError::Timeout(_)), "{err:?}");
    let r = exec(d, &id, "echo still", o).await;
    assert_eq!(r.stdout, "still\n");
    d.delete(&id).await.expect("delete");
}

/// Unknown ids: state is `Absent`, start is `NotFound`.
pub async fn unknown_is_absent(d: &dyn Driver, _make_spec: &MakeSpec<'_>, _o: &SuiteOptions) {
    let id = new_id();
    assert_eq!(d.state(&id).await.unwrap(), RuntimeState::Absent);
    assert!(!d.list().await.unwrap().contains(&id));
    let err = d.start(&id).await.unwrap_err();
    assert!(matches!(err, DriverError::NotFound(_)), "{err:?}");
}

/// Runs every check, one after the other.
pub async fn run_all(d: &dyn Driver, make_spec: &MakeSpec<'_>, o: &SuiteOptions) {
    unknown_is_absent(d, make_spec, o).await;
    lifecycle(d, make_spec, o).await;
    main_exit_code(d, make_spec, o).await;
    idempotence(d, make_spec, o).await;
    exec_not_running(d, make_spec, o).await;
    exec_timeout(d, make_spec, o).await;
}
