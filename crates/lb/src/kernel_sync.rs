//! Keeps one load balancer's in-kernel L4 table ([`crate::kernel`]) in step with its
//! configuration and its backends' health, and feeds the table's counters and the conntrack
//! table into the LB's metrics.
//!
//! The plan is rendered from the current snapshot whenever it may have changed: at once when a
//! configuration is published or a backend's availability changes (health state, ejection,
//! draining; the LB's change counter), when an ejection or a drain timeout ends, and at least
//! every second. When the text differs from what was applied, the table is replaced in one
//! `nft -f` transaction (counters are read first). Every 2 s (one `nft` process and one
//! conntrack read per LB, so many LBs stay cheap) the counters and `/proc/net/nf_conntrack` are
//! read. If `nft` fails, the user-space listener keeps serving and the sync retries.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::balancer::Algorithm;
use crate::kernel::{self, KernelBackend, KernelPlan, SlotCounters};
use crate::runtime::Inner;

/// Runs `nft` with `args`, feeding `stdin`; returns stdout or stderr's first line.
pub(crate) async fn nft(args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let mut child = tokio::process::Command::new("nft")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("running nft: {e}"))?;
    if let Some(mut w) = child.stdin.take() {
        if let Some(s) = stdin {
            w.write_all(s.as_bytes())
                .await
                .map_err(|e| format!("writing to nft: {e}"))?;
        }
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| format!("running nft: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Delete the `ip` tables named `<prefix>_lb*` that are not in `keep` (left by a load balancer
/// that is gone, e.g. deleted while its agent was down). Returns the names deleted.
pub async fn remove_stale_tables(prefix: &str, keep: &[String]) -> Vec<String> {
    let Ok(list) = nft(&["list", "tables", "ip"], None).await else {
        return Vec::new();
    };
    let own = format!("{prefix}_lb");
    let mut removed = Vec::new();
    for name in list.lines().filter_map(|l| l.split_whitespace().nth(2)) {
        let ours = name.strip_prefix(&own).is_some_and(|h| {
            h.len() == 8
                && h.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        });
        if ours && !keep.iter().any(|k| k == name) {
            match nft(&["delete", "table", "ip", name], None).await {
                Ok(_) => removed.push(name.to_string()),
                Err(e) => tracing::warn!(table = name, "cannot delete a stale L4 table: {e}"),
            }
        }
    }
    removed
}

/// Delete the conntrack entries matching `mark` under `mask` (their flows end at their next
/// packet).
async fn cut(mark: u32, mask: u32) {
    match tokio::task::spawn_blocking(move || crate::conntrack::delete_by_mark(mark, mask)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(
            mark = format_args!("{mark:#010x}"),
            "cannot cut drained flows: {e}"
        ),
        Err(e) => tracing::warn!("cannot cut drained flows: {e}"),
    }
}

/// How often counters and open flows are folded into the metrics.
const STATS_EVERY: Duration = Duration::from_secs(2);
/// Longest time between two renders of the plan (retries of a failed `nft`, stats).
const IDLE_WAKE: Duration = Duration::from_secs(1);

/// The backend behind each slot of a table.
type Slots = Vec<(u16, Arc<Backend>)>;

/// What was last applied: the script and the backend behind each slot.
struct Applied {
    script: String,
    slots: Slots,
}

struct Sync {
    table: String,
    slots: HashMap<SocketAddr, u16>,
    applied: Option<Applied>,
    /// Slots of backends that left the table, with the time their flows are cut.
    draining: Vec<(u16, Instant)>,
    last: BTreeMap<u16, SlotCounters>,
    failing: bool,
    logged_reason: Option<kernel::Ineligible>,
    last_stats: Instant,
}

/// Keep the table of `inner` in step until `cancel`, then delete it.
pub(crate) async fn run(inner: Weak<Inner>, table: String, cancel: CancellationToken) {
    let mut s = Sync {
        table,
        slots: HashMap::new(),
        applied: None,
        draining: Vec::new(),
        last: BTreeMap::new(),
        failing: false,
        logged_reason: None,
        last_stats: Instant::now(),
    };
    let Some(mut changes) = inner.upgrade().map(|i| i.changes.subscribe()) else {
        return;
    };
    let mut wake = Duration::ZERO;
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            r = changes.changed() => if r.is_err() { break },
            () = tokio::time::sleep(wake) => {}
        }
        let Some(inner) = inner.upgrade() else {
            break;
        };
        let generation = *changes.borrow_and_update();
        s.step(&inner).await;
        // Applied, or failed (then the user-space proxy serves and nobody should wait).
        inner.kernel_applied.send_replace(generation);
        wake = s.next_wake();
    }
    let mut drain = None;
    if let Some(inner) = inner.upgrade() {
        s.stats(&inner).await;
        s.forget(&inner, &[]);
        drain = Some(Duration::from_millis(
            inner.snap.load().cfg.limits.drain_timeout_ms,
        ));
    }
    if let (Some(drain), Some(_)) = (drain, &s.applied) {
        // Like relayed connections of a stopped listener, forwarded flows get the drain
        // timeout, then end.
        let base = kernel::mark(&s.table, 0);
        tokio::spawn(async move {
            tokio::time::sleep(drain).await;
            cut(base, kernel::MARK_TABLE_MASK).await;
        });
    }
    if s.applied.is_some() {
        match nft(&["delete", "table", "ip", &s.table], None).await {
            Ok(_) => tracing::info!(table = %s.table, "in-kernel L4 path removed"),
            // Already removed as stale by the agent.
            Err(e) if e.contains("No such file") => {}
            Err(e) => tracing::warn!(table = %s.table, "cannot delete the L4 table: {e}"),
        }
    }
}

