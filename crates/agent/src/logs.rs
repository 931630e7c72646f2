//! Console log rotation. Instances write their console (container stdout/stderr, a VM's serial
//! console) to a file opened with `O_APPEND`; the agent rotates it by copy-and-truncate once it
//! passes [`MAX_LOG_BYTES`], keeping one older generation in `<log>.1`. Writers need no signal:
//! their next append lands at the new end of the truncated file. Lines written between the copy
//! and the truncation (microseconds) can be lost, as with logrotate's `copytruncate`.

use std::io;
use std::path::{Path, PathBuf};

/// Size at which a console log is rotated.
pub const MAX_LOG_BYTES: u64 = 16 << 20;

/// The previous generation of `log`.
pub fn rotated_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Whether `log` is over `max` bytes (cheap: one `stat`).
pub fn needs_rotation(log: &Path, max: u64) -> bool {
    std::fs::metadata(log).is_ok_and(|m| m.len() > max)
}

/// Copies `log` to `<log>.1` (replacing the older generation atomically) and truncates `log`.
/// Returns whether it rotated (false if the file is absent or not over `max`).
pub fn rotate(log: &Path, max: u64) -> io::Result<bool> {
    if !needs_rotation(log, max) {
        return Ok(false);
    }
    let old = rotated_path(log);
    let mut tmp = old.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::copy(log, &tmp)?;
    std::fs::rename(&tmp, &old)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(log)?
        .set_len(0)?;
    Ok(true)
}

/// The whole retained log: the older generation, then the current file.
pub async fn read_all(log: &Path) -> Vec<u8> {
    let mut data = tokio::fs::read(rotated_path(log)).await.unwrap_or_default();
    data.extend(tokio::fs::read(log).await.unwrap_or_default());
    data
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn rotates_and_appends_continue_at_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let mut w = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        w.write_all(b"0123456789\n").unwrap();
        assert!(!rotate(&log, 100).unwrap(), "under the limit");
        assert!(rotate(&log, 5).unwrap());
        assert_eq!(std::fs::read(rotated_path(&log)).unwrap(), b"0123456789\n");
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        // The writer's next append lands at the start of the truncated file, not at a hole.
        w.write_all(b"next\n").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"next\n");
        let all = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(read_all(&log));
        assert_eq!(all, b"0123456789\nnext\n");
        assert!(!rotate(&dir.path().join("absent.log"), 1).unwrap());
    }
}
