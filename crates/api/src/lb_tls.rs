//! TLS material checks for load balancers: PEM parses, the key matches the certificate, and the
//! certificate is valid now.

use crate::ApiError;

/// Check a PEM certificate chain and private key.
pub fn check(cert_pem: &str, key_pem: &str) -> Result<(), ApiError> {
    check_key(cert_pem, key_pem, "tls.key_pem")
}

/// Check a PEM certificate chain alone (parses, valid now).
pub fn check_cert(cert_pem: &str) -> Result<(), ApiError> {
    leaf_spki(cert_pem).map(drop)
}

/// Check that `key_pem` is a usable private key matching the certificate; errors about the
/// key name `key_field`. Messages never quote the key.
pub fn check_key(cert_pem: &str, key_pem: &str, key_field: &str) -> Result<(), ApiError> {
    let cert_spki = leaf_spki(cert_pem)?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| ApiError::invalid(key_field, format!("private key PEM: {e}")))?
        .ok_or_else(|| ApiError::invalid(key_field, "no private key found in the key PEM"))?;
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| ApiError::invalid(key_field, format!("unusable private key: {e}")))?;
    let Some(spki) = signing.public_key() else {
        return Err(ApiError::invalid(
            key_field,
            "cannot derive the public key of this private key",
        ));
    };
    if spki.as_ref() != cert_spki.as_slice() {
        return Err(ApiError::invalid(
            key_field,
            "the private key does not match the certificate",
        ));
    }
    Ok(())
}

/// The leaf certificate's SubjectPublicKeyInfo, after checking it parses and is valid now.
fn leaf_spki(cert_pem: &str) -> Result<Vec<u8>, ApiError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| ApiError::invalid("tls.cert_pem", format!("certificate PEM: {e}")))?;
    let Some(leaf) = certs.first() else {
        return Err(ApiError::invalid(
            "tls.cert_pem",
            "no certificate found in the certificate PEM",
        ));
    };
    let (_, x509) = x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| {
        ApiError::invalid("tls.cert_pem", format!("certificate does not parse: {e}"))
    })?;
    let validity = x509.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now > validity.not_after {
        return Err(ApiError::invalid(
            "tls.cert_pem",
            format!("the certificate expired on {}", validity.not_after),
        ));
    }
    if now < validity.not_before {
        return Err(ApiError::invalid(
            "tls.cert_pem",
            format!(
                "the certificate is not valid before {}",
                validity.not_before
            ),
        ));
    }
    Ok(x509.public_key().raw.to_vec())
}

#[cfg(test)]
mod tests {
    use super::check;

    fn cert(not_after: Option<(i32, u8, u8)>) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["example.test".to_string()]).unwrap();
        if let Some((y, m, d)) = not_after {
            p.not_before = rcgen::date_time_ymd(y - 1, m, d);
            p.not_after = rcgen::date_time_ymd(y, m, d);
        }
        let c = p.self_signed(&key).unwrap();
        (c.pem(), key.serialize_pem())
    }

    #[test]
    fn valid_mismatched_expired_and_garbage() {
        let (c, k) = cert(None);
        check(&c, &k).unwrap();
        let (_, other) = cert(None);
        let e = check(&c, &other).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("tls.key_pem"));
        assert!(e.message.contains("does not match"), "{}", e.message);
        let (old, old_key) = cert(Some((2020, 1, 1)));
        let e = check(&old, &old_key).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("tls.cert_pem"));
        assert!(e.message.contains("expired"), "{}", e.message);
        assert_eq!(
            check("garbage", &k).unwrap_err().field.as_deref(),
            Some("tls.cert_pem")
        );
        assert_eq!(
            check(&c, "garbage").unwrap_err().field.as_deref(),
            Some("tls.key_pem")
        );
    }
}
