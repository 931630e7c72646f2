//! The container shim: `nimbus shim ...` — started per container, outlives the agent.
//!
//! The agent spawns `nimbus shim run --runc P --root R --bundle B --id ID` directly (one exec,
//! stdio on `/dev/null` and `B/shim.log`) and reaps it if it exits while the agent lives. The
//! shim makes itself a session leader (the agent's death or its terminal's does not reach it)
//! and a child subreaper, runs `runc create` with the container's stdout/stderr appended to
//! `B/console.log`, records either `B/created` (init PID) or `B/start.err` (runc's own error),
//! then waits for the container init (reparented to it) and writes its exit status to
//! `B/exit.json` (`{"code": N}`, 128+signal for signals) atomically before exiting. The agent
//! starts the process with `runc start` when it decides to (once the node's datapath has
//! programmed the container's network), and records `B/started`.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::rootfs::{write_atomic, write_replace, Bundle};
use super::runc::errors_from_log;

/// What the shim records when the container init exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// Exit code, 128+signal if killed by a signal; `None` if it could not be observed.
    pub code: Option<i32>,
}

/// Parsed shim arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimArgs {
    /// The runc binary.
    pub runc: PathBuf,
    /// runc `--root`.
    pub root: PathBuf,
    /// Bundle directory.
    pub bundle: PathBuf,
    /// Container id.
    pub id: String,
}

impl ShimArgs {
    /// The arguments as passed after the stage word (`run`).
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "--runc".into(),
            self.runc.display().to_string(),
            "--root".into(),
            self.root.display().to_string(),
            "--bundle".into(),
            self.bundle.display().to_string(),
            "--id".into(),
            self.id.clone(),
        ]
    }

    /// Parses `--runc P --root R --bundle B --id ID` (any order).
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let (mut runc, mut root, mut bundle, mut id) = (None, None, None, None);
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let value = it
                .next()
                .ok_or_else(|| format!("missing value for {flag}"))?
                .clone();
            match flag.as_str() {
                "--runc" => runc = Some(PathBuf::from(value)),
                "--root" => root = Some(PathBuf::from(value)),
                "--bundle" => bundle = Some(PathBuf::from(value)),
                "--id" => id = Some(value),
                other => return Err(format!("unknown argument {other}")),
            }
        }
        Ok(Self {
            runc: runc.ok_or("missing --runc")?,
            root: root.ok_or("missing --root")?,
            bundle: bundle.ok_or("missing --bundle")?,
            id: id.ok_or("missing --id")?,
        })
    }
}

/// Entry point of `nimbus shim ARGS...`; returns the process exit code.
#[allow(clippy::needless_pass_by_value)] // the signature the binary dispatches to
pub fn main(args: Vec<String>) -> i32 {
    let Some((stage, rest)) = args.split_first() else {
        eprintln!("usage: nimbus shim run --runc P --root R --bundle B --id ID");
        return 2;
    };
    let parsed = match ShimArgs::parse(rest) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nimbus shim: {e}");
            return 2;
        }
    };
    let result = match stage.as_str() {
        "run" => run(&parsed),
        other => Err(format!("unknown shim stage {other}")),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("nimbus shim {stage} {}: {e}", parsed.id);
            1
        }
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), String> {
    let data = serde_json::to_vec(value).map_err(|e| e.to_string())?;
    write_atomic(path, &data).map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))
}

/// The detached stage: create the container and wait for its init.
fn run(args: &ShimArgs) -> Result<(), String> {
    // A session of our own: the agent's death (or its terminal's) does not reach us.
    let _ = nix::unistd::setsid();
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| format!("PR_SET_CHILD_SUBREAPER: {e}"))?;
    let bundle = Bundle {
        dir: args.bundle.clone(),
    };
    // Launch records are not fsynced: they mean nothing after a reboot.
    write_replace(
        &bundle.shim_pid(),
        std::process::id().to_string().as_bytes(),
        false,
    )
    .map_err(|e| e.to_string())?;

    let console = OpenOptions::new()
        .create(true)
        .append(true)
        .open(bundle.console_log())
        .map_err(|e| format!("opening {}: {e}", bundle.console_log().display()))?;
    let console_err = console.try_clone().map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(bundle.runc_log());
    let status = Command::new(&args.runc)
        .arg("--root")
        .arg(&args.root)
        .arg("--log")
        .arg(bundle.runc_log())
        .arg("--log-format")
        .arg("json")
        .arg("create")
        .arg("--pid-file")
        .arg(bundle.init_pid())
        .arg("--bundle")
        .arg(&args.bundle)
        .arg(&args.id)
        .stdin(Stdio::null())
        .stdout(console)
        .stderr(console_err)
        .current_dir(&args.bundle)
        .status();
    let failure = match status {
        Ok(s) if s.success() => None,
        Ok(s) => {
            let log = std::fs::read_to_string(bundle.runc_log()).unwrap_or_default();
            let msg = errors_from_log(&log);
            Some(if msg.is_empty() {
                format!("runc create exited with {s}")
            } else {
                msg
            })
        }
        Err(e) => Some(format!("cannot run {}: {e}", args.runc.display())),
    };
    if let Some(msg) = failure {
        write_atomic(&bundle.start_error(), msg.as_bytes()).map_err(|e| e.to_string())?;
        notify_agent("failed\n");
        return Err(msg);
    }
    let pid: i32 = std::fs::read_to_string(bundle.init_pid())
        .map_err(|e| format!("reading the init pid: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("parsing the init pid: {e}"))?;
    write_replace(&bundle.created(), pid.to_string().as_bytes(), false)
        .map_err(|e| e.to_string())?;
    notify_agent(&format!("created {pid}\n"));

    let code = wait_for(Pid::from_raw(pid));
    eprintln!("container {} init {pid} exited: {code:?}", args.id);
    write_json(&bundle.exit_json(), &ExitRecord { code })
}

/// Wakes the agent waiting on our stdout (a pipe) once the create is decided (the record is
/// already on disk), then points stdout at `/dev/null` so the pipe does not outlive the launch.
fn notify_agent(line: &str) {
    use std::io::Write as _;
    use std::os::fd::AsRawFd as _;
    let mut out = std::io::stdout();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
    if let Ok(null) = std::fs::File::open("/dev/null") {
        let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
    }
}

/// Reaps children until `init` exits; returns its exit code (128+signal for signals).
fn wait_for(init: Pid) -> Option<i32> {
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == init => return Some(code),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == init => return Some(128 + sig as i32),
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => {
                // No children left: the init was not reparented to us (we were restarted?).
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_round_trip() {
        let a = ShimArgs {
            runc: "/usr/sbin/runc".into(),
            root: "/run/nimbus/runc".into(),
            bundle: "/var/lib/nimbus/containers/x".into(),
            id: "x".into(),
        };
        assert_eq!(ShimArgs::parse(&a.to_args()).unwrap(), a);
        assert!(ShimArgs::parse(&["--id".into()]).is_err());
        assert!(ShimArgs::parse(&["--what".into(), "x".into()]).is_err());
    }

    #[test]
    fn bad_usage_exits_2() {
        assert_eq!(main(vec![]), 2);
        assert_eq!(main(vec!["run".into()]), 2);
    }
}
