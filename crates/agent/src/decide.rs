//! The agent's decision core: what to do next about one instance, as a pure function of what
//! the control plane wants ([`Intent`], from the assignment), what the agent remembers (its
//! [`LocalInstance`] record), what the runtime shows ([`Observation`]) and the time.
//!
//! [`decide`] returns a [`Decision`]: the updated record, at most one [`Step`] for the runtime
//! to execute, the [`Status`] to report and when to decide again. The runtime executes the
//! step, folds its outcome back in ([`LocalInstance::started`] after a start, [`failed`] after
//! any failure) and decides again on a fresh observation, until no step is left. Nothing here
//! does I/O or sleeps: a backoff is a "not before" time in the record that the runtime wakes
//! up for. (The split follows openraft's engine and runtime: the engine decides, the runtime
//! runs commands and feeds results back.)
//!
//! Rules:
//! - A new placement (generation) starts a fresh record; a changed desired state resets the
//!   backoff; a changed restart nonce (a user restart or start) stops a running instance and
//!   starts it again, whatever the policy and backoff say.
//! - A process is started only once the node's datapath has programmed the instance (address,
//!   security groups, published ports): until then the instance is `starting`. Its resources
//!   are created meanwhile.
//! - Every failure (a failed create, start, stop or delete, and a run that exits) counts
//!   towards an exponential backoff ([`backoff_ms`]) reset by a run of
//!   [`BACKOFF_RESET_MS`]. Policy `never` makes one attempt: a failed create or start leaves
//!   the instance `failed` with the runtime's reason until the user restarts it; `on-failure`
//!   and `always` retry after the backoff, and restart exited runs as their policy says.
//! - An instance that is no longer assigned here ([`decide_unassigned`]) is deleted (fencing).

use nimbus_api::{DesiredState, InstanceState, InstanceType, RestartPolicy};

use crate::driver::RuntimeState;
use crate::local::LocalInstance;

/// The first backoff delay.
pub const BACKOFF_BASE_MS: u64 = 200;
/// The longest backoff delay.
pub const BACKOFF_CAP_MS: u64 = 30_000;
/// A run at least this long resets the failure count (the next exit restarts after
/// [`BACKOFF_BASE_MS`]).
pub const BACKOFF_RESET_MS: u64 = 10_000;

/// The delay before attempt number `failures + 1`: [`BACKOFF_BASE_MS`] doubled per
/// consecutive failure, at most [`BACKOFF_CAP_MS`].
pub fn backoff_ms(failures: u32) -> u64 {
    let doublings = failures.saturating_sub(1).min(20);
    BACKOFF_BASE_MS
        .saturating_mul(1 << doublings)
        .min(BACKOFF_CAP_MS)
}

/// What the control plane wants of an instance (the parts of its assignment that decide).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intent {
    /// Container or VM.
    pub instance_type: InstanceType,
    /// Placement generation.
    pub generation: u64,
    /// Desired state.
    pub desired: DesiredState,
    /// Restart policy.
    pub restart: RestartPolicy,
    /// Bumped by a user start or restart.
    pub restart_nonce: u64,
}

/// What the runtime shows of an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// The driver's view.
    pub runtime: RuntimeState,
    /// The node's datapath has programmed the instance (its address, security groups and
    /// published ports are in force). Always true on a node without a datapath.
    pub datapath_ready: bool,
}

/// One thing for the runtime to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Build the runtime spec (pulling image layers) and create the instance's resources.
    Create,
    /// Start the main process; the runtime records the PID with [`LocalInstance::started`].
    Start,
    /// Stop the main process (grace period, then a hard kill).
    Stop,
    /// Remove everything of the instance from the node.
    Delete,
}

impl Step {
    /// The verb, for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Delete => "delete",
        }
    }
}

/// The status to report to the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Observed state.
    pub state: InstanceState,
    /// Main PID.
    pub pid: Option<u32>,
    /// Exit code of the last run.
    pub exit_code: Option<i32>,
    /// Why (a failure, an exit, what it waits for).
    pub message: String,
    /// Restarts by policy.
    pub restart_count: u32,
    /// The instance is gone from the node (after a delete).
    pub deleted: bool,
}

impl Status {
    fn new(state: InstanceState, r: &LocalInstance) -> Self {
        Self {
            state,
            pid: None,
            exit_code: None,
            message: String::new(),
            restart_count: r.restart_count,
            deleted: false,
        }
    }

