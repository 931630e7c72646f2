use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::*;
use crate::verify::roots;

fn leaf(ca: &Ca, id: &Identity) -> (String, String, Issued) {
    let (key, csr) = new_key_and_csr(id).unwrap();
    let issued = ca
        .issue(&csr, id, Duration::from_secs(60), &[], &[])
        .unwrap();
    let chain = format!("{}{}", issued.cert_pem, ca.cert_pem());
    (chain, key, issued)
}

#[derive(Debug, Default)]
struct Revoked(Mutex<Vec<String>>);
impl Revocation for Revoked {
    fn is_revoked(&self, p: &PeerCert) -> bool {
        self.0
            .lock()
            .unwrap()
            .iter()
            .any(|s| *s == p.serial || *s == p.identity.name)
    }
}

/// Runs a TLS handshake in memory; Err on either side's refusal.
fn handshake(
    server: rustls::ServerConfig,
    client: rustls::ClientConfig,
) -> Result<(), rustls::Error> {
    let mut c = rustls::ClientConnection::new(Arc::new(client), "nimbus".try_into().unwrap())?;
    let mut s = rustls::ServerConnection::new(Arc::new(server))?;
    for _ in 0..10 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
        }
        let srv = s.process_new_packets();
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
        }
        let cl = c.process_new_packets();
        srv?;
        cl?;
        if !c.is_handshaking() && !s.is_handshaking() {
            assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
            return Ok(());
        }
    }
    panic!("handshake did not finish");
}

fn configs(
    ca: &Ca,
    server: (&str, &str),
    client: Option<(&str, &str)>,
    client_roles: Vec<Role>,
    mandatory: bool,
    revocation: Arc<dyn Revocation>,
) -> (rustls::ServerConfig, rustls::ClientConfig) {
    let roots = roots(ca.cert_pem()).unwrap();
    let sv = ClusterClientVerifier::new(roots.clone(), client_roles, revocation.clone(), mandatory)
        .unwrap();
    let scfg = server_config(
        Arc::new(CertStore::new(server.0, server.1).unwrap()),
        Some(Arc::new(sv)),
    )
    .unwrap();
    let cv = ClusterServerVerifier::new(roots, vec![Role::Server], revocation);
    let ccfg = client_config(
        Arc::new(cv),
        client.map(|(c, k)| Arc::new(CertStore::new(c, k).unwrap())),
    )
    .unwrap();
    (scfg, ccfg)
}

#[test]
fn identity_uri_round_trips_and_rejects_bad_names() {
    let id = Identity::new(Role::Agent, "node-1");
    assert_eq!(id.uri(), "nimbus://agent/node-1");
    assert_eq!(Identity::from_uri(&id.uri()), Some(id));
    assert_eq!(Identity::from_uri("nimbus://admin/x"), None);
    assert_eq!(Identity::from_uri("nimbus://agent/Bad_Name"), None);
    assert_eq!(Identity::from_uri("https://agent/x"), None);
}

#[test]
fn issued_leaf_names_identity_serial_and_lifetime() {
    let ca = Ca::generate("c1").unwrap();
    let id = Identity::new(Role::Agent, "n1");
    let (chain, _key, issued) = leaf(&ca, &id);
    let certs = certs_from_pem(&chain).unwrap();
    let peer = PeerCert::from_der(&certs[0]).unwrap();
    assert_eq!(peer.identity, id);
    assert_eq!(peer.serial, issued.serial);
    assert_eq!(peer.not_after, issued.not_after);
    assert!(
        (peer.not_after - peer.not_before - 120).abs() <= 1,
        "{peer:?}"
    );
    assert!(ca.fingerprint().starts_with("sha256:") && ca.fingerprint().len() == 71);
    assert_eq!(ca.fingerprint(), fingerprint(&certs[1]));
}

#[test]
fn bad_csr_and_bad_name_are_refused() {
    let ca = Ca::generate("c1").unwrap();
    let id = Identity::new(Role::Agent, "n1");
    assert!(matches!(
        ca.issue("not a csr", &id, Duration::from_secs(1), &[], &[]),
        Err(PkiError::Invalid(_))
    ));
    let (_, csr) = new_key_and_csr(&id).unwrap();
    let bad = Identity::new(Role::Agent, "../x");
    assert!(ca
        .issue(&csr, &bad, Duration::from_secs(1), &[], &[])
        .is_err());
}

#[test]
fn mutual_tls_13_between_cluster_members() {
    let ca = Ca::generate("c1").unwrap();
    let (sc, sk, _) = leaf(&ca, &Identity::new(Role::Server, "s1"));
    let (ac, ak, _) = leaf(&ca, &Identity::new(Role::Agent, "a1"));
    let (s, c) = configs(
        &ca,
        (&sc, &sk),
        Some((&ac, &ak)),
        vec![Role::Agent],
        true,
        Arc::new(NoRevocation),
    );
    handshake(s, c).unwrap();
}

#[test]
fn reloaded_ca_issues_certificates_the_original_verifies() {
    let ca = Ca::generate("c1").unwrap();
    let again = Ca::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
    let (sc, sk, _) = leaf(&again, &Identity::new(Role::Server, "s1"));
    let (s, c) = configs(
        &ca,
        (&sc, &sk),
        None,
        vec![Role::Agent],
        false,
        Arc::new(NoRevocation),
    );
    handshake(s, c).unwrap();
}

