//! Invoking runc: state, kill, delete, exec. Errors carry runc's own stderr.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nimbus_api::ExecResponse;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};
use tracing::debug;

use crate::driver::DriverError;

/// Maximum captured size of each of an exec's stdout and stderr.
pub const EXEC_OUTPUT_LIMIT: usize = 4 << 20;

/// Where runc keeps its container state (tmpfs: gone after a reboot, like the containers).
pub const DEFAULT_RUNC_ROOT: &str = "/run/nimbus/runc";

/// `runc state` output (the fields we use).
#[derive(Debug, Clone, Deserialize)]
pub struct RuncState {
    /// `created`, `running`, `paused` or `stopped`.
    pub status: String,
    /// Init PID (0 once stopped).
    #[serde(default)]
    pub pid: i64,
}

/// A runc binary with its state root.
#[derive(Debug, Clone)]
pub struct Runc {
    /// The runc binary.
    pub bin: PathBuf,
    /// `--root`.
    pub root: PathBuf,
}

fn runtime_err(message: impl Into<String>) -> DriverError {
    DriverError::Runtime {
        tool: "runc",
        message: message.into(),
    }
}

/// The error messages of a runc JSON log (`--log-format json`), or its raw text.
pub fn errors_from_log(log: &str) -> String {
    let mut msgs = Vec::new();
    for line in log.lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            if matches!(v["level"].as_str(), Some("error" | "fatal")) {
                if let Some(m) = v["msg"].as_str() {
                    msgs.push(m.to_string());
                }
            }
        }
    }
    if msgs.is_empty() {
        log.trim().to_string()
    } else {
        msgs.join("; ")
    }
}