    fn pid(mut self, pid: u32) -> Self {
        self.pid = Some(pid);
        self
    }

    fn code(mut self, code: Option<i32>) -> Self {
        self.exit_code = code;
        self
    }

    fn message(mut self, m: impl Into<String>) -> Self {
        self.message = m.into();
        self
    }
}

/// What to do about one instance now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The record to keep (`None`: forget the instance).
    pub record: Option<LocalInstance>,
    /// The step to execute, if any.
    pub step: Option<Step>,
    /// The status to report (`None`: nothing to say yet, e.g. while a step runs).
    pub status: Option<Status>,
    /// Decide again at this time (unix ms) even if nothing else happens (a backoff expires).
    pub wake_at_ms: Option<u64>,
}

impl Decision {
    /// Nothing to do until the node's datapath has programmed the instance.
    pub fn awaits_datapath(&self) -> bool {
        self.step.is_none()
            && self
                .status
                .as_ref()
                .is_some_and(|s| s.message == WAITING_FOR_DATAPATH)
    }

    fn keep(r: LocalInstance) -> Self {
        Self {
            record: Some(r),
            step: None,
            status: None,
            wake_at_ms: None,
        }
    }

    fn step(mut self, s: Step) -> Self {
        self.step = Some(s);
        self
    }

    fn status(mut self, s: Status) -> Self {
        self.status = Some(s);
        self
    }

    fn wake(mut self, at: u64) -> Self {
        self.wake_at_ms = Some(at);
        self
    }
}

/// The message of an instance waiting for its node's datapath.
pub const WAITING_FOR_DATAPATH: &str = "waiting for the node's datapath to program its network";

impl LocalInstance {
    /// A fresh record for a new placement.
    pub fn fresh(want: &Intent) -> Self {
        Self {
            instance_type: want.instance_type,
            generation: want.generation,
            restart_nonce: want.restart_nonce,
            desired: Some(want.desired),
            ..Self::default()
        }
    }

    /// Records a successful start of run `pid` at `now` (unix ms).
    pub fn started(&mut self, pid: u32, now: u64) {
        if self.pending_restart {
            // A user's start: no earlier run to speak of.
            self.last_exit_code = None;
        }
        self.pid = Some(pid);
        self.handled_exit_pid = None;
        self.started_ms = Some(now);
        self.not_before_ms = None;
        self.last_error = None;
        self.pending_restart = false;
    }

    fn clear_backoff(&mut self) {
        self.failures = 0;
        self.not_before_ms = None;
        self.last_error = None;
    }

    /// The pending attempt's time if it is still in the future.
    fn backing_off(&self, now: u64) -> Option<u64> {
        self.not_before_ms.filter(|t| *t > now)
    }

    /// A failed step under policy `never`: no attempt is due and none will be.
    fn gave_up(&self) -> bool {
        self.last_error.is_some() && self.not_before_ms.is_none() && !self.pending_restart
    }

    fn exit_is_new(&self) -> bool {
        self.pid.is_none() || self.handled_exit_pid != self.pid
    }
}

fn retry_note(r: &LocalInstance) -> String {
    let ms = backoff_ms(r.failures);
    let delay = if ms >= 1000 && ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else if ms >= 1000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{ms} ms")
    };
    format!("retrying in {delay} (failure {})", r.failures)
}

fn exit_message(code: Option<i32>) -> String {
    match code {
        Some(c) => format!("exited with code {c}"),
        None => "exited (code unknown)".into(),
    }
}

/// The status of an instance whose last step failed.
fn failure_status(r: &LocalInstance, state: InstanceState) -> Status {
    let reason = r.last_error.clone().unwrap_or_default();
    let message = if r.not_before_ms.is_some() {
        format!("{reason}; {}", retry_note(r))
    } else {
        reason
    };
    Status::new(state, r).message(message)
}

/// The status of an exited run: `stopped` after exit code 0, `failed` otherwise; with the
/// restart to come, if one is due.
fn exit_status(r: &LocalInstance, code: Option<i32>) -> Status {
    let state = if code == Some(0) {
        InstanceState::Stopped
    } else {
        InstanceState::Failed
    };
    let mut message = exit_message(code);
    if r.not_before_ms.is_some() {
        message = format!(
            "{message}; {}",
            retry_note(r).replace("retrying", "restarting")
        );
    }
    Status::new(state, r).code(code).message(message)
}

