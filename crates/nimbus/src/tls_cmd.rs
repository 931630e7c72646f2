//! TLS for the CLI and the agent: which cluster CA to trust, and a node's certificate.
//!
//! - **CLI**: an `https://` URL needs the cluster CA: `--ca FILE`, or the CA pinned on first
//!   use (like SSH's known hosts): the CLI fetches the chain the server presents, shows the
//!   CA's SHA-256 fingerprint and, on a terminal, asks; the answer is kept in
//!   `$XDG_CONFIG_HOME/nimbus/known_cas` (default `~/.config/nimbus`) with the CA in
//!   `cas/<hex>.pem`. Without a terminal an unknown CA is refused, its fingerprint printed.
//! - **Agent**: `nimbus agent --join-token T` generates a key in `<data-dir>/pki/node.key`
//!   (0600), sends a CSR with the token, and keeps the certificate and CA next to it; later
//!   starts reuse them. The certificate is renewed at 2/3 of its life over mTLS and swapped in
//!   place (open connections keep going).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nimbus_pki::{CertStore, ClusterServerVerifier, Identity, NoRevocation, Role};

/// `host:port` of an `http(s)://` URL (port 443 if none).
pub fn host_port(url: &str) -> Result<(String, u16)> {
    let rest = url
        .split_once("://")
        .map_or(url, |(_, r)| r)
        .split('/')
        .next()
        .unwrap_or_default();
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') && p.bytes().all(|b| b.is_ascii_digit()) => (
            h,
            p.parse()
                .with_context(|| format!("invalid port in {url}"))?,
        ),
        _ => (rest, 443),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        bail!("no host in URL {url:?}");
    }
    Ok((host.to_owned(), port))
}

/// The client config trusting `ca_pem` for a nimbus server (or an operator's certificate
/// from that CA naming the host).
pub fn client_config(ca_pem: &str, certs: Option<Arc<CertStore>>) -> Result<rustls::ClientConfig> {
    let roots = nimbus_pki::verify::roots(ca_pem)?;
    let v = ClusterServerVerifier::new(roots, vec![Role::Server], Arc::new(NoRevocation))
        .with_host_name_fallback()?;
    Ok(nimbus_pki::client_config(Arc::new(v), certs)?)
}

/// The chain the server at `url` presents, and the CA (its last certificate) after checking
/// that it signed the leaf: (CA PEM, fingerprint).
pub async fn probe_ca(url: &str) -> Result<(String, String)> {
    let (host, port) = host_port(url)?;
    let probe = Arc::new(nimbus_pki::config::ChainProbe::default());
    let cfg = nimbus_pki::pinning_probe_config(probe.clone())?;
    let tcp = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .with_context(|| format!("connecting to {url}: timed out"))?
    .with_context(|| format!("connecting to {url}"))?;
    let name = rustls::pki_types::ServerName::try_from(host.clone()).unwrap_or_else(|_| {
        rustls::pki_types::ServerName::try_from("nimbus").expect("static name")
    });
    let _ = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name.clone(), tcp)
        .await;
    let chain = probe.chain.lock().map(|c| c.clone()).unwrap_or_default();
    let (Some(leaf), Some(ca)) = (chain.first(), chain.last()) else {
        bail!("{url} did not present a TLS certificate (is it a nimbus server with TLS?)");
    };
    if chain.len() < 2 {
        bail!("{url} presented no CA certificate with its own: pass --ca FILE");
    }
    let ca_pem = nimbus_pki::cert_pem(ca);
    let roots = nimbus_pki::verify::roots(&ca_pem)?;
    let v = ClusterServerVerifier::new(roots, vec![Role::Server], Arc::new(NoRevocation))
        .with_host_name_fallback()?;
    rustls::client::danger::ServerCertVerifier::verify_server_cert(
        &v,
        leaf,
        &chain[1..chain.len() - 1],
        &name,
        &[],
        rustls::pki_types::UnixTime::now(),
    )
    .map_err(|e| {
        anyhow::anyhow!("the certificate of {url} does not check out against its own CA: {e}")
    })?;
    Ok((ca_pem, nimbus_pki::fingerprint(ca)))
}

fn config_dir() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from(".config"))
        .join("nimbus")
}

