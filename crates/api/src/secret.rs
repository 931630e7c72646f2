//! Secrets: the resource (metadata only, never the value), the create request, how an
//! instance uses a secret, and their validation.
//!
//! A secret's value travels in exactly three places: the create request (base64 `data`), the
//! replicated state (sealed under the cluster master key, see `nimbus-seal`) and the answer to
//! the node that runs an instance using it ([`InstanceSecrets`]). It is never part of a
//! [`Secret`], an event, a log line or an error message.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use zeroize::Zeroizing;

use crate::validate::name;
use crate::{ApiError, ErrorCode, Meta};

/// Largest secret value in bytes (64 KiB).
pub const MAX_SECRET_BYTES: usize = 64 * 1024;
/// Most secrets one instance may use.
pub const MAX_SECRET_USES: usize = 32;

/// A secret's metadata. The value is never returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Secret {
    /// Metadata.
    #[serde(flatten)]
    pub meta: Meta,
    /// Size of the value in bytes.
    pub size_bytes: u64,
    /// Id of the master key its data key is wrapped with (changes on rotation).
    pub key_id: String,
}

/// `POST /v1/projects/{project}/secrets`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateSecretRequest {
    /// Name (DNS label, unique in the project).
    pub name: String,
    /// The value, base64 (standard alphabet, padded); at most 64 KiB decoded.
    pub data: String,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl std::fmt::Debug for CreateSecretRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateSecretRequest")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Drop for CreateSecretRequest {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.data);
    }
}

/// Validates a create request and decodes its value.
pub fn create_secret(req: &CreateSecretRequest) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    name("name", &req.name)?;
    for (k, v) in &req.labels {
        crate::validate::label(k, v)?;
    }
    // Refuse by the encoded length first, so a huge body is not decoded.
    if req.data.len() > MAX_SECRET_BYTES.div_ceil(3) * 4 + 4 {
        return Err(too_large(req.data.len() / 4 * 3));
    }
    let value = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(req.data.as_bytes())
            .map_err(|_| ApiError::invalid("data", "data must be base64 (standard alphabet)"))?,
    );
    if value.len() > MAX_SECRET_BYTES {
        return Err(too_large(value.len()));
    }
    Ok(value)
}

fn too_large(len: usize) -> ApiError {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!("the secret is {len} bytes; the limit is 64 KiB ({MAX_SECRET_BYTES} bytes)"),
    )
    .with_field("data")
}

/// Encodes a value for [`CreateSecretRequest::data`].
pub fn encode(value: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(value)
}

/// How an instance uses a secret: as a read-only file at `path`, or as the environment
/// variable `env` (exactly one of them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretUse {
    /// Secret name (in the instance's project).
    pub secret: String,
    /// Absolute path of the file inside the instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Environment variable name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
}

/// Validates the secret uses of an instance (`env` is its plain environment, which a secret
/// variable may not shadow).
pub fn secret_uses(uses: &[SecretUse], env: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if uses.is_empty() {
        return Ok(());
    }
    if uses.len() > MAX_SECRET_USES {
        return Err(ApiError::invalid(
            "secrets",
            format!("at most {MAX_SECRET_USES} secrets per instance"),
        ));
    }
    let mut paths = BTreeSet::new();
    let mut vars = BTreeSet::new();
    for (i, u) in uses.iter().enumerate() {
        let field = format!("secrets[{i}]");
        name(&format!("{field}.secret"), &u.secret)?;
        match (&u.path, &u.env) {
            (Some(p), None) => {
                secret_path(&format!("{field}.path"), p)?;
                if !paths.insert(p.as_str()) {
                    return Err(ApiError::invalid(
                        format!("{field}.path"),
                        format!("two secrets use the path {p:?}"),
                    ));
                }
            }
            (None, Some(v)) => {
                env_name(&format!("{field}.env"), v)?;
                if env.contains_key(v) || !vars.insert(v.as_str()) {
                    return Err(ApiError::invalid(
                        format!("{field}.env"),
                        format!("the environment variable {v:?} is set twice"),
                    ));
                }
            }
            _ => {
                return Err(ApiError::invalid(
                    field,
                    "give exactly one of path (a file) or env (a variable)",
                ))
            }
        }
    }
    Ok(())
}

/// A secret file's path: absolute, normalized (no `.`/`..`/empty parts), not `/`, no NUL, and
/// not under the runtime's own mounts (`/proc`, `/sys`, `/dev`).
fn secret_path(field: &str, p: &str) -> Result<(), ApiError> {
    let bad = |why: &str| {
        Err(ApiError::invalid(
            field,
            format!("invalid path {p:?}: {why}"),
        ))
    };
    if !p.starts_with('/') || p.len() < 2 {
        return bad("must be an absolute file path");
    }
    if p.len() > 1024 || p.contains('\0') {
        return bad("at most 1024 characters, no NUL");
    }
    if p[1..]
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return bad("no empty, '.' or '..' components");
    }
    let top = p[1..].split('/').next().unwrap_or("");
    if matches!(top, "proc" | "sys" | "dev") {
        return bad("not under /proc, /sys or /dev");
    }
    Ok(())
}

