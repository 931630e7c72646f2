//! History checker for fault tests.
//!
//! The workload uses real resources: each write creates a project `<prefix>-<n>` (a fresh
//! key each time, retried against the next server until acknowledged or given up); each read
//! lists the projects. The register is "is key k present", which only ever goes from absent to
//! present, so a history is linearizable iff:
//!
//! 1. every acknowledged write is present at the end (no acknowledged change lost);
//! 2. every key present at the end, or seen by a read, was written by some attempt that
//!    started before (no phantom values);
//! 3. a read sees every write acknowledged before the read started (no stale read);
//! 4. every key a read saw is present at the end (no read of a value that was later lost);
//! 5. a read that starts after another read ended sees at least what that one saw.
//!
//! A write that failed or timed out may or may not have happened: either is fine.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nimbus_client::{Client, ClientError};

/// One write: a key, when its first attempt started, when it was acknowledged (if it was).
#[derive(Debug, Clone)]
pub struct Write {
    /// The key (project name).
    pub key: String,
    /// Start of the first attempt.
    pub start: Instant,
    /// When it was acknowledged; `None` if every attempt failed (outcome unknown).
    pub acked: Option<Instant>,
}

/// One successful read.
#[derive(Debug, Clone)]
pub struct Read {
    /// When the request was sent.
    pub start: Instant,
    /// When the answer arrived.
    pub end: Instant,
    /// The keys seen.
    pub seen: BTreeSet<String>,
}

/// Counts of one run.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Writes acknowledged.
    pub acked: usize,
    /// Writes given up on (outcome unknown).
    pub unknown: usize,
    /// Successful reads.
    pub reads: usize,
    /// Failed attempts (write or read) that were retried elsewhere.
    pub failed_attempts: usize,
    /// The longest time a write waited for its acknowledgement.
    pub max_write_latency: Duration,
}

