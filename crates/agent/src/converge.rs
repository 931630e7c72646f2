//! The executor of the decision core ([`crate::decide`]): one worker per instance observes it,
//! decides, executes the decided step through the instance's driver, folds the outcome back
//! in, and decides again until nothing is left to do.
//!
//! - The reconcile loop wakes on a new assignment list, on the datapath having programmed
//!   something new, at the earliest "not before" time of a backoff, when a worker asks, and
//!   every [`RESYNC`] for a full pass (to notice exits). A full pass starts a worker for every
//!   instance (assigned ones, and ones the drivers still hold that are no longer assigned
//!   here); the passes between start workers only for instances with news (see
//!   `reconcile_changed`). No pass waits for its workers: a slow step (a stop's grace period,
//!   an image pull) holds up only its own instance; a worker busy with an instance is asked
//!   to run once more instead.
//! - One report path: every decided status goes to the reporter task, which sends what differs
//!   from what the control plane acknowledged, at once, batching whatever queued up while a
//!   request was in flight.
//! - The local records are saved by a saver task after they change (off the launch path).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nimbus_api::agent::{Assignment, InstanceReport, StatusReport};
use nimbus_api::{DesiredState, InstanceState, InstanceType, RestartPolicy};
use tokio::sync::{mpsc, watch, Notify};

use crate::decide::{self, Decision, Intent, Observation, Status, Step};
use crate::driver::{Driver, DriverError};
use crate::local::LocalState;
use crate::runtime::Agent;

/// How often every instance is looked at without another reason (to notice exits).
pub const RESYNC: Duration = Duration::from_millis(500);
/// The same on a hollow node, whose instances never change by themselves.
pub const HOLLOW_RESYNC: Duration = Duration::from_secs(30);
/// Steps one worker run executes at most before it leaves the rest to the next pass.
const MAX_STEPS: usize = 8;
/// Pause after a failed status report before it is sent again.
const REPORT_RETRY: Duration = Duration::from_secs(1);

/// Milliseconds since the Unix epoch (what records keep: they outlive the agent).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The executor's bookkeeping.
pub(crate) struct Executor {
    /// Instances with a running worker; `true`: run it once more when it is done.
    workers: Mutex<HashMap<String, bool>>,
    /// When each instance wants to be decided again (unix ms).
    wakes: Mutex<HashMap<String, u64>>,
    /// Instances waiting for the datapath to program them.
    awaiting_datapath: Mutex<HashSet<String>>,
    /// Wakes the reconcile loop.
    kick: Notify,
    /// The report path.
    reports: mpsc::UnboundedSender<Queued>,
    report_rx: Mutex<Option<mpsc::UnboundedReceiver<Queued>>>,
    /// The local records changed.
    dirty: Notify,
    /// Set when the agent stops: workers end at once.
    stopped: watch::Sender<bool>,
}

impl Executor {
    pub(crate) fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            workers: Mutex::new(HashMap::new()),
            wakes: Mutex::new(HashMap::new()),
            awaiting_datapath: Mutex::new(HashSet::new()),
            kick: Notify::new(),
            reports: tx,
            report_rx: Mutex::new(Some(rx)),
            dirty: Notify::new(),
            stopped: watch::channel(false).0,
        }
    }

    /// Claims instance `id` for a new worker; if one runs, asks it to run once more.
    fn claim(&self, id: &str) -> bool {
        let mut w = self.workers.lock().expect("workers lock");
        if let Some(again) = w.get_mut(id) {
            *again = true;
            false
        } else {
            w.insert(id.to_owned(), false);
            true
        }
    }

    /// Ends a worker run; `true`: it was asked to run once more (and keeps the claim).
    fn release(&self, id: &str) -> bool {
        let mut w = self.workers.lock().expect("workers lock");
        if w.get(id) == Some(&true) {
            w.insert(id.to_owned(), false);
            true
        } else {
            w.remove(id);
            false
        }
    }

    fn busy(&self, id: &str) -> bool {
        self.workers.lock().expect("workers lock").contains_key(id)
    }

    fn set_wake(&self, id: &str, at: Option<u64>) {
        let earlier = {
            let mut w = self.wakes.lock().expect("wakes lock");
            if let Some(t) = at {
                let earlier = w.values().all(|o| t < *o);
                w.insert(id.to_owned(), t);
                earlier
            } else {
                w.remove(id);
                false
            }
        };
        if earlier {
            self.kick.notify_one();
        }
    }

    fn earliest_wake(&self) -> Option<u64> {
        self.wakes
            .lock()
            .expect("wakes lock")
            .values()
            .min()
            .copied()
    }

    /// Stops the workers (the agent is stopping).
    pub(crate) fn stop(&self) {
        self.stopped.send_replace(true);
    }

    pub(crate) fn take_report_rx(&self) -> Option<mpsc::UnboundedReceiver<Queued>> {
        self.report_rx.lock().expect("report rx lock").take()
    }
}

