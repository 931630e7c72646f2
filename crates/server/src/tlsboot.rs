//! Forming a TLS cluster with `--bootstrap-expect N` (N > 1): which server's CA (and master
//! key) becomes the cluster's, settled before a server starts serving its API.
//!
//! Until a bootstrapping server holds the cluster CA ([`settle_ca`]) it serves only
//! `POST /raft/pki/hello` (TLS 1.3, with a certificate of a provisional CA kept in memory), and
//! polls its peers' hello, authenticating each answer with the shared cluster secret without
//! sending it:
//! 1. it learns the CA a peer presents (the chain of a handshake it refuses, as the CLI's
//!    first-use pinning does), then asks the peer over TLS verified against that CA, with a
//!    fresh 256-bit nonce;
//! 2. the peer answers its node id, URL, whether it is initialized and whether it holds the
//!    cluster CA for good, with HMAC-SHA256 under the cluster secret over the nonce, the
//!    fingerprint of its CA and that answer ([`hello_mac`]): a peer without the secret cannot
//!    answer, and an interceptor without the CA key cannot present the CA the answer names.
//!
//! Then, with `found` = this server and the peers that answered:
//! - a peer is initialized, or holds the cluster CA: this server takes the CA over from it as
//!   `--join` does ([`crate::peers::prepare_join`]: a CSR with the cluster secret, then the
//!   master key and the sealed CA key over mTLS), trusting the CA the hello authenticated;
//! - else, once `found` has N servers and this one has the lowest node id, its provisional CA
//!   becomes the cluster CA (kept in `<data-dir>/pki`, sealed under a new master key);
//! - else it waits (printing what for every 5 s).
//!
//! The lowest id is also the server that initializes Raft ([`crate::cluster`]); by then every
//! server presents a certificate of the one CA, so the cluster forms over mTLS as a `--join`ed
//! one does. A running server answers the same hello (`ready`), so servers that come late or
//! restart with an empty data dir take the CA over from it.
//!
//! | route | credential | what |
//! |---|---|---|
//! | `POST /raft/pki/hello` | none (the answer is authenticated) | [`HelloResponse`] |

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use nimbus_pki::{Ca, CertStore, Role};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::app::{AppState, ServerConfig};
use crate::masterkey::MasterKeys;
use crate::{ClusterOptions, StartError};

/// A server answers who it is, authenticated by the cluster secret.
pub const PATH_HELLO: &str = "/raft/pki/hello";

/// Domain separation of the hello MAC.
const HELLO_LABEL: &[u8] = b"nimbus-tls-bootstrap-hello-v1\n";

/// Length of a hello's nonce.
const NONCE_LEN: usize = 32;

/// How long a hello may take.
const HELLO_TIMEOUT: Duration = Duration::from_secs(3);

/// `POST /raft/pki/hello`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelloRequest {
    /// 32 random bytes, hex.
    pub nonce: String,
}

/// Who a server is (the authenticated part of [`HelloResponse`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloInfo {
    /// Its node id.
    pub node_id: u64,
    /// Its advertised URL.
    pub url: String,
    /// Whether it has a Raft membership.
    pub initialized: bool,
    /// Whether the CA it presents is the cluster CA for good (a running server), not a
    /// provisional one.
    pub ready: bool,
}

/// The answer to a hello.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelloResponse {
    /// [`HelloInfo`] as JSON (the exact bytes the MAC covers).
    pub info: String,
    /// HMAC-SHA256 (hex) under the cluster secret, see [`hello_mac`].
    pub mac: String,
}

/// The MAC of a hello answer: HMAC-SHA256 keyed by the cluster secret over a label, the
/// caller's nonce, the fingerprint of the CA the answering server presents and the answer.
pub fn hello_mac(secret: &str, nonce: &[u8], ca_fingerprint: &str, info: &str) -> ring::hmac::Tag {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(HELLO_LABEL);
    ctx.update(nonce);
    ctx.update(ca_fingerprint.as_bytes());
    ctx.update(b"\n");
    ctx.update(info.as_bytes());
    ctx.sign()
}

