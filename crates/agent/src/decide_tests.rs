//! Table tests of the decision core: no driver, no root, no clock.
// Short names are the tables' vocabulary: w(ant), r(ecord), d(ecision), f(ailure).
#![allow(clippy::many_single_char_names)]

use nimbus_api::{DesiredState, InstanceState, InstanceType, RestartPolicy};

use super::*;
use crate::driver::RuntimeState;
use crate::local::LocalInstance;

const T0: u64 = 1_700_000_000_000;

fn want(restart: RestartPolicy) -> Intent {
    Intent {
        instance_type: InstanceType::Container,
        generation: 1,
        desired: DesiredState::Running,
        restart,
        restart_nonce: 0,
    }
}

fn obs(runtime: RuntimeState) -> Observation {
    Observation {
        runtime,
        datapath_ready: true,
    }
}

fn unready(runtime: RuntimeState) -> Observation {
    Observation {
        runtime,
        datapath_ready: false,
    }
}

const ABSENT: RuntimeState = RuntimeState::Absent;
const CREATED: RuntimeState = RuntimeState::Created;

fn running(pid: u32) -> RuntimeState {
    RuntimeState::Running { pid }
}

fn exited(code: i32) -> RuntimeState {
    RuntimeState::Exited { code: Some(code) }
}

fn rec(d: &Decision) -> LocalInstance {
    d.record.clone().expect("a record")
}

fn state(d: &Decision) -> Option<InstanceState> {
    d.status.as_ref().map(|s| s.state)
}

/// Runs a launch to `running` with pid `pid` at `now`; returns the record.
fn launched(w: &Intent, pid: u32, now: u64) -> LocalInstance {
    let d = decide(w, None, &obs(ABSENT), now);
    assert_eq!(d.step, Some(Step::Create));
    let d = decide(w, d.record.as_ref(), &obs(CREATED), now);
    assert_eq!(d.step, Some(Step::Start));
    let mut r = rec(&d);
    r.started(pid, now);
    let d = decide(w, Some(&r), &obs(running(pid)), now);
    assert_eq!(state(&d), Some(InstanceState::Running));
    assert_eq!(d.status.as_ref().unwrap().pid, Some(pid));
    rec(&d)
}

#[test]
fn backoff_doubles_from_the_base_up_to_the_cap() {
    let delays: Vec<u64> = (1..=10).map(backoff_ms).collect();
    assert_eq!(
        delays,
        [200, 400, 800, 1600, 3200, 6400, 12_800, 25_600, 30_000, 30_000]
    );
    assert_eq!(backoff_ms(u32::MAX), BACKOFF_CAP_MS);
}

#[test]
fn a_launch_creates_then_starts_then_reports_running_once() {
    let w = want(RestartPolicy::Never);
    let d = decide(&w, None, &obs(ABSENT), T0);
    // Nothing is reported before it runs: a launch reports `running` only.
    assert_eq!(
        (d.step, d.status.clone(), d.wake_at_ms),
        (Some(Step::Create), None, None)
    );
    let r = launched(&w, 42, T0);
    assert_eq!((r.pid, r.started_ms), (Some(42), Some(T0)));
    // Steady: the same status, no step.
    let d1 = decide(&w, Some(&r), &obs(running(42)), T0 + 5000);
    let d2 = decide(&w, d1.record.as_ref(), &obs(running(42)), T0 + 9000);
    assert_eq!((d1.step, d2.step), (None, None));
    assert_eq!(d1.status, d2.status);
}

