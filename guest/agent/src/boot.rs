//! Early boot work of PID 1: mounts, hostname, root filesystem growth, metadata, user-data.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::mount::{mount, MsFlags};
use serde_json::Value;

use crate::reaper;

/// Where the initramfs puts the per-VM config.
pub const CONFIG_PATH: &str = "/.nimbus/config.json";
/// Marker: the first-boot script ran.
const USER_DATA_DONE: &str = "/.nimbus/user-data.done";

/// Mounts the API filesystems (errors such as "already mounted" are ignored).
pub fn mount_api_filesystems() {
    let none: Option<&str> = None;
    let mounts: [(&str, &str, &str, MsFlags, Option<&str>); 6] = [
        (
            "proc",
            "/proc",
            "proc",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            none,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            none,
        ),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("gid=5,mode=620,ptmxmode=666"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
    ];
    for (src, target, fstype, flags, data) in mounts {
        let _ = fs::create_dir_all(target);
        if let Err(e) = mount(Some(src), target, Some(fstype), flags, data) {
            if e != nix::errno::Errno::EBUSY {
                log(&format!("mount {target}: {e}"));
            }
        }
    }
}

/// Writes a line to the console (stderr is the console for PID 1).
pub fn log(msg: &str) {
    eprintln!("nimbus-guest: {msg}");
}

/// Reads the per-VM config (empty object if there is none).
pub fn read_config() -> Value {
    fs::read_to_string(CONFIG_PATH)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Object(serde_json::Map::new()))
}

/// Strings of a JSON array field.
pub fn strings(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Hostname, /etc/hostname and SSH authorized keys.
pub fn apply_metadata(cfg: &Value) {
    if let Some(name) = cfg
        .get("hostname")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
    {
        if let Err(e) = nix::unistd::sethostname(name) {
            log(&format!("sethostname: {e}"));
        }
        let _ = fs::write("/etc/hostname", format!("{name}\n"));
    }
    let keys = strings(cfg, "ssh_keys");
    if !keys.is_empty() {
        let dir = Path::new("/root/.ssh");
        let _ = fs::create_dir_all(dir);
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        let path = dir.join("authorized_keys");
        let mut body = keys.join("\n");
        body.push('\n');
        if let Err(e) = fs::write(&path, body) {
            log(&format!("writing {}: {e}", path.display()));
        }
        let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o600));
    }
}

/// Grows the root ext4 filesystem online to fill its disk (the per-VM disk may be larger than
/// the image's base filesystem).
pub fn grow_root() {
    let Ok(sectors) = fs::read_to_string("/sys/block/vda/size") else {
        return;
    };
    let Ok(sectors) = sectors.trim().parse::<u64>() else {
        return;
    };
    // Base disks are made with 4 KiB blocks (see the node driver's disk.rs).
    let blocks = sectors * 512 / 4096;
    match fs::File::open("/") {
        Ok(root) => {
            if let Err(e) = resize_fs(&root, blocks) {
                log(&format!("growing / to {blocks} blocks: {e}"));
            }
        }
        Err(e) => log(&format!("open /: {e}")),
    }
}

nix::ioctl_write_ptr!(ext4_resize_fs, b'f', 16, u64);

#[allow(unsafe_code)]
fn resize_fs(root: &fs::File, blocks: u64) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 through the pointer, which lives for the call;
    // the fd is a valid open directory on the filesystem to resize.
    unsafe { ext4_resize_fs(root.as_raw_fd(), &raw const blocks) }.map(|_| ())
}

/// Runs the first-boot script once (marker on the disk), output to the console.
pub fn run_user_data(cfg: &Value) {
    let Some(script) = cfg
        .get("user_data")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    else {
        return;
    };
    if Path::new(USER_DATA_DONE).exists() {
        log("user-data already ran on this disk");
        return;
    }
    let _ = fs::create_dir_all("/root");
    let path = "/.nimbus/user-data";
    let write = fs::File::create(path).and_then(|mut f| {
        f.write_all(script.as_bytes())?;
        f.set_permissions(fs::Permissions::from_mode(0o700))
    });
    if let Err(e) = write {
        log(&format!("writing user-data: {e}"));
        return;
    }
    log("running user-data");
    let mut cmd = if script.starts_with("#!") {
        Command::new(path)
    } else {
        Command::new("/bin/sh")
    };
    if !script.starts_with("#!") {
        cmd.arg(path);
    }
    cmd.stdin(Stdio::null())
        .current_dir("/root")
        .env("HOME", "/root");
    let code = match reaper::spawn(&mut cmd) {
        Ok(p) => reaper::wait(p.pid, None).unwrap_or(-1),
        Err(e) => {
            log(&format!("user-data: {e}"));
            -1
        }
    };
    log(&format!("user-data exited with code {code}"));
    let _ = fs::write(USER_DATA_DONE, format!("{code}\n"));
    nix::unistd::sync();
}
