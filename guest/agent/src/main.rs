//! nimbus guest agent: PID 1 inside a nimbus VM.
//!
//! It mounts the API filesystems, applies metadata (hostname, SSH keys), grows the root
//! filesystem, runs the first-boot user-data script once, runs the instance's command as the
//! main service (config `command`) or the image's default command as a plain service (config
//! `service`, when no command was given), reaps zombies, and serves the node agent over the
//! virtio-serial port
//! `org.nimbus.agent.0` with newline-delimited JSON:
//!
//! ```text
//! -> {"id":1,"op":"ping"}                     <- {"id":1,"ok":true,"event":"ready"}
//! -> {"id":2,"op":"exec","argv":[..],"env":[..],"timeout_ms":5000}
//!                                             <- {"id":2,"ok":true,"exit_code":0,"stdout":"..","stderr":".."}
//! -> {"id":3,"op":"stats"}                    <- {"id":3,"ok":true,"cpu_nanos":..,"memory_bytes":..,"memory_total":..}
//! -> {"id":4,"op":"shutdown"}                 <- {"id":4,"ok":true}  (then sync, umount, power off)
//! -> {"id":5,"op":"secrets","files":[{"path":"/abs","data":"<base64>"}],"env":[{"name":"V","value":".."}]}
//!                                             <- {"id":5,"ok":true}
//! ```
//! When the config says `"secrets": true`, user-data and the command wait (up to
//! [`secrets::WAIT`]) for the node agent to send them (see `secrets`); without them the
//! command does not start (a main service then exits with code 1). `exec` runs with the
//! instance's environment (config `env` and the secret variables), like a container's exec.
//! Failures answer `{"id":N,"ok":false,"error":"..."}`. When the main service exits, its code
//! is written as `{"event":"exit","code":N}` to the port `org.nimbus.status.0` (a file on the
//! host) and the VM powers off, like a container whose main process exits. A plain service's exit
//! is only logged: a VM without a main service stays up until it is stopped.

mod boot;
mod reaper;
mod secrets;

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use boot::log;

/// The node agent's port.
const AGENT_PORT: &str = "org.nimbus.agent.0";
/// The exit-status port.
const STATUS_PORT: &str = "org.nimbus.status.0";
/// Set once a shutdown began: the main service's exit is then not its own.
static SHUTTING_DOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// The config's environment `(name, value)`, for the services and `exec`.
static CONFIG_ENV: OnceLock<Vec<(String, String)>> = OnceLock::new();

fn main() {
    let pid1 = std::process::id() == 1;
    if pid1 {
        boot::mount_api_filesystems();
    }
    reaper::start();
    let cfg = boot::read_config();
    let _ = CONFIG_ENV.set(
        boot::strings(&cfg, "env")
            .into_iter()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
            })
            .collect(),
    );
    boot::apply_metadata(&cfg);
    if pid1 {
        boot::grow_root();
    }
    std::thread::spawn(watch_power_button);
    if pid1 {
        std::thread::spawn(console_shell);
    }
    let main_pid: Arc<Mutex<Option<i32>>> = Arc::new(Mutex::new(None));
    {
        let cfg = cfg.clone();
        let main_pid = Arc::clone(&main_pid);
        std::thread::spawn(move || {
            let announced = cfg.get("secrets").and_then(Value::as_bool) == Some(true);
            if announced && !secrets::wait(secrets::WAIT) {
                log(&format!(
                    "the instance's secrets did not arrive within {} s: not starting its command",
                    secrets::WAIT.as_secs()
                ));
                if !boot::strings(&cfg, "command").is_empty() {
                    main_exited(1, &main_pid);
                }
                return;
            }
            boot::run_user_data(&cfg);
            run_main_service(&cfg, &main_pid);
        });
    }
    log("ready");
    serve(&main_pid);
}

/// Path of a named virtio-serial port in /dev (no udev: look it up in sysfs).
fn find_port(name: &str) -> Option<String> {
    let by_name = format!("/dev/virtio-ports/{name}");
    if fs::metadata(&by_name).is_ok() {
        return Some(by_name);
    }
    for entry in fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let n = fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if n.trim() == name {
            return Some(format!("/dev/{}", entry.file_name().to_string_lossy()));
        }
    }
    None
}