#[test]
fn start_waits_for_the_datapath_but_create_does_not() {
    let w = want(RestartPolicy::Never);
    let d = decide(&w, None, &unready(ABSENT), T0);
    assert_eq!((d.step, d.status.clone()), (Some(Step::Create), None));
    let d = decide(&w, d.record.as_ref(), &unready(CREATED), T0);
    assert_eq!(d.step, None);
    assert_eq!(state(&d), Some(InstanceState::Starting));
    assert_eq!(d.status.as_ref().unwrap().message, WAITING_FOR_DATAPATH);
    assert_eq!(d.wake_at_ms, None, "woken by the datapath, not by a timer");
    assert!(d.awaits_datapath());
    let d = decide(&w, d.record.as_ref(), &obs(CREATED), T0 + 30);
    assert_eq!(d.step, Some(Step::Start));
}

#[test]
fn a_network_setup_failing_before_the_datapath_is_ready_is_not_a_failure() {
    let w = want(RestartPolicy::Never);
    let d = decide(&w, None, &unready(ABSENT), T0);
    let f = failed(Some(&w), &rec(&d), Step::Create, "no such bridge", true, T0);
    assert_eq!(state(&f), Some(InstanceState::Starting));
    let r = rec(&f);
    assert_eq!((r.failures, r.last_error.clone()), (0, None));
    assert_eq!(
        decide(&w, Some(&r), &obs(ABSENT), T0 + 10).step,
        Some(Step::Create)
    );
}

#[test]
fn policy_never_attempts_a_failing_start_once() {
    let w = want(RestartPolicy::Never);
    let d = decide(&w, None, &obs(CREATED), T0);
    assert_eq!(d.step, Some(Step::Start));
    let reason = "runc failed: exec: \"/nope\": stat /nope: no such file or directory";
    let f = failed(Some(&w), &rec(&d), Step::Start, reason, false, T0);
    assert_eq!(state(&f), Some(InstanceState::Failed));
    let msg = f.status.as_ref().unwrap().message.clone();
    assert!(msg.contains(reason) && !msg.contains("retrying"), "{msg}");
    assert_eq!(f.wake_at_ms, None);
    // However often and however late it is looked at again: no second attempt.
    let mut r = rec(&f);
    for (i, runtime) in [CREATED, CREATED, ABSENT, exited(1)]
        .into_iter()
        .enumerate()
    {
        let d = decide(&w, Some(&r), &obs(runtime), T0 + 60_000 * (i as u64 + 1));
        assert_eq!(d.step, None);
        assert_eq!(d.status.as_ref().map(|s| &s.message), Some(&msg));
        assert_eq!(d.wake_at_ms, None);
        r = rec(&d);
    }
}

#[test]
fn policy_never_leaves_an_exited_run_alone() {
    let w = want(RestartPolicy::Never);
    let r = launched(&w, 7, T0);
    for at in [T0 + 100, T0 + 100_000] {
        let d = decide(&w, Some(&r), &obs(exited(3)), at);
        assert_eq!(d.step, None);
        let s = d.status.unwrap();
        assert_eq!((s.state, s.exit_code), (InstanceState::Failed, Some(3)));
        assert_eq!(s.message, "exited with code 3");
    }
    let d = decide(&w, Some(&r), &obs(exited(0)), T0 + 100);
    assert_eq!(state(&d), Some(InstanceState::Stopped));
}

#[test]
fn failing_starts_back_off_exponentially_up_to_the_cap() {
    for policy in [RestartPolicy::OnFailure, RestartPolicy::Always] {
        let w = want(policy);
        let mut now = T0;
        let mut r = rec(&decide(&w, None, &obs(CREATED), now));
        let mut delays = Vec::new();
        let mut attempts = 0;
        while attempts < 12 {
            let d = decide(&w, Some(&r), &obs(CREATED), now);
            r = rec(&d);
            match d.step {
                Some(Step::Start) => {
                    attempts += 1;
                    let f = failed(Some(&w), &r, Step::Start, "pids.max refused", false, now);
                    assert_eq!(state(&f), Some(InstanceState::Failed));
                    assert!(f.status.as_ref().unwrap().message.contains("retrying in"));
                    let at = f.wake_at_ms.expect("a retry is scheduled");
                    delays.push(at - now);
                    r = rec(&f);
                    // Looked at before it is due: no step, the same status, the same wake-up.
                    let early = decide(&w, Some(&r), &obs(CREATED), at - 1);
                    assert_eq!((early.step, early.wake_at_ms), (None, Some(at)));
                    assert_eq!(early.status, f.status);
                    now = at;
                }
                other => panic!("{policy:?}: expected a start, got {other:?}"),
            }
        }
        assert_eq!(
            delays,
            [200, 400, 800, 1600, 3200, 6400, 12_800, 25_600, 30_000, 30_000, 30_000, 30_000],
            "{policy:?}"
        );
        assert_eq!(r.restart_count, 11, "retries count as restarts");
    }
}

