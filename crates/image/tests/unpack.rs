//! Layer unpacking (overlayfs form) and flattening: whiteouts, metadata, path safety.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use nimbus_image::testutil::{self, LayerEntry};
use nimbus_image::{ImageError, ImageStore};

fn store(dir: &Path) -> ImageStore {
    ImageStore::open(&dir.join("store")).unwrap()
}

fn put(store: &ImageStore, data: &[u8]) -> String {
    let digest = nimbus_image::sha256_digest(data);
    store.put_blob(data, &digest).unwrap();
    digest
}

fn put_layer(store: &ImageStore, entries: &[LayerEntry]) -> String {
    put(store, &testutil::layer_tar(entries).unwrap())
}

fn is_whiteout(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == 0)
}

fn lower_layers() -> Vec<LayerEntry> {
    vec![
        LayerEntry::file("a", b"a"),
        LayerEntry::dir("dir/"),
        LayerEntry::file("dir/x", b"x"),
        LayerEntry::file("dir/y", b"y"),
        LayerEntry::dir("sub/"),
        LayerEntry::file("sub/z", b"z"),
        LayerEntry::file("keep", b"keep"),
    ]
}

fn upper_layers() -> Vec<LayerEntry> {
    vec![
        LayerEntry::file(".wh.a", b""),
        // A sibling before the opaque marker must survive it (same layer).
        LayerEntry::file("dir/new", b"new"),
        LayerEntry::file("dir/.wh..wh..opq", b""),
        LayerEntry::file("sub/.wh.z", b""),
        LayerEntry::file("fresh/.wh..wh..opq", b""),
    ]
}

#[test]
fn unpack_converts_whiteouts_to_overlayfs_form() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let digest = put_layer(&store, &upper_layers());
    let path = store.unpacked_layer(&digest).unwrap();
    assert_eq!(path, store.root().join("layers").join(&digest[7..]));
    assert!(is_whiteout(&path.join("a")), "a is not a 0/0 char device");
    assert!(is_whiteout(&path.join("sub/z")));
    assert_eq!(
        xattr::get(path.join("dir"), "trusted.overlay.opaque").unwrap(),
        Some(b"y".to_vec())
    );
    assert_eq!(
        xattr::get(path.join("fresh"), "trusted.overlay.opaque").unwrap(),
        Some(b"y".to_vec())
    );
    assert_eq!(
        xattr::get(path.join("sub"), "trusted.overlay.opaque").unwrap(),
        None
    );
    assert_eq!(fs::read(path.join("dir/new")).unwrap(), b"new");
    for name in [".wh.a", "dir/.wh..wh..opq", "sub/.wh.z"] {
        assert!(
            fs::symlink_metadata(path.join(name)).is_err(),
            "{name} left behind"
        );
    }
    // Idempotent, and nothing left in tmp.
    assert_eq!(store.unpacked_layer(&digest).unwrap(), path);
    assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
}