/// Decides what to do about an assigned instance. `rec` is the local record (`None` if the
/// agent has none), `now` the wall-clock time in unix ms (records outlive the agent).
pub fn decide(want: &Intent, rec: Option<&LocalInstance>, obs: &Observation, now: u64) -> Decision {
    let mut r = match rec {
        Some(r) if r.generation == want.generation => r.clone(),
        _ => LocalInstance::fresh(want),
    };
    if r.desired != Some(want.desired) {
        r.desired = Some(want.desired);
        r.clear_backoff();
        r.pending_restart = false;
    }
    match want.desired {
        DesiredState::Deleted => deleted(r, obs, now),
        DesiredState::Stopped => stopped(r, obs, now),
        DesiredState::Running => running(want, r, obs, now),
    }
}

fn deleted(r: LocalInstance, obs: &Observation, now: u64) -> Decision {
    if obs.runtime == RuntimeState::Absent {
        let mut status = Status::new(InstanceState::Stopped, &r);
        status.deleted = true;
        return Decision {
            record: None,
            step: None,
            status: Some(status),
            wake_at_ms: None,
        };
    }
    if let Some(t) = r.backing_off(now) {
        return Decision::keep(r).wake(t);
    }
    Decision::keep(r).step(Step::Delete)
}

fn stopped(mut r: LocalInstance, obs: &Observation, now: u64) -> Decision {
    if let Some(t) = r.backing_off(now) {
        return Decision::keep(r).wake(t);
    }
    match obs.runtime {
        RuntimeState::Running { pid } | RuntimeState::Starting { pid } => {
            r.pid = Some(pid);
            Decision::keep(r).step(Step::Stop)
        }
        RuntimeState::Absent => Decision::keep(r).step(Step::Create),
        RuntimeState::Created => {
            r.not_before_ms = None;
            let s = Status::new(InstanceState::Stopped, &r);
            Decision::keep(r).status(s)
        }
        RuntimeState::Exited { code } => {
            r.handled_exit_pid = r.pid;
            r.not_before_ms = None;
            let s = Status::new(InstanceState::Stopped, &r).code(code);
            Decision::keep(r).status(s)
        }
    }
}

fn running(want: &Intent, mut r: LocalInstance, obs: &Observation, now: u64) -> Decision {
    if r.restart_nonce != want.restart_nonce {
        // A user start or restart: whatever ran, failed or waited, start afresh.
        r.restart_nonce = want.restart_nonce;
        r.clear_backoff();
        r.pending_restart = true;
    }
    match obs.runtime {
        RuntimeState::Running { pid } | RuntimeState::Starting { pid } => {
            if r.pending_restart {
                if let Some(t) = r.backing_off(now) {
                    return Decision::keep(r).wake(t);
                }
                r.pid = Some(pid);
                // The exit the stop causes is the restart's, not the policy's.
                r.handled_exit_pid = Some(pid);
                return Decision::keep(r).step(Step::Stop);
            }
            if r.pid != Some(pid) {
                // Re-attached to a run this record did not start (or lost track of).
                r.pid = Some(pid);
                r.handled_exit_pid = None;
                r.started_ms.get_or_insert(now);
            }
            r.not_before_ms = None;
            r.last_error = None;
            let state = if matches!(obs.runtime, RuntimeState::Running { .. }) {
                InstanceState::Running
            } else {
                InstanceState::Starting
            };
            let s = Status::new(state, &r).pid(pid).code(r.last_exit_code);
            Decision::keep(r).status(s)
        }
        RuntimeState::Absent | RuntimeState::Created => not_running(want, r, obs, now, None),
        RuntimeState::Exited { code } => not_running(want, r, obs, now, Some(Exit(code))),
    }
}

/// The exit code of a run that ended (`None`: unknown).
#[derive(Debug, Clone, Copy)]
struct Exit(Option<i32>);