#[test]
fn exits_restart_by_policy_with_backoff() {
    // (policy, exit code, restarted?)
    let table = [
        (RestartPolicy::Never, 0, false),
        (RestartPolicy::Never, 1, false),
        (RestartPolicy::OnFailure, 0, false),
        (RestartPolicy::OnFailure, 2, true),
        (RestartPolicy::Always, 0, true),
        (RestartPolicy::Always, 137, true),
    ];
    for (policy, code, restarts) in table {
        let w = want(policy);
        let r = launched(&w, 10, T0);
        let now = T0 + 1000;
        let d = decide(&w, Some(&r), &obs(exited(code)), now);
        assert_eq!(d.step, None, "{policy:?} {code}: never at once");
        let s = d.status.clone().unwrap();
        assert_eq!(s.exit_code, Some(code));
        let want_state = if code == 0 {
            InstanceState::Stopped
        } else {
            InstanceState::Failed
        };
        assert_eq!(s.state, want_state, "{policy:?} {code}");
        if !restarts {
            assert_eq!(d.wake_at_ms, None);
            let again = decide(&w, d.record.as_ref(), &obs(exited(code)), now + 60_000);
            assert_eq!(again.step, None, "{policy:?} {code}");
            continue;
        }
        assert!(s.message.contains("restarting in 200 ms"), "{}", s.message);
        let at = d.wake_at_ms.expect("restart scheduled");
        assert_eq!(at, now + BACKOFF_BASE_MS);
        let d = decide(&w, d.record.as_ref(), &obs(exited(code)), at);
        assert_eq!(d.step, Some(Step::Start), "{policy:?} {code}");
        let mut r = rec(&d);
        assert_eq!(r.restart_count, 1);
        r.started(11, at);
        let d = decide(&w, Some(&r), &obs(running(11)), at + 1);
        let s = d.status.unwrap();
        assert_eq!(
            (s.state, s.pid, s.restart_count),
            (InstanceState::Running, Some(11), 1)
        );
        assert_eq!(s.exit_code, Some(code), "the last run's exit code");
    }
}

#[test]
fn a_crash_loop_backs_off_and_a_long_run_resets_it() {
    let w = want(RestartPolicy::Always);
    let mut r = launched(&w, 100, T0);
    let mut now = T0;
    let mut delays = Vec::new();
    for pid in 101..106 {
        now += 50; // dies at once
        let d = decide(&w, Some(&r), &obs(exited(1)), now);
        let at = d.wake_at_ms.unwrap();
        delays.push(at - now);
        let d = decide(&w, d.record.as_ref(), &obs(exited(1)), at);
        assert_eq!(d.step, Some(Step::Start));
        r = rec(&d);
        now = at;
        r.started(pid, now);
    }
    assert_eq!(delays, [200, 400, 800, 1600, 3200]);
    // This run lasts a minute: the next exit restarts after the base delay again.
    now += 60_000;
    let d = decide(&w, Some(&r), &obs(exited(1)), now);
    assert_eq!(d.wake_at_ms, Some(now + BACKOFF_BASE_MS));
    assert_eq!(rec(&d).failures, 1);
}