impl Runc {
    fn cmd(&self) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.bin);
        c.arg("--root").arg(&self.root);
        c.stdin(Stdio::null()).kill_on_drop(true);
        c
    }

    async fn run(&self, args: &[&str]) -> Result<std::process::Output, DriverError> {
        let out = self
            .cmd()
            .args(args)
            .output()
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    DriverError::Unavailable(format!("runc not found at {}", self.bin.display()))
                }
                _ => DriverError::Io {
                    context: format!("running runc {}", args.join(" ")),
                    source: e,
                },
            })?;
        debug!(args = ?args, status = ?out.status, "runc");
        Ok(out)
    }

    /// Whether runc has state for `id`.
    pub fn knows(&self, id: &str) -> bool {
        self.root.join(id).join("state.json").exists()
    }

    /// `runc state ID`; `None` if runc does not know the container.
    pub async fn state(&self, id: &str) -> Result<Option<RuncState>, DriverError> {
        if !self.knows(id) {
            return Ok(None);
        }
        let out = self.run(&["state", id]).await?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if err.contains("does not exist") || !self.knows(id) {
                return Ok(None);
            }
            return Err(runtime_err(err));
        }
        serde_json::from_slice(&out.stdout)
            .map(Some)
            .map_err(|e| runtime_err(format!("unparsable runc state output: {e}")))
    }

    /// `runc start ID`: runs the process of a created container.
    pub async fn start(&self, id: &str) -> Result<(), DriverError> {
        // JSON log lines on stderr: their messages are runc's words.
        let out = self.run(&["--log-format", "json", "start", id]).await?;
        if out.status.success() {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        let msg = errors_from_log(&err);
        Err(runtime_err(if msg.is_empty() {
            format!("runc start exited with {}", out.status)
        } else {
            msg
        }))
    }

    /// `runc kill ID SIGNAL`; a container that is not running (or unknown) is fine.
    pub async fn kill(&self, id: &str, signal: &str) -> Result<(), DriverError> {
        if !self.knows(id) {
            return Ok(());
        }
        let out = self.run(&["kill", id, signal]).await?;
        if out.status.success() {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if err.contains("not running") || err.contains("does not exist") || !self.knows(id) {
            Ok(())
        } else {
            Err(runtime_err(err))
        }
    }

    /// `runc delete --force ID`; unknown containers are fine.
    pub async fn delete_force(&self, id: &str) -> Result<(), DriverError> {
        if !self.knows(id) {
            return Ok(());
        }
        let out = self.run(&["delete", "--force", id]).await?;
        if out.status.success() || !self.knows(id) {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if err.contains("does not exist") {
            Ok(())
        } else {
            Err(runtime_err(err))
        }
    }

    /// `runc exec --process FILE ID`, capturing output (each stream up to
    /// [`EXEC_OUTPUT_LIMIT`]). On timeout the process is killed and `Timeout` returned.
    pub async fn exec(
        &self,
        id: &str,
        process_json: &Path,
        scratch: &Path,
        timeout: Duration,
    ) -> Result<ExecResponse, DriverError> {
        let pid_file = scratch.with_extension("pid");
        let log_file = scratch.with_extension("log");
        let mut child = self
            .cmd()
            .arg("--log")
            .arg(&log_file)
            .arg("--log-format")
            .arg("json")
            .arg("exec")
            .arg("--process")
            .arg(process_json)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(id)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(DriverError::io("spawning runc exec"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let work = async {
            let (out, err, status) = tokio::join!(
                read_limited(stdout, EXEC_OUTPUT_LIMIT),
                read_limited(stderr, EXEC_OUTPUT_LIMIT),
                child.wait()
            );
            (out, err, status)
        };
        let result = tokio::time::timeout(timeout, work).await;
        let cleanup = |pid_file: &Path, log_file: &Path| {
            let _ = std::fs::remove_file(pid_file);
            let _ = std::fs::remove_file(log_file);
        };
        let Ok((out, err, status)) = result else {
            // Kill the process inside the container, then runc itself.
            if let Some(pid) = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            cleanup(&pid_file, &log_file);
            return Err(DriverError::Timeout(timeout));
        };
        let status = status.map_err(DriverError::io("waiting for runc exec"))?;
        let log = std::fs::read_to_string(&log_file).unwrap_or_default();
        cleanup(&pid_file, &log_file);
        let exit_code = exit_code_of(status);
        let ((out, out_cut), (err, err_cut)) = (out, err);
        let truncated = out_cut || err_cut;
        let runc_error = errors_from_log(&log);
        let mut stderr = String::from_utf8_lossy(&err).into_owned();
        if exit_code != 0 && log.contains("\"level\":\"error\"") && !runc_error.is_empty() {
            // The command could not be started: its failure, as a shell (and `docker exec`)
            // reports it, not the runtime's.
            let Some(code) = start_failure_code(&runc_error) else {
                return Err(runtime_err(runc_error));
            };
            if !stderr.contains(&runc_error) {
                stderr.push_str(&runc_error);
                stderr.push('\n');
            }
            return Ok(ExecResponse {
                exit_code: code,
                stdout: String::from_utf8_lossy(&out).into_owned(),
                stderr,
                truncated,
            });
        }
        Ok(ExecResponse {
            exit_code,
            stdout: String::from_utf8_lossy(&out).into_owned(),
            stderr,
            truncated,
        })
    }
}

/// The exit code a shell gives a command runc could not start (`exec: "X": ...` in its error):
/// 127 if it does not exist, 126 if it cannot be executed; `None` for other runc errors.
pub fn start_failure_code(runc_error: &str) -> Option<i32> {
    if !runc_error.contains("exec: \"") && !runc_error.contains("unable to start container process")
    {
        return None;
    }
    let not_found = ["no such file or directory", "executable file not found"];
    if not_found.iter().any(|m| runc_error.contains(m)) {
        Some(127)
    } else {
        Some(126)
    }
}

/// Exit code of a finished process; 128+signal when killed by a signal.
pub fn exit_code_of(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// Reads a stream to its end, keeping at most `limit` bytes; whether it had more.
async fn read_limited(mut r: impl AsyncRead + Unpin, limit: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut cut = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = limit.saturating_sub(kept.len());
                cut |= n > room;
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    (kept, cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_beyond_the_limit_is_cut_and_says_so() {
        let (kept, cut) = read_limited(&b"0123456789"[..], 4).await;
        assert_eq!((kept.as_slice(), cut), (&b"0123"[..], true));
        let (kept, cut) = read_limited(&b"0123"[..], 4).await;
        assert_eq!((kept.as_slice(), cut), (&b"0123"[..], false));
        let (kept, cut) = read_limited(&b""[..], 4).await;
        assert!(kept.is_empty() && !cut);
    }

    #[test]
    fn runc_log_errors() {
        let log = "{\"level\":\"info\",\"msg\":\"x\"}\n{\"level\":\"error\",\"msg\":\"exec: \\\"nope\\\": not found\"}\n";
        assert_eq!(errors_from_log(log), "exec: \"nope\": not found");
        assert_eq!(errors_from_log("plain text\n"), "plain text");
    }

    #[test]
    fn commands_that_cannot_start_get_shell_exit_codes() {
        let table = [
            ("exec failed: unable to start container process: exec: \"/nope\": stat /nope: no such file or directory", Some(127)),
            ("exec failed: unable to start container process: exec: \"nope\": executable file not found in $PATH", Some(127)),
            ("exec failed: unable to start container process: exec: \"/etc/passwd\": permission denied", Some(126)),
            ("exec failed: unable to start container process: exec: \"/bin/x\": exec format error", Some(126)),
            ("cannot exec in a stopped container", None),
            ("container does not exist", None),
        ];
        for (msg, code) in table {
            assert_eq!(start_failure_code(msg), code, "{msg}");
        }
    }

    #[tokio::test]
    async fn limited_read_discards_the_rest() {
        let data = [b'x'; 100];
        let (got, cut) = read_limited(&data[..], 10).await;
        assert_eq!((got.len(), cut), (10, true));
    }
}