#[test]
fn flatten_applies_whiteouts_and_opaque_dirs() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let lower = put_layer(&store, &lower_layers());
    let upper = put(
        &store,
        &testutil::gzip(&testutil::layer_tar(&upper_layers()).unwrap()),
    );
    let dest = dir.path().join("flat");
    store
        .flatten_to_dir(&[lower.clone(), upper], &dest)
        .unwrap();
    assert!(!dest.join("a").exists());
    let mut in_dir: Vec<_> = fs::read_dir(dest.join("dir"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    in_dir.sort();
    assert_eq!(in_dir, vec!["new"]);
    assert!(dest.join("sub").is_dir());
    assert!(!dest.join("sub/z").exists());
    assert_eq!(fs::read(dest.join("keep")).unwrap(), b"keep");
    assert!(dest.join("fresh").is_dir());
    assert_eq!(
        xattr::get(dest.join("dir"), "trusted.overlay.opaque").unwrap(),
        None
    );
    let mut stack = vec![dest.clone()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            assert!(
                !e.file_name().to_string_lossy().starts_with(".wh."),
                "{:?}",
                e.path()
            );
            assert!(!is_whiteout(&e.path()));
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    // Missing blob.
    let missing = nimbus_image::sha256_digest(b"nope");
    assert!(matches!(
        store.flatten_to_dir(&[missing], &dest),
        Err(ImageError::BlobNotFound(_))
    ));
}

/// Builds a layer with ownership, modes, mtimes, a device, a hardlink and a PAX xattr.
fn rich_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let header = |kind, mode, uid, gid, size| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(1_000_000);
        h.set_size(size);
        h
    };
    let mut h = header(tar::EntryType::Directory, 0o1777, 0, 0, 0);
    b.append_data(&mut h, "tmp/", &[][..]).unwrap();
    let mut h = header(tar::EntryType::Directory, 0o750, 1000, 1001, 0);
    b.append_data(&mut h, "home/", &[][..]).unwrap();
    let mut h = header(tar::EntryType::Regular, 0o4755, 0, 0, 4);
    b.append_data(&mut h, "bin/suid", &b"suid"[..]).unwrap();
    let pax = b"30 SCHILY.xattr.user.test=val\n";
    let mut h = header(tar::EntryType::XHeader, 0o644, 0, 0, pax.len() as u64);
    b.append_data(&mut h, "PaxHeader/owned", &pax[..]).unwrap();
    let mut h = header(tar::EntryType::Regular, 0o600, 1000, 1001, 5);
    b.append_data(&mut h, "home/owned", &b"owned"[..]).unwrap();
    let mut h = header(tar::EntryType::Link, 0o600, 1000, 1001, 0);
    b.append_link(&mut h, "home/hard", "home/owned").unwrap();
    let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0, 0);
    b.append_link(&mut h, "bin/sh", "/bin/busybox").unwrap();
    let mut h = header(tar::EntryType::Char, 0o666, 0, 0, 0);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    b.append_data(&mut h, "dev/null", &[][..]).unwrap();
    let mut h = header(tar::EntryType::Fifo, 0o644, 0, 0, 0);
    b.append_data(&mut h, "run/fifo", &[][..]).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn unpack_preserves_metadata_links_and_devices() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let layer = rich_layer();
    let digest = put(&store, &layer);
    let root = store.unpacked_layer(&digest).unwrap();
    let mode = |p: &str| {
        fs::symlink_metadata(root.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("tmp"), 0o1777);
    assert_eq!(mode("home"), 0o750);
    assert_eq!(mode("bin/suid"), 0o4755);
    assert_eq!(mode("home/owned"), 0o600);
    assert_eq!(mode("bin"), 0o755, "implicit parents are 0755");
    let owned = fs::metadata(root.join("home/owned")).unwrap();
    let hard = fs::metadata(root.join("home/hard")).unwrap();
    assert_eq!(owned.ino(), hard.ino());
    assert_eq!(owned.mtime(), 1_000_000);
    assert_eq!(fs::metadata(root.join("home")).unwrap().mtime(), 1_000_000);
    assert_eq!(
        xattr::get(root.join("home/owned"), "user.test").unwrap(),
        Some(b"val".to_vec())
    );
    assert_eq!(
        fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("/bin/busybox")
    );
    if nix::unistd::geteuid().is_root() {
        assert_eq!((owned.uid(), owned.gid()), (1000, 1001));
        let null = fs::metadata(root.join("dev/null")).unwrap();
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
    }
    assert!(fs::symlink_metadata(root.join("run/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    // Flattening keeps the same metadata.
    let flat = dir.path().join("flat");
    store.flatten_to_dir(&[digest], &flat).unwrap();
    assert_eq!(
        fs::metadata(flat.join("bin/suid"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o4755
    );
    assert_eq!(
        fs::metadata(flat.join("home/hard")).unwrap().ino(),
        fs::metadata(flat.join("home/owned")).unwrap().ino()
    );
}

#[test]
fn path_traversal_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let outside = dir.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let outside_s = outside.to_string_lossy().into_owned();
    let cases: Vec<Vec<LayerEntry>> = vec![
        vec![LayerEntry::file("../escape", b"x")],
        vec![LayerEntry::file("a/../../escape", b"x")],
        vec![LayerEntry::file(&format!("{outside_s}/abs"), b"x")],
        vec![
            LayerEntry::symlink("link", &outside_s),
            LayerEntry::file("link/escape", b"x"),
        ],
        vec![
            LayerEntry::symlink("up", ".."),
            LayerEntry::file("up/escape", b"x"),
        ],
        vec![
            LayerEntry::dir("d/"),
            LayerEntry::symlink("d/l", "../.."),
            LayerEntry::dir("d/l/escape/"),
        ],
        vec![LayerEntry::hardlink("h", "../../etc/passwd")],
        vec![LayerEntry::hardlink("h", "/etc/passwd")],
        vec![
            LayerEntry::symlink("link", &outside_s),
            LayerEntry::file("link/.wh.victim", b""),
        ],
        vec![
            LayerEntry::symlink("link", &outside_s),
            LayerEntry::file("link/.wh..wh..opq", b""),
        ],
    ];
    fs::write(outside.join("victim"), b"v").unwrap();
    for (i, entries) in cases.iter().enumerate() {
        let digest = put_layer(&store, entries);
        let err = store.unpacked_layer(&digest).unwrap_err();
        assert!(
            matches!(err, ImageError::UnsafePath { .. }),
            "case {i}: expected unsafe path, got {err}"
        );
        assert!(!store.root().join("layers").join(&digest[7..]).exists());
        let flat = dir.path().join(format!("flat{i}"));
        let err = store.flatten_to_dir(&[digest], &flat).unwrap_err();
        assert!(
            matches!(err, ImageError::UnsafePath { .. }),
            "case {i} flatten: {err}"
        );
    }
    let names: Vec<_> = fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["victim"], "something was written outside");
    assert!(!dir.path().join("escape").exists());
    assert!(!store.root().join("escape").exists());
    assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
    // A symlink pointing outside is fine by itself (resolved inside the container).
    let digest = put_layer(&store, &[LayerEntry::symlink("etc-link", "/etc")]);
    store.unpacked_layer(&digest).unwrap();
}

#[test]
fn later_entries_replace_earlier_ones_without_following_symlinks() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let target = dir.path().join("target");
    fs::write(&target, b"untouched").unwrap();
    let digest = put_layer(
        &store,
        &[
            LayerEntry::symlink("f", &target.to_string_lossy()),
            LayerEntry::file("f", b"replaced"),
            LayerEntry::file("d", b"file first"),
            LayerEntry::dir("d/"),
            LayerEntry::file("d/inner", b"i"),
        ],
    );
    let root = store.unpacked_layer(&digest).unwrap();
    assert_eq!(fs::read(&target).unwrap(), b"untouched");
    assert_eq!(fs::read(root.join("f")).unwrap(), b"replaced");
    assert_eq!(fs::read(root.join("d/inner")).unwrap(), b"i");
}

#[test]
fn bad_layers_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let good = testutil::layer_tar(&lower_layers()).unwrap();
    let mut cases = vec![
        (b"garbage garbage garbage".repeat(40), "bad layer"),
        (vec![0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0], "zstd"),
        (testutil::gzip(b"not a tar"), "bad layer"),
        (good[..700].to_vec(), "bad layer"),
        (
            testutil::gzip(&testutil::gzip(&good))[..30].to_vec(),
            "bad layer",
        ),
    ];
    let mut corrupt = good.clone();
    corrupt[148] ^= 0x55; // header checksum
    cases.push((corrupt, "bad layer"));
    for (i, (data, want)) in cases.into_iter().enumerate() {
        let digest = put(&store, &data);
        let err = store.unpacked_layer(&digest).unwrap_err();
        assert!(err.to_string().contains(want), "case {i}: {err}");
        assert!(!store.root().join("layers").join(&digest[7..]).exists());
    }
    let missing = nimbus_image::sha256_digest(b"missing");
    assert!(matches!(
        store.unpacked_layer(&missing),
        Err(ImageError::BlobNotFound(_))
    ));
    assert!(matches!(
        store.unpacked_layer("sha256:zz"),
        Err(ImageError::InvalidDigest(_))
    ));
    assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
}

/// The unpacked layers work as overlayfs lower dirs: whiteouts hide, opaque dirs hide.
#[test]
fn unpacked_layers_mount_as_overlayfs() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let lower = store
        .unpacked_layer(&put_layer(&store, &lower_layers()))
        .unwrap();
    let upper = store
        .unpacked_layer(&put_layer(&store, &upper_layers()))
        .unwrap();
    let merged = dir.path().join("merged");
    fs::create_dir(&merged).unwrap();
    let opts = format!("lowerdir={}:{}", upper.display(), lower.display());
    let mounted = nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(opts.as_str()),
    );
    if let Err(e) = mounted {
        assert!(
            std::env::var("CI").as_deref() != Ok("true") && !nix::unistd::geteuid().is_root(),
            "overlay mount failed: {e}"
        );
        eprintln!("skipping overlay mount check (not root): {e}");
        return;
    }
    let check = || {
        assert!(!merged.join("a").exists());
        assert!(!merged.join("sub/z").exists());
        assert!(merged.join("keep").exists());
        let mut names: Vec<_> = fs::read_dir(merged.join("dir"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, vec!["new"]);
    };
    let result = std::panic::catch_unwind(check);
    nix::mount::umount(&merged).unwrap();
    result.unwrap();
}