/// Releases a worker's claim if its task ends early (panic, agent stop).
struct Claim<'a> {
    exec: &'a Executor,
    id: &'a str,
    done: bool,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.exec
                .workers
                .lock()
                .expect("workers lock")
                .remove(self.id);
        }
    }
}

/// A status on its way to the control plane, with the assignment it answers: the control plane
/// changes an instance's state itself on a user action (`start` makes a failed instance
/// `starting`), so a status equal to one already acknowledged is sent again when it answers a
/// newer request.
pub(crate) struct Queued {
    answers: (u64, DesiredState, u64),
    report: InstanceReport,
}

fn intent(a: &Assignment) -> Intent {
    Intent {
        instance_type: a.spec.instance_type,
        generation: a.generation,
        desired: a.desired,
        restart: a.spec.restart,
        restart_nonce: a.restart_nonce,
    }
}

fn deadline_of(ms: u64) -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_millis(ms.saturating_sub(now_ms()))
}

impl Agent {
    pub(crate) async fn reconcile_loop(self: Arc<Self>, mut rx: watch::Receiver<Option<u64>>) {
        // Wait for the first assignment list before touching anything.
        while rx.borrow().is_none() {
            if rx.changed().await.is_err() {
                return;
            }
        }
        let mut datapath = self.datapath.subscribe();
        let resync = if self.cfg.hollow {
            HOLLOW_RESYNC
        } else {
            RESYNC
        };
        // What each assigned instance was asked last time, to tell which ones changed.
        let mut asked: HashMap<String, (InstanceType, Intent)> = HashMap::new();
        let mut last_full: Option<tokio::time::Instant> = None;
        let mut datapath_changed = false;
        loop {
            rx.borrow_and_update();
            datapath.borrow_and_update();
            if last_full.is_none_or(|t| t.elapsed() >= resync) {
                last_full = Some(tokio::time::Instant::now());
                self.reconcile_once().await;
                asked = self.asked();
            } else {
                self.reconcile_changed(&mut asked, datapath_changed);
            }
            let mut next = last_full.map_or_else(tokio::time::Instant::now, |t| t + resync);
            if let Some(at) = self.exec.earliest_wake() {
                next = next.min(deadline_of(at));
            }
            datapath_changed = false;
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                _ = datapath.changed() => datapath_changed = true,
                () = self.exec.kick.notified() => {}
                () = tokio::time::sleep_until(next) => {}
            }
        }
    }

    fn asked(&self) -> HashMap<String, (InstanceType, Intent)> {
        self.assignments
            .lock()
            .expect("assignments lock")
            .values()
            .map(|a| (a.id.clone(), (a.spec.instance_type, intent(a))))
            .collect()
    }

    /// A pass between full ones: starts workers only for instances with news (a new or
    /// changed assignment, one that went away, a due wake-up, the datapath they wait for), so
    /// a launch costs the same on a node with a thousand instances as on an empty one.
    fn reconcile_changed(
        self: &Arc<Self>,
        asked: &mut HashMap<String, (InstanceType, Intent)>,
        datapath_changed: bool,
    ) {
        let now = self.asked();
        for (id, (ty, want)) in &now {
            if asked.get(id).is_none_or(|(_, w)| w != want) {
                self.spawn_worker(id, *ty);
            }
        }
        for (id, (ty, _)) in asked.iter() {
            if !now.contains_key(id) {
                self.spawn_worker(id, *ty);
            }
        }
        *asked = now;
        let due: Vec<String> = {
            let t = now_ms();
            let wakes = self.exec.wakes.lock().expect("wakes lock");
            wakes
                .iter()
                .filter(|(_, at)| **at <= t)
                .map(|(id, _)| id.clone())
                .collect()
        };
        let waiting: Vec<String> = if datapath_changed {
            self.exec
                .awaiting_datapath
                .lock()
                .expect("awaiting lock")
                .iter()
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        for id in due.into_iter().chain(waiting) {
            if let Some((ty, _)) = asked.get(&id) {
                self.spawn_worker(&id, *ty);
            }
        }
    }

    /// One full pass: starts a worker for every assigned instance and for every instance a
    /// driver holds that is no longer assigned here, rotates console logs, and forgets records
    /// of instances that are gone. Does not wait for the workers.
    pub async fn reconcile_once(self: &Arc<Self>) {
        let assignments: Vec<Assignment> = self
            .assignments
            .lock()
            .expect("assignments lock")
            .values()
            .cloned()
            .collect();
        for a in &assignments {
            self.spawn_worker(&a.id, a.spec.instance_type);
        }
        self.rotate_logs(&assignments).await;
        let assigned: HashSet<&str> = assignments.iter().map(|a| a.id.as_str()).collect();
        let mut held: HashSet<String> = HashSet::new();
        let mut listed: HashSet<InstanceType> = HashSet::new();
        for (ty, d) in &self.drivers {
            match d.list().await {
                Ok(ids) => {
                    listed.insert(*ty);
                    for id in ids {
                        if !assigned.contains(id.as_str()) {
                            self.spawn_worker(&id, *ty);
                        }
                        held.insert(id);
                    }
                }
                Err(e) => tracing::warn!(kind = ty.as_str(), "listing instances failed: {e}"),
            }
        }
        let forgotten = {
            let mut local = self.local.lock().expect("local lock");
            let before = local.instances.len();
            local.instances.retain(|id, r| {
                assigned.contains(id.as_str())
                    || held.contains(id)
                    || !listed.contains(&r.instance_type)
                    || self.exec.busy(id)
            });
            before != local.instances.len()
        };
        if forgotten {
            self.exec.dirty.notify_one();
        }
        let gone = |id: &String| !assigned.contains(id.as_str()) && !held.contains(id);
        self.exec
            .wakes
            .lock()
            .expect("wakes lock")
            .retain(|id, _| !gone(id));
        self.exec
            .awaiting_datapath
            .lock()
            .expect("awaiting lock")
            .retain(|id| !gone(id));
    }

    fn spawn_worker(self: &Arc<Self>, id: &str, ty: InstanceType) {
        // The worker sets its next wake-up; a due one must not keep waking the loop while a
        // busy worker finishes a long step.
        self.exec.set_wake(id, None);
        if !self.exec.claim(id) {
            return;
        }
        let agent = self.clone();
        let id = id.to_owned();
        let mut stopped = self.exec.stopped.subscribe();
        tokio::spawn(async move {
            let mut claim = Claim {
                exec: &agent.exec,
                id: &id,
                done: false,
            };
            let work = async {
                loop {
                    agent.converge_instance(&id, ty).await;
                    if !agent.exec.release(&id) {
                        break;
                    }
                }
            };
            tokio::select! {
                () = work => claim.done = true,
                _ = stopped.wait_for(|s| *s) => {}
            }
        });
    }

    fn datapath_ready(&self, a: &Assignment) -> bool {
        // A hollow node has no datapath.
        self.cfg.hollow || self.datapath.borrow().has(&a.id, &a.network.ip)
    }

    /// Observes, decides and executes for instance `id` until nothing is left to do.
    /// `listed_as` is the driver that holds it if it is not assigned.
    async fn converge_instance(&self, id: &str, listed_as: InstanceType) {
        for _ in 0..MAX_STEPS {
            let a = self
                .assignments
                .lock()
                .expect("assignments lock")
                .get(id)
                .cloned();
            let ty = a.as_ref().map_or(listed_as, |a| a.spec.instance_type);
            let Some(driver) = self.drivers.get(&ty).cloned() else {
                if let Some(a) = &a {
                    let msg = format!("this node has no {} driver", ty.as_str());
                    self.publish(a, &Status::failed(msg));
                }
                return;
            };
            let runtime = match driver.state(id).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(instance = id, "observing the instance failed: {e}");
                    if let Some(a) = &a {
                        self.publish(a, &Status::failed(e.to_string()));
                    }
                    return;
                }
            };
            let obs = Observation {
                runtime,
                datapath_ready: a.as_ref().is_none_or(|a| self.datapath_ready(a)),
            };
            let rec = self
                .local
                .lock()
                .expect("local lock")
                .instances
                .get(id)
                .cloned();
            let want = a.as_ref().map(intent);
            let d = match &want {
                Some(w) => decide::decide(w, rec.as_ref(), &obs, now_ms()),
                None => decide::decide_unassigned(ty, rec.as_ref(), &obs, now_ms()),
            };
            self.apply(id, a.as_ref(), &d);
            let Some(step) = d.step else { return };
            let name = a.as_ref().map_or(id, |a| a.name.as_str());
            let began = Instant::now();
            match self.execute(&*driver, id, a.as_ref(), step).await {
                Ok(pid) => {
                    tracing::debug!(
                        instance = %name,
                        step = step.as_str(),
                        elapsed_ms = began.elapsed().as_secs_f64() * 1e3,
                        "step done"
                    );
                    if let Some(pid) = pid {
                        if let Some(r) =
                            self.local.lock().expect("local lock").instances.get_mut(id)
                        {
                            r.started(pid, now_ms());
                        }
                        self.exec.dirty.notify_one();
                        if let Some(a) = &a {
                            tracing::info!(instance = %a.name, project = %a.project, pid, "instance running");
                        }
                    }
                }
                Err(e) => {
                    let rec = d.record.clone().unwrap_or_default();
                    let now = now_ms();
                    // The network setup of a create that ran while the datapath was being
                    // programmed may have lost a race with it (see `decide::failed`).
                    let transient = !obs.datapath_ready
                        && matches!(
                            e,
                            DriverError::Runtime {
                                tool: "netlink",
                                ..
                            }
                        );
                    let f =
                        decide::failed(want.as_ref(), &rec, step, &e.to_string(), transient, now);
                    log_failure(name, want.as_ref(), step, &e, &f, now);
                    self.apply(id, a.as_ref(), &f);
                    return;
                }
            }
        }
        tracing::warn!(
            instance = id,
            "still converging after {MAX_STEPS} steps; continuing on the next pass"
        );
    }

    /// Keeps a decision's record, wake-up and status.
    fn apply(&self, id: &str, a: Option<&Assignment>, d: &Decision) {
        let changed = {
            let mut local = self.local.lock().expect("local lock");
            match &d.record {
                Some(r) if local.instances.get(id) != Some(r) => {
                    local.instances.insert(id.to_owned(), r.clone());
                    true
                }
                Some(_) => false,
                None => local.instances.remove(id).is_some(),
            }
        };
        if changed {
            self.exec.dirty.notify_one();
        }
        self.exec.set_wake(id, d.wake_at_ms);
        {
            let mut awaiting = self.exec.awaiting_datapath.lock().expect("awaiting lock");
            if d.awaits_datapath() {
                awaiting.insert(id.to_owned());
            } else {
                awaiting.remove(id);
            }
        }
        if let (Some(a), Some(s)) = (a, &d.status) {
            self.publish(a, s);
        }
    }

    /// Queues a status for the reporter (the one report path).
    fn publish(&self, a: &Assignment, s: &Status) {
        let accelerator = if a.spec.instance_type == InstanceType::Vm {
            self.capabilities
                .lock()
                .expect("caps lock")
                .accelerator
                .clone()
        } else {
            None
        };
        let report = InstanceReport {
            id: a.id.clone(),
            generation: a.generation,
            state: s.state,
            pid: s.pid,
            exit_code: s.exit_code,
            message: s.message.clone(),
            restart_count: s.restart_count,
            accelerator,
            deleted: s.deleted,
        };
        let _ = self.exec.reports.send(Queued {
            answers: (a.generation, a.desired, a.restart_nonce),
            report,
        });
    }

    /// Executes one step; a start returns the new PID.
    async fn execute(
        &self,
        d: &dyn Driver,
        id: &str,
        a: Option<&Assignment>,
        step: Step,
    ) -> Result<Option<u32>, DriverError> {
        match (step, a) {
            (Step::Create, Some(a)) => {
                let began = Instant::now();
                let spec = self.runtime_spec(a).await?;
                let spec_done = began.elapsed();
                d.create(&spec).await?;
                tracing::debug!(
                    instance = %a.name,
                    spec_ms = spec_done.as_secs_f64() * 1e3,
                    create_ms = began.elapsed().saturating_sub(spec_done).as_secs_f64() * 1e3,
                    "created"
                );
                Ok(None)
            }
            (Step::Start, Some(_)) => d.start(id).await.map(Some),
            (Step::Stop, _) => d.stop(id, self.cfg.stop_grace).await.map(|()| None),
            (Step::Delete, _) => {
                if a.is_none() {
                    tracing::info!(instance = %id, "removing instance no longer assigned to this node");
                }
                d.delete(id).await.map(|()| None)
            }
            (step, None) => Err(DriverError::NotFound(format!(
                "{id} is not assigned to this node (no {})",
                step.as_str()
            ))),
        }
    }

    /// Sends queued statuses that differ from what the control plane acknowledged: at once,
    /// with whatever else queued up meanwhile in the same request.
    pub(crate) async fn report_loop(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Queued>) {
        let mut acked: HashMap<String, Queued> = HashMap::new();
        let mut pending: BTreeMap<String, Queued> = BTreeMap::new();
        let same = |a: &Queued, b: &Queued| a.answers == b.answers && a.report == b.report;
        loop {
            if pending.is_empty() {
                match rx.recv().await {
                    Some(q) => {
                        pending.insert(q.report.id.clone(), q);
                    }
                    None => return,
                }
            }
            while let Ok(q) = rx.try_recv() {
                pending.insert(q.report.id.clone(), q);
            }
            pending.retain(|id, q| acked.get(id).is_none_or(|a| !same(a, q)));
            if pending.is_empty() {
                continue;
            }
            let report = StatusReport {
                instances: pending.values().map(|q| q.report.clone()).collect(),
                interfaces: Vec::new(),
            };
            let sent = Instant::now();
            match self.link.report(&self.cfg.name, &report).await {
                Ok(()) => {
                    tracing::debug!(
                        instances = report.instances.len(),
                        elapsed_ms = sent.elapsed().as_secs_f64() * 1e3,
                        "status reported"
                    );
                    acked.extend(std::mem::take(&mut pending));
                    if acked.len() > 64 {
                        // Forget what is no longer assigned (deleted, moved away).
                        let assignments = self.assignments.lock().expect("assignments lock");
                        acked.retain(|id, _| assignments.contains_key(id));
                    }
                }
                Err(e) => {
                    tracing::warn!("status report failed: {e}");
                    tokio::time::sleep(REPORT_RETRY).await;
                }
            }
        }
    }

    /// Saves the local records whenever they changed.
    pub(crate) async fn save_loop(self: Arc<Self>) {
        loop {
            self.exec.dirty.notified().await;
            self.save_local().await;
        }
    }

    /// Saves the local records now.
    pub(crate) async fn save_local(&self) {
        let (path, data) = {
            let local = self.local.lock().expect("local lock");
            (local.path().to_path_buf(), local.encode())
        };
        match tokio::task::spawn_blocking(move || LocalState::write(&path, &data)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("saving agent state: {e}"),
            Err(e) => tracing::error!("saving agent state: {e}"),
        }
    }
}

