//! The OCI runtime `config.json` of a container, built with the oci-spec crate.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    get_default_maskedpaths, get_default_mounts, get_default_readonly_paths, Capability,
    LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDeviceCgroupBuilder,
    LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder,
    LinuxResourcesBuilder, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompBuilder,
    LinuxSyscallBuilder, Mount, MountBuilder, PosixRlimitBuilder, PosixRlimitType, Process,
    ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};

use crate::driver::{DriverError, RuntimeSpec};

/// Default `PATH` when the image sets none.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// CFS period used for CPU quotas (100 ms).
pub const CPU_PERIOD_US: u64 = 100_000;

/// Upper bound for the container's `RLIMIT_NOFILE` (further capped by the agent's hard limit).
pub const NOFILE_MAX: u64 = 1_048_576;

/// Docker's default capability set.
pub fn default_capabilities() -> Vec<Capability> {
    vec![
        Capability::Chown,
        Capability::DacOverride,
        Capability::Fsetid,
        Capability::Fowner,
        Capability::Mknod,
        Capability::NetRaw,
        Capability::Setgid,
        Capability::Setuid,
        Capability::Setfcap,
        Capability::Setpcap,
        Capability::NetBindService,
        Capability::SysChroot,
        Capability::Kill,
        Capability::AuditWrite,
    ]
}

/// System calls a container may not make (they fail with `EPERM`): kernel modules and kexec,
/// reboot, swap, clock and time setting, keyrings, BPF and perf events, namespace and mount
/// manipulation (including user namespaces, a large kernel attack surface), cross-process memory
/// access and handle-based opens. Close to what Docker's default profile leaves blocked for a
/// container without `CAP_SYS_ADMIN`; everything else is allowed.
pub const DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "move_mount",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "sysfs",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
];

/// The container's seccomp filter: allow by default, [`DENIED_SYSCALLS`] fail with `EPERM`.
pub fn seccomp_profile() -> Result<LinuxSeccomp, DriverError> {
    const EPERM: u32 = 1;
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .syscalls(vec![LinuxSyscallBuilder::default()
            .names(
                DENIED_SYSCALLS
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>(),
            )
            .action(LinuxSeccompAction::ScmpActErrno)
            .errno_ret(EPERM)
            .build()
            .map_err(oci_err)?])
        .build()
        .map_err(oci_err)
}

/// Inputs of [`build`] besides the runtime spec.
#[derive(Debug, Clone)]
pub struct BundlePaths {
    /// The overlay mount point used as the container's root.
    pub rootfs: PathBuf,
    /// Named network namespace to join.
    pub netns: PathBuf,
    /// Files bind-mounted over `/etc/hosts`, `/etc/hostname`, `/etc/resolv.conf`.
    pub hosts: PathBuf,
    /// See `hosts`.
    pub hostname: PathBuf,
    /// See `hosts`.
    pub resolv_conf: PathBuf,
}

fn oci_err(e: impl std::fmt::Display) -> DriverError {
    DriverError::Io {
        context: "building the OCI spec".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// The hard `RLIMIT_NOFILE` of this process (the container cannot get more).
pub fn nofile_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(_, hard)| hard)
        .min(NOFILE_MAX)
}

fn bind_mount(destination: &str, source: &Path) -> Result<Mount, DriverError> {
    MountBuilder::default()
        .destination(destination)
        .typ("bind")
        .source(source)
        .options(vec!["rbind".to_string(), "rprivate".to_string()])
        .build()
        .map_err(oci_err)
}

/// The container's main process.
pub fn process(spec: &RuntimeSpec) -> Result<Process, DriverError> {
    let mut env = spec.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.to_string());
    }
    let cwd = if spec.working_dir.is_empty() {
        "/".to_string()
    } else {
        spec.working_dir.clone()
    };
    let caps: std::collections::HashSet<Capability> = default_capabilities().into_iter().collect();
    let nofile = nofile_limit();
    ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(0u32)
                .gid(0u32)
                .build()
                .map_err(oci_err)?,
        )
        .args(spec.command.clone())
        .env(env)
        .cwd(cwd)
        .no_new_privileges(true)
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(caps.clone())
                .effective(caps.clone())
                .permitted(caps)
                .build()
                .map_err(oci_err)?,
        )
        .rlimits(vec![PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .hard(nofile)
            .soft(nofile)
            .build()
            .map_err(oci_err)?])
        .build()
        .map_err(oci_err)
}

