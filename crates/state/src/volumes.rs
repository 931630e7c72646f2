//! Volumes and storage pools in the replicated state: the records and the rules `apply`
//! enforces (a refused command changes nothing). No data path yet: nothing here is acted on
//! by an agent, and an instance naming volumes is refused at admission once its volume uses
//! are checked (see [`StateMachine::check_volume_uses`]).
//!
//! Rules: a volume is attached to at most one instance unless `shared`, and a shared volume
//! only to VMs; an attached volume cannot be deleted; a resize never shrinks; a restore names
//! a snapshot of the same volume; the pool must exist (`local` always does).

use nimbus_api::volume::{
    StorageDriver, StoragePool, Volume, VolumeDraft, VolumeSnapshot, VolumeState, DEFAULT_POOL,
    MAX_SNAPSHOTS, MAX_VOLUME_BYTES,
};
use nimbus_api::{ApiError, ErrorCode, InstanceSpec, InstanceType, Meta};

use crate::command::{CommandEnvelope, CommandOutput, CommandResult};
use crate::machine::{check_version, meta, touch, StateMachine};

/// The key of a volume in [`crate::StateData::volumes`].
pub fn volume_key(project: &str, name: &str) -> String {
    format!("{project}/{name}")
}

/// The built-in pool `local` (driver `local`), which exists without being stored.
pub fn default_pool() -> StoragePool {
    StoragePool {
        meta: Meta {
            id: DEFAULT_POOL.into(),
            name: DEFAULT_POOL.into(),
            project: String::new(),
            version: 1,
            created_at: "1970-01-01T00:00:00Z".into(),
            updated_at: "1970-01-01T00:00:00Z".into(),
            labels: std::collections::BTreeMap::new(),
        },
        driver: StorageDriver::Local,
        ceph: None,
    }
}

fn out(v: &Volume) -> CommandOutput {
    CommandOutput::Volume(Box::new(v.clone()))
}

impl StateMachine {
    /// A pool by name: a stored one, or the built-in `local`.
    pub fn storage_pool(&self, name: &str) -> Option<StoragePool> {
        match self.storage_pools.get(name) {
            Some(p) => Some(p.clone()),
            None if name == DEFAULT_POOL => Some(default_pool()),
            None => None,
        }
    }

    /// Every pool in name order, the built-in `local` included.
    pub fn storage_pool_list(&self) -> Vec<StoragePool> {
        let mut v: Vec<StoragePool> = self.storage_pools.values().cloned().collect();
        if !self.storage_pools.contains_key(DEFAULT_POOL) {
            v.push(default_pool());
            v.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
        }
        v
    }

