//! A small async QMP (QEMU Machine Protocol) client over a unix socket.
//!
//! One connection per operation: connect, read the greeting, negotiate capabilities, run
//! commands. Asynchronous events received while waiting for a reply are skipped.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use super::VmError;

/// How long one QMP exchange may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// A negotiated QMP connection.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
}

impl Qmp {
    /// Connects to `path`, reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<Self, VmError> {
        let stream = tokio::time::timeout(QMP_TIMEOUT, UnixStream::connect(path))
            .await
            .map_err(|_| VmError::Qmp(format!("connecting to {}: timed out", path.display())))?
            .map_err(|e| VmError::Qmp(format!("connecting to {}: {e}", path.display())))?;
        let (r, w) = stream.into_split();
        let mut qmp = Self {
            reader: BufReader::new(r),
            writer: w,
            next_id: 1,
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(VmError::Qmp(format!("unexpected greeting: {greeting}")));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, VmError> {
        let mut line = String::new();
        let n = tokio::time::timeout(QMP_TIMEOUT, self.reader.read_line(&mut line))
            .await
            .map_err(|_| VmError::Qmp("no reply from QEMU: timed out".into()))?
            .map_err(|e| VmError::Qmp(format!("reading from QEMU: {e}")))?;
        if n == 0 {
            return Err(VmError::Qmp("QEMU closed the QMP connection".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| VmError::Qmp(format!("bad QMP message {line:?}: {e}")))
    }

    /// Runs one command and returns its `return` value; a QMP error carries QEMU's own
    /// description.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"execute": command, "id": id});
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .await
            .map_err(|e| VmError::Qmp(format!("sending {command}: {e}")))?;
        loop {
            let reply = self.read_message().await?;
            if reply.get("event").is_some() {
                continue;
            }
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(err) = reply.get("error") {
                let desc = err
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error");
                return Err(VmError::Qmp(format!("{command}: {desc}")));
            }
            return Ok(reply.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// `query-status`: the run state (`running`, `paused`, `shutdown`, ...).
    pub async fn status(&mut self) -> Result<String, VmError> {
        let v = self.execute("query-status", None).await?;
        Ok(v.get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned())
    }

    /// `query-cpus-fast`: host thread id of each vCPU.
    pub async fn vcpu_threads(&mut self) -> Result<Vec<u32>, VmError> {
        let v = self.execute("query-cpus-fast", None).await?;
        Ok(v.as_array()
            .map(|cpus| {
                cpus.iter()
                    .filter_map(|c| c.get("thread-id").and_then(Value::as_u64))
                    .map(|t| t as u32)
                    .collect()
            })
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn negotiates_skips_events_and_reports_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .unwrap();
            let mut buf = vec![0u8; 4096];
            let mut replies = vec![
                "{\"return\": {}, \"id\": 1}\n".to_owned(),
                "{\"event\": \"RESUME\"}\n{\"return\": {\"status\": \"running\", \"running\": true}, \"id\": 2}\n".to_owned(),
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"boom\"}, \"id\": 3}\n".to_owned(),
            ]
            .into_iter();
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                match replies.next() {
                    Some(r) => s.write_all(r.as_bytes()).await.unwrap(),
                    None => break,
                }
            }
        });
        let mut qmp = Qmp::connect(&path).await.unwrap();
        assert_eq!(qmp.status().await.unwrap(), "running");
        let err = qmp.execute("stop", None).await.unwrap_err();
        assert!(err.to_string().contains("boom"), "{err}");
        drop(qmp);
        server.await.unwrap();
    }
}
