//! Persistent volumes and storage pools: the resources, their requests, how an instance uses
//! a volume, and their validation (what does not depend on the state; `apply` checks the
//! rest: the pool, attachments, snapshots, sizes against the stored ones).
//!
//! No data path yet: a volume is a record (size, pool, snapshots, attachments) that agents do
//! not act on, and `apply` refuses an instance naming volumes (see docs/design.md, Volumes).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::validate::{json_size, name};
use crate::{ApiError, Meta};

/// The pool every cluster has without set-up (driver `local`).
pub const DEFAULT_POOL: &str = "local";
/// Largest volume (16 TiB): the maximum `create` and `resize` accept.
pub const MAX_VOLUME_BYTES: u64 = 16 << 40;
/// Most snapshots one volume keeps.
pub const MAX_SNAPSHOTS: usize = 256;
/// Most volumes one instance may use.
pub const MAX_VOLUME_USES: usize = 16;

/// Where a pool keeps its volumes' data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum StorageDriver {
    /// A file per volume under the agent's data dir of one node: the volume belongs to that
    /// node.
    #[default]
    Local,
    /// RBD images in a Ceph cluster, reachable from every node.
    Ceph,
}

impl StorageDriver {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Ceph => "ceph",
        }
    }
}

/// How a `ceph` pool reaches its cluster. The cephx key is kept as a sealed secret, never here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CephPoolConfig {
    /// Monitor addresses (`host:port`).
    pub monitors: Vec<String>,
    /// The RADOS pool RBD images are made in.
    pub pool: String,
    /// The cephx user (without `client.`).
    pub user: String,
    /// The secret (project `default`) holding the cephx key.
    pub key_secret: String,
}

/// A storage pool (cluster-scoped).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StoragePool {
    /// Metadata (`project` is empty).
    #[serde(flatten)]
    pub meta: Meta,
    /// Driver.
    pub driver: StorageDriver,
    /// Driver settings (`ceph` pools only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceph: Option<CephPoolConfig>,
}

/// A volume's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    /// Its driver is making it.
    Creating,
    /// Ready, attached to nothing.
    #[default]
    Available,
    /// Attached to at least one instance.
    Attached,
    /// Its driver is removing it.
    Deleting,
    /// Its driver failed; `reason` says why.
    Error,
}

impl VolumeState {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Available => "available",
            Self::Attached => "attached",
            Self::Deleting => "deleting",
            Self::Error => "error",
        }
    }
}

/// An instance a volume is attached to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VolumeAttachment {
    /// Instance id.
    pub instance_id: String,
    /// Instance name.
    pub instance: String,
    /// Mount path inside the instance (none: a raw disk of a VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// A point-in-time copy of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VolumeSnapshot {
    /// Unique id.
    pub id: String,
    /// Name, unique within its volume.
    pub name: String,
    /// The volume's size when it was taken.
    pub size_bytes: u64,
    /// When it was taken, RFC 3339.
    pub created_at: String,
}

/// A persistent volume (project-scoped).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Volume {
    /// Metadata.
    #[serde(flatten)]
    pub meta: Meta,
    /// Size in bytes (what quotas count).
    pub size_bytes: u64,
    /// Pool.
    pub pool: String,
    /// The pool's driver when it was created.
    pub driver: StorageDriver,
    /// Encrypted at rest (LUKS, one key per volume).
    #[serde(default)]
    pub encrypted: bool,
    /// May be attached to several VMs at once (raw block, VMs only).
    #[serde(default)]
    pub shared: bool,
    /// The node holding a `local` volume (set when first attached).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Instances it is attached to.
    #[serde(default)]
    pub attachments: Vec<VolumeAttachment>,
    /// Snapshots, oldest first.
    #[serde(default)]
    pub snapshots: Vec<VolumeSnapshot>,
    /// State.
    pub state: VolumeState,
    /// Why it is in `error` (empty otherwise).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// `POST /v1/projects/{project}/volumes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateVolumeRequest {
    /// Name (DNS label, unique in the project).
    pub name: String,
    /// Size: bytes as a number or a size string (`10G`), at most 16 TiB.
    pub size: serde_json::Value,
    /// Pool (default `local`).
    #[serde(default)]
    pub pool: Option<String>,
    /// Encrypt at rest.
    #[serde(default)]
    pub encrypted: bool,
    /// Attachable to several VMs at once (raw block, VMs only).
    #[serde(default)]
    pub shared: bool,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A validated create: what `apply` needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeDraft {
    /// Name.
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Pool.
    pub pool: String,
    /// Encrypted.
    pub encrypted: bool,
    /// Shared.
    pub shared: bool,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// `POST /v1/projects/{project}/volumes/{name}/snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotVolumeRequest {
    /// Snapshot name (DNS label, unique in the volume).
    pub name: String,
}

