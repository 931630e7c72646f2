//! The nimbus control plane: REST API, authentication, controllers, on top of the replicated
//! state.

pub mod app;
pub mod auth;
pub mod beats;
pub mod blobs;
pub mod cluster;
pub mod controllers;
pub mod error;
pub mod forward;
pub mod identity;
pub mod masterkey;
pub mod peers;
pub mod proposer;
pub mod routes;
pub mod telemetry;
pub mod tls;
pub mod tlsboot;
pub mod unread;

use std::path::Path;
use std::sync::Arc;

use nimbus_image::ImageStore;
use nimbus_state::raft::{RaftConfig, RaftNode};
use nimbus_state::Command;

pub use app::{AppState, ServerConfig};
pub use cluster::ClusterOptions;

/// Startup failures.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory cannot be used.
    #[error("data directory {path}: {message}")]
    DataDir {
        /// Path.
        path: String,
        /// Why.
        message: String,
    },
    /// The replicated store failed to open.
    #[error("opening the replicated store")]
    Raft(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The listen address is taken or invalid.
    #[error("listening on {addr}")]
    Listen {
        /// Address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The store did not become writable.
    #[error("the control plane did not become ready: {0}")]
    NotReady(String),
    /// Forming or joining the server cluster failed.
    #[error("{0}")]
    Cluster(String),
}

/// A running server.
pub struct Server {
    /// Shared state.
    pub app: AppState,
    /// Where it listens.
    pub local_addr: std::net::SocketAddr,
    serve: tokio::task::JoinHandle<()>,
}

/// File holding the server-to-server cluster secret (plain, 0600: this server presents it).
pub const CLUSTER_SECRET_FILE: &str = "cluster.secret";

/// Writes `contents` to a new or truncated file of mode 0600 and syncs it.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An existing file keeps its mode through `open`.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    std::io::Write::write_all(&mut f, contents)?;
    f.sync_all()
}

/// Reads a token file, or creates it (mode 0600) with a fresh 256-bit token.
pub fn load_or_create_token(path: &Path) -> Result<String, StartError> {
    let err = |m: String| StartError::DataDir {
        path: path.display().to_string(),
        message: m,
    };
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(format!("reading token: {e}"))),
    }
    let token = auth::generate_token();
    write_private(path, format!("{token}\n").as_bytes())
        .map_err(|e| err(format!("writing token: {e}")))?;
    Ok(token)
}

/// Makes `dir` and the directories below it, down to `depth` levels, private to their owner
/// (0700), and the regular files down to `file_depth` levels 0600.
pub fn restrict_tree(dir: &Path, depth: usize, file_depth: usize) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let t = e.file_type()?;
        if t.is_dir() && depth > 0 {
            restrict_tree(&e.path(), depth - 1, file_depth.saturating_sub(1))?;
        } else if t.is_file() && file_depth > 0 {
            std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

/// The path of the hash of the token file `path` (`<path>.sha256`).
pub fn token_hash_path(path: &Path) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".sha256");
    p.into()
}

/// The SHA-256 of the token of `path`, kept in `<path>.sha256`. On first start it creates the
/// token in `path` (0600: the one plain copy, the credential file of the CLI or the agents;
/// the server never reads it again) and its hash; a data dir of an earlier build (the plain
/// file only) gets its hash written.
pub fn load_or_create_token_hash(path: &Path) -> Result<[u8; 32], StartError> {
    let hash_path = token_hash_path(path);
    let err = |m: String| StartError::DataDir {
        path: hash_path.display().to_string(),
        message: m,
    };
    match std::fs::read_to_string(&hash_path) {
        Ok(h) => {
            let mut out = [0u8; 32];
            hex::decode_to_slice(h.trim(), &mut out)
                .map_err(|e| err(format!("not a SHA-256 hash: {e}")))?;
            return Ok(out);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(format!("reading: {e}"))),
    }
    let token = load_or_create_token(path)?;
    let hash = auth::token_hash(&token);
    write_private(&hash_path, format!("{}\n", hex::encode(hash)).as_bytes())
        .map_err(|e| err(format!("writing: {e}")))?;
    Ok(hash)
}