fn open_port(name: &str) -> File {
    let mut warned = false;
    loop {
        if let Some(path) = find_port(name) {
            match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(f) => return f,
                Err(e) if !warned => {
                    log(&format!("open {path}: {e}"));
                    warned = true;
                }
                Err(_) => {}
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Serves requests forever; each request runs in its own thread.
fn serve(main_pid: &Arc<Mutex<Option<i32>>>) {
    let port = open_port(AGENT_PORT);
    let writer = Arc::new(Mutex::new(port.try_clone().expect("dup port")));
    let mut reader = BufReader::new(port);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            // EOF: the host side is not connected; poll until it is.
            Ok(0) => std::thread::sleep(Duration::from_millis(50)),
            Ok(_) => {
                let req: Value = match serde_json::from_str(line.trim()) {
                    Ok(v) => v,
                    Err(_) => continue,
                };
                let writer = Arc::clone(&writer);
                let main_pid = Arc::clone(main_pid);
                std::thread::spawn(move || {
                    let id = req.get("id").cloned().unwrap_or(Value::Null);
                    let op = req
                        .get("op")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned();
                    let mut resp = match handle(&op, &req) {
                        Ok(v) => v,
                        Err(e) => json!({"ok": false, "error": e}),
                    };
                    resp["id"] = id;
                    let mut text = resp.to_string();
                    text.push('\n');
                    let _ = writer.lock().unwrap().write_all(text.as_bytes());
                    if op == "shutdown" {
                        shutdown(&main_pid);
                    }
                });
            }
            Err(e) => {
                log(&format!("reading agent port: {e}"));
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

fn handle(op: &str, req: &Value) -> Result<Value, String> {
    match op {
        "ping" => Ok(json!({"ok": true, "event": "ready", "version": env!("CARGO_PKG_VERSION")})),
        "exec" => {
            let argv = boot::strings(req, "argv");
            let env: Vec<(String, String)> = instance_env()
                .into_iter()
                .chain(boot::strings(req, "env").into_iter().filter_map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                }))
                .collect();
            let timeout = Duration::from_millis(
                req.get("timeout_ms")
                    .and_then(Value::as_u64)
                    .unwrap_or(60_000),
            );
            let cwd = req.get("cwd").and_then(Value::as_str);
            let out = reaper::exec(&argv, &env, cwd, timeout)?;
            Ok(
                json!({"ok": true, "exit_code": out.exit_code, "stdout": out.stdout, "stderr": out.stderr}),
            )
        }
        "stats" => Ok(stats()),
        "secrets" => secrets::install(req).map(|()| json!({"ok": true})),
        "shutdown" => Ok(json!({"ok": true})),
        other => Err(format!("unknown op {other:?}")),
    }
}

/// Guest CPU time (all CPUs, busy jiffies) and memory use from /proc.
fn stats() -> Value {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let busy: u64 = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .enumerate()
        // user nice system idle iowait irq softirq steal: all but idle and iowait.
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum();
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> u64 {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let total = field("MemTotal:");
    let available = field("MemAvailable:");
    // USER_HZ is 100 on Linux: one jiffy is 10 ms.
    json!({"ok": true, "cpu_nanos": busy * 10_000_000, "memory_bytes": total.saturating_sub(available), "memory_total": total})
}

/// Runs the main service (config `command`); when it exits, reports and powers off. Without
/// one, runs the plain service (config `service`) if any and keeps the VM up.
fn run_main_service(cfg: &Value, main_pid: &Arc<Mutex<Option<i32>>>) {
    let argv = boot::strings(cfg, "command");
    if argv.is_empty() {
        let service = boot::strings(cfg, "service");
        if !service.is_empty() {
            log(&format!("starting service {service:?}"));
            let code = run_service(cfg, &service, |_| {});
            log(&format!(
                "service exited with code {code}; the VM stays up until it is stopped"
            ));
        }
        return;
    }
    log(&format!("starting main service {argv:?}"));
    let code = run_service(cfg, &argv, |pid| *main_pid.lock().unwrap() = pid);
    log(&format!("main service exited with code {code}"));
    main_exited(code, main_pid);
}

/// Reports the main service's exit `code` on the status port and powers off (unless a shutdown
/// is already under way).
fn main_exited(code: i32, main_pid: &Arc<Mutex<Option<i32>>>) {
    if SHUTTING_DOWN.load(std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    if let Some(path) = find_port(STATUS_PORT) {
        if let Ok(mut f) = OpenOptions::new().write(true).open(path) {
            let _ = f.write_all(format!("{}\n", json!({"event": "exit", "code": code})).as_bytes());
        }
    }
    shutdown(main_pid);
}

/// The instance's environment: the config's, then the secret variables.
fn instance_env() -> Vec<(String, String)> {
    let mut env = CONFIG_ENV.get().cloned().unwrap_or_default();
    env.extend(secrets::env());
    env
}

/// Runs `argv` with the instance's environment and the config's working directory until it exits; returns its
/// exit code (127 if it cannot start). `track` is told its PID, then `None` once it exited.
fn run_service(cfg: &Value, argv: &[String], track: impl Fn(Option<i32>)) -> i32 {
    let Some((prog, args)) = argv.split_first() else {
        return 0;
    };
    let mut cmd = Command::new(prog);
    cmd.args(args).stdin(Stdio::null());
    cmd.envs(instance_env());
    if let Some(dir) = cfg
        .get("working_dir")
        .and_then(Value::as_str)
        .filter(|d| !d.is_empty())
    {
        cmd.current_dir(dir);
    }
    let code = match reaper::spawn(&mut cmd) {
        Ok(p) => {
            track(Some(p.pid));
            reaper::wait(p.pid, None).unwrap_or(-1)
        }
        Err(e) => {
            log(&format!("starting {prog}: {e}"));
            127
        }
    };
    track(None);
    code
}

/// Keeps a root shell on the serial console (`nimbus console` attaches to it), using the
/// busybox the initramfs put in `/.nimbus` so it works whatever the image contains.
fn console_shell() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    const BUSYBOX: &str = "/.nimbus/busybox";
    if fs::metadata(BUSYBOX).is_err() {
        log("no /.nimbus/busybox: no console shell");
        return;
    }
    while !SHUTTING_DOWN.load(std::sync::atomic::Ordering::SeqCst) {
        // O_NONBLOCK: a serial open must not wait for carrier; the shell gets a blocking fd.
        let tty = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits() | nix::fcntl::OFlag::O_NOCTTY.bits())
            .open("/dev/ttyS0")
        {
            Ok(t) => t,
            Err(e) => {
                log(&format!("console shell: open /dev/ttyS0: {e}"));
                return;
            }
        };
        let _ = nix::fcntl::fcntl(
            tty.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_RDWR),
        );
        let (Ok(out), Ok(err)) = (tty.try_clone(), tty.try_clone()) else {
            return;
        };
        let mut cmd = Command::new(BUSYBOX);
        cmd.args(["setsid", "-c", BUSYBOX, "sh"])
            .stdin(tty)
            .stdout(out)
            .stderr(err)
            .current_dir("/")
            .env("HOME", "/root")
            .env("TERM", "vt100")
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            );
        match reaper::spawn(&mut cmd) {
            Ok(p) => {
                reaper::wait(p.pid, None);
            }
            Err(e) => {
                log(&format!("console shell: {e}"));
                return;
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Waits for the ACPI power button (evdev KEY_POWER) and shuts down.
fn watch_power_button() {
    // struct input_event on x86_64: timeval (16) + type u16 + code u16 + value i32.
    const EV_KEY: u16 = 1;
    const KEY_POWER: u16 = 116;
    std::thread::sleep(Duration::from_millis(500));
    let Ok(dir) = fs::read_dir("/dev/input") else {
        return;
    };
    for entry in dir.flatten() {
        if !entry.file_name().to_string_lossy().starts_with("event") {
            continue;
        }
        let path = entry.path();
        std::thread::spawn(move || {
            let Ok(mut f) = File::open(&path) else { return };
            let mut ev = [0u8; 24];
            while f.read_exact(&mut ev).is_ok() {
                let ty = u16::from_ne_bytes([ev[16], ev[17]]);
                let code = u16::from_ne_bytes([ev[18], ev[19]]);
                if ty == EV_KEY && code == KEY_POWER {
                    log("power button pressed");
                    shutdown(&Arc::new(Mutex::new(None)));
                }
            }
        });
    }
}

/// Graceful shutdown: stop processes, sync, unmount, power off.
fn shutdown(main_pid: &Arc<Mutex<Option<i32>>>) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        SHUTTING_DOWN.store(true, std::sync::atomic::Ordering::SeqCst);
        log("shutting down");
        if let Some(pid) = *main_pid.lock().unwrap() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        if std::process::id() != 1 {
            let _ = Command::new("poweroff").status();
            return;
        }
        let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
        std::thread::sleep(Duration::from_millis(300));
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        nix::unistd::sync();
        for target in ["/dev/shm", "/dev/pts", "/run"] {
            let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            nix::mount::MsFlags::MS_REMOUNT | nix::mount::MsFlags::MS_RDONLY,
            None::<&str>,
        );
        nix::unistd::sync();
        log("power off");
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    });
}