impl Sync {
    /// The slot of a backend address: derived from the address (so an agent restarted over
    /// live flows gives each backend the slot its flows are marked with), probing past a slot
    /// another address holds; never reused while this LB lives.
    fn slot(&mut self, addr: SocketAddr) -> u16 {
        if let Some(s) = self.slots.get(&addr) {
            return *s;
        }
        if self.slots.len() >= usize::from(kernel::MAX_SLOTS) {
            self.slots.clear();
        }
        let mut s =
            (crate::balancer::hash64(addr.to_string().as_bytes()) as u16) % kernel::MAX_SLOTS;
        while self.slots.values().any(|v| *v == s) {
            s = (s + 1) % kernel::MAX_SLOTS;
        }
        self.slots.insert(addr, s);
        s
    }

    /// The plan for the current snapshot, or why there is none.
    fn plan(&mut self, inner: &Inner) -> Option<(KernelPlan, Slots)> {
        let snap = inner.snap.load_full();
        match kernel::eligible(&snap.cfg) {
            Ok(true) => self.logged_reason = None,
            Ok(false) => return None,
            Err(r) => {
                if self.logged_reason != Some(r) {
                    tracing::info!(lb = %inner.name, "L4 listeners stay on the user-space proxy: {r}");
                    self.logged_reason = Some(r);
                }
                return None;
            }
        }
        let (Some(pc), Some(pool)) = (snap.cfg.pools.first(), snap.pools.first()) else {
            return None;
        };
        let listeners = inner
            .listen_addrs()
            .into_iter()
            .filter(|(p, _)| !p.is_http())
            .filter_map(|(p, a)| kernel::v4([a]).pop().map(|a| (p, a)))
            .collect();
        let mut backends = Vec::new();
        let mut slots = Vec::new();
        for (bc, b) in pc.backends.iter().zip(&pool.backends) {
            let Some(addr) = kernel::v4([bc.addr]).pop() else {
                continue;
            };
            let slot = self.slot(bc.addr);
            backends.push(KernelBackend {
                slot,
                addr,
                weight: kernel::weight(pc.algorithm, bc.weight),
                available: b.available(),
            });
            slots.push((slot, Arc::clone(b)));
        }
        let plan = KernelPlan {
            table: self.table.clone(),
            listeners,
            backends,
            by_client: matches!(pc.algorithm, Algorithm::IpHash | Algorithm::ConsistentHash),
        };
        Some((plan, slots))
    }

    async fn step(&mut self, inner: &Inner) {
        match self.plan(inner) {
            Some((plan, slots)) => {
                let script = plan.script();
                if self.applied.as_ref().map(|a| &a.script) != Some(&script) {
                    self.stats(inner).await;
                    match nft(&["-f", "-"], Some(&script)).await {
                        Ok(_) => {
                            if self.failing || self.applied.is_none() {
                                tracing::info!(lb = %inner.name, table = %self.table, "L4 listeners forwarded in the kernel");
                            }
                            self.failing = false;
                            self.forget(inner, &slots);
                            self.schedule_cuts(inner, &slots);
                            self.applied = Some(Applied { script, slots });
                            self.last.clear();
                        }
                        Err(e) => {
                            if !self.failing {
                                tracing::warn!(lb = %inner.name, table = %self.table, "cannot apply the in-kernel L4 path, the user-space proxy serves: {e}");
                            }
                            self.failing = true;
                        }
                    }
                }
            }
            None => {
                if self.applied.is_some() {
                    self.stats(inner).await;
                    if nft(&["delete", "table", "ip", &self.table], None)
                        .await
                        .is_ok()
                    {
                        tracing::info!(lb = %inner.name, table = %self.table, "in-kernel L4 path removed");
                        self.forget(inner, &[]);
                        self.applied = None;
                        self.last.clear();
                    }
                }
            }
        }
        if self.last_stats.elapsed() >= STATS_EVERY {
            self.stats(inner).await;
        }
        self.cut_due().await;
    }