fn log_failure(
    name: &str,
    want: Option<&Intent>,
    step: Step,
    e: &DriverError,
    f: &Decision,
    now: u64,
) {
    let r = f.record.as_ref();
    let attempt = r.map_or(0, |r| r.failures);
    let retry_ms = f.wake_at_ms.map(|t| t.saturating_sub(now));
    let starting = want.is_some_and(|w| w.desired == DesiredState::Running)
        && matches!(step, Step::Create | Step::Start);
    match (starting, retry_ms) {
        (true, None) if attempt > 0 => {
            let never = want.is_some_and(|w| w.restart == RestartPolicy::Never);
            tracing::error!(
                instance = %name,
                step = step.as_str(),
                "instance failed to start: {e}{}",
                if never { " (restart policy never: not retried)" } else { "" }
            );
        }
        (true, Some(ms)) => tracing::warn!(
            instance = %name,
            step = step.as_str(),
            attempt,
            retry_in_ms = ms,
            "instance failed to start: {e}"
        ),
        // A create before the datapath was ready: tried again once it is.
        (true, None) => {
            tracing::info!(instance = %name, "create failed, retrying once the datapath is ready: {e}");
        }
        (false, _) => tracing::warn!(
            instance = %name,
            step = step.as_str(),
            attempt,
            retry_in_ms = retry_ms,
            "{} failed: {e}",
            step.as_str()
        ),
    }
}

impl Status {
    /// A failure that is not a step's (no driver, observing failed).
    fn failed(message: String) -> Self {
        Self {
            state: InstanceState::Failed,
            pid: None,
            exit_code: None,
            message,
            restart_count: 0,
            deleted: false,
        }
    }
}
