//! The CA: creation, loading, and issuing leaf certificates from CSRs.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use crate::{Identity, PkiError};

/// How far back a leaf's validity starts at most (clock skew between machines); a tenth of
/// the lifetime if that is shorter, so renewal at 2/3 of the validity stays after issuance.
pub const BACKDATE: Duration = Duration::from_secs(60);

/// The cluster CA: its certificate and signing key.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    cert_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// A certificate the CA issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The leaf certificate, PEM.
    pub cert_pem: String,
    /// Its serial number (hex).
    pub serial: String,
    /// Its expiry (Unix seconds).
    pub not_after: i64,
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

fn offset(t: SystemTime) -> Result<time::OffsetDateTime, PkiError> {
    time::OffsetDateTime::from_unix_timestamp(unix(t))
        .map_err(|e| PkiError::Invalid(format!("time out of range: {e}")))
}

impl Ca {
    /// A new self-signed CA (ECDSA P-256, valid 10 years) named after the cluster.
    pub fn generate(cluster: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("nimbus cluster CA {cluster}"));
        dn.push(DnType::OrganizationName, "nimbus");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = offset(now - BACKDATE)?;
        params.not_after = offset(now + Duration::from_secs(10 * 365 * 86_400))?;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        Ok(Self {
            cert,
            key,
            cert_pem,
        })
    }

    /// The CA from its certificate and key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem)?;
        // Re-signing the parsed parameters gives an issuer with the same name and key; the
        // certificate peers trust stays the original PEM.
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert,
            key,
            cert_pem: cert_pem.to_owned(),
        })
    }

    /// The CA certificate (PEM), what every peer trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key (PEM). Keep it sealed or in a 0600 file.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The CA certificate's fingerprint.
    pub fn fingerprint(&self) -> String {
        crate::certs_from_pem(&self.cert_pem)
            .ok()
            .and_then(|c| c.first().map(|d| crate::fingerprint(d)))
            .unwrap_or_default()
    }

    /// Issues a leaf certificate for `id` over the public key of `csr_pem` (the CSR's own
    /// names are ignored), valid from a little before now (see [`BACKDATE`]) until `lifetime`
    /// from now, with `dns` and
    /// `ips` as extra SANs (so stock clients can check a host name too).
    pub fn issue(
        &self,
        csr_pem: &str,
        id: &Identity,
        lifetime: Duration,
        dns: &[String],
        ips: &[std::net::IpAddr],
    ) -> Result<Issued, PkiError> {
        self.issue_between(
            csr_pem,
            id,
            SystemTime::now() - BACKDATE,
            SystemTime::now() + lifetime,
            dns,
            ips,
        )
    }

    /// [`Ca::issue`] with an explicit validity window (tests issue expired certificates).
    pub fn issue_between(
        &self,
        csr_pem: &str,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
        dns: &[String],
        ips: &[std::net::IpAddr],
    ) -> Result<Issued, PkiError> {
        if !crate::valid_name(&id.name) {
            return Err(PkiError::Invalid(format!(
                "invalid certificate name {:?}: use 1 to 63 lowercase letters, digits or '-'",
                id.name
            )));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Invalid(format!("invalid certificate signing request: {e}")))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, id.name.clone());
        dn.push(DnType::OrganizationalUnitName, id.role.as_str());
        dn.push(DnType::OrganizationName, "nimbus");
        params.distinguished_name = dn;
        let uri = rcgen::Ia5String::try_from(id.uri())?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        for d in dns {
            if let Ok(n) = rcgen::Ia5String::try_from(d.as_str()) {
                params.subject_alt_names.push(SanType::DnsName(n));
            }
        }
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = offset(not_before)?;
        params.not_after = offset(not_after)?;
        let serial = random_serial();
        let serial_hex = hex::encode(serial.as_ref());
        params.serial_number = Some(serial);
        let cert = params.signed_by(&csr.public_key, &self.cert, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            serial: serial_hex,
            not_after: unix(not_after),
        })
    }
}

/// A random positive 128-bit serial.
fn random_serial() -> SerialNumber {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b[0] &= 0x7f;
    b[0] |= 0x01;
    SerialNumber::from_slice(&b)
}

/// A fresh ECDSA P-256 key (PEM) and a CSR over it naming `id`; the key never leaves the
/// machine that calls this.
pub fn new_key_and_csr(id: &Identity) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, id.name.clone());
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(rcgen::Ia5String::try_from(id.uri())?)];
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// Checks that `csr_pem` is a well-formed, correctly self-signed CSR.
pub fn check_csr(csr_pem: &str) -> Result<(), PkiError> {
    CertificateSigningRequestParams::from_pem(csr_pem)
        .map(|_| ())
        .map_err(|e| PkiError::Invalid(format!("invalid certificate signing request: {e}")))
}