    /// When the plan may change without a change being signalled: an ejection or a drain
    /// timeout ends; at most [`IDLE_WAKE`].
    fn next_wake(&self) -> Duration {
        let now = Instant::now();
        let ejections = self
            .applied
            .iter()
            .flat_map(|a| &a.slots)
            .filter_map(|(_, b)| b.ejected_for())
            .map(|d| d + Duration::from_millis(1));
        let cuts = self
            .draining
            .iter()
            .map(|(_, due)| due.saturating_duration_since(now));
        ejections.chain(cuts).fold(IDLE_WAKE, Duration::min)
    }

    /// Backends that left the table get their flows cut after the drain timeout.
    fn schedule_cuts(&mut self, inner: &Inner, keep: &[(u16, Arc<Backend>)]) {
        let Some(a) = &self.applied else {
            return;
        };
        let due =
            Instant::now() + Duration::from_millis(inner.snap.load().cfg.limits.drain_timeout_ms);
        for (slot, _) in &a.slots {
            if !keep.iter().any(|(k, _)| k == slot) && !self.draining.iter().any(|(d, _)| d == slot)
            {
                self.draining.push((*slot, due));
            }
        }
        // A backend that came back keeps its flows.
        self.draining
            .retain(|(d, _)| !keep.iter().any(|(k, _)| k == d));
    }

    async fn cut_due(&mut self) {
        let now = Instant::now();
        let due: Vec<u16> = self
            .draining
            .iter()
            .filter(|(_, t)| *t <= now)
            .map(|(s, _)| *s)
            .collect();
        self.draining.retain(|(_, t)| *t > now);
        for slot in due {
            tracing::info!(table = %self.table, slot, "drain timeout over: cutting the backend's forwarded flows");
            cut(kernel::mark(&self.table, slot), u32::MAX).await;
        }
    }

    /// Backends that leave the table stop counting kernel connections.
    fn forget(&self, inner: &Inner, keep: &[(u16, Arc<Backend>)]) {
        let Some(a) = &self.applied else {
            return;
        };
        for (_, b) in &a.slots {
            if !keep.iter().any(|(_, k)| Arc::ptr_eq(k, b)) {
                let d = b.set_kernel_active(0);
                b.metrics.active.inc_by(d);
                inner.conns.inc_by(d);
            }
        }
    }

    /// Fold the counters' growth since the last read and the open connections into the metrics.
    async fn stats(&mut self, inner: &Inner) {
        self.last_stats = Instant::now();
        let Some(a) = &self.applied else {
            return;
        };
        let json = match nft(
            &["-j", "list", "counters", "table", "ip", &self.table],
            None,
        )
        .await
        {
            Ok(j) => j,
            Err(e) => {
                tracing::debug!(table = %self.table, "cannot read the L4 counters: {e}");
                return;
            }
        };
        let now = kernel::parse_counters(&json).unwrap_or_default();
        for (slot, b) in &a.slots {
            let (cur, prev) = (
                now.get(slot).copied().unwrap_or_default(),
                self.last.get(slot).copied().unwrap_or_default(),
            );
            // A counter below its last reading was recreated: all of it is new.
            let grow = |c: u64, p: u64| if c >= p { c - p } else { c };
            b.metrics.requests[1].inc_by(grow(cur.connections, prev.connections));
            b.metrics
                .bytes_to_backend
                .inc_by(grow(cur.bytes_to, prev.bytes_to));
            b.metrics
                .bytes_from_backend
                .inc_by(grow(cur.bytes_from, prev.bytes_from));
        }
        self.last = now;
        if let Ok(text) = tokio::fs::read_to_string("/proc/net/nf_conntrack").await {
            let open = kernel::count_conntrack(&text, kernel::mark(&self.table, 0));
            for (slot, b) in &a.slots {
                let d = b.set_kernel_active(open.get(slot).copied().unwrap_or(0));
                b.metrics.active.inc_by(d);
                inner.conns.inc_by(d);
            }
        }
    }
}