/// Checks that `dir` is a nimbus data directory (or empty / new), writing a marker file.
pub fn check_data_dir(dir: &Path) -> Result<(), StartError> {
    let err = |m: String| StartError::DataDir {
        path: dir.display().to_string(),
        message: m,
    };
    std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create: {e}")))?;
    // Nothing in a data dir is for other users.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(|e| err(format!("cannot restrict to its owner: {e}")))?;
    let marker = dir.join("NIMBUS_DATA_DIR");
    match std::fs::read_to_string(&marker) {
        Ok(s) if s.trim() == "nimbus-data-v1" => Ok(()),
        Ok(s) => Err(err(format!(
            "unsupported data directory format {:?}",
            s.trim()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let foreign = std::fs::read_dir(dir)
                .map_err(|e| err(format!("cannot read: {e}")))?
                .filter_map(Result::ok)
                .any(|e| !e.file_name().to_string_lossy().starts_with('.'));
            if foreign {
                return Err(err("not empty and not a nimbus data directory (no NIMBUS_DATA_DIR marker); choose another --data-dir".into()));
            }
            write_private(&marker, b"nimbus-data-v1\n")
                .map_err(|e| err(format!("cannot write marker: {e}")))
        }
        Err(e) => Err(err(format!("cannot read marker: {e}"))),
    }
}

/// The cluster secret of this server: `<data-dir>/cluster.secret` (installed from
/// `--cluster-secret-file` for a server of a multi-server cluster). A stand-alone server, or
/// the first server of a cluster formed with `--bootstrap-expect 1`, creates it; a server that
/// joins or forms a cluster with others must have it, since a secret of its own would not
/// let it talk to them.
fn cluster_secret(data_dir: &Path, opts: &ClusterOptions) -> Result<String, StartError> {
    let path = data_dir.join(CLUSTER_SECRET_FILE);
    if !path.exists() && !opts.is_single() && opts.bootstrap_expect != Some(1) {
        return Err(StartError::Cluster(format!(
            "no cluster secret: servers of a cluster share one; give every server the same \
             --cluster-secret-file (e.g. the {CLUSTER_SECRET_FILE} of an existing server, or a \
             file with 64 random hex digits for a new cluster)"
        )));
    }
    load_or_create_token(&path)
}

impl Server {
    /// Opens the store, bootstraps a single-voter cluster if new, and starts serving.
    pub async fn start(cfg: ServerConfig) -> Result<Self, StartError> {
        Self::start_with(cfg, ClusterOptions::single()).await
    }

    /// Opens the store and starts serving as a member of a server cluster.
    ///
    /// - single (no options): bootstraps a one-voter cluster if new and returns once it is
    ///   writable (`nimbus up`);
    /// - `join`: returns once a member has added this server (learner, then voter);
    /// - `bootstrap_expect`: returns at once while the servers find each other in the
    ///   background (printing "waiting for N more servers"); over TLS (N > 1) only once the
    ///   servers settled whose CA is the cluster's ([`tlsboot`]).
    ///
    /// A server whose store is already initialized just rejoins its cluster.
    pub async fn start_with(cfg: ServerConfig, opts: ClusterOptions) -> Result<Self, StartError> {
        check_data_dir(&cfg.data_dir)?;
        let creds = auth::Credentials {
            admin_sha256: load_or_create_token_hash(&cfg.data_dir.join("admin.token"))?,
            node_sha256: load_or_create_token_hash(&cfg.data_dir.join("node.token"))?,
            cluster_secret: cluster_secret(&cfg.data_dir, &opts)?,
            metrics_sha256: load_or_create_token_hash(&cfg.data_dir.join("metrics.token"))?,
        };
        let images =
            ImageStore::open(&cfg.data_dir.join("images")).map_err(|e| StartError::DataDir {
                path: cfg.data_dir.display().to_string(),
                message: format!("image store: {e}"),
            })?;
        let keys = masterkey::MasterKeys::load(&cfg.data_dir, cfg.master_key_file.as_deref())
            .map_err(|message| StartError::DataDir {
                path: cfg.data_dir.display().to_string(),
                message,
            })?;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: cfg.listen.to_string(),
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: cfg.listen.to_string(),
            source,
        })?;
        let mut cfg = cfg;
        let tls_on = cfg.tls.mode != identity::TlsMode::Plain;
        if matches!(cfg.tls.mode, identity::TlsMode::Files { .. }) && !opts.is_single() {
            return Err(StartError::Cluster(
                "--tls-cert is for a single server: servers of a cluster present their certificates of the cluster CA to each other".into(),
            ));
        }
        if cfg.advertise_url.is_empty() {
            let scheme = if tls_on { "https" } else { "http" };
            cfg.advertise_url = format!("{scheme}://{local_addr}");
        }
        let listener = if tlsboot::must_settle(&cfg, &opts) {
            tlsboot::settle_ca(&mut cfg, listener, &creds.cluster_secret, &keys, &opts).await?
        } else {
            listener
        };
        if peers::must_prepare_join(&cfg, &opts.join) {
            peers::prepare_join(&cfg, &creds.cluster_secret, &keys, &opts.join).await?;
        }
        let pki = Arc::new(identity::Pki::setup(
            &cfg.tls,
            &cfg.data_dir,
            cfg.node_id,
            local_addr,
            &cfg.advertise_url,
            &keys,
        )?);
        let peer_tls = pki.peer_client_tls.as_ref();
        let raft_cfg = RaftConfig {
            node_id: cfg.node_id,
            data_dir: cfg.data_dir.join("raft"),
            advertise_url: cfg.advertise_url.clone(),
            cluster_secret: creds.cluster_secret.clone(),
            snapshot_every: 5000,
        };
        let openraft_cfg = raft_cfg.openraft_config();
        let raft_http = peers::client(
            peer_tls,
            reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(2))
                .pool_idle_timeout(std::time::Duration::from_secs(90)),
        )
        .map_err(|e| StartError::NotReady(e.to_string()))?;
        let raft = RaftNode::open_with_client(raft_cfg, openraft_cfg, Some(raft_http))
            .await
            .map_err(|e| StartError::Raft(Box::new(e)))?;
        pki.revocation.attach(raft.clone());
        // The store holds the whole state: owner only (redb creates it 0644).
        restrict_tree(&cfg.data_dir.join("raft"), 0, 1).map_err(|e| StartError::DataDir {
            path: cfg.data_dir.join("raft").display().to_string(),
            message: format!("cannot restrict to its owner: {e}"),
        })?;
        let forwarder =
            forward::Forwarder::new(raft.clone(), creds.cluster_secret.clone(), peer_tls);
        let app = AppState {
            cluster: Arc::new(cluster::ClusterState::load(
                &cfg.data_dir,
                opts.bootstrap_expect,
            )),
            cfg: Arc::new(cfg),
            raft: raft.clone(),
            images: Arc::new(images),
            creds: Arc::new(creds),
            proposer: proposer::Proposer::spawn(forwarder.clone()),
            forwarder,
            http: agent_http(&pki).map_err(|e| StartError::NotReady(e.to_string()))?,
            peer_http: peers::client(peer_tls, reqwest::Client::builder())
                .map_err(|e| StartError::NotReady(e.to_string()))?,
            blob_http: blobs::http_client(peer_tls),
            blob_fetches: Arc::default(),
            telemetry: Arc::default(),
            net_maps: Arc::default(),
            drain_clock: Arc::default(),
            keys: Arc::new(keys),
            pki: pki.clone(),
        };
        let mut router = routes::router(app.clone())
            .merge(cluster::router(app.clone()))
            .merge(beats::internal_router(app.clone()))
            .merge(masterkey::internal_router(app.clone()))
            .merge(peers::router(app.clone()))
            .merge(tlsboot::router(app.clone()))
            .merge(nimbus_state::raft::raft_router(raft.clone()));
        if tls_on {
            router = router.layer(axum::middleware::from_fn_with_state(
                app.clone(),
                peers::server_gate,
            ));
        }
        let serve = if let Some(tls) = pki.server_tls.clone() {
            tls::serve(listener, router, tls, pki.revocation.clone())
        } else {
            tokio::spawn(async move {
                if let Err(e) = axum::serve(
                    listener,
                    router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
                )
                .await
                {
                    tracing::error!("API server stopped: {e}");
                }
            })
        };
        let server = Self {
            app: app.clone(),
            local_addr,
            serve,
        };
        let started = if opts.is_single() {
            Self::start_single(&app).await
        } else {
            Self::start_member(&app, opts).await
        };
        if let Err(e) = started {
            server.shutdown().await;
            return Err(e);
        }
        identity::spawn_renewal(app.clone());
        identity::spawn_reseal(app.clone());
        controllers::spawn(app);
        Ok(server)
    }

    async fn start_single(app: &AppState) -> Result<(), StartError> {
        app.raft
            .bootstrap_single()
            .await
            .map_err(|e| StartError::NotReady(e.to_string()))?;
        if !app.keys.present() && app.raft.members().len() <= 1 {
            app.keys.create().map_err(|message| StartError::DataDir {
                path: app.cfg.data_dir.display().to_string(),
                message,
            })?;
        }
        if app.cluster.cluster_id().is_none() && app.raft.members().len() <= 1 {
            app.cluster
                .set_cluster_id(&cluster::new_cluster_id())
                .map_err(StartError::Cluster)?;
        }
        bootstrap_defaults(app).await?;
        identity::publish_ca(app)
            .await
            .map_err(|e| StartError::NotReady(e.message))
    }

    async fn start_member(app: &AppState, opts: ClusterOptions) -> Result<(), StartError> {
        let mut peers = opts.peers.clone();
        peers.extend(opts.join.iter().cloned());
        peers.retain(|p| p.trim_end_matches('/') != app.raft.advertise_url().trim_end_matches('/'));
        if app.raft.is_initialized().await {
            cluster::check_peers(app, &peers).await?;
        } else if let Some(expect) = opts.bootstrap_expect {
            if expect <= 1 {
                return Self::start_single(app).await;
            }
            tokio::spawn(cluster::bootstrap_expect(app.clone(), expect, peers));
        } else {
            cluster::join_cluster(app, &peers).await?;
        }
        tokio::spawn(cluster::adopt_cluster_id(app.clone()));
        tokio::spawn(masterkey::obtain(app.clone()));
        tokio::spawn(member_defaults(app.clone()));
        tokio::spawn(blobs::sync_loop(app.clone()));
        Ok(())
    }

    /// Stops serving.
    pub async fn shutdown(self) {
        self.serve.abort();
        self.app.raft.shutdown().await;
    }
}