fn write_file(path: &Path, data: &str, mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(data.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// The CA pinned for `host:port`, if any.
fn pinned(server: &str) -> Option<String> {
    let dir = config_dir();
    let known = std::fs::read_to_string(dir.join("known_cas")).ok()?;
    let fp = known.lines().find_map(|l| {
        let (s, fp) = l.split_once(' ')?;
        (s == server).then(|| fp.trim().to_owned())
    })?;
    let hexfp = fp.strip_prefix("sha256:")?;
    let pem = std::fs::read_to_string(dir.join("cas").join(format!("{hexfp}.pem"))).ok()?;
    let der = nimbus_pki::certs_from_pem(&pem).ok()?;
    (nimbus_pki::fingerprint(der.first()?) == fp).then_some(pem)
}

fn pin(server: &str, ca_pem: &str, fp: &str) -> Result<()> {
    let dir = config_dir();
    let hexfp = fp.trim_start_matches("sha256:");
    write_file(&dir.join("cas").join(format!("{hexfp}.pem")), ca_pem, 0o644)?;
    let known = std::fs::read_to_string(dir.join("known_cas")).unwrap_or_default();
    let mut lines: Vec<String> = known
        .lines()
        .filter(|l| l.split(' ').next() != Some(server))
        .map(str::to_owned)
        .collect();
    lines.push(format!("{server} {fp}"));
    write_file(&dir.join("known_cas"), &(lines.join("\n") + "\n"), 0o644)
}

/// The TLS config of the CLI for `url`: `None` for `http://`.
pub async fn cli_tls(url: &str, ca: Option<&Path>) -> Result<Option<rustls::ClientConfig>> {
    if !url.starts_with("https://") {
        return Ok(None);
    }
    if let Some(ca) = ca {
        let pem = std::fs::read_to_string(ca)
            .with_context(|| format!("reading --ca {}", ca.display()))?;
        return Ok(Some(client_config(&pem, None)?));
    }
    let (host, port) = host_port(url)?;
    let server = format!("{host}:{port}");
    if let Some(pem) = pinned(&server) {
        return Ok(Some(client_config(&pem, None)?));
    }
    let (pem, fp) = probe_ca(url).await?;
    if !std::io::stdin().is_terminal() {
        bail!(
            "the cluster CA of {server} is unknown; its fingerprint is {fp}. Pass --ca FILE (the server's <data-dir>/pki/ca.crt), or run interactively once to pin it"
        );
    }
    eprintln!("The cluster CA of {server} is not known yet.\nIts fingerprint is {fp}\n(compare with what `nimbus server` printed at start).");
    eprint!("Trust it for {server}? [y/N] ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if !matches!(answer.trim(), "y" | "Y" | "yes") {
        bail!("not trusted: {server} ({fp})");
    }
    pin(&server, &pem, &fp)?;
    eprintln!(
        "pinned {fp} for {server} in {}",
        config_dir().join("known_cas").display()
    );
    Ok(Some(client_config(&pem, None)?))
}

/// A node's TLS: its certificate store, and the configs for the link to the servers and its
/// own API.
pub struct NodeTls {
    /// The node's certificate (swapped on renewal).
    pub store: Arc<CertStore>,
    /// Link to the servers: presents the node certificate, accepts server certificates.
    pub server_tls: rustls::ClientConfig,
    /// The agent API: verifies a server certificate if the client presents one (only
    /// `/metrics` and `/agent/healthz` answer a client without one; see `nimbus_agent::http`).
    pub api_tls: Arc<rustls::ServerConfig>,
    /// The server certificates both configs refuse (the agent keeps it current).
    pub revocation: Arc<nimbus_pki::ServerRevocationList>,
    dir: PathBuf,
}

fn node_configs(dir: &Path, ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<NodeTls> {
    let store = Arc::new(CertStore::new(&format!("{cert_pem}{ca_pem}"), key_pem)?);
    let roots = nimbus_pki::verify::roots(ca_pem)?;
    let revocation = Arc::new(nimbus_pki::ServerRevocationList::default());
    let server_tls = nimbus_pki::client_config(
        Arc::new(ClusterServerVerifier::new(
            roots.clone(),
            vec![Role::Server],
            revocation.clone(),
        )),
        Some(store.clone()),
    )?;
    let api_verifier = nimbus_pki::ClusterClientVerifier::new(
        roots,
        vec![Role::Server],
        revocation.clone(),
        false,
    )?;
    let api_tls = Arc::new(nimbus_pki::server_config(
        store.clone(),
        Some(Arc::new(api_verifier)),
    )?);
    Ok(NodeTls {
        store,
        server_tls,
        api_tls,
        revocation,
        dir: dir.to_owned(),
    })
}

/// The node's TLS from `<data-dir>/pki`, or by joining with `join_token` (the CA from `ca`,
/// or fetched and checked against `ca_fingerprint`); `None` if neither (the node-token path).
pub async fn node_tls(
    data_dir: &Path,
    name: &str,
    servers: &[String],
    join_token: Option<&str>,
    ca: Option<&Path>,
    ca_fingerprint: Option<&str>,
) -> Result<Option<NodeTls>> {
    let dir = data_dir.join("pki");
    let (crt, key, cap) = (
        dir.join("node.crt"),
        dir.join("node.key"),
        dir.join("ca.crt"),
    );
    if crt.exists() {
        let read = |p: &Path| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        let tls = node_configs(&dir, &read(&cap)?, &read(&crt)?, &read(&key)?)?;
        let cur = tls
            .store
            .current()
            .context("the node certificate names no nimbus identity")?;
        if cur.identity.name != name {
            bail!(
                "{} belongs to node {:?}, not {name:?}: use --name {} or another --data-dir",
                crt.display(),
                cur.identity.name,
                cur.identity.name
            );
        }
        if cur.not_after <= nimbus_server::identity::unix_now() {
            bail!(
                "the node certificate in {} expired; remove {} and join again with a new --join-token",
                crt.display(),
                dir.display()
            );
        }
        return Ok(Some(tls));
    }
    let Some(token) = join_token else {
        return Ok(None);
    };
    let server = servers.first().context("no --server given")?;
    if !server.starts_with("https://") {
        bail!("--join-token needs an https:// --server URL (got {server})");
    }
    let ca_pem = if let Some(ca) = ca {
        std::fs::read_to_string(ca).with_context(|| format!("reading --ca {}", ca.display()))?
    } else {
        let (pem, fp) = probe_ca(server).await?;
        match ca_fingerprint {
            Some(want) if want.trim().eq_ignore_ascii_case(&fp) => pem,
            Some(want) => bail!("the cluster CA of {server} has fingerprint {fp}, not {want}: refusing to join"),
            None => bail!(
                "the cluster CA of {server} is unknown; its fingerprint is {fp}. Pass --ca FILE or --ca-fingerprint {fp} after checking it"
            ),
        }
    };
    let id = Identity::new(Role::Agent, name);
    let (key_pem, csr) = nimbus_pki::new_key_and_csr(&id)?;
    let client = nimbus_client::Client::new(server.clone(), "", "default")
        .with_tls(client_config(&ca_pem, None)?);
    let issued = client
        .join_node(&nimbus_api::pki::NodeJoinRequest {
            join_token: token.trim().to_owned(),
            name: name.to_owned(),
            csr,
        })
        .await
        .map_err(|e| match e {
            nimbus_client::ClientError::Api(api) => anyhow::anyhow!(
                "joining the cluster: {} ({})",
                api.message,
                api.code.as_str()
            ),
            other => anyhow::Error::new(other).context("joining the cluster"),
        })?;
    write_file(&key, &key_pem, 0o600)?;
    write_file(&cap, &issued.ca_pem, 0o644)?;
    write_file(&crt, &issued.cert_pem, 0o644)?;
    tracing::info!(serial = %issued.serial, "joined the cluster: certificate in {}", crt.display());
    node_configs(&dir, &issued.ca_pem, &issued.cert_pem, &key_pem).map(Some)
}

impl NodeTls {
    /// Renews the certificate at 2/3 of its life through the servers, forever.
    pub fn spawn_renewal(&self, servers: Vec<String>) {
        let link = nimbus_agent::server_link::ServerLink::with_tls(
            servers,
            String::new(),
            Some(self.server_tls.clone()),
        );
        let store = self.store.clone();
        let dir = self.dir.clone();
        tokio::spawn(async move {
            loop {
                let Some(cur) = store.current() else { return };
                let due = nimbus_pki::renew_at(cur.not_before, cur.not_after);
                let wait = (due - nimbus_server::identity::unix_now()).max(1);
                tokio::time::sleep(Duration::from_secs(wait as u64)).await;
                if let Err(e) = renew_once(&store, &link, &dir, &cur.identity).await {
                    tracing::warn!("renewing the node certificate: {e:#}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        });
    }
}

async fn renew_once(
    store: &CertStore,
    link: &nimbus_agent::server_link::ServerLink,
    dir: &Path,
    id: &Identity,
) -> Result<()> {
    let (key_pem, csr) = nimbus_pki::new_key_and_csr(id)?;
    let issued = link.renew_cert(csr).await?;
    store.replace(&format!("{}{}", issued.cert_pem, issued.ca_pem), &key_pem)?;
    write_file(&dir.join("node.key"), &key_pem, 0o600)?;
    write_file(&dir.join("node.crt"), &issued.cert_pem, 0o644)?;
    tracing::info!(serial = %issued.serial, "renewed the node certificate");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::host_port;

    #[test]
    fn host_and_port_of_urls() {
        assert_eq!(
            host_port("https://10.0.0.1:7443").unwrap(),
            ("10.0.0.1".into(), 7443)
        );
        assert_eq!(host_port("https://srv/x").unwrap(), ("srv".into(), 443));
        assert_eq!(host_port("https://[::1]:9/").unwrap(), ("::1".into(), 9));
        assert!(host_port("https://").is_err());
        assert!(host_port("https://h:99999").is_err());
    }
}