#[test]
fn foreign_ca_client_certificate_is_refused() {
    let ca = Ca::generate("c1").unwrap();
    let other = Ca::generate("evil").unwrap();
    let (sc, sk, _) = leaf(&ca, &Identity::new(Role::Server, "s1"));
    let (ac, ak, _) = leaf(&other, &Identity::new(Role::Agent, "a1"));
    let (s, c) = configs(
        &ca,
        (&sc, &sk),
        Some((&ac, &ak)),
        vec![Role::Agent],
        false,
        Arc::new(NoRevocation),
    );
    assert!(handshake(s, c).is_err());
}

#[test]
fn foreign_ca_server_is_refused_by_the_client() {
    let ca = Ca::generate("c1").unwrap();
    let other = Ca::generate("evil").unwrap();
    let (sc, sk, _) = leaf(&other, &Identity::new(Role::Server, "s1"));
    let (s, c) = configs(
        &ca,
        (&sc, &sk),
        None,
        vec![Role::Agent],
        false,
        Arc::new(NoRevocation),
    );
    let err = handshake(s, c).unwrap_err();
    assert!(
        matches!(err, rustls::Error::InvalidCertificate(_)),
        "{err:?}"
    );
}

#[test]
fn expired_client_certificate_is_refused() {
    let ca = Ca::generate("c1").unwrap();
    let (sc, sk, _) = leaf(&ca, &Identity::new(Role::Server, "s1"));
    let id = Identity::new(Role::Agent, "a1");
    let (ak, csr) = new_key_and_csr(&id).unwrap();
    let now = SystemTime::now();
    let old = ca
        .issue_between(
            &csr,
            &id,
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
            &[],
            &[],
        )
        .unwrap();
    let ac = format!("{}{}", old.cert_pem, ca.cert_pem());
    let (s, c) = configs(
        &ca,
        (&sc, &sk),
        Some((&ac, &ak)),
        vec![Role::Agent],
        false,
        Arc::new(NoRevocation),
    );
    assert!(handshake(s, c).is_err());
}

#[test]
fn wrong_role_is_refused() {
    let ca = Ca::generate("c1").unwrap();
    let (sc, sk, _) = leaf(&ca, &Identity::new(Role::Server, "s1"));
    let (ac, ak, _) = leaf(&ca, &Identity::new(Role::Agent, "a1"));
    // The agent API accepts only servers: an agent certificate as client is refused.
    let (s, c) = configs(
        &ca,
        (&sc, &sk),
        Some((&ac, &ak)),
        vec![Role::Server],
        true,
        Arc::new(NoRevocation),
    );
    assert!(handshake(s, c).is_err());
    // A client expecting a server refuses an agent's certificate as server.
    let (s, c) = configs(
        &ca,
        (&ac, &ak),
        None,
        vec![Role::Agent],
        false,
        Arc::new(NoRevocation),
    );
    assert!(handshake(s, c).is_err());
}

#[test]
fn revoked_serial_or_holder_is_refused() {
    let ca = Ca::generate("c1").unwrap();
    let (sc, sk, _) = leaf(&ca, &Identity::new(Role::Server, "s1"));
    let (ac, ak, issued) = leaf(&ca, &Identity::new(Role::Agent, "a1"));
    let rev = Arc::new(Revoked::default());
    let (s, c) = configs(
        &ca,
        (&sc, &sk),
        Some((&ac, &ak)),
        vec![Role::Agent],
        false,
        rev.clone(),
    );
    handshake(s.clone(), c.clone()).unwrap();
    rev.0.lock().unwrap().push(issued.serial.clone());
    assert!(handshake(s.clone(), c.clone()).is_err());
    rev.0.lock().unwrap().clear();
    rev.0.lock().unwrap().push("a1".into());
    assert!(handshake(s, c).is_err());
}

#[test]
fn store_swaps_certificate_for_new_handshakes() {
    let ca = Ca::generate("c1").unwrap();
    let (c1, k1, i1) = leaf(&ca, &Identity::new(Role::Server, "s1"));
    let (c2, k2, i2) = leaf(&ca, &Identity::new(Role::Server, "s1"));
    let store = CertStore::new(&c1, &k1).unwrap();
    assert_eq!(store.current().unwrap().serial, i1.serial);
    store.replace(&c2, &k2).unwrap();
    assert_eq!(store.current().unwrap().serial, i2.serial);
    assert!(store.replace("junk", &k2).is_err());
    assert_eq!(store.current().unwrap().serial, i2.serial);
}

#[test]
fn renewal_is_due_at_two_thirds_of_life() {
    assert_eq!(renew_at(1000, 1030), 1020);
    assert_eq!(renew_at(0, 86_400), 57_600);
    assert_eq!(renew_at(10, 5), 10);
}

#[test]
fn pem_encoding_round_trips() {
    let ca = Ca::generate("c1").unwrap();
    let der = certs_from_pem(ca.cert_pem()).unwrap().remove(0);
    let again = certs_from_pem(&cert_pem(&der)).unwrap().remove(0);
    assert_eq!(der, again);
}