/// Builds the OCI runtime spec of a container.
pub fn build(
    spec: &RuntimeSpec,
    paths: &BundlePaths,
    cgroup_parent: &str,
) -> Result<Spec, DriverError> {
    let mut mounts = get_default_mounts();
    mounts.push(bind_mount("/etc/hosts", &paths.hosts)?);
    mounts.push(bind_mount("/etc/hostname", &paths.hostname)?);
    mounts.push(bind_mount("/etc/resolv.conf", &paths.resolv_conf)?);

    let mut namespaces = Vec::new();
    for typ in [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Cgroup,
    ] {
        namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(typ)
                .build()
                .map_err(oci_err)?,
        );
    }
    namespaces.push(
        LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::Network)
            .path(paths.netns.clone())
            .build()
            .map_err(oci_err)?,
    );

    let mut resources = LinuxResourcesBuilder::default().devices(vec![
        // Deny everything; runc adds its default allow-list (null, zero, tty, ...).
        LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .access("rwm")
            .build()
            .map_err(oci_err)?,
    ]);
    if spec.cpus > 0.0 {
        let quota = (spec.cpus * CPU_PERIOD_US as f64).round() as i64;
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .period(CPU_PERIOD_US)
                .quota(quota.max(1000))
                .build()
                .map_err(oci_err)?,
        );
    }
    if spec.memory_bytes > 0 {
        resources = resources.memory(
            LinuxMemoryBuilder::default()
                .limit(spec.memory_bytes as i64)
                .build()
                .map_err(oci_err)?,
        );
    }
    if spec.pids_limit > 0 {
        resources = resources.pids(
            LinuxPidsBuilder::default()
                .limit(spec.pids_limit as i64)
                .build()
                .map_err(oci_err)?,
        );
    }

    let linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .masked_paths(get_default_maskedpaths())
        .readonly_paths(get_default_readonly_paths())
        .cgroups_path(PathBuf::from(format!("/{cgroup_parent}/{}", spec.id)))
        .resources(resources.build().map_err(oci_err)?)
        .seccomp(seccomp_profile()?)
        .build()
        .map_err(oci_err)?;

    SpecBuilder::default()
        .version("1.0.2")
        .root(
            RootBuilder::default()
                .path(paths.rootfs.clone())
                .readonly(false)
                .build()
                .map_err(oci_err)?,
        )
        .process(process(spec)?)
        .hostname(spec.name.clone())
        .mounts(mounts)
        .linux(linux)
        .build()
        .map_err(oci_err)
}

/// Writes `spec` to `path` (via a temporary file and rename).
pub fn save(spec: &Spec, path: &Path) -> Result<(), DriverError> {
    let json = serde_json::to_vec_pretty(spec).map_err(oci_err)?;
    super::rootfs::write_replace(path, &json, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_api::agent::{ImageRef, NetworkAttachment};

    pub(crate) fn sample_spec() -> RuntimeSpec {
        RuntimeSpec {
            id: "c1".into(),
            name: "web-1".into(),
            image: ImageRef {
                name: "busybox".into(),
                digest: String::new(),
                layers: vec![],
                default_command: vec![],
                default_env: vec![],
                working_dir: String::new(),
            },
            layer_dirs: vec![],
            command: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: vec!["FOO=bar".into()],
            working_dir: String::new(),
            cpus: 0.5,
            memory_bytes: 64 << 20,
            disk_bytes: 0,
            pids_limit: 100,
            network: NetworkAttachment {
                bridge: "nimbus0".into(),
                ip: "10.0.0.2".into(),
                prefix_len: 24,
                gateway: "10.0.0.1".into(),
                mac: "02:00:00:00:00:02".into(),
                mtu: 0,
            },
            user_data: None,
            ssh_keys: vec![],
            secrets: crate::driver::SecretMaterial::default(),
        }
    }

    #[test]
    fn config_has_limits_namespaces_and_mounts() {
        let paths = BundlePaths {
            rootfs: "/b/rootfs".into(),
            netns: "/run/netns/nimbus-c1".into(),
            hosts: "/b/hosts".into(),
            hostname: "/b/hostname".into(),
            resolv_conf: "/b/resolv.conf".into(),
        };
        let spec = build(&sample_spec(), &paths, "nimbus").unwrap();
        let v = serde_json::to_value(&spec).unwrap();
        assert_eq!(v["hostname"], "web-1");
        assert_eq!(v["root"]["path"], "/b/rootfs");
        assert_eq!(v["root"]["readonly"], false);
        assert_eq!(v["process"]["args"][2], "echo hi");
        assert_eq!(v["process"]["env"][0], DEFAULT_PATH);
        assert_eq!(v["process"]["cwd"], "/");
        assert_eq!(v["process"]["terminal"], false);
        assert_eq!(v["process"]["noNewPrivileges"], true);
        let caps = v["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert!(caps.iter().any(|c| c == "CAP_NET_BIND_SERVICE"));
        assert!(!caps.iter().any(|c| c == "CAP_SYS_ADMIN"));
        let nofile = v["process"]["rlimits"][0]["hard"].as_u64().unwrap();
        assert!(nofile <= nofile_limit());
        assert_eq!(v["linux"]["cgroupsPath"], "/nimbus/c1");
        let r = &v["linux"]["resources"];
        assert_eq!(r["cpu"]["quota"], 50_000);
        assert_eq!(r["cpu"]["period"], 100_000);
        assert_eq!(r["memory"]["limit"], 64 << 20);
        assert_eq!(r["pids"]["limit"], 100);
        let ns = v["linux"]["namespaces"].as_array().unwrap();
        let net = ns.iter().find(|n| n["type"] == "network").unwrap();
        assert_eq!(net["path"], "/run/netns/nimbus-c1");
        let mounts = v["mounts"].as_array().unwrap();
        for dest in [
            "/proc",
            "/sys",
            "/dev",
            "/dev/pts",
            "/dev/shm",
            "/dev/mqueue",
            "/etc/hosts",
        ] {
            assert!(mounts.iter().any(|m| m["destination"] == dest), "{dest}");
        }
        assert!(!v["linux"]["maskedPaths"].as_array().unwrap().is_empty());
    }
}