#[test]
fn overlay_xattrs_from_archives_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let mut b = tar::Builder::new(Vec::new());
    let pax = b"44 SCHILY.xattr.trusted.overlay.redirect=/x\n";
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::XHeader);
    h.set_size(pax.len() as u64);
    b.append_data(&mut h, "PaxHeader/d", &pax[..]).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    b.append_data(&mut h, "d/", &[][..]).unwrap();
    let digest = put(&store, &b.into_inner().unwrap());
    let root = store.unpacked_layer(&digest).unwrap();
    assert!(root.join("d").is_dir());
    assert_eq!(
        xattr::get(root.join("d"), "trusted.overlay.redirect").unwrap(),
        None
    );
}

#[test]
fn unpack_image_returns_layers_bottom_first_and_gc_clears_stale_tmp() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let tarball = dir.path().join("img.tar");
    let layers = vec![
        testutil::layer_tar(&lower_layers()).unwrap(),
        testutil::layer_tar(&upper_layers()).unwrap(),
    ];
    testutil::write_oci_layout_tarball_layers(
        &layers,
        &tarball,
        &testutil::FixtureConfig::default(),
    )
    .unwrap();
    let image = store.import_tarball(&tarball, None).unwrap();
    assert_eq!(image.name, "fixture");
    let dirs = store.unpack_image(&image).unwrap();
    assert_eq!(dirs.len(), 2);
    assert!(dirs[0].join("keep").is_file());
    assert!(is_whiteout(&dirs[1].join("a")));

    let stale = store.root().join("tmp/layer-stale");
    fs::create_dir_all(stale.join("x")).unwrap();
    let fresh = store.root().join("tmp/blob-fresh");
    fs::write(&fresh, b"in progress").unwrap();
    let old = nix::sys::time::TimeSpec::new(1_000_000, 0);
    nix::sys::stat::utimensat(
        None,
        &stale,
        &old,
        &old,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
    let stats = store.gc(std::slice::from_ref(&image)).unwrap();
    assert_eq!(stats.tmp_removed, 1);
    assert!(!stale.exists());
    assert!(fresh.exists());
    assert_eq!(store.unpack_image(&image).unwrap(), dirs);
}

#[test]
fn concurrent_unpacks_of_one_layer_agree() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let mut entries = lower_layers();
    for i in 0..200 {
        entries.push(LayerEntry::file(&format!("many/{i}"), &[b'x'; 512]));
    }
    let digest = put_layer(&store, &entries);
    let paths: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| store.unpacked_layer(&digest)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    });
    assert!(paths.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(fs::read_dir(paths[0].join("many")).unwrap().count(), 200);
    assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
}