/// An environment variable name: `[A-Za-z_][A-Za-z0-9_]*`, at most 255 characters.
fn env_name(field: &str, v: &str) -> Result<(), ApiError> {
    let ok = !v.is_empty()
        && v.len() <= 255
        && !v.as_bytes()[0].is_ascii_digit()
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            format!("invalid environment variable name {v:?}"),
        ))
    }
}

/// `GET /v1/nodes/{node}/instances/{id}/secrets`: the unsealed values an instance uses, for
/// the node that runs it only.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
pub struct InstanceSecrets {
    /// Files: path inside the instance -> value (base64).
    pub files: BTreeMap<String, String>,
    /// Environment: variable -> value (the secret must be UTF-8 without NUL).
    pub env: BTreeMap<String, String>,
}

impl std::fmt::Debug for InstanceSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceSecrets")
            .field("files", &self.files.keys().collect::<Vec<_>>())
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Drop for InstanceSecrets {
    fn drop(&mut self) {
        use zeroize::Zeroize as _;
        for v in self.files.values_mut().chain(self.env.values_mut()) {
            v.zeroize();
        }
    }
}

/// Decodes a file value of [`InstanceSecrets::files`].
pub fn decode(data: &str) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    base64::engine::general_purpose::STANDARD
        .decode(data.as_bytes())
        .map(Zeroizing::new)
        .map_err(|_| ApiError::invalid("data", "data must be base64 (standard alphabet)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn use_(secret: &str, path: Option<&str>, env: Option<&str>) -> SecretUse {
        SecretUse {
            secret: secret.into(),
            path: path.map(Into::into),
            env: env.map(Into::into),
        }
    }

    #[test]
    fn create_decodes_and_refuses_oversize_and_garbage() {
        let mut req = CreateSecretRequest {
            name: "db".into(),
            data: encode(b"pw"),
            labels: BTreeMap::new(),
        };
        assert_eq!(create_secret(&req).unwrap().as_slice(), b"pw");
        req.data = encode(&vec![7u8; MAX_SECRET_BYTES]);
        assert_eq!(create_secret(&req).unwrap().len(), MAX_SECRET_BYTES);
        req.data = encode(&vec![7u8; MAX_SECRET_BYTES + 1]);
        let e = create_secret(&req).unwrap_err();
        assert_eq!(e.code, ErrorCode::PayloadTooLarge);
        assert_eq!(e.field.as_deref(), Some("data"));
        req.data = "a".repeat(10 << 20);
        assert_eq!(
            create_secret(&req).unwrap_err().code,
            ErrorCode::PayloadTooLarge
        );
        req.data = "not base64!".into();
        let e = create_secret(&req).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(!e.message.contains("not base64!"));
        req.data = encode(b"x");
        req.name = "Bad_Name".into();
        assert_eq!(
            create_secret(&req).unwrap_err().field.as_deref(),
            Some("name")
        );
    }

    #[test]
    fn uses_are_checked() {
        let env = BTreeMap::from([("PLAIN".to_string(), "1".to_string())]);
        let ok = [
            use_("a", Some("/run/secrets/a"), None),
            use_("a", None, Some("A_PW")),
        ];
        secret_uses(&ok, &env).unwrap();
        let field = |u: &[SecretUse]| secret_uses(u, &env).unwrap_err().field.unwrap();
        assert_eq!(field(&[use_("a", None, None)]), "secrets[0]");
        assert_eq!(field(&[use_("a", Some("/x"), Some("X"))]), "secrets[0]");
        assert_eq!(field(&[use_("a", Some("rel"), None)]), "secrets[0].path");
        assert_eq!(
            field(&[use_("a", Some("/a/../b"), None)]),
            "secrets[0].path"
        );
        assert_eq!(
            field(&[use_("a", Some("/proc/x"), None)]),
            "secrets[0].path"
        );
        assert_eq!(field(&[use_("a", Some("/"), None)]), "secrets[0].path");
        assert_eq!(field(&[use_("a", None, Some("1X"))]), "secrets[0].env");
        assert_eq!(field(&[use_("a", None, Some("PLAIN"))]), "secrets[0].env");
        assert_eq!(field(&[use_("A", None, Some("X"))]), "secrets[0].secret");
        assert_eq!(
            field(&[use_("a", Some("/x"), None), use_("b", Some("/x"), None)]),
            "secrets[1].path"
        );
    }
}
