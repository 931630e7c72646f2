//! Multi-host harness: N hosts, each a network namespace with its own address on a shared
//! underlay bridge, each running `nimbus server` (and optionally `nimbus agent`), with fault
//! injection: SIGKILL and restart a host's process, cut its link, partition it from the other
//! hosts (nftables inside its namespace; the test process can still reach it), and packet
//! loss/delay on its link (`tc netem` on both ends of its veth).
//!
//! Layout of slot `s` (a file lock under `/tmp/nimbus-testkit` keeps concurrent runs apart):
//! the underlay is a bridge `br0` in its own namespace `nha<s>-sw` (the switch), where bridge
//! netfilter is off (`net.bridge.bridge-nf-call-*`, per namespace): a physical switch does not
//! run the machine's firewall and connection tracking on the traffic between hosts, and a bridge
//! in the root namespace would (this machine's root namespace has br_netfilter on for every
//! bridge, with conntrack and other tenants' forward chains). Host `i` lives in namespace
//! `nha<s>-<i>` at `10.250.<s>.<i+1>`, its link a veth whose switch end `nha<s>v<i>` is a port of
//! `br0`. The test process reaches every host through the veth `nha<s>` (root end, at
//! `10.250.<s>.254/24`), whose other end is a port of the switch too. Everything is removed on drop (also on panic), and
//! leftovers of a crashed run in the same slot are removed before use.
//!
//! Needs root, iproute2 (`ip`, `tc`), `nft` and util-linux's `nsenter` (processes enter only
//! the host's network namespace, so runc still sees the cgroup mounts); shelling out to them
//! is fine in a test harness (the product uses netlink).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nimbus_client::{Client, ClusterInfo};

use crate::KitError;

/// The API port every server listens on inside its namespace.
pub const PORT: u16 = 7443;
/// The agent API port.
pub const AGENT_PORT: u16 = 7444;