/// Desired running, nothing runs: absent, created, or exited with `exit`.
fn not_running(
    want: &Intent,
    mut r: LocalInstance,
    obs: &Observation,
    now: u64,
    exit: Option<Exit>,
) -> Decision {
    if let Some(t) = r.backing_off(now) {
        let s = match exit {
            Some(Exit(code)) if r.last_error.is_none() => exit_status(&r, code),
            _ => failure_status(&r, InstanceState::Failed),
        };
        return Decision::keep(r).status(s).wake(t);
    }
    if r.gave_up() {
        let s = failure_status(&r, InstanceState::Failed);
        return Decision::keep(r).status(s);
    }
    let retry_due = r.not_before_ms.is_some();
    if !r.pending_restart && !retry_due {
        if let Some(Exit(code)) = exit {
            if !r.exit_is_new() {
                let s = exit_status(&r, code);
                return Decision::keep(r).status(s);
            }
            // A new exit: the policy decides.
            r.handled_exit_pid = r.pid;
            r.last_exit_code = code;
            let restart = match want.restart {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => code != Some(0),
                RestartPolicy::Never => false,
            };
            if !restart {
                let s = exit_status(&r, code);
                return Decision::keep(r).status(s);
            }
            let long_run = r
                .started_ms
                .is_none_or(|s| now.saturating_sub(s) >= BACKOFF_RESET_MS);
            if long_run {
                r.failures = 0;
            }
            r.failures = r.failures.saturating_add(1);
            let at = now.saturating_add(backoff_ms(r.failures));
            r.not_before_ms = Some(at);
            let s = exit_status(&r, code);
            return Decision::keep(r).status(s).wake(at);
        }
    }
    // An attempt is due: a first start, a retry, a restart by policy or by the user.
    if exit.is_none() && obs.runtime == RuntimeState::Absent {
        // Resources first, also while the datapath is being programmed (nothing is reported:
        // a launch that finds the datapath ready reports `running` only).
        return Decision::keep(r).step(Step::Create);
    }
    if !obs.datapath_ready {
        let s = Status::new(InstanceState::Starting, &r).message(WAITING_FOR_DATAPATH);
        return Decision::keep(r).status(s);
    }
    if retry_due && !r.pending_restart {
        r.restart_count = r.restart_count.saturating_add(1);
    }
    r.not_before_ms = None;
    Decision::keep(r).step(Step::Start)
}

/// Folds a failed step into the record: counts the failure, keeps the runtime's reason and
/// schedules the retry (none for a create or start under policy `never`). A `transient`
/// failure is not the instance's (a create whose network setup failed while the datapath was
/// still being programmed: a map from before the instance may remove the bridge it was
/// attaching to): it is not counted, and the create is tried again once the datapath is ready.
/// `want` is `None` for an instance no longer assigned here.
pub fn failed(
    want: Option<&Intent>,
    rec: &LocalInstance,
    step: Step,
    reason: &str,
    transient: bool,
    now: u64,
) -> Decision {
    let mut r = rec.clone();
    let desired = want.map(|w| w.desired);
    let starting =
        desired == Some(DesiredState::Running) && matches!(step, Step::Create | Step::Start);
    if starting && step == Step::Create && transient {
        let s = Status::new(InstanceState::Starting, &r).message(WAITING_FOR_DATAPATH);
        return Decision::keep(r).status(s);
    }
    r.failures = r.failures.saturating_add(1);
    r.last_error = Some(format!("{} failed: {reason}", step.as_str()));
    let retry = !(starting && want.is_some_and(|w| w.restart == RestartPolicy::Never));
    if starting {
        r.pending_restart = false;
    }
    let at = retry.then(|| now.saturating_add(backoff_ms(r.failures)));
    r.not_before_ms = at;
    let status = match (desired, step) {
        (None, _) => None,
        (Some(DesiredState::Deleted), _) => Some(failure_status(&r, InstanceState::Deleting)),
        // A user restart whose stop failed: the process still runs.
        (Some(DesiredState::Running), Step::Stop) => {
            let mut s = failure_status(&r, InstanceState::Running);
            s.pid = r.pid;
            Some(s)
        }
        (Some(_), Step::Stop) => Some(failure_status(&r, InstanceState::Stopping)),
        (Some(_), _) => Some(failure_status(&r, InstanceState::Failed)),
    };
    Decision {
        record: Some(r),
        step: None,
        status,
        wake_at_ms: at,
    }
}

/// Decides about an instance this node still has but is no longer assigned (moved elsewhere,
/// or deleted while the node was away): it is deleted, and then forgotten.
pub fn decide_unassigned(
    instance_type: InstanceType,
    rec: Option<&LocalInstance>,
    obs: &Observation,
    now: u64,
) -> Decision {
    let r = rec.cloned().unwrap_or(LocalInstance {
        instance_type,
        ..LocalInstance::default()
    });
    if obs.runtime == RuntimeState::Absent {
        return Decision {
            record: None,
            step: None,
            status: None,
            wake_at_ms: None,
        };
    }
    if let Some(t) = r.backing_off(now) {
        return Decision::keep(r).wake(t);
    }
    Decision::keep(r).step(Step::Delete)
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
