//! Readiness: a VM is `Starting` from QEMU's start until its guest agent first answered and
//! took the VM's secrets (if it has any, see `secrets`), then `Running`.
//!
//! One waiter task per booting VM pings the guest agent until it answers (or QEMU is gone) and
//! records the answer in `vms/<id>/ready` (the QEMU PID it answered for). `state()` is then a
//! file read, never a round trip, and a new driver on the same state directory (an agent
//! restart) sees an already booted VM as running at once. The file is removed when QEMU is
//! started again; a PID that does not match the running QEMU means "not yet".

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use super::process::{self, VmPaths};
use super::{guest, secrets, VmError};

/// How long one ping may wait for the answer while the guest boots.
const PING_TIMEOUT: Duration = Duration::from_millis(500);
/// Pause between pings that failed fast (QEMU's socket not there yet).
const PING_PAUSE: Duration = Duration::from_millis(100);
/// How long the guest agent may take to put the secrets in place.
const SECRETS_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed delivery (the guest refused, e.g. a path that is a directory).
const SECRETS_RETRY: Duration = Duration::from_secs(2);

/// Whether the guest agent of the VM whose QEMU is `pid` has answered.
pub fn is_ready(paths: &VmPaths, pid: u32) -> bool {
    std::fs::read_to_string(paths.ready())
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        == Some(pid)
}

/// Records that the guest agent of QEMU `pid` answered (atomically: temporary file, rename).
pub fn mark_ready(paths: &VmPaths, pid: u32) {
    if is_ready(paths, pid) {
        return;
    }
    let tmp = paths.ready().with_extension("tmp");
    let res = std::fs::write(&tmp, format!("{pid}\n"))
        .and_then(|()| std::fs::rename(&tmp, paths.ready()));
    if let Err(e) = res {
        tracing::warn!(path = %paths.ready().display(), "recording VM readiness: {e}");
    }
}

/// Waits up to `timeout` for the guest agent of QEMU `pid`, hands it the VM's secrets and
/// records readiness.
pub async fn confirm(paths: &VmPaths, pid: u32, timeout: Duration) -> Result<(), VmError> {
    if is_ready(paths, pid) {
        return Ok(());
    }
    let deadline = Instant::now() + timeout;
    guest::wait_ready(&paths.guest_agent(), timeout).await?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(SECRETS_TIMEOUT);
    secrets::deliver(paths, left).await?;
    mark_ready(paths, pid);
    Ok(())
}

/// Forgets readiness (before QEMU is started again).
pub fn clear(paths: &VmPaths) {
    let _ = std::fs::remove_file(paths.ready());
}

/// The waiter tasks running, by VM id: the QEMU PID each waits for.
#[derive(Default, Clone)]
pub struct Waiters {
    running: Arc<Mutex<HashMap<String, u32>>>,
}

impl Waiters {
    /// Starts a waiter for VM `id` whose QEMU is `pid`, unless one already waits for that PID.
    /// Needs a tokio runtime.
    pub fn watch(&self, id: &str, paths: &VmPaths, pid: u32) {
        {
            let mut running = self.running.lock().expect("waiters lock");
            if running.get(id) == Some(&pid) {
                return;
            }
            running.insert(id.to_owned(), pid);
        }
        let (id, paths, running) = (id.to_owned(), paths.clone(), Arc::clone(&self.running));
        tokio::spawn(async move {
            let started = Instant::now();
            let sock = paths.guest_agent();
            while process::running_pid(&paths) == Some(pid) {
                let ping = guest::request(&sock, json!({"op": "ping"}), PING_TIMEOUT);
                if ping.await.is_ok() {
                    match secrets::deliver(&paths, SECRETS_TIMEOUT).await {
                        Ok(sent) => {
                            mark_ready(&paths, pid);
                            tracing::info!(id, pid, secrets = sent, elapsed = ?started.elapsed(), "VM guest agent answered");
                            break;
                        }
                        // The guest's error names paths, never values.
                        Err(e) => {
                            tracing::warn!(id, pid, error = %e, "delivering the VM's secrets");
                            tokio::time::sleep(SECRETS_RETRY).await;
                        }
                    }
                }
                tokio::time::sleep(PING_PAUSE).await;
            }
            let mut running = running.lock().expect("waiters lock");
            if running.get(&id) == Some(&pid) {
                running.remove(&id);
            }
        });
    }
}
