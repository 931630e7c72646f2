//! Unit tests of volumes in the state machine: every refusal leaves the whole state unchanged
//! (`H::err` compares it).

use nimbus_api::volume::{
    StorageDriver, VolumeAttachment, VolumeDraft, VolumeState, VolumeUse, MAX_VOLUME_BYTES,
};
use nimbus_api::{ErrorCode, InstanceType};

use crate::machine_tests::{instance, H};
use crate::{Command, CommandOutput};

const G: u64 = 1 << 30;

fn draft(name: &str, size: u64) -> VolumeDraft {
    VolumeDraft {
        name: name.into(),
        size_bytes: size,
        pool: "local".into(),
        encrypted: false,
        shared: false,
        labels: std::collections::BTreeMap::new(),
    }
}

fn create(name: &str, size: u64) -> Command {
    Command::CreateVolume {
        project: "default".into(),
        volume: draft(name, size),
    }
}

fn vol(o: CommandOutput) -> nimbus_api::volume::Volume {
    match o {
        CommandOutput::Volume(v) => *v,
        other => panic!("not a volume: {other:?}"),
    }
}

fn resize(name: &str, size: u64, version: Option<u64>) -> Command {
    Command::ResizeVolume {
        project: "default".into(),
        name: name.into(),
        size_bytes: size,
        version,
    }
}

fn snapshot(name: &str, snap: &str) -> Command {
    Command::SnapshotVolume {
        project: "default".into(),
        name: name.into(),
        snapshot: snap.into(),
    }
}

fn restore(name: &str, snap: &str) -> Command {
    Command::RestoreVolume {
        project: "default".into(),
        name: name.into(),
        snapshot: snap.into(),
        version: None,
    }
}

fn delete(name: &str) -> Command {
    Command::DeleteVolume {
        project: "default".into(),
        name: name.into(),
    }
}

/// Marks a volume attached to `instance` (no command attaches yet: the data path is to come).
fn attach(h: &mut H, name: &str, instance: &str) {
    let v = h.sm.volumes.get_mut(&format!("default/{name}")).unwrap();
    v.attachments.push(VolumeAttachment {
        instance_id: format!("id-{instance}"),
        instance: instance.into(),
        path: Some("/data".into()),
    });
    v.state = VolumeState::Attached;
}

#[test]
fn create_records_size_pool_and_an_event() {
    let mut h = H::new();
    let v = vol(h.ok(create("data", 10 * G)));
    assert_eq!(v.size_bytes, 10 * G);
    assert_eq!(v.pool, "local");
    assert_eq!(v.driver, StorageDriver::Local);
    assert_eq!(v.state, VolumeState::Available);
    assert_eq!(v.meta.version, 1);
    assert_eq!(v.node, None);
    assert_eq!(h.sm.volumes["default/data"], v);
    assert_eq!(h.sm.project_volume_bytes("default"), 10 * G);
    let e = h.sm.events.back().unwrap();
    assert_eq!((e.kind.as_str(), e.reason.as_str()), ("volume", "Created"));
    assert_eq!(h.sm.storage_pool_list().len(), 1);
    assert_eq!(
        h.sm.storage_pool("local").unwrap().driver,
        StorageDriver::Local
    );
}

#[test]
fn refused_creates_change_nothing() {
    let mut h = H::new();
    h.ok(create("data", G));
    assert_eq!(h.err(create("data", 2 * G)).code, ErrorCode::AlreadyExists);
    let mut d = draft("other", G);
    d.pool = "fast".into();
    let e = h.err(Command::CreateVolume {
        project: "default".into(),
        volume: d,
    });
    assert_eq!(
        (e.code, e.field.as_deref()),
        (ErrorCode::NotFound, Some("pool"))
    );
    assert_eq!(h.err(create("zero", 0)).field.as_deref(), Some("size"));
    assert_eq!(
        h.err(create("huge", MAX_VOLUME_BYTES + 1)).field.as_deref(),
        Some("size")
    );
    assert_eq!(h.err(create("Bad", G)).field.as_deref(), Some("name"));
    let e = h.err(Command::CreateVolume {
        project: "nope".into(),
        volume: draft("x", G),
    });
    assert_eq!(e.code, ErrorCode::NotFound);
}

#[test]
fn resize_grows_with_versions_and_never_shrinks() {
    let mut h = H::new();
    h.ok(create("data", 10 * G));
    let e = h.err(resize("data", 5 * G, None));
    assert_eq!(
        (e.code, e.field.as_deref()),
        (ErrorCode::InvalidArgument, Some("size"))
    );
    assert_eq!(
        h.err(resize("data", 20 * G, Some(7))).code,
        ErrorCode::VersionConflict
    );
    assert_eq!(
        h.err(resize("nope", 20 * G, None)).code,
        ErrorCode::NotFound
    );
    assert_eq!(
        h.err(resize("data", MAX_VOLUME_BYTES + 1, None))
            .field
            .as_deref(),
        Some("size")
    );
    let v = vol(h.ok(resize("data", 20 * G, Some(1))));
    assert_eq!((v.size_bytes, v.meta.version), (20 * G, 2));
    assert_eq!(h.sm.project_volume_bytes("default"), 20 * G);
    // The same size is a no-op.
    let v = vol(h.ok(resize("data", 20 * G, None)));
    assert_eq!(v.meta.version, 2);
}