/// Checks a hello answer for `nonce` from a server presenting the CA `ca_fingerprint`.
pub fn check_hello(
    secret: &str,
    nonce: &[u8],
    ca_fingerprint: &str,
    resp: &HelloResponse,
) -> Result<HelloInfo, String> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut msg = Vec::with_capacity(256 + resp.info.len());
    msg.extend_from_slice(HELLO_LABEL);
    msg.extend_from_slice(nonce);
    msg.extend_from_slice(ca_fingerprint.as_bytes());
    msg.push(b'\n');
    msg.extend_from_slice(resp.info.as_bytes());
    let mac = hex::decode(&resp.mac).map_err(|_| "the hello MAC is not hex".to_string())?;
    ring::hmac::verify(&key, &msg, &mac).map_err(|_| {
        "its hello is not authenticated by this server's cluster secret: every server must share the same cluster.secret (--cluster-secret-file)".to_string()
    })?;
    serde_json::from_str(&resp.info).map_err(|e| format!("reading its hello: {e}"))
}

/// Answers a hello; only a nonce of exactly [`NONCE_LEN`] bytes is signed, so that the signed
/// message (fixed-length nonce and fingerprint) cannot be shifted into another.
fn answer(
    secret: &str,
    nonce_hex: &str,
    ca_fingerprint: &str,
    info: &HelloInfo,
) -> Result<Json<HelloResponse>, (StatusCode, &'static str)> {
    let nonce = hex::decode(nonce_hex)
        .ok()
        .filter(|n| n.len() == NONCE_LEN)
        .ok_or((StatusCode::BAD_REQUEST, "the nonce must be 32 bytes in hex"))?;
    let info = serde_json::to_string(info).unwrap_or_default();
    let mac = hello_mac(secret, &nonce, ca_fingerprint, &info);
    Ok(Json(HelloResponse {
        mac: hex::encode(mac.as_ref()),
        info,
    }))
}

/// The hello route of a running server (the gate lets it through without a certificate).
pub fn router(app: AppState) -> Router {
    Router::new().route(PATH_HELLO, post(hello)).with_state(app)
}

async fn hello(
    State(app): State<AppState>,
    Json(req): Json<HelloRequest>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let Some(ca) = app.pki.ca.as_ref() else {
        return (
            axum::http::StatusCode::CONFLICT,
            "this server runs without TLS",
        )
            .into_response();
    };
    let info = HelloInfo {
        node_id: app.raft.node_id(),
        url: app.raft.advertise_url().to_owned(),
        initialized: app.raft.is_initialized().await,
        ready: true,
    };
    answer(
        &app.creds.cluster_secret,
        &req.nonce,
        &ca.fingerprint(),
        &info,
    )
    .into_response()
}

fn host_port(url: &str) -> Result<(String, u16), String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("{url}: {e}"))?;
    let host = u
        .host_str()
        .ok_or_else(|| format!("{url}: no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = u
        .port_or_known_default()
        .ok_or_else(|| format!("{url}: no port"))?;
    Ok((host, port))
}

/// The CA certificate (PEM) the server at `url` presents with its own, unverified: the last
/// certificate of the chain of a handshake that is refused once the chain is recorded (nothing
/// is sent).
pub async fn presented_ca(url: &str) -> Result<String, String> {
    let (host, port) = host_port(url)?;
    let probe = Arc::new(nimbus_pki::config::ChainProbe::default());
    let cfg = nimbus_pki::pinning_probe_config(probe.clone()).map_err(|e| e.to_string())?;
    let tcp = tokio::time::timeout(
        HELLO_TIMEOUT,
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| format!("cannot reach {url}: timed out"))?
    .map_err(|e| format!("cannot reach {url}: {e}"))?;
    let name = rustls::pki_types::ServerName::try_from(host).unwrap_or_else(|_| {
        rustls::pki_types::ServerName::try_from("nimbus").expect("static name")
    });
    let _ = tokio::time::timeout(
        HELLO_TIMEOUT,
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await;
    let chain = probe.chain.lock().map(|c| c.clone()).unwrap_or_default();
    match chain.as_slice() {
        [_, .., ca] => Ok(nimbus_pki::cert_pem(ca)),
        _ => Err(format!(
            "{url} presented no certificate chain with its CA (is it a nimbus server with TLS?)"
        )),
    }
}

/// The fingerprint of the first certificate of `pem`.
pub fn pem_fingerprint(pem: &str) -> Option<String> {
    nimbus_pki::certs_from_pem(pem)
        .ok()
        .and_then(|c| c.first().map(|d| nimbus_pki::fingerprint(d)))
}

/// Says hello to the server at `url`: who it is (authenticated with `secret`) and its CA.
pub async fn say_hello(url: &str, secret: &str) -> Result<(HelloInfo, String), String> {
    use rand::RngCore;
    if !url.starts_with("https://") {
        return Err(format!(
            "{url}: the peers of a TLS server are https:// URLs"
        ));
    }
    let ca_pem = presented_ca(url).await?;
    let fp = pem_fingerprint(&ca_pem).ok_or_else(|| format!("{url}: unreadable CA"))?;
    let roots = nimbus_pki::verify::roots(&ca_pem).map_err(|e| e.to_string())?;
    let verifier = nimbus_pki::ClusterServerVerifier::new(
        roots,
        vec![Role::Server],
        Arc::new(nimbus_pki::NoRevocation),
    );
    let tls = nimbus_pki::client_config(Arc::new(verifier), None).map_err(|e| e.to_string())?;
    let http = crate::peers::client(
        Some(&tls),
        reqwest::Client::builder().timeout(HELLO_TIMEOUT),
    )
    .map_err(|e| e.to_string())?;
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let resp = http
        .post(format!("{}{PATH_HELLO}", url.trim_end_matches('/')))
        .json(&HelloRequest {
            nonce: hex::encode(nonce),
        })
        .send()
        .await
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url} answered HTTP {} to hello", resp.status()));
    }
    let resp: HelloResponse = resp
        .json()
        .await
        .map_err(|e| format!("reading the hello of {url}: {e}"))?;
    let info = check_hello(secret, &nonce, &fp, &resp).map_err(|e| format!("{url}: {e}"))?;
    Ok((info, ca_pem))
}

