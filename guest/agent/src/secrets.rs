//! The instance's secrets, delivered by the node agent over the agent port (op `secrets`) once
//! this agent answers, never through the initramfs or the disk.
//!
//! Files go to a tmpfs at [`DIR`] (0400, root) and are bind-mounted read-only at their paths
//! (an empty file is created on the root disk as the mount point when the image has none);
//! variables are kept in memory and join the environment of the main service and of every
//! `exec`, like a container's. Values are never logged and never in an error.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use nix::mount::{mount, MsFlags};
use serde_json::Value;

/// How long the main service (and user-data) wait for the secrets the config announces.
pub const WAIT: Duration = Duration::from_secs(120);
/// The tmpfs that holds the secret files.
const DIR: &str = "/run/nimbus-secrets";

#[derive(Default)]
struct Delivered {
    /// The tmpfs is mounted (a failed delivery may be retried).
    mounted: bool,
    /// The secrets are in place.
    done: bool,
    /// Secret variables `(name, value)`.
    env: Vec<(String, String)>,
}

static STATE: Mutex<Delivered> = Mutex::new(Delivered {
    mounted: false,
    done: false,
    env: Vec::new(),
});
static ARRIVED: Condvar = Condvar::new();

/// Installs the secrets of a `secrets` request:
/// `{"files":[{"path":"/abs","data":"<base64>"}],"env":[{"name":"VAR","value":".."}]}`.
/// A second delivery (the node agent restarted while the VM booted) changes nothing.
pub fn install(req: &Value) -> Result<(), String> {
    let mut st = STATE.lock().unwrap();
    if st.done {
        return Ok(());
    }
    let files = req.get("files").and_then(Value::as_array);
    if files.is_some_and(|f| !f.is_empty()) && !st.mounted {
        mount_tmpfs()?;
        st.mounted = true;
    }
    for (i, f) in files.into_iter().flatten().enumerate() {
        let path = f
            .get("path")
            .and_then(Value::as_str)
            .filter(|p| p.starts_with('/'))
            .ok_or_else(|| format!("secret file {i}: no absolute path"))?;
        let data = base64::engine::general_purpose::STANDARD
            .decode(f.get("data").and_then(Value::as_str).unwrap_or_default())
            .map_err(|_| format!("secret file {path}: data is not base64"))?;
        let source = format!("{DIR}/file-{i}");
        write_file(&source, &data).map_err(|e| format!("secret file {path}: {e}"))?;
        bind_read_only(&source, path).map_err(|e| format!("secret file {path}: {e}"))?;
    }
    let mut env = Vec::new();
    for v in req
        .get("env")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(name), Some(value)) = (
            v.get("name").and_then(Value::as_str),
            v.get("value").and_then(Value::as_str),
        ) else {
            return Err("a secret variable needs a name and a value".into());
        };
        env.push((name.to_owned(), value.to_owned()));
    }
    st.env = env;
    st.done = true;
    ARRIVED.notify_all();
    Ok(())
}

/// Waits up to `timeout` for the secrets; whether they arrived.
pub fn wait(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut st = STATE.lock().unwrap();
    while !st.done {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        st = ARRIVED.wait_timeout(st, left).unwrap().0;
    }
    true
}

/// The secret variables (empty until delivered).
pub fn env() -> Vec<(String, String)> {
    STATE.lock().unwrap().env.clone()
}

fn mount_tmpfs() -> Result<(), String> {
    fs::create_dir_all(DIR).map_err(|e| format!("creating {DIR}: {e}"))?;
    mount(
        Some("tmpfs"),
        DIR,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700,size=16m"),
    )
    .map_err(|e| format!("mounting a tmpfs on {DIR}: {e}"))
}

fn write_file(path: &str, data: &[u8]) -> std::io::Result<()> {
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(path)?;
    f.write_all(data)
}

/// Bind-mounts `source` read-only at `target`, creating an empty mount point if needed.
fn bind_read_only(source: &str, target: &str) -> Result<(), String> {
    let t = Path::new(target);
    if t.is_dir() {
        return Err("the path is a directory in the image".into());
    }
    if !t.exists() {
        if let Some(parent) = t.parent() {
            fs::create_dir_all(parent).map_err(|e| format!("creating its directory: {e}"))?;
        }
        fs::File::create(t).map_err(|e| format!("creating the mount point: {e}"))?;
        let _ = fs::set_permissions(t, fs::Permissions::from_mode(0o400));
    }
    let none: Option<&str> = None;
    mount(Some(source), t, none, MsFlags::MS_BIND, none).map_err(|e| format!("bind: {e}"))?;
    mount(
        none,
        t,
        none,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        none,
    )
    .map_err(|e| format!("read-only remount: {e}"))
}