/// `POST /v1/projects/{project}/volumes/{name}/resize`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResizeVolumeRequest {
    /// New size (bytes or a size string), not below the current one.
    pub size: serde_json::Value,
    /// Expected resource version (optimistic concurrency).
    #[serde(default)]
    pub version: Option<u64>,
}

/// `POST /v1/projects/{project}/volumes/{name}/restore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreVolumeRequest {
    /// Snapshot: `SNAP` or `VOLUME@SNAP` (`VOLUME` must be this volume).
    pub snapshot: String,
    /// Expected resource version (optimistic concurrency).
    #[serde(default)]
    pub version: Option<u64>,
}

/// How an instance uses a volume: mounted at `path` (containers; VMs: the guest mounts it),
/// or a raw disk (VMs, no path).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeUse {
    /// Volume name (in the instance's project).
    pub volume: String,
    /// Absolute mount path inside the instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// Validates a size field against [`MAX_VOLUME_BYTES`].
pub fn volume_size(field: &str, value: &serde_json::Value) -> Result<u64, ApiError> {
    let bytes = json_size(field, value)?;
    if bytes > MAX_VOLUME_BYTES {
        return Err(ApiError::invalid(
            field,
            format!(
                "size {} is over the maximum of {}",
                crate::validate::format_size(bytes),
                crate::validate::format_size(MAX_VOLUME_BYTES)
            ),
        ));
    }
    Ok(bytes)
}

/// Validates a create request.
pub fn create_volume(req: &CreateVolumeRequest) -> Result<VolumeDraft, ApiError> {
    name("name", &req.name)?;
    let size_bytes = volume_size("size", &req.size)?;
    let pool = req.pool.clone().unwrap_or_else(|| DEFAULT_POOL.to_string());
    name("pool", &pool)?;
    for (k, v) in &req.labels {
        crate::validate::label(k, v)?;
    }
    Ok(VolumeDraft {
        name: req.name.clone(),
        size_bytes,
        pool,
        encrypted: req.encrypted,
        shared: req.shared,
        labels: req.labels.clone(),
    })
}

/// Splits a restore's snapshot reference into (volume, snapshot), checking both names.
pub fn snapshot_ref(value: &str) -> Result<(Option<&str>, &str), ApiError> {
    let (vol, snap) = match value.split_once('@') {
        Some((v, s)) => {
            name("snapshot", v)?;
            (Some(v), s)
        }
        None => (None, value),
    };
    name("snapshot", snap)?;
    Ok((vol, snap))
}

/// Validates the volume uses of an instance: known names, at most one use per volume,
/// absolute normalized distinct paths; a container needs a path.
pub fn volume_uses(uses: &[VolumeUse], vm: bool) -> Result<(), ApiError> {
    if uses.len() > MAX_VOLUME_USES {
        return Err(ApiError::invalid(
            "volumes",
            format!("at most {MAX_VOLUME_USES} volumes per instance"),
        ));
    }
    let mut names = BTreeSet::new();
    let mut paths = BTreeSet::new();
    for (i, u) in uses.iter().enumerate() {
        let field = format!("volumes[{i}]");
        name(&format!("{field}.volume"), &u.volume)?;
        if !names.insert(u.volume.as_str()) {
            return Err(ApiError::invalid(
                format!("{field}.volume"),
                format!("volume {:?} is named twice", u.volume),
            ));
        }
        match &u.path {
            Some(p) => {
                mount_path(&format!("{field}.path"), p)?;
                if !paths.insert(p.as_str()) {
                    return Err(ApiError::invalid(
                        format!("{field}.path"),
                        format!("two volumes use the path {p:?}"),
                    ));
                }
            }
            None if !vm => {
                return Err(ApiError::invalid(
                    format!("{field}.path"),
                    "a container mounts a volume at a path: give NAME:/PATH",
                ))
            }
            None => {}
        }
    }
    Ok(())
}