/// Whether this server must settle the cluster CA before it serves: TLS, `--bootstrap-expect`
/// N > 1, not joining, and no CA in its data dir yet.
pub fn must_settle(cfg: &ServerConfig, opts: &ClusterOptions) -> bool {
    cfg.tls.mode != crate::identity::TlsMode::Plain
        && opts.bootstrap_expect.is_some_and(|n| n > 1)
        && !crate::peers::must_prepare_join(cfg, &opts.join)
        && !cfg
            .data_dir
            .join(crate::identity::PKI_DIR)
            .join("ca.crt")
            .exists()
}

/// A peer that answered a hello.
struct Peer {
    url: String,
    info: HelloInfo,
    ca_pem: String,
}

/// Settles the cluster CA (see the module docs), serving the hello on `listener` meanwhile;
/// hands the listener back. Afterwards `<data-dir>/pki` holds the cluster CA and this server
/// the master key.
pub async fn settle_ca(
    cfg: &mut ServerConfig,
    listener: TcpListener,
    secret: &str,
    keys: &MasterKeys,
    opts: &ClusterOptions,
) -> Result<TcpListener, StartError> {
    let expect = opts.bootstrap_expect.unwrap_or(1);
    let me = cfg.node_id;
    let mut peers: Vec<String> = opts.peers.iter().chain(&opts.join).cloned().collect();
    peers.retain(|p| p.trim_end_matches('/') != cfg.advertise_url.trim_end_matches('/'));
    peers.dedup();
    let err = |m: String| StartError::Cluster(m);
    let ca = Ca::generate(&format!("{me:x}")).map_err(|e| err(e.to_string()))?;
    let fp = ca.fingerprint();
    let id = crate::peers::server_identity(me);
    let (key, csr) = nimbus_pki::new_key_and_csr(&id).map_err(|e| err(e.to_string()))?;
    let leaf = ca
        .issue(&csr, &id, Duration::from_secs(3600), &[], &[])
        .map_err(|e| err(e.to_string()))?;
    let store = CertStore::new(&format!("{}{}", leaf.cert_pem, ca.cert_pem()), &key)
        .map_err(|e| err(e.to_string()))?;
    let tls = nimbus_pki::server_config(Arc::new(store), None).map_err(|e| err(e.to_string()))?;
    let info = HelloInfo {
        node_id: me,
        url: cfg.advertise_url.clone(),
        initialized: false,
        ready: false,
    };
    let owned = secret.to_owned();
    let router =
        Router::new().route(
            PATH_HELLO,
            post(move |Json(req): Json<HelloRequest>| async move {
                answer(&owned, &req.nonce, &fp, &info)
            }),
        );
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let serving = crate::tls::serve_until(listener, router, Arc::new(tls), stopped);
    let outcome = decide(cfg, secret, keys, &ca, expect, &peers).await;
    let _ = stop.send(());
    let listener = serving
        .await
        .map_err(|e| err(format!("the bootstrap listener: {e}")))?;
    outcome.map(|()| listener)
}