#[test]
fn one_exit_causes_one_restart() {
    let w = want(RestartPolicy::Always);
    let r = launched(&w, 5, T0);
    let d = decide(&w, Some(&r), &obs(exited(1)), T0 + 10);
    let at = d.wake_at_ms.unwrap();
    let d = decide(&w, d.record.as_ref(), &obs(exited(1)), at);
    assert_eq!(d.step, Some(Step::Start));
    // The start is executed and recorded; the same exited state seen once more (a stale
    // observation) must not schedule another restart of the old run.
    let mut r = rec(&d);
    r.started(6, at);
    let d = decide(&w, Some(&r), &obs(running(6)), at + 1);
    assert_eq!(rec(&d).failures, 1);
    assert_eq!(rec(&d).restart_count, 1);
}

#[test]
fn a_new_generation_starts_from_a_fresh_record() {
    let w = want(RestartPolicy::Never);
    let d = decide(&w, None, &obs(CREATED), T0);
    let f = failed(Some(&w), &rec(&d), Step::Start, "boom", false, T0);
    let old = rec(&f);
    assert!(decide(&w, Some(&old), &obs(CREATED), T0 + 1).step.is_none());
    let moved = Intent { generation: 2, ..w };
    let d = decide(&moved, Some(&old), &obs(ABSENT), T0 + 2);
    assert_eq!(d.step, Some(Step::Create));
    let r = rec(&d);
    assert_eq!(
        (r.generation, r.failures, r.last_error.clone()),
        (2, 0, None)
    );
}

#[test]
fn a_user_restart_stops_then_starts_without_counting_a_policy_restart() {
    let w = want(RestartPolicy::Never);
    let r = launched(&w, 9, T0);
    let again = Intent {
        restart_nonce: 1,
        ..w
    };
    let d = decide(&again, Some(&r), &obs(running(9)), T0 + 10);
    assert_eq!(d.step, Some(Step::Stop));
    let d = decide(&again, d.record.as_ref(), &obs(exited(143)), T0 + 20);
    assert_eq!(
        d.step,
        Some(Step::Start),
        "policy never does not stop a user restart"
    );
    let mut r = rec(&d);
    assert_eq!(r.restart_count, 0);
    r.started(10, T0 + 30);
    assert!(!r.pending_restart);
    let d = decide(&again, Some(&r), &obs(running(10)), T0 + 31);
    assert_eq!(state(&d), Some(InstanceState::Running));
}

#[test]
fn a_user_start_retries_what_policy_never_gave_up_on() {
    let w = want(RestartPolicy::Never);
    let d = decide(&w, None, &obs(CREATED), T0);
    let f = failed(Some(&w), &rec(&d), Step::Start, "boom", false, T0);
    let again = Intent {
        restart_nonce: 1,
        ..w
    };
    let d = decide(&again, f.record.as_ref(), &obs(CREATED), T0 + 100);
    assert_eq!(d.step, Some(Step::Start));
    // It fails again: one attempt per request.
    let f = failed(Some(&again), &rec(&d), Step::Start, "boom", false, T0 + 100);
    assert_eq!(f.wake_at_ms, None);
    assert_eq!(
        decide(&again, f.record.as_ref(), &obs(CREATED), T0 + 500).step,
        None
    );
}

#[test]
fn a_user_restart_whose_stop_fails_is_retried_after_a_backoff() {
    let w = want(RestartPolicy::Never);
    let r = launched(&w, 9, T0);
    let again = Intent {
        restart_nonce: 1,
        ..w
    };
    let d = decide(&again, Some(&r), &obs(running(9)), T0);
    let f = failed(
        Some(&again),
        &rec(&d),
        Step::Stop,
        "runc kill failed",
        false,
        T0,
    );
    let s = f.status.clone().unwrap();
    assert_eq!((s.state, s.pid), (InstanceState::Running, Some(9)));
    let at = f.wake_at_ms.unwrap();
    assert_eq!(
        decide(&again, f.record.as_ref(), &obs(running(9)), at - 1).step,
        None
    );
    assert_eq!(
        decide(&again, f.record.as_ref(), &obs(running(9)), at).step,
        Some(Step::Stop)
    );
}

