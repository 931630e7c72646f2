//! The node side of the guest agent protocol (newline-delimited JSON over the VM's
//! virtio-serial port, exposed by QEMU as a unix socket). See `guest/agent`.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::VmError;

/// A fresh request id (unique across agent processes sharing a guest).
pub fn next_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        + u64::from(std::process::id()) * 1_000_000
}

/// Sends one request and waits up to `timeout` for the answer with the same id.
pub async fn request(sock: &Path, mut req: Value, timeout: Duration) -> Result<Value, VmError> {
    let id = next_id();
    req["id"] = json!(id);
    exchange(sock, id, format!("{req}\n").as_bytes(), timeout).await
}

/// Sends `line` (one JSON request carrying `"id": id`, newline-terminated) and waits up to
/// `timeout` for the answer with that id.
///
/// A fresh connection per request: QEMU's socket chardev serves one client at a time, and a
/// leading newline flushes any partial line an aborted earlier client left in the guest.
pub async fn exchange(
    sock: &Path,
    id: u64,
    line: &[u8],
    timeout: Duration,
) -> Result<Value, VmError> {
    let fut = async {
        let stream = UnixStream::connect(sock)
            .await
            .map_err(|e| VmError::Guest(format!("connecting to {}: {e}", sock.display())))?;
        let (r, mut w) = stream.into_split();
        let sent = |e: std::io::Error| VmError::Guest(format!("sending to the guest agent: {e}"));
        w.write_all(b"\n").await.map_err(sent)?;
        w.write_all(line).await.map_err(sent)?;
        let mut reader = BufReader::new(r);
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader
                .read_line(&mut line)
                .await
                .map_err(|e| VmError::Guest(format!("reading from the guest agent: {e}")))?;
            if n == 0 {
                return Err(VmError::Guest("the guest agent connection closed".into()));
            }
            let Ok(v) = serde_json::from_str::<Value>(line.trim()) else {
                continue;
            };
            if v.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if v.get("ok").and_then(Value::as_bool) == Some(true) {
                return Ok(v);
            }
            let err = v
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("unknown error");
            return Err(VmError::Guest(err.to_owned()));
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| VmError::GuestTimeout(timeout))?
}

/// Pings until the guest agent answers or `timeout` passes.
pub async fn wait_ready(sock: &Path, timeout: Duration) -> Result<(), VmError> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(VmError::GuestTimeout(timeout));
        }
        match request(
            sock,
            json!({"op": "ping"}),
            left.min(Duration::from_millis(500)),
        )
        .await
        {
            Ok(_) => return Ok(()),
            Err(e) => {
                tracing::trace!(error = %e, "guest agent not ready yet");
                // The connect fails fast while QEMU is starting: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