fn run(args: &[&str]) -> Result<(), KitError> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(KitError::NotReady(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// `tc qdisc VERB dev DEV root SPEC...` inside network namespace `ns`.
fn qdisc(ns: &str, dev: &str, verb: &str, spec: &[&str]) -> Result<(), KitError> {
    let mut a = vec![
        "ip", "netns", "exec", ns, "tc", "qdisc", verb, "dev", dev, "root",
    ];
    a.extend_from_slice(spec);
    run(&a)
}

fn run_quiet(args: &[&str]) {
    let _ = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Whether this process can build the harness (root, `ip`, `tc`, `nft`, `nsenter`).
pub fn available() -> bool {
    nix::unistd::geteuid().is_root()
        && crate::have("ip")
        && crate::have("tc")
        && crate::have("nft")
        && crate::have("nsenter")
}

struct SlotLock {
    index: u8,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

fn take_slot() -> SlotLock {
    let dir = Path::new("/tmp/nimbus-testkit");
    let _ = std::fs::create_dir_all(dir);
    loop {
        for index in 0..64u8 {
            let Ok(f) = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(format!("netns-slot-{index}.lock")))
            else {
                continue;
            };
            if let Ok(lock) =
                nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            {
                return SlotLock { index, _lock: lock };
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One host: a namespace with an address, a data dir and its processes.
pub struct Host {
    /// Index in the net.
    pub index: usize,
    /// Namespace name.
    pub ns: String,
    /// Its address on the underlay.
    pub addr: String,
    /// The server's data dir.
    pub data_dir: PathBuf,
    /// Whether its server serves TLS with its internal CA ([`Net::start_tls_server`]).
    pub tls: bool,
    veth: String,
    server_args: Vec<String>,
    server: Option<Child>,
    agent_args: Vec<String>,
    agent: Option<Child>,
}

impl Host {
    /// The server's URL.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}:{PORT}", self.addr)
    }

    /// The cluster CA this server holds (`<data-dir>/pki/ca.crt`; TLS clusters).
    pub fn ca_file(&self) -> PathBuf {
        self.data_dir.join("pki").join("ca.crt")
    }

    fn spawn(&self, args: &[String], bin: &Path, log: &Path) -> Result<Child, KitError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let log2 = log.try_clone()?;
        // `nsenter --net` (not `ip netns exec`): only the network namespace changes. `ip netns
        // exec` also remounts /sys, which hides the cgroup hierarchy runc needs.
        Ok(Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .arg(bin)
            .args(args)
            .env(
                "NIMBUS_LOG",
                std::env::var("NIMBUS_TEST_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
            )
            .env_remove("NIMBUS_DATA_DIR")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()?)
    }

    fn server_log(&self) -> PathBuf {
        self.data_dir.with_extension("log")
    }

    fn agent_log(&self) -> PathBuf {
        self.data_dir.with_extension("agent.log")
    }
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A set of hosts on one underlay bridge.
pub struct Net {
    /// The switch's network namespace (holds the underlay bridge and the hosts' switch ports).
    switch: String,
    /// The hosts.
    pub hosts: Vec<Host>,
    /// The shared admin token.
    pub admin_token: String,
    /// The shared node token file.
    pub node_token_file: PathBuf,
    admin_token_file: PathBuf,
    /// The servers' shared cluster secret file.
    pub cluster_secret_file: PathBuf,
    bridge: String,
    slot: SlotLock,
    bin: PathBuf,
    tmp: tempfile::TempDir,
}

impl Net {
    /// Creates `n` hosts (no processes yet).
    pub fn new(bin: &Path, n: usize) -> Result<Self, KitError> {
        let slot = take_slot();
        let s = slot.index;
        let tmp = tempfile::Builder::new().prefix("nimbus-ha-").tempdir()?;
        let bridge = format!("nha{s}");
        let switch = format!("nha{s}-sw");
        // Leftovers of a crashed run in this slot.
        for i in 0..16 {
            run_quiet(&["ip", "netns", "del", &format!("nha{s}-{i}")]);
            run_quiet(&["ip", "link", "del", &format!("nha{s}v{i}")]);
        }
        run_quiet(&["ip", "netns", "del", &switch]);
        run_quiet(&["ip", "link", "del", &bridge]);
        run_quiet(&["ip", "link", "del", &format!("nha{s}u")]);
        let admin_token = format!("{:032x}{:032x}", rand_u128(), rand_u128());
        let node_token = format!("{:032x}{:032x}", rand_u128(), rand_u128());
        let admin_token_file = tmp.path().join("admin.tok");
        let node_token_file = tmp.path().join("node.tok");
        std::fs::write(&admin_token_file, &admin_token)?;
        std::fs::write(&node_token_file, &node_token)?;
        let cluster_secret_file = tmp.path().join("cluster.secret");
        std::fs::write(
            &cluster_secret_file,
            format!("{:032x}{:032x}", rand_u128(), rand_u128()),
        )?;
        let mut net = Self {
            switch: switch.clone(),
            hosts: Vec::new(),
            admin_token,
            node_token_file,
            admin_token_file,
            cluster_secret_file,
            bridge: bridge.clone(),
            slot,
            bin: bin.to_owned(),
            tmp,
        };
        run(&["ip", "netns", "add", &switch])?;
        for family in ["iptables", "ip6tables", "arptables"] {
            // Absent when br_netfilter is not loaded: then bridges run no netfilter anyway.
            run_quiet(&[
                "ip",
                "netns",
                "exec",
                &switch,
                "sysctl",
                "-qw",
                &format!("net.bridge.bridge-nf-call-{family}=0"),
            ]);
        }
        run(&["ip", "-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &switch, "link", "set", "br0", "up"])?;
        // Interface names are unique per slot also while still in the root namespace
        // (concurrent nets).
        let uplink = format!("nha{s}u");
        run(&[
            "ip", "link", "add", &bridge, "type", "veth", "peer", "name", &uplink,
        ])?;
        run(&["ip", "link", "set", &uplink, "netns", &switch])?;
        run(&[
            "ip", "-n", &switch, "link", "set", &uplink, "master", "br0", "up",
        ])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("10.250.{s}.254/24"),
            "dev",
            &bridge,
        ])?;
        run(&["ip", "link", "set", &bridge, "up"])?;
        for i in 0..n {
            let ns = format!("nha{s}-{i}");
            let veth = format!("nha{s}v{i}");
            let peer = format!("nha{s}p{i}");
            let addr = format!("10.250.{s}.{}", i + 1);
            run(&["ip", "netns", "add", &ns])?;
            run(&[
                "ip", "link", "add", &veth, "type", "veth", "peer", "name", &peer,
            ])?;
            run(&["ip", "link", "set", &peer, "netns", &ns])?;
            run(&["ip", "link", "set", &veth, "netns", &switch])?;
            run(&[
                "ip", "-n", &switch, "link", "set", &veth, "master", "br0", "up",
            ])?;
            run(&["ip", "-n", &ns, "link", "set", &peer, "name", "eth0"])?;
            run(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            net.hosts.push(Host {
                index: i,
                ns,
                addr,
                data_dir: net.tmp.path().join(format!("host{i}")),
                tls: false,
                veth,
                server_args: Vec::new(),
                server: None,
                agent_args: Vec::new(),
                agent: None,
            });
        }
        Ok(net)
    }

    /// The slot (0..64) of this net: its subnet is `10.250.<slot>.0/24`.
    pub fn slot(&self) -> u8 {
        self.slot.index
    }

    /// The URLs of all servers.
    pub fn urls(&self) -> Vec<String> {
        self.hosts.iter().map(Host::url).collect()
    }

    /// An admin client of host `i`'s server (TLS clusters: trusting the cluster CA).
    pub fn client(&self, i: usize) -> Client {
        let c = Client::new(self.hosts[i].url(), &self.admin_token, "default");
        if self.hosts[i].tls {
            c.with_tls(self.tls_config(None))
        } else {
            c
        }
    }

    /// The switch's network namespace: its bridge `br0` carries every packet between the
    /// hosts and between the test process and the hosts (e.g. for a capture).
    pub fn switch_ns(&self) -> &str {
        &self.switch
    }

    /// Makes the servers of this net serve TLS and speak mTLS to each other (no `--insecure`);
    /// form the cluster with [`Net::start_tls_servers`].
    #[must_use]
    pub fn with_tls(mut self) -> Self {
        for h in &mut self.hosts {
            h.tls = true;
        }
        self
    }

    /// The cluster CA (PEM) of a TLS cluster, from the first server that holds it.
    pub fn ca_pem(&self) -> String {
        self.hosts
            .iter()
            .find_map(|h| std::fs::read_to_string(h.ca_file()).ok())
            .unwrap_or_default()
    }

    /// A TLS 1.3 client config trusting only server certificates of the cluster CA,
    /// presenting `client` (chain PEM, key PEM) if given.
    pub fn tls_config(&self, client: Option<(&str, &str)>) -> rustls::ClientConfig {
        let roots = nimbus_pki::verify::roots(&self.ca_pem()).expect("cluster CA");
        let v = nimbus_pki::ClusterServerVerifier::new(
            roots,
            vec![nimbus_pki::Role::Server],
            std::sync::Arc::new(nimbus_pki::NoRevocation),
        );
        let certs = client.map(|(c, k)| {
            std::sync::Arc::new(nimbus_pki::CertStore::new(c, k).expect("client cert"))
        });
        nimbus_pki::client_config(std::sync::Arc::new(v), certs).expect("TLS config")
    }

    /// TLS: starts host 0's server as a new cluster (`--bootstrap-expect 1`), waits for its
    /// CA, then the others with `--join <host 0>`, trusting the CA by file (`--ca`) on host 1
    /// and by fingerprint (`--ca-fingerprint`) on the others; `extra` goes to every server.
    pub async fn start_tls_servers(&mut self, extra: &[&str]) -> Result<(), KitError> {
        self.start_tls_first(extra).await?;
        let ca_file = self.hosts[0].ca_file().display().to_string();
        let der = nimbus_pki::certs_from_pem(&self.ca_pem()).expect("CA");
        let fingerprint = nimbus_pki::fingerprint(&der[0]);
        let join = self.hosts[0].url();
        for i in 1..self.hosts.len() {
            let mut args = vec!["--join", join.as_str()];
            if i == 1 {
                args.extend(["--ca", ca_file.as_str()]);
            } else {
                args.extend(["--ca-fingerprint", fingerprint.as_str()]);
            }
            args.extend_from_slice(extra);
            self.start_servers_with(i, &args)?;
        }
        Ok(())
    }

    /// TLS: starts host 0's server as a new cluster (`--bootstrap-expect 1`) and waits until
    /// it answers with its CA.
    pub async fn start_tls_first(&mut self, extra: &[&str]) -> Result<(), KitError> {
        let mut first = vec!["--bootstrap-expect", "1"];
        first.extend_from_slice(extra);
        self.start_servers_with(0, &first)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.ca_pem().is_empty() || self.client(0).cluster_info().await.is_err() {
            if Instant::now() > deadline {
                return Err(KitError::NotReady(format!(
                    "the first TLS server did not come up\n{}",
                    self.logs_tail(20)
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// Starts `nimbus server --bootstrap-expect N --peers <all>` on every host, with `extra`
    /// arguments.
    pub fn start_servers(&mut self, extra: &[&str]) -> Result<(), KitError> {
        let peers = self.urls().join(",");
        let n = self.hosts.len().to_string();
        for i in 0..self.hosts.len() {
            let mut args = vec!["--bootstrap-expect", n.as_str(), "--peers", peers.as_str()];
            args.extend_from_slice(extra);
            self.start_servers_with(i, &args)?;
        }
        Ok(())
    }

    /// Starts `nimbus server --bootstrap-expect N --peers <theirs>` on the N hosts `hosts`
    /// only (the others can run agents), with `extra` arguments.
    pub fn start_servers_on(&mut self, hosts: &[usize], extra: &[&str]) -> Result<(), KitError> {
        let peers: Vec<String> = hosts.iter().map(|&i| self.hosts[i].url()).collect();
        let peers = peers.join(",");
        let n = hosts.len().to_string();
        for &i in hosts {
            let mut args = vec!["--bootstrap-expect", n.as_str(), "--peers", peers.as_str()];
            args.extend_from_slice(extra);
            self.start_servers_with(i, &args)?;
        }
        Ok(())
    }

    /// Starts `nimbus server` on host `i` with its data dir, address, the shared tokens, and
    /// `extra` arguments (e.g. `--join URL`); restarts reuse them.
    pub fn start_servers_with(&mut self, i: usize, extra: &[&str]) -> Result<(), KitError> {
        let h = &self.hosts[i];
        let mut args: Vec<String> = vec![
            "server".into(),
            "--data-dir".into(),
            h.data_dir.display().to_string(),
            "--listen".into(),
            format!("{}:{PORT}", h.addr),
            "--advertise".into(),
            h.url(),
            "--node-token-file".into(),
            self.node_token_file.display().to_string(),
            "--admin-token-file".into(),
            self.admin_token_file.display().to_string(),
            "--cluster-secret-file".into(),
            self.cluster_secret_file.display().to_string(),
        ];
        if !h.tls {
            args.push("--insecure".into());
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        self.hosts[i].server_args = args;
        self.start_server(i)
    }

    /// Starts `nimbus server` on host `i` over TLS with its internal CA as a server on its own
    /// (a cluster of them: [`Net::start_tls_servers`]), with `extra` arguments.
    pub fn start_tls_server(&mut self, i: usize, extra: &[&str]) -> Result<(), KitError> {
        self.hosts[i].tls = true;
        self.start_servers_with(i, extra)
    }

    /// Starts (again) host `i`'s server with the arguments it was first started with.
    pub fn start_server(&mut self, i: usize) -> Result<(), KitError> {
        let h = &self.hosts[i];
        let child = h.spawn(&h.server_args, &self.bin, &h.server_log())?;
        self.hosts[i].server = Some(child);
        Ok(())
    }

    /// Starts `nimbus agent` named `name` on host `i`, knowing every server.
    pub fn start_agent(&mut self, i: usize, name: &str, extra: &[&str]) -> Result<(), KitError> {
        let servers = self.urls();
        self.start_agent_with(i, name, &servers, extra)
    }

    /// Starts `nimbus agent` named `name` on host `i`, knowing only `servers`.
    pub fn start_agent_with(
        &mut self,
        i: usize,
        name: &str,
        servers: &[String],
        extra: &[&str],
    ) -> Result<(), KitError> {
        let credential = [
            "--token-file".to_owned(),
            self.node_token_file.display().to_string(),
        ];
        self.spawn_agent(i, name, servers, &credential, extra)
    }

    /// Starts `nimbus agent` named `name` on host `i`, joining the TLS server of host
    /// `server` with `join_token` (its CA from that server's data dir).
    pub fn join_agent(
        &mut self,
        i: usize,
        name: &str,
        server: usize,
        join_token: &str,
        extra: &[&str],
    ) -> Result<(), KitError> {
        let s = &self.hosts[server];
        let credential = [
            "--join-token".to_owned(),
            join_token.to_owned(),
            "--ca".to_owned(),
            s.ca_file().display().to_string(),
        ];
        self.spawn_agent(i, name, &[s.url()], &credential, extra)
    }

    fn spawn_agent(
        &mut self,
        i: usize,
        name: &str,
        servers: &[String],
        credential: &[String],
        extra: &[&str],
    ) -> Result<(), KitError> {
        let h = &self.hosts[i];
        let mut args: Vec<String> = vec!["agent".into()];
        for u in servers {
            args.push("--server".into());
            args.push(u.clone());
        }
        args.extend_from_slice(credential);
        args.extend([
            "--name".into(),
            name.into(),
            "--data-dir".into(),
            h.data_dir.with_extension("agent").display().to_string(),
            "--listen".into(),
            format!("{}:{AGENT_PORT}", h.addr),
            // Agents of the hosts share this machine's cgroups, runc state and /run/netns.
            "--runtime-scope".into(),
            self.runtime_scope(i),
        ]);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let child = h.spawn(&args, &self.bin, &h.agent_log())?;
        self.hosts[i].agent_args = args;
        self.hosts[i].agent = Some(child);
        Ok(())
    }

    /// Runs any program in host `i`'s namespace (e.g. a baseline like etcd), output appended
    /// to `<data dir>.<name>.log`. The caller owns (and must kill) the child.
    pub fn spawn_in(
        &self,
        i: usize,
        name: &str,
        program: &str,
        args: &[String],
    ) -> Result<Child, KitError> {
        let h = &self.hosts[i];
        let log = h.data_dir.with_extension(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let log2 = log.try_clone()?;
        Ok(Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", h.ns))
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()?)
    }

    /// Runs a program to completion in host `i`'s network namespace and returns its output.
    pub fn run_in(
        &self,
        i: usize,
        program: &str,
        args: &[&str],
    ) -> Result<std::process::Output, KitError> {
        Ok(Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.hosts[i].ns))
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .output()?)
    }

    /// The test process's own address on the underlay (`10.250.<slot>.254`): an address
    /// outside every host, for egress and published-port checks.
    pub fn underlay_gateway(&self) -> String {
        format!("10.250.{}.254", self.slot.index)
    }

    /// The `--runtime-scope` of host `i`'s agent (its containers' cgroups, runc ids and
    /// network namespaces are named under it).
    pub fn runtime_scope(&self, i: usize) -> String {
        format!("nha{}-{i}", self.slot.index)
    }

    /// A scratch directory that lives as long as the net.
    pub fn scratch(&self) -> &Path {
        self.tmp.path()
    }

    /// SIGKILLs host `i`'s server.
    pub fn kill9(&mut self, i: usize) {
        kill(&mut self.hosts[i].server);
    }

    /// SIGKILLs host `i`'s agent.
    pub fn kill9_agent(&mut self, i: usize) {
        kill(&mut self.hosts[i].agent);
    }

    /// Restarts host `i`'s agent.
    pub fn restart_agent(&mut self, i: usize) -> Result<(), KitError> {
        kill(&mut self.hosts[i].agent);
        let h = &self.hosts[i];
        let child = h.spawn(&h.agent_args, &self.bin, &h.agent_log())?;
        self.hosts[i].agent = Some(child);
        Ok(())
    }

    /// SIGKILLs and restarts host `i`'s server.
    pub fn restart(&mut self, i: usize) -> Result<(), KitError> {
        self.kill9(i);
        self.start_server(i)
    }

    /// Sets host `i`'s switch port `up` or `down`.
    fn set_link(&self, i: usize, state: &str) -> Result<(), KitError> {
        let port = &self.hosts[i].veth;
        run(&["ip", "-n", &self.switch, "link", "set", port, state])
    }

    /// Takes host `i`'s link down (it can reach nobody, nobody can reach it).
    pub fn cut_link(&self, i: usize) -> Result<(), KitError> {
        self.set_link(i, "down")
    }

    /// Brings host `i`'s link back.
    pub fn restore_link(&self, i: usize) -> Result<(), KitError> {
        self.set_link(i, "up")
    }

    /// Drops all traffic between host `i` and the other hosts (nftables in its namespace);
    /// the test process can still reach it.
    pub fn partition(&self, i: usize) -> Result<(), KitError> {
        let others: Vec<String> = self
            .hosts
            .iter()
            .filter(|h| h.index != i)
            .map(|h| h.addr.clone())
            .collect();
        let set = others.join(", ");
        let rules = format!(
            "table inet nimbus_partition {{\n chain input {{ type filter hook input priority 0; ip saddr {{ {set} }} drop; }}\n chain output {{ type filter hook output priority 0; ip daddr {{ {set} }} drop; }}\n}}\n"
        );
        let path = self.tmp.path().join(format!("partition{i}.nft"));
        std::fs::write(&path, rules)?;
        run(&[
            "ip",
            "netns",
            "exec",
            &self.hosts[i].ns,
            "nft",
            "-f",
            &path.display().to_string(),
        ])
    }

    /// Removes host `i`'s partition.
    pub fn heal(&self, i: usize) -> Result<(), KitError> {
        run(&[
            "ip",
            "netns",
            "exec",
            &self.hosts[i].ns,
            "nft",
            "delete",
            "table",
            "inet",
            "nimbus_partition",
        ])
    }

    /// Impairs both directions of host `i`'s link: packet loss and delay with `tc netem`
    /// where the kernel has it; otherwise (kernels without `sch_netem`, like the CI machines)
    /// loss with an nftables `numgen random` drop rule in the host's namespace and, instead
    /// of a fixed delay, a `tbf` rate limit of `fallback_rate` with a 50 ms queue on both
    /// ends. Returns which of the two was applied.
    pub fn impair(
        &self,
        i: usize,
        loss_percent: u32,
        delay_ms: u32,
        fallback_rate: &str,
    ) -> Result<&'static str, KitError> {
        let h = &self.hosts[i];
        let loss = format!("{loss_percent}%");
        let delay = format!("{delay_ms}ms");
        let jitter = format!("{}ms", delay_ms / 2);
        let netem = [
            "netem",
            "delay",
            delay.as_str(),
            jitter.as_str(),
            "loss",
            loss.as_str(),
        ];
        if qdisc(&self.switch, &h.veth, "replace", &netem).is_ok() {
            qdisc(&h.ns, "eth0", "replace", &netem)?;
            return Ok("netem");
        }
        let rules = format!(
            "table inet nimbus_loss {{\n chain input {{ type filter hook input priority 0; iifname \"eth0\" numgen random mod 100 < {loss_percent} drop; }}\n chain output {{ type filter hook output priority 0; oifname \"eth0\" numgen random mod 100 < {loss_percent} drop; }}\n}}\n"
        );
        let path = self.tmp.path().join(format!("loss{i}.nft"));
        std::fs::write(&path, rules)?;
        run(&[
            "ip",
            "netns",
            "exec",
            &h.ns,
            "nft",
            "-f",
            &path.display().to_string(),
        ])?;
        let tbf = [
            "tbf",
            "rate",
            fallback_rate,
            "burst",
            "16kb",
            "latency",
            "50ms",
        ];
        qdisc(&self.switch, &h.veth, "replace", &tbf)?;
        qdisc(&h.ns, "eth0", "replace", &tbf)?;
        Ok("nft-loss+tbf")
    }

    /// Removes the impairments of host `i`.
    pub fn clear_impair(&self, i: usize) {
        let h = &self.hosts[i];
        let _ = qdisc(&self.switch, &h.veth, "del", &[]);
        let _ = qdisc(&h.ns, "eth0", "del", &[]);
        run_quiet(&[
            "ip",
            "netns",
            "exec",
            &h.ns,
            "nft",
            "delete",
            "table",
            "inet",
            "nimbus_loss",
        ]);
    }

    /// Host `i`'s server log so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.hosts[i].server_log()).unwrap_or_default()
    }

    /// Host `i`'s agent log so far.
    pub fn agent_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.hosts[i].agent_log()).unwrap_or_default()
    }

    /// The tail of every server log (for assertion messages).
    pub fn logs_tail(&self, lines: usize) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        for h in &self.hosts {
            let log = self.log(h.index);
            let tail: Vec<&str> = log.lines().rev().take(lines).collect();
            let _ = writeln!(out, "--- host {} ({}) ---", h.index, h.addr);
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Waits until a server among `among` reports a leader and `voters` voters that all know
    /// the cluster id; returns the leader's host index.
    pub async fn wait_cluster(
        &self,
        among: &[usize],
        voters: usize,
        timeout: Duration,
    ) -> Result<usize, KitError> {
        let deadline = Instant::now() + timeout;
        loop {
            for &i in among {
                let c = self.client(i).with_timeout(Duration::from_secs(2));
                if let Ok(info) = c.cluster_info().await {
                    if let Some(l) = self.leader_host(&info) {
                        if info.cluster_id.is_some()
                            && info.members.iter().filter(|m| m.voter).count() == voters
                            && among.contains(&l)
                        {
                            return Ok(l);
                        }
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(KitError::NotReady(format!(
                    "no cluster of {voters} voters with a leader among hosts {among:?} within {timeout:?}\n{}",
                    self.logs_tail(15)
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The host index of the leader `info` names.
    pub fn leader_host(&self, info: &ClusterInfo) -> Option<usize> {
        let l = info.leader_id?;
        let url = &info.members.iter().find(|m| m.id == l)?.url;
        self.hosts.iter().position(|h| &h.url() == url)
    }

    /// Removes the containers the agents of this net left (a test that failed halfway, or a
    /// host killed on purpose).
    fn remove_containers(&self) {
        for (i, h) in self.hosts.iter().enumerate() {
            crate::remove_agent_containers(
                &self.runtime_scope(i),
                &h.data_dir.with_extension("agent"),
            );
        }
    }

    fn cleanup(&mut self) {
        for h in &mut self.hosts {
            kill(&mut h.agent);
            kill(&mut h.server);
        }
        self.remove_containers();
        for h in &self.hosts {
            run_quiet(&["ip", "netns", "del", &h.ns]);
        }
        // The switch's namespace holds the bridge and every switch-side veth end.
        run_quiet(&["ip", "netns", "del", &self.switch]);
        run_quiet(&["ip", "link", "del", &self.bridge]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.cleanup();
    }
}

fn rand_u128() -> u128 {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    u128::from_le_bytes(b)
}