/// A mount path: absolute, normalized, not `/`, no NUL, not under `/proc`, `/sys`, `/dev`.
fn mount_path(field: &str, p: &str) -> Result<(), ApiError> {
    let bad = |why: &str| {
        Err(ApiError::invalid(
            field,
            format!("invalid path {p:?}: {why}"),
        ))
    };
    if !p.starts_with('/') || p.len() < 2 {
        return bad("must be an absolute path other than /");
    }
    if p.len() > 4096 || p.contains('\0') {
        return bad("too long or contains NUL");
    }
    if p[1..]
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return bad("must be normalized (no empty, . or .. parts)");
    }
    if ["/proc", "/sys", "/dev"]
        .iter()
        .any(|r| p == *r || p.starts_with(&format!("{r}/")))
    {
        return bad("must not be under /proc, /sys or /dev");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;
    use serde_json::json;

    fn req(size: serde_json::Value) -> CreateVolumeRequest {
        CreateVolumeRequest {
            name: "data".into(),
            size,
            ..CreateVolumeRequest::default()
        }
    }

    fn field(r: Result<impl std::fmt::Debug, ApiError>) -> String {
        let e = r.unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{e:?}");
        e.field.unwrap()
    }

    #[test]
    fn create_parses_sizes_and_defaults_the_pool() {
        let d = create_volume(&req(json!("10G"))).unwrap();
        assert_eq!(d.size_bytes, 10 << 30);
        assert_eq!(d.pool, "local");
        assert_eq!(create_volume(&req(json!(4096))).unwrap().size_bytes, 4096);
        assert_eq!(
            create_volume(&req(json!("16T"))).unwrap().size_bytes,
            MAX_VOLUME_BYTES
        );
    }

    #[test]
    fn create_refuses_bad_sizes_names_and_pools() {
        for bad in [
            json!(0),
            json!("0"),
            json!("0G"),
            json!("ten"),
            json!("10Q"),
            json!(-1),
            json!(true),
            json!("17T"),
            json!(MAX_VOLUME_BYTES + 1),
        ] {
            assert_eq!(field(create_volume(&req(bad.clone()))), "size", "{bad}");
        }
        let e = create_volume(&req(json!("17T"))).unwrap_err();
        assert!(e.message.contains("maximum"), "{}", e.message);
        let mut r = req(json!("1G"));
        r.name = "Bad_Name".into();
        assert_eq!(field(create_volume(&r)), "name");
        let mut r = req(json!("1G"));
        r.pool = Some("no/pool".into());
        assert_eq!(field(create_volume(&r)), "pool");
        let mut r = req(json!("1G"));
        r.labels.insert("bad key!".into(), "v".into());
        assert!(create_volume(&r).is_err());
    }

    #[test]
    fn snapshot_refs_split_on_at() {
        assert_eq!(snapshot_ref("nightly").unwrap(), (None, "nightly"));
        assert_eq!(
            snapshot_ref("data@nightly").unwrap(),
            (Some("data"), "nightly")
        );
        assert_eq!(field(snapshot_ref("data@")), "snapshot");
        assert_eq!(field(snapshot_ref("Nightly")), "snapshot");
    }

    #[test]
    fn uses_are_checked() {
        let u = |v: &str, p: Option<&str>| VolumeUse {
            volume: v.into(),
            path: p.map(Into::into),
        };
        volume_uses(&[u("a", Some("/data")), u("b", Some("/logs"))], false).unwrap();
        volume_uses(&[u("a", None)], true).unwrap();
        assert_eq!(
            field(volume_uses(&[u("a", None)], false)),
            "volumes[0].path"
        );
        assert_eq!(
            field(volume_uses(&[u("a", Some("rel"))], false)),
            "volumes[0].path"
        );
        assert_eq!(
            field(volume_uses(&[u("a", Some("/a/../b"))], false)),
            "volumes[0].path"
        );
        assert_eq!(
            field(volume_uses(&[u("a", Some("/proc/x"))], false)),
            "volumes[0].path"
        );
        assert_eq!(
            field(volume_uses(&[u("A", Some("/x"))], false)),
            "volumes[0].volume"
        );
        assert_eq!(
            field(volume_uses(
                &[u("a", Some("/x")), u("a", Some("/y"))],
                false
            )),
            "volumes[1].volume"
        );
        assert_eq!(
            field(volume_uses(
                &[u("a", Some("/x")), u("b", Some("/x"))],
                false
            )),
            "volumes[1].path"
        );
        let many: Vec<_> = (0..=MAX_VOLUME_USES)
            .map(|i| u(&format!("v{i}"), Some(&format!("/v{i}"))))
            .collect();
        assert_eq!(field(volume_uses(&many, false)), "volumes");
    }
}