#[test]
fn desired_stopped() {
    let w = Intent {
        desired: DesiredState::Stopped,
        ..want(RestartPolicy::Always)
    };
    let table: [(RuntimeState, Option<Step>, Option<InstanceState>); 5] = [
        (running(3), Some(Step::Stop), None),
        (RuntimeState::Starting { pid: 3 }, Some(Step::Stop), None),
        (ABSENT, Some(Step::Create), None),
        (CREATED, None, Some(InstanceState::Stopped)),
        (exited(143), None, Some(InstanceState::Stopped)),
    ];
    for (runtime, step, st) in table {
        let d = decide(&w, None, &obs(runtime.clone()), T0);
        assert_eq!((d.step, state(&d)), (step, st), "{runtime:?}");
    }
    // The policy does not restart what was stopped on purpose.
    let d = decide(&w, None, &obs(exited(143)), T0);
    assert_eq!(d.status.unwrap().exit_code, Some(143));
    assert_eq!(d.wake_at_ms, None);
}

#[test]
fn desired_deleted_deletes_then_forgets() {
    let w = Intent {
        desired: DesiredState::Deleted,
        ..want(RestartPolicy::Always)
    };
    for runtime in [
        running(3),
        CREATED,
        exited(0),
        RuntimeState::Starting { pid: 4 },
    ] {
        let d = decide(&w, None, &obs(runtime), T0);
        assert_eq!(d.step, Some(Step::Delete));
    }
    let d = decide(&w, None, &obs(ABSENT), T0);
    assert_eq!(d.record, None);
    assert_eq!(d.step, None);
    assert!(d.status.unwrap().deleted);
    // A failed delete is retried after a backoff, reported as `deleting` with the reason.
    let r = rec(&decide(&w, None, &obs(running(3)), T0));
    let f = failed(Some(&w), &r, Step::Delete, "device busy", false, T0);
    let s = f.status.clone().unwrap();
    assert_eq!(s.state, InstanceState::Deleting);
    assert!(s.message.contains("device busy"));
    let at = f.wake_at_ms.unwrap();
    assert_eq!(
        decide(&w, f.record.as_ref(), &obs(running(3)), at - 1).step,
        None
    );
    assert_eq!(
        decide(&w, f.record.as_ref(), &obs(running(3)), at).step,
        Some(Step::Delete)
    );
}

#[test]
fn a_changed_desired_state_does_not_wait_for_an_old_backoff() {
    let w = want(RestartPolicy::Always);
    let d = decide(&w, None, &obs(CREATED), T0);
    let f = failed(Some(&w), &rec(&d), Step::Start, "boom", false, T0);
    assert!(f.wake_at_ms.unwrap() > T0 + 1);
    let del = Intent {
        desired: DesiredState::Deleted,
        ..w
    };
    assert_eq!(
        decide(&del, f.record.as_ref(), &obs(CREATED), T0 + 1).step,
        Some(Step::Delete)
    );
}

#[test]
fn starting_is_reported_and_stopped_like_running() {
    let w = want(RestartPolicy::Never);
    let d = decide(&w, None, &obs(RuntimeState::Starting { pid: 77 }), T0);
    let s = d.status.clone().unwrap();
    assert_eq!((s.state, s.pid), (InstanceState::Starting, Some(77)));
    let again = Intent {
        restart_nonce: 1,
        ..w
    };
    assert_eq!(
        decide(
            &again,
            d.record.as_ref(),
            &obs(RuntimeState::Starting { pid: 77 }),
            T0
        )
        .step,
        Some(Step::Stop)
    );
}