    /// Volumes of a project in name order, after `after`.
    pub fn project_volumes<'a>(
        &'a self,
        project: &'a str,
        after: Option<&str>,
    ) -> impl Iterator<Item = &'a Volume> + 'a {
        let start = match after {
            Some(a) => std::ops::Bound::Excluded(volume_key(project, a)),
            None => std::ops::Bound::Included(format!("{project}/")),
        };
        let prefix = format!("{project}/");
        self.volumes
            .range((start, std::ops::Bound::Unbounded))
            .take_while(move |(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v)
    }

    /// The bytes a project's volumes take (what a quota counts; snapshots not included).
    pub fn project_volume_bytes(&self, project: &str) -> u64 {
        self.project_volumes(project, None)
            .map(|v| v.size_bytes)
            .sum()
    }

    fn volume(&self, project: &str, name: &str) -> Result<&Volume, ApiError> {
        self.volumes
            .get(&volume_key(project, name))
            .ok_or_else(|| ApiError::not_found("volume", name))
    }

    pub(crate) fn create_volume(
        &mut self,
        env: &CommandEnvelope,
        project: &str,
        d: &VolumeDraft,
    ) -> CommandResult {
        if !self.projects.contains_key(project) {
            return Err(ApiError::not_found("project", project).with_field("project"));
        }
        nimbus_api::validate::name("name", &d.name)?;
        check_size("size", d.size_bytes)?;
        let key = volume_key(project, &d.name);
        if self.volumes.contains_key(&key) {
            return Err(ApiError::already_exists("volume", &d.name));
        }
        let pool = self
            .storage_pool(&d.pool)
            .ok_or_else(|| ApiError::not_found("storage pool", &d.pool).with_field("pool"))?;
        let mut m = meta(env, &d.name, project);
        m.labels.clone_from(&d.labels);
        let v = Volume {
            meta: m,
            size_bytes: d.size_bytes,
            pool: pool.meta.name.clone(),
            driver: pool.driver,
            encrypted: d.encrypted,
            shared: d.shared,
            node: None,
            attachments: Vec::new(),
            snapshots: Vec::new(),
            // No data path yet: a local volume's file is made on its first attach.
            state: VolumeState::Available,
            reason: String::new(),
        };
        self.volumes.insert(key, v.clone());
        self.event(
            env,
            project,
            "volume",
            &d.name,
            "Created",
            format!(
                "{} in pool {}{}{}",
                nimbus_api::validate::format_size(d.size_bytes),
                v.pool,
                if d.encrypted { ", encrypted" } else { "" },
                if d.shared { ", shared" } else { "" },
            ),
        );
        Ok(out(&v))
    }

    pub(crate) fn delete_volume(
        &mut self,
        env: &CommandEnvelope,
        project: &str,
        name: &str,
    ) -> CommandResult {
        let v = self.volume(project, name)?;
        if let Some(a) = v.attachments.first() {
            return Err(ApiError::conflict(format!(
                "volume {name:?} is attached to instance {}; detach it or delete the instance first",
                a.instance
            )));
        }
        self.volumes.remove(&volume_key(project, name));
        self.event(env, project, "volume", name, "Deleted", String::new());
        Ok(CommandOutput::None)
    }

    pub(crate) fn snapshot_volume(
        &mut self,
        env: &CommandEnvelope,
        project: &str,
        name: &str,
        snapshot: &str,
    ) -> CommandResult {
        nimbus_api::validate::name("name", snapshot)?;
        let v = self.volume(project, name)?;
        if v.snapshots.iter().any(|s| s.name == snapshot) {
            return Err(ApiError::already_exists("snapshot", snapshot));
        }
        if v.snapshots.len() >= MAX_SNAPSHOTS {
            return Err(ApiError::conflict(format!(
                "volume {name:?} has {MAX_SNAPSHOTS} snapshots, the most it keeps"
            )));
        }
        let snap = VolumeSnapshot {
            id: env.new_id.clone(),
            name: snapshot.to_string(),
            size_bytes: v.size_bytes,
            created_at: env.time.clone(),
        };
        self.update_volume(
            env,
            project,
            name,
            |v| v.snapshots.push(snap),
            "Snapshotted",
            format!("snapshot {snapshot}"),
        )
    }

    pub(crate) fn resize_volume(
        &mut self,
        env: &CommandEnvelope,
        project: &str,
        name: &str,
        size_bytes: u64,
        version: Option<u64>,
    ) -> CommandResult {
        check_size("size", size_bytes)?;
        let v = self.volume(project, name)?;
        check_version(&v.meta, version)?;
        if size_bytes < v.size_bytes {
            return Err(ApiError::invalid(
                "size",
                format!(
                    "volume {name:?} is {}; a volume cannot shrink (asked {})",
                    nimbus_api::validate::format_size(v.size_bytes),
                    nimbus_api::validate::format_size(size_bytes)
                ),
            ));
        }
        if size_bytes == v.size_bytes {
            return Ok(out(v));
        }
        let from = v.size_bytes;
        self.update_volume(
            env,
            project,
            name,
            |v| v.size_bytes = size_bytes,
            "Resized",
            format!(
                "{} -> {}",
                nimbus_api::validate::format_size(from),
                nimbus_api::validate::format_size(size_bytes)
            ),
        )
    }

    /// Rolls a volume back to one of its own snapshots (its size becomes the snapshot's);
    /// refused while attached.
    pub(crate) fn restore_volume(
        &mut self,
        env: &CommandEnvelope,
        project: &str,
        name: &str,
        snapshot: &str,
        version: Option<u64>,
    ) -> CommandResult {
        let (of, snap) = nimbus_api::volume::snapshot_ref(snapshot)?;
        let v = self.volume(project, name)?;
        check_version(&v.meta, version)?;
        if let Some(of) = of.filter(|of| *of != name) {
            return Err(ApiError::invalid(
                "snapshot",
                format!("snapshot {snapshot:?} is of volume {of:?}, not {name:?}; a volume restores only its own snapshots (clone the other volume's instead)"),
            ));
        }
        let Some(s) = v.snapshots.iter().find(|s| s.name == snap) else {
            return Err(ApiError::not_found("snapshot", snap).with_field("snapshot"));
        };
        if let Some(a) = v.attachments.first() {
            return Err(ApiError::conflict(format!(
                "volume {name:?} is attached to instance {}; detach it before restoring",
                a.instance
            )));
        }
        let size = s.size_bytes;
        self.update_volume(
            env,
            project,
            name,
            |v| v.size_bytes = size,
            "Restored",
            format!("from snapshot {snap}"),
        )
    }

    /// Applies `change` to a volume found (and checked) before, moves its version and records
    /// the event `reason` with `message`.
    fn update_volume(
        &mut self,
        env: &CommandEnvelope,
        project: &str,
        name: &str,
        change: impl FnOnce(&mut Volume),
        reason: &str,
        message: String,
    ) -> CommandResult {
        let v = self
            .volumes
            .get_mut(&volume_key(project, name))
            .ok_or_else(|| ApiError::not_found("volume", name))?;
        change(v);
        touch(&mut v.meta, env);
        let v = v.clone();
        self.event(env, project, "volume", name, reason, message);
        Ok(out(&v))
    }

    /// Checks an instance's volume uses against the state (each exists in the project, is
    /// not in use unless shared, and a shared one goes to a VM), then refuses any: volumes
    /// have no data path yet, and an instance must not run without the disks it asked for.
    pub(crate) fn check_volume_uses(
        &self,
        project: &str,
        spec: &InstanceSpec,
    ) -> Result<(), ApiError> {
        for (i, u) in spec.volumes.iter().enumerate() {
            let field = format!("volumes[{i}].volume");
            let v = self
                .volume(project, &u.volume)
                .map_err(|e| e.with_field(field.clone()))?;
            if v.shared && spec.instance_type != InstanceType::Vm {
                return Err(ApiError::invalid(
                    field,
                    format!(
                        "volume {:?} is shared (raw block): only VMs can use it",
                        u.volume
                    ),
                ));
            }
            if !v.shared {
                if let Some(a) = v.attachments.first() {
                    return Err(ApiError::new(
                        ErrorCode::Conflict,
                        format!(
                            "volume {:?} is in use by instance {}; a volume not created --shared attaches to one instance",
                            u.volume, a.instance
                        ),
                    )
                    .with_field(field));
                }
            }
            if !matches!(v.state, VolumeState::Available | VolumeState::Attached) {
                return Err(ApiError::conflict(format!(
                    "volume {:?} is {}",
                    u.volume,
                    v.state.as_str()
                ))
                .with_field(field));
            }
        }
        if spec.volumes.is_empty() {
            return Ok(());
        }
        Err(ApiError::invalid(
            "volumes",
            "volumes are not attached to instances yet (no data path in this release); launch without --volume",
        ))
    }
}

fn check_size(field: &str, bytes: u64) -> Result<(), ApiError> {
    if bytes == 0 || bytes > MAX_VOLUME_BYTES {
        return Err(ApiError::invalid(
            field,
            format!(
                "size must be between 1 byte and {}",
                nimbus_api::validate::format_size(MAX_VOLUME_BYTES)
            ),
        ));
    }
    Ok(())
}