/// A recorded history.
#[derive(Debug, Default)]
pub struct History {
    writes: Mutex<Vec<Write>>,
    reads: Mutex<Vec<Read>>,
    failed: Mutex<usize>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl History {
    /// An empty history.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Records a write.
    pub fn record_write(&self, w: Write) {
        lock(&self.writes).push(w);
    }

    /// Records a successful read.
    pub fn record_read(&self, r: Read) {
        lock(&self.reads).push(r);
    }

    /// Counts a failed attempt.
    pub fn record_failure(&self) {
        *lock(&self.failed) += 1;
    }

    /// Checks the history against the final set of keys (read after the faults healed).
    /// Returns the summary, or every violation found.
    pub fn check(&self, final_keys: &BTreeSet<String>) -> Result<Summary, Vec<String>> {
        let writes = lock(&self.writes).clone();
        let reads = lock(&self.reads).clone();
        let mut errors = Vec::new();
        let by_key: BTreeMap<&str, &Write> = writes.iter().map(|w| (w.key.as_str(), w)).collect();
        let mut summary = Summary {
            reads: reads.len(),
            failed_attempts: *lock(&self.failed),
            ..Summary::default()
        };
        for w in &writes {
            match w.acked {
                Some(t) => {
                    summary.acked += 1;
                    summary.max_write_latency = summary.max_write_latency.max(t - w.start);
                    if !final_keys.contains(&w.key) {
                        errors.push(format!("acknowledged write {} is lost", w.key));
                    }
                }
                None => summary.unknown += 1,
            }
        }
        for k in final_keys {
            if !by_key.contains_key(k.as_str()) {
                errors.push(format!("{k} is present but was never written"));
            }
        }
        for (ri, r) in reads.iter().enumerate() {
            for w in &writes {
                if w.acked.is_some_and(|a| a < r.start) && !r.seen.contains(&w.key) {
                    errors.push(format!(
                        "stale read #{ri}: {} was acknowledged {:?} before the read started but not seen",
                        w.key,
                        r.start - w.acked.unwrap_or(r.start)
                    ));
                }
            }
            for k in &r.seen {
                match by_key.get(k.as_str()) {
                    None => errors.push(format!("read #{ri} saw {k}, which was never written")),
                    Some(w) if w.start > r.end => {
                        errors.push(format!("read #{ri} saw {k} before it was written"));
                    }
                    Some(_) => {}
                }
                if !final_keys.contains(k) {
                    errors.push(format!("read #{ri} saw {k}, which was later lost"));
                }
            }
        }
        let mut by_end: Vec<&Read> = reads.iter().collect();
        by_end.sort_by_key(|r| r.end);
        let mut sorted_start: Vec<&Read> = reads.iter().collect();
        sorted_start.sort_by_key(|r| r.start);
        // Reads are few enough for the quadratic check.
        for a in &by_end {
            for b in &sorted_start {
                if b.start > a.end {
                    if let Some(k) = a.seen.difference(&b.seen).next() {
                        errors.push(format!(
                            "a later read does not see {k}, which an earlier read saw"
                        ));
                        break;
                    }
                }
            }
        }
        errors.truncate(50);
        if errors.is_empty() {
            Ok(summary)
        } else {
            Err(errors)
        }
    }
}

/// How long one request may take before the client tries another server.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(4);

/// How long one write keeps retrying before it is given up (outcome unknown).
pub const WRITE_GIVE_UP: Duration = Duration::from_secs(30);

/// Runs writers and a reader against `servers` until `stop` is set: each writer creates
/// projects `<prefix>-<writer>-<n>` one after another, moving to the next server when one
/// fails; the reader lists projects. Returns when all tasks ended.
pub async fn run_workload(
    servers: Vec<Client>,
    history: Arc<History>,
    prefix: String,
    writers: usize,
    stop: Arc<AtomicBool>,
) {
    let servers: Vec<Client> = servers
        .into_iter()
        .map(|c| c.with_timeout(ATTEMPT_TIMEOUT))
        .collect();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (servers, history, stop) = (servers.clone(), history.clone(), stop.clone());
        let prefix = format!("{prefix}-{w}");
        tasks.push(tokio::spawn(async move {
            let mut at = w % servers.len();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let key = format!("{prefix}-{n}");
                let start = Instant::now();
                let mut acked = None;
                while start.elapsed() < WRITE_GIVE_UP {
                    match servers[at].create_project(&key).await {
                        Ok(_) => {
                            acked = Some(Instant::now());
                            break;
                        }
                        // An earlier attempt whose answer was lost did commit.
                        Err(ClientError::Api(e))
                            if e.code == nimbus_api::ErrorCode::AlreadyExists =>
                        {
                            acked = Some(Instant::now());
                            break;
                        }
                        Err(_) => {
                            history.record_failure();
                            at = (at + 1) % servers.len();
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                history.record_write(Write { key, start, acked });
            }
        }));
    }
    {
        let (servers, history, stop) = (servers.clone(), history.clone(), stop.clone());
        let prefix = format!("{prefix}-");
        tasks.push(tokio::spawn(async move {
            let mut at = 0;
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                match servers[at].list_projects().await {
                    Ok(ps) => {
                        let seen = ps
                            .into_iter()
                            .map(|p| p.meta.name)
                            .filter(|n| n.starts_with(&prefix))
                            .collect();
                        history.record_read(Read {
                            start,
                            end: Instant::now(),
                            seen,
                        });
                    }
                    Err(_) => history.record_failure(),
                }
                at = (at + 1) % servers.len();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// The keys with `prefix` present now, read (linearizably) through the first server of
/// `servers` that answers.
pub async fn final_keys(servers: &[Client], prefix: &str) -> Option<BTreeSet<String>> {
    let prefix = format!("{prefix}-");
    for _ in 0..20 {
        for c in servers {
            if let Ok(ps) = c.with_timeout(ATTEMPT_TIMEOUT).list_projects().await {
                return Some(
                    ps.into_iter()
                        .map(|p| p.meta.name)
                        .filter(|n| n.starts_with(&prefix))
                        .collect(),
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    None
}

/// A workload running against some servers of a [`crate::netns::Net`] while faults are
/// injected; [`Workload::finish`] stops it and checks the history.
pub struct Workload {
    prefix: String,
    servers: Vec<usize>,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Workload {
    /// Starts two writers and a reader through the servers on hosts `servers` of `net`,
    /// writing keys `<prefix>-...`.
    pub fn start(net: &crate::netns::Net, servers: &[usize], prefix: &str) -> Self {
        let history = History::new();
        let stop = Arc::new(AtomicBool::new(false));
        let clients = servers.iter().map(|&i| net.client(i)).collect();
        let task = tokio::spawn(run_workload(
            clients,
            history.clone(),
            prefix.to_owned(),
            2,
            stop.clone(),
        ));
        Self {
            prefix: prefix.to_owned(),
            servers: servers.to_vec(),
            history,
            stop,
            task,
        }
    }

    /// Stops the workload, waits until the servers form a whole cluster again (a leader and
    /// all of them voters), checks that every server holds exactly the same keys and that the
    /// history is linearizable. Panics with the violations and the server logs otherwise.
    pub async fn finish(self, net: &crate::netns::Net) -> Summary {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        if let Err(e) = net
            .wait_cluster(&self.servers, self.servers.len(), Duration::from_secs(60))
            .await
        {
            panic!("cluster not whole again: {e}");
        }
        let clients: Vec<Client> = self.servers.iter().map(|&i| net.client(i)).collect();
        let keys = final_keys(&clients, &self.prefix)
            .await
            .unwrap_or_else(|| panic!("no server answers a final read\n{}", net.logs_tail(20)));
        // Every server must hold every acknowledged write (each read is linearizable).
        for c in &clients {
            let per_server = final_keys(std::slice::from_ref(c), &self.prefix)
                .await
                .unwrap_or_else(|| {
                    panic!(
                        "{} answers no final read\n{}",
                        c.base_url(),
                        net.logs_tail(30)
                    )
                });
            assert_eq!(per_server, keys, "{} disagrees", c.base_url());
        }
        match self.history.check(&keys) {
            Ok(s) => {
                eprintln!("history ok: {s:?}");
                assert!(s.acked > 0, "no write was acknowledged");
                s
            }
            Err(errors) => panic!(
                "history check failed:\n{}\n{}",
                errors.join("\n"),
                net.logs_tail(20)
            ),
        }
    }
}