async fn decide(
    cfg: &mut ServerConfig,
    secret: &str,
    keys: &MasterKeys,
    ca: &Ca,
    expect: usize,
    peers: &[String],
) -> Result<(), StartError> {
    let me = cfg.node_id;
    let mut last_msg = tokio::time::Instant::now() - Duration::from_secs(60);
    loop {
        let mut found: Vec<Peer> = Vec::new();
        let mut problems = Vec::new();
        for p in peers {
            match say_hello(p, secret).await {
                Ok((info, _)) if info.node_id == me => {}
                Ok((info, ca_pem)) => found.push(Peer {
                    url: p.clone(),
                    info,
                    ca_pem,
                }),
                Err(e) => problems.push(e),
            }
        }
        let source = found
            .iter()
            .filter(|p| p.info.initialized)
            .min_by_key(|p| p.info.node_id)
            .or_else(|| {
                found
                    .iter()
                    .filter(|p| p.info.ready)
                    .min_by_key(|p| p.info.node_id)
            });
        if let Some(src) = source {
            eprintln!(
                "nimbus server: taking the cluster CA {} over from server {} ({})",
                pem_fingerprint(&src.ca_pem).unwrap_or_default(),
                src.info.node_id,
                src.url
            );
            cfg.tls.cluster_ca = Some(src.ca_pem.clone());
            return crate::peers::prepare_join(cfg, secret, keys, std::slice::from_ref(&src.url))
                .await;
        }
        let mut ids: Vec<u64> = found.iter().map(|p| p.info.node_id).collect();
        ids.push(me);
        ids.sort_unstable();
        ids.dedup();
        if ids.len() >= expect && ids[0] == me {
            keys.create().map_err(StartError::Cluster)?;
            crate::identity::store_new_ca(&cfg.data_dir, ca, keys).map_err(StartError::Cluster)?;
            eprintln!(
                "nimbus server: {} servers found; this server's CA {} is the cluster CA",
                ids.len(),
                ca.fingerprint()
            );
            return Ok(());
        }
        if last_msg.elapsed() >= Duration::from_secs(5) {
            let msg = if ids.len() >= expect {
                format!(
                    "found {} servers; waiting for server {} to provide the cluster CA",
                    ids.len(),
                    ids[0]
                )
            } else {
                let more = expect - ids.len();
                let s = if more == 1 { "" } else { "s" };
                let mut m =
                    format!("waiting for {more} more server{s} (bootstrap-expect {expect})");
                if !problems.is_empty() {
                    m = format!("{m}: {}", problems.join("; "));
                }
                m
            };
            eprintln!("{msg}");
            tracing::warn!("{msg}");
            last_msg = tokio::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hello_is_authenticated_by_the_secret_the_nonce_and_the_ca() {
        let info = HelloInfo {
            node_id: 7,
            url: "https://10.0.0.1:7443".into(),
            initialized: false,
            ready: true,
        };
        let secret = "s".repeat(64);
        let nonce = [1u8; 32];
        let Json(resp) = answer(&secret, &hex::encode(nonce), "sha256:aa", &info).unwrap();
        // Only a 32-byte nonce is answered.
        assert!(answer(&secret, &hex::encode([1u8; 33]), "sha256:aa", &info).is_err());
        assert!(answer(&secret, "", "sha256:aa", &info).is_err());
        assert_eq!(check_hello(&secret, &nonce, "sha256:aa", &resp), Ok(info));
        // Another secret, another nonce (a replay), another CA (an interceptor's): refused.
        let other = "t".repeat(64);
        let e = check_hello(&other, &nonce, "sha256:aa", &resp).unwrap_err();
        assert!(e.contains("cluster secret"), "{e}");
        assert!(check_hello(&secret, &[2u8; 32], "sha256:aa", &resp).is_err());
        assert!(check_hello(&secret, &nonce, "sha256:bb", &resp).is_err());
        // A changed answer (e.g. a lower node id) too.
        let mut forged = resp.clone();
        forged.info = forged.info.replace("\"node_id\":7", "\"node_id\":1");
        assert!(check_hello(&secret, &nonce, "sha256:aa", &forged).is_err());
    }
}
