//! Child reaping for PID 1 and process execution on top of it.
//!
//! As PID 1 the agent must reap every zombie, including re-parented orphans. A single reaper
//! thread calls `waitpid(-1)`; processes the agent itself started register their PID (under the
//! same lock that is held across `spawn`, so a fast exit cannot be missed) and get their status
//! through a condition variable.

use std::collections::HashMap;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

/// Most output captured per stream of one exec.
const MAX_OUTPUT: u64 = 16 << 20;

#[derive(Default)]
struct Table {
    /// PIDs someone waits for; `Some(code)` once reaped.
    wanted: HashMap<i32, Option<i32>>,
}

struct Reaper {
    table: Mutex<Table>,
    cond: Condvar,
}

fn reaper() -> &'static Reaper {
    static REAPER: OnceLock<Reaper> = OnceLock::new();
    REAPER.get_or_init(|| Reaper {
        table: Mutex::new(Table::default()),
        cond: Condvar::new(),
    })
}

/// Starts the reaper thread.
pub fn start() {
    std::thread::spawn(|| loop {
        match waitpid(None, None) {
            Ok(status) => {
                let (pid, code) = match status {
                    WaitStatus::Exited(pid, code) => (pid, code),
                    WaitStatus::Signaled(pid, sig, _) => (pid, 128 + sig as i32),
                    _ => continue,
                };
                let r = reaper();
                let mut table = r.table.lock().unwrap();
                if let Some(slot) = table.wanted.get_mut(&pid.as_raw()) {
                    *slot = Some(code);
                    r.cond.notify_all();
                }
            }
            Err(Errno::ECHILD) => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    });
}

/// A process started through the reaper.
pub struct Proc {
    /// Its PID.
    pub pid: i32,
    /// Captured stdout, stderr (if piped).
    pub child: std::process::Child,
}

/// Spawns `cmd` and registers it with the reaper.
pub fn spawn(cmd: &mut Command) -> std::io::Result<Proc> {
    let r = reaper();
    let mut table = r.table.lock().unwrap();
    let child = cmd.spawn()?;
    let pid = child.id() as i32;
    table.wanted.insert(pid, None);
    Ok(Proc { pid, child })
}

/// Waits for a registered process; `None` on timeout.
pub fn wait(pid: i32, timeout: Option<Duration>) -> Option<i32> {
    let r = reaper();
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut table = r.table.lock().unwrap();
    loop {
        if let Some(Some(code)) = table.wanted.get(&pid) {
            let code = *code;
            table.wanted.remove(&pid);
            return Some(code);
        }
        match deadline {
            None => table = r.cond.wait(table).unwrap(),
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    return None;
                }
                table = r.cond.wait_timeout(table, d - now).unwrap().0;
            }
        }
    }
}

/// Result of [`exec`].
pub struct ExecOutput {
    /// Exit code (128+signal for signals).
    pub exit_code: i32,
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    pub stderr: String,
}

/// Output of one stream, filled by a reader thread; `done` once it hit EOF.
type Sink = Arc<(Mutex<(Vec<u8>, bool)>, Condvar)>;

fn drain(stream: Option<impl Read + Send + 'static>) -> Sink {
    let sink: Sink = Arc::new((Mutex::new((Vec::new(), false)), Condvar::new()));
    let s2 = Arc::clone(&sink);
    std::thread::spawn(move || {
        if let Some(mut s) = stream {
            let mut chunk = [0u8; 8192];
            loop {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut g = s2.0.lock().unwrap();
                        if (g.0.len() as u64) < MAX_OUTPUT {
                            g.0.extend_from_slice(&chunk[..n]);
                        }
                    }
                }
            }
        }
        s2.0.lock().unwrap().1 = true;
        s2.1.notify_all();
    });
    sink
}

/// Takes what a sink has collected, waiting up to `grace` for EOF (a background process may
/// keep the pipe open after the command itself exited).
fn collect(sink: &Sink, grace: Duration) -> String {
    let g = sink.0.lock().unwrap();
    let (g, _) = sink
        .1
        .wait_timeout_while(g, grace, |(_, done)| !*done)
        .unwrap();
    String::from_utf8_lossy(&g.0).into_owned()
}

/// Runs `argv` (no shell) with extra `env`, capturing output; `Err("timeout")` after `timeout`.
pub fn exec(
    argv: &[String],
    env: &[(String, String)],
    cwd: Option<&str>,
    timeout: Duration,
) -> Result<ExecOutput, String> {
    let (prog, args) = argv.split_first().ok_or("empty command")?;
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    if let Some(dir) = cwd.filter(|d| !d.is_empty()) {
        cmd.current_dir(dir);
    }
    let mut proc = spawn(&mut cmd).map_err(|e| format!("{prog}: {e}"))?;
    let out = drain(proc.child.stdout.take());
    let err = drain(proc.child.stderr.take());
    let Some(code) = wait(proc.pid, Some(timeout)) else {
        let _ = kill(Pid::from_raw(proc.pid), Signal::SIGKILL);
        let _ = wait(proc.pid, Some(Duration::from_secs(5)));
        return Err(format!("timeout after {timeout:?}"));
    };
    let stdout = collect(&out, Duration::from_secs(1));
    let stderr = collect(&err, Duration::from_secs(1));
    Ok(ExecOutput {
        exit_code: code,
        stdout,
        stderr,
    })
}