#[test]
fn a_restarted_agent_reattaches_and_keeps_the_pid() {
    let w = want(RestartPolicy::Always);
    // No record (lost), the process runs: adopt it.
    let d = decide(&w, None, &obs(running(1234)), T0);
    assert_eq!(d.step, None);
    assert_eq!(d.status.clone().unwrap().pid, Some(1234));
    assert_eq!(rec(&d).pid, Some(1234));
}

#[test]
fn a_backoff_survives_an_agent_restart() {
    let w = want(RestartPolicy::OnFailure);
    let d = decide(&w, None, &obs(CREATED), T0);
    let f = failed(Some(&w), &rec(&d), Step::Start, "boom", false, T0);
    let f = failed(
        Some(&w),
        f.record.as_ref().unwrap(),
        Step::Start,
        "boom",
        false,
        T0,
    );
    let at = f.wake_at_ms.unwrap();
    // Through instances.json and back.
    let json = serde_json::to_string(f.record.as_ref().unwrap()).unwrap();
    let back: LocalInstance = serde_json::from_str(&json).unwrap();
    let d = decide(&w, Some(&back), &obs(CREATED), at - 1);
    assert_eq!((d.step, d.wake_at_ms), (None, Some(at)));
    assert_eq!(
        decide(&w, Some(&back), &obs(CREATED), at).step,
        Some(Step::Start)
    );
}

#[test]
fn a_missing_bundle_is_created_again() {
    let w = want(RestartPolicy::Never);
    let r = launched(&w, 5, T0);
    // The bundle vanished (an interrupted create, a wiped state directory).
    let d = decide(&w, Some(&r), &obs(ABSENT), T0 + 5000);
    assert_eq!(d.step, Some(Step::Create));
}

#[test]
fn restarts_wait_for_the_datapath() {
    let w = want(RestartPolicy::Always);
    let r = launched(&w, 5, T0);
    let d = decide(&w, Some(&r), &obs(exited(1)), T0 + 100);
    let at = d.wake_at_ms.unwrap();
    let d = decide(&w, d.record.as_ref(), &unready(exited(1)), at);
    assert_eq!(d.step, None);
    assert_eq!(state(&d), Some(InstanceState::Starting));
}

#[test]
fn instances_no_longer_assigned_are_deleted_then_forgotten() {
    for runtime in [
        running(3),
        CREATED,
        exited(1),
        RuntimeState::Starting { pid: 2 },
    ] {
        let d = decide_unassigned(InstanceType::Container, None, &obs(runtime), T0);
        assert_eq!((d.step, d.status.clone()), (Some(Step::Delete), None));
    }
    let d = decide_unassigned(InstanceType::Vm, None, &obs(ABSENT), T0);
    assert_eq!((d.record, d.step), (None, None));
    // A failed cleanup backs off (and reports nothing: the instance is not ours any more).
    let r = rec(&decide_unassigned(
        InstanceType::Container,
        None,
        &obs(running(3)),
        T0,
    ));
    let f = failed(None, &r, Step::Delete, "busy", false, T0);
    assert_eq!(f.status, None);
    let at = f.wake_at_ms.unwrap();
    let d = decide_unassigned(
        InstanceType::Container,
        f.record.as_ref(),
        &obs(running(3)),
        at - 1,
    );
    assert_eq!(d.step, None);
}

#[test]
fn a_create_failing_for_its_own_reason_counts_even_before_the_datapath_is_ready() {
    let w = want(RestartPolicy::Never);
    let d = decide(&w, None, &unready(ABSENT), T0);
    let reason = "runc create failed: exec: \"/nope\": no such file or directory";
    let f = failed(Some(&w), &rec(&d), Step::Create, reason, false, T0);
    assert_eq!(state(&f), Some(InstanceState::Failed));
    // The failed create was cleaned up: absent, and not created again.
    assert_eq!(
        decide(&w, f.record.as_ref(), &obs(ABSENT), T0 + 10_000).step,
        None
    );
}