#[test]
fn snapshots_and_restores_stay_within_their_volume() {
    let mut h = H::new();
    h.ok(create("data", 10 * G));
    h.ok(create("other", G));
    let v = vol(h.ok(snapshot("data", "nightly")));
    assert_eq!(v.snapshots.len(), 1);
    assert_eq!(v.snapshots[0].size_bytes, 10 * G);
    assert_eq!(
        v.snapshots[0].created_at,
        h.sm.volumes["default/data"].meta.updated_at
    );
    h.ok(snapshot("other", "mine"));
    assert_eq!(
        h.err(snapshot("data", "nightly")).code,
        ErrorCode::AlreadyExists
    );
    assert_eq!(
        h.err(snapshot("data", "Bad")).field.as_deref(),
        Some("name")
    );
    assert_eq!(h.err(snapshot("nope", "x")).code, ErrorCode::NotFound);
    h.ok(resize("data", 30 * G, None));
    // A snapshot of another volume, named either way, is refused.
    let e = h.err(restore("data", "other@mine"));
    assert_eq!(
        (e.code, e.field.as_deref()),
        (ErrorCode::InvalidArgument, Some("snapshot"))
    );
    let e = h.err(restore("data", "mine"));
    assert_eq!(
        (e.code, e.field.as_deref()),
        (ErrorCode::NotFound, Some("snapshot"))
    );
    let v = vol(h.ok(restore("data", "data@nightly")));
    assert_eq!(v.size_bytes, 10 * G);
    attach(&mut h, "data", "db");
    assert_eq!(h.err(restore("data", "nightly")).code, ErrorCode::Conflict);
}

#[test]
fn attached_volumes_are_not_deleted() {
    let mut h = H::new();
    h.ok(create("data", G));
    attach(&mut h, "data", "db");
    let e = h.err(delete("data"));
    assert_eq!(e.code, ErrorCode::Conflict);
    assert!(e.message.contains("db"), "{}", e.message);
    let e = h.err(Command::DeleteProject {
        name: "default".into(),
    });
    assert_eq!(e.code, ErrorCode::Conflict);
    h.sm.volumes
        .get_mut("default/data")
        .unwrap()
        .attachments
        .clear();
    h.ok(delete("data"));
    assert!(h.sm.volumes.is_empty());
    assert_eq!(h.err(delete("data")).code, ErrorCode::NotFound);
}

fn launch(h: &mut H, name: &str, vm: bool, uses: &[(&str, Option<&str>)]) -> nimbus_api::ApiError {
    let mut i = instance(name, 64 << 20);
    if vm {
        i.spec.instance_type = InstanceType::Vm;
    }
    i.spec.volumes = uses
        .iter()
        .map(|(v, p)| VolumeUse {
            volume: (*v).into(),
            path: p.map(Into::into),
        })
        .collect();
    h.err(Command::CreateInstance {
        instance: Box::new(i.into()),
        idempotency_key: None,
    })
}

#[test]
fn instances_naming_volumes_are_checked_then_refused() {
    let mut h = H::new();
    h.node("n1", true);
    h.ok(create("data", G));
    h.ok(create("used", G));
    h.ok(Command::CreateVolume {
        project: "default".into(),
        volume: VolumeDraft {
            shared: true,
            ..draft("raw", G)
        },
    });
    attach(&mut h, "used", "other");
    let e = launch(&mut h, "a", false, &[("nope", Some("/d"))]);
    assert_eq!(
        (e.code, e.field.as_deref()),
        (ErrorCode::NotFound, Some("volumes[0].volume"))
    );
    let e = launch(
        &mut h,
        "a",
        false,
        &[("data", Some("/d")), ("used", Some("/u"))],
    );
    assert_eq!(
        (e.code, e.field.as_deref()),
        (ErrorCode::Conflict, Some("volumes[1].volume"))
    );
    let e = launch(&mut h, "a", false, &[("raw", Some("/r"))]);
    assert_eq!(e.field.as_deref(), Some("volumes[0].volume"));
    assert!(e.message.contains("only VMs"), "{}", e.message);
    // Everything checks out: still refused, as nothing would give the instance its disk.
    let e = launch(&mut h, "a", true, &[("raw", None), ("data", Some("/d"))]);
    assert_eq!(
        (e.code, e.field.as_deref()),
        (ErrorCode::InvalidArgument, Some("volumes"))
    );
    assert!(
        e.message.contains("not attached to instances yet"),
        "{}",
        e.message
    );
    assert!(h.sm.instances.is_empty());
    // Without volumes it launches.
    h.create("b", 64 << 20, None).unwrap();
}