/// The client for calls to agents: over TLS it presents this server's certificate and accepts
/// only agent certificates of the cluster CA (plain `http://` agents still work).
fn agent_http(pki: &identity::Pki) -> Result<reqwest::Client, reqwest::Error> {
    let b = reqwest::Client::builder();
    match pki.agent_client_tls.clone() {
        Some(tls) => b.use_preconfigured_tls(tls).build(),
        None => b.build(),
    }
}

/// In a server cluster: once a leader is known, the leader writes the defaults (retrying, as
/// leadership may move); every server builds the built-in image's blobs locally so agents
/// can pull them from whichever server they talk to.
async fn member_defaults(app: AppState) {
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        if app.raft.leader().is_none() {
            continue;
        }
        if app.raft.is_leader() {
            match bootstrap_defaults(&app).await {
                Ok(()) => break,
                Err(e) => tracing::warn!("writing cluster defaults: {e}"),
            }
        } else if app.read(|s| s.projects.contains_key("default")) {
            break;
        }
    }
    let busybox = Path::new("/bin/busybox");
    if busybox.exists() {
        let store = app.images.clone();
        let _ = tokio::task::spawn_blocking(move || store.build_busybox(busybox)).await;
    }
}

async fn bootstrap_defaults(app: &AppState) -> Result<(), StartError> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match app.propose(Command::Noop).await {
            Ok(_) => break,
            Err(e) if tokio::time::Instant::now() > deadline => {
                return Err(StartError::NotReady(e.message))
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
    let want = nimbus_state::machine::NetworkSettings {
        pool: app.cfg.network_pool.clone(),
        prefix: app.cfg.net_prefix.clone(),
        ..Default::default()
    };
    if app.read(|s| s.network.pool != want.pool || s.network.prefix != want.prefix) {
        if let Err(e) = app
            .propose(Command::ConfigureNetwork {
                pool: want.pool.clone(),
                prefix: want.prefix.clone(),
                mtu: 0,
                vxlan_port: 0,
            })
            .await
        {
            if app.read(|s| s.networks.is_empty()) {
                return Err(StartError::NotReady(e.message));
            }
            tracing::warn!("keeping the existing network settings: {}", e.message);
        }
    }
    if !app.read(|s| s.projects.contains_key("default")) {
        app.propose(Command::CreateProject {
            name: "default".into(),
            description: "the default project".into(),
            idempotency_key: None,
        })
        .await
        .or_else(|e| {
            if e.code == nimbus_api::ErrorCode::AlreadyExists {
                Ok(nimbus_state::CommandOutput::None)
            } else {
                Err(e)
            }
        })
        .map_err(|e| StartError::NotReady(e.message))?;
    }
    if !app.read(|s| s.images.contains_key("busybox")) {
        let busybox = Path::new("/bin/busybox");
        if busybox.exists() {
            let store = app.images.clone();
            let img =
                tokio::task::spawn_blocking(move || store.build_busybox(Path::new("/bin/busybox")))
                    .await
                    .map_err(|e| StartError::NotReady(e.to_string()))?;
            match img {
                Ok(img) => {
                    routes::images::put(app, &img)
                        .await
                        .map_err(|e| StartError::NotReady(e.message))?;
                    tracing::info!(digest = %img.digest, "built-in busybox image created");
                }
                Err(e) => tracing::warn!("cannot build the built-in busybox image: {e}"),
            }
        } else {
            tracing::warn!(
                "/bin/busybox is missing (install busybox-static): no built-in busybox image"
            );
        }
    }
    if app.keys.present() {
        routes::secrets::migrate_lb_keys(app).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_kept_as_hashes_after_their_creation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        let hash = load_or_create_token_hash(&path).unwrap();
        let token = std::fs::read_to_string(&path).unwrap();
        assert_eq!(hash, auth::token_hash(token.trim()));
        // The plain file is the client's copy: the server goes by the hash.
        std::fs::write(&path, "changed").unwrap();
        assert_eq!(load_or_create_token_hash(&path).unwrap(), hash);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(load_or_create_token_hash(&path).unwrap(), hash);
        // A data dir of an earlier build (plain file only) gets its hash.
        let old = dir.path().join("node.token");
        std::fs::write(&old, "t0\n").unwrap();
        assert_eq!(
            load_or_create_token_hash(&old).unwrap(),
            auth::token_hash("t0")
        );
        assert!(token_hash_path(&old).exists());
    }

    #[test]
    fn a_server_joining_others_needs_the_cluster_secret() {
        let dir = tempfile::tempdir().unwrap();
        let join = ClusterOptions {
            join: vec!["http://10.0.0.1:7443".into()],
            ..ClusterOptions::default()
        };
        let e = cluster_secret(dir.path(), &join).unwrap_err();
        assert!(e.to_string().contains("--cluster-secret-file"), "{e}");
        // A stand-alone server creates one (and keeps it).
        let s = cluster_secret(dir.path(), &ClusterOptions::single()).unwrap();
        assert_eq!(s.len(), 64);
        assert_eq!(cluster_secret(dir.path(), &join).unwrap(), s);
    }
}
