//! Import of OCI layout and `docker save` tarballs, verification, records and GC.
#![allow(clippy::case_sensitive_file_extension_comparisons)]

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use nimbus_image::testutil::{self, DockerSaveFormat, FixtureConfig, LayerEntry};
use nimbus_image::{ImageError, ImageStore};

fn store(dir: &Path) -> ImageStore {
    ImageStore::open(&dir.join("store")).unwrap()
}

fn layers() -> Vec<Vec<u8>> {
    vec![
        testutil::layer_tar(&[
            LayerEntry::dir("etc/"),
            LayerEntry::file("etc/motd", b"hello\n"),
            LayerEntry::file("bin/tool", b"#!/bin/sh\necho hi\n"),
        ])
        .unwrap(),
        testutil::layer_tar(&[LayerEntry::file("etc/motd", b"second\n")]).unwrap(),
    ]
}

fn cfg() -> FixtureConfig {
    FixtureConfig {
        name: Some("docker.io/library/demo:1.0".into()),
        entrypoint: vec!["/bin/tool".into()],
        cmd: vec!["--flag".into()],
        env: vec!["A=1".into()],
        working_dir: "/srv".into(),
        ..FixtureConfig::default()
    }
}

/// Rewrites a tarball, letting `edit` replace (Some) or drop (None) regular files.
fn rewrite(input: &Path, output: &Path, mut edit: impl FnMut(&str, Vec<u8>) -> Option<Vec<u8>>) {
    let mut archive = tar::Archive::new(fs::File::open(input).unwrap());
    let mut builder = tar::Builder::new(fs::File::create(output).unwrap());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut header = entry.header().clone();
        if header.entry_type() == tar::EntryType::Regular {
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            if let Some(data) = edit(&path, data) {
                header.set_size(data.len() as u64);
                builder
                    .append_data(&mut header, &path, data.as_slice())
                    .unwrap();
            }
        } else {
            builder.append(&header, &mut entry).unwrap();
        }
    }
    builder.finish().unwrap();
}

fn check_demo(store: &ImageStore, tarball: &Path, want_digest: &str) {
    let image = store.import_tarball(tarball, None).unwrap();
    assert_eq!(image.name, "demo");
    assert_eq!(image.digest, want_digest);
    assert_eq!(image.layers.len(), 2);
    assert_eq!(image.default_command, vec!["/bin/tool", "--flag"]);
    assert_eq!(image.default_env, vec!["A=1"]);
    assert_eq!(image.working_dir, "/srv");
    let total: u64 = layers().iter().map(|l| l.len() as u64).sum();
    assert_eq!(image.size_bytes, total);
    for layer in &image.layers {
        assert!(store.has_blob(layer), "{layer} not stored");
    }
    assert!(store.has_blob(&image.digest));
    assert_eq!(store.read_image(&image.digest).unwrap(), image);
    // Nothing left in tmp.
    assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
}

#[test]
fn imports_oci_layout_plain_and_gzip_and_nested() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    for (gzip, nested) in [(false, false), (true, false), (false, true), (true, true)] {
        let tarball = dir.path().join(format!("oci-{gzip}-{nested}.tar"));
        let cfg = FixtureConfig {
            gzip_layers: gzip,
            nested_index: nested,
            ..cfg()
        };
        let fixture = testutil::write_oci_layout_tarball_layers(&layers(), &tarball, &cfg).unwrap();
        check_demo(&store, &tarball, &fixture.digest);
        if gzip {
            let head = fs::read(store.blob_path(&fixture.layers[0])).unwrap();
            assert_eq!(&head[..2], &[0x1f, 0x8b]);
        }
    }
}

#[test]
fn imports_docker_save_legacy_and_oci_compatible() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    for format in [DockerSaveFormat::Legacy, DockerSaveFormat::OciCompatible] {
        for gzip in [false, true] {
            let tarball = dir.path().join(format!("docker-{format:?}-{gzip}.tar"));
            let cfg = FixtureConfig {
                gzip_layers: gzip,
                docker_format: format,
                ..cfg()
            };
            let fixture =
                testutil::write_docker_save_tarball_layers(&layers(), &tarball, &cfg).unwrap();
            check_demo(&store, &tarball, &fixture.digest);
        }
    }
}

#[test]
fn legacy_docker_save_with_duplicate_layer_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let layer = layers().remove(0);
    let tarball = dir.path().join("dup.tar");
    testutil::write_docker_save_tarball_layers(&[layer.clone(), layer], &tarball, &cfg()).unwrap();
    let image = store.import_tarball(&tarball, None).unwrap();
    assert_eq!(image.layers.len(), 2);
    assert_eq!(image.layers[0], image.layers[1]);
}

#[test]
fn gzipped_outer_tarball_and_fixture_from_dir() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let rootfs = dir.path().join("rootfs");
    fs::create_dir_all(rootfs.join("usr/bin")).unwrap();
    fs::write(rootfs.join("usr/bin/app"), b"app").unwrap();
    std::os::unix::fs::symlink("usr/bin", rootfs.join("bin")).unwrap();
    let tarball = dir.path().join("img.tar");
    let fixture = testutil::write_oci_layout_tarball(&rootfs, &tarball, &cfg()).unwrap();
    let gz = dir.path().join("img.tar.gz");
    fs::write(&gz, testutil::gzip(&fs::read(&tarball).unwrap())).unwrap();
    let image = store.import_tarball(&gz, Some("My_Org/App")).unwrap();
    assert_eq!(image.name, "my-org-app");
    assert_eq!(image.digest, fixture.digest);
    // Deterministic fixtures: the same directory gives the same digest.
    let again = dir.path().join("again.tar");
    let fixture2 = testutil::write_docker_save_tarball(&rootfs, &again, &cfg()).unwrap();
    assert_eq!(fixture2.layers, fixture.layers);
}

#[test]
fn names_come_from_argument_tags_or_annotations() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let unnamed = FixtureConfig {
        name: None,
        ..cfg()
    };
    let oci = dir.path().join("oci.tar");
    testutil::write_oci_layout_tarball_layers(&layers(), &oci, &unnamed).unwrap();
    let docker = dir.path().join("docker.tar");
    testutil::write_docker_save_tarball_layers(&layers(), &docker, &unnamed).unwrap();
    for tarball in [&oci, &docker] {
        let err = store.import_tarball(tarball, None).unwrap_err();
        assert!(matches!(err, ImageError::NameRequired), "{err}");
        assert!(err.to_string().contains("pass a name"));
        assert_eq!(
            store.import_tarball(tarball, Some("web_app")).unwrap().name,
            "web-app"
        );
        let err = store
            .import_tarball(tarball, Some("bad name!"))
            .unwrap_err();
        assert!(matches!(err, ImageError::InvalidName { .. }), "{err}");
    }
    let named = FixtureConfig {
        name: Some("ghcr.io/acme/tools:v2".into()),
        ..cfg()
    };
    testutil::write_oci_layout_tarball_layers(&layers(), &oci, &named).unwrap();
    assert_eq!(store.import_tarball(&oci, None).unwrap().name, "acme-tools");
}

fn tamper_test(tarball: &Path, out: &Path, target: &str) -> ImageError {
    let mut hit = false;
    rewrite(tarball, out, |path, mut data| {
        if path.ends_with(target) {
            hit = true;
            let last = data.len() - 1;
            data[last] ^= 0xff;
        }
        Some(data)
    });
    assert!(hit, "{target} not in tarball");
    let store = ImageStore::open(&out.with_extension("store")).unwrap();
    store.import_tarball(out, None).unwrap_err()
}

#[test]
fn digest_mismatch_is_reported_with_both_digests() {
    let dir = tempfile::tempdir().unwrap();
    let tarball = dir.path().join("oci.tar");
    let fixture = testutil::write_oci_layout_tarball_layers(&layers(), &tarball, &cfg()).unwrap();
    for target in [&fixture.layers[0], &fixture.config_digest, &fixture.digest] {
        let hex = &target["sha256:".len()..];
        let err = tamper_test(
            &tarball,
            &dir.path().join(format!("bad-{}.tar", &hex[..8])),
            hex,
        );
        match &err {
            ImageError::DigestMismatch {
                expected, actual, ..
            } => {
                assert_eq!(expected, target);
                assert_ne!(actual, target);
            }
            other => panic!("expected digest mismatch, got {other}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("expected") && msg.contains("actual"), "{msg}");
    }
    // A legacy layer.tar is not named by digest: the config's diff ids catch the change.
    let legacy = dir.path().join("legacy.tar");
    testutil::write_docker_save_tarball_layers(&layers(), &legacy, &cfg()).unwrap();
    let err = tamper_test(&legacy, &dir.path().join("legacy-bad.tar"), "layer.tar");
    assert!(
        matches!(&err, ImageError::DigestMismatch { what, .. } if what.contains("diff_ids")),
        "{err}"
    );
}

#[test]
fn missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let tarball = dir.path().join("oci.tar");
    let fixture = testutil::write_oci_layout_tarball_layers(&layers(), &tarball, &cfg()).unwrap();
    let store = store(dir.path());
    let layer_hex = fixture.layers[1]["sha256:".len()..].to_string();
    for (drop, want) in [
        ("index.json".to_string(), "index.json".to_string()),
        (layer_hex.clone(), format!("blobs/sha256/{layer_hex}")),
    ] {
        let out = dir.path().join("missing.tar");
        rewrite(&tarball, &out, |path, data| {
            (!path.ends_with(&drop)).then_some(data)
        });
        let err = store.import_tarball(&out, None).unwrap_err();
        assert!(err.to_string().contains(&want), "{err}");
    }
    let legacy = dir.path().join("legacy.tar");
    testutil::write_docker_save_tarball_layers(&layers(), &legacy, &cfg()).unwrap();
    let out = dir.path().join("legacy-missing.tar");
    rewrite(&legacy, &out, |path, data| {
        (!path.ends_with(".json") || path == "manifest.json").then_some(data)
    });
    let err = store.import_tarball(&out, None).unwrap_err();
    assert!(
        matches!(err, ImageError::MissingFile(ref f) if f.ends_with(".json")),
        "{err}"
    );
}

#[test]
fn garbage_and_truncated_tarballs_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let tarball = dir.path().join("oci.tar");
    testutil::write_oci_layout_tarball_layers(
        &layers(),
        &tarball,
        &FixtureConfig {
            gzip_layers: true,
            ..cfg()
        },
    )
    .unwrap();
    let good = fs::read(&tarball).unwrap();
    let bad = dir.path().join("bad.tar");
    let mut cases: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"not a tarball at all".to_vec(),
        vec![0u8; 10240],
        vec![0x1f, 0x8b, 0, 0, 1, 2, 3],
        testutil::gzip(b"garbage inside gzip"),
    ];
    for cut in [
        1,
        100,
        511,
        512,
        700,
        1024,
        1536,
        3000,
        good.len() / 2,
        good.len() - 1100,
    ] {
        cases.push(good[..cut.min(good.len())].to_vec());
    }
    let mut seed = 0x1234_5678_u32;
    for _ in 0..40 {
        let mut data = good.clone();
        for _ in 0..8 {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let i = seed as usize % data.len();
            data[i] = (seed >> 24) as u8;
        }
        cases.push(data);
    }
    for (i, case) in cases.iter().enumerate() {
        fs::write(&bad, case).unwrap();
        // Either an error or (for a harmless flip) a successful import; never a panic.
        if let Ok(image) = store.import_tarball(&bad, None) {
            assert!(i >= 15, "case {i} should fail");
            assert_eq!(image.name, "demo");
        }
    }
    let err = store
        .import_tarball(&dir.path().join("does-not-exist.tar"), None)
        .unwrap_err();
    assert!(err.to_string().contains("does-not-exist.tar"), "{err}");
}

#[test]
fn foreign_platform_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let tarball = dir.path().join("oci.tar");
    testutil::write_oci_layout_tarball_layers(&layers(), &tarball, &cfg()).unwrap();
    let out = dir.path().join("arm.tar");
    rewrite(&tarball, &out, |path, data| {
        if path == "index.json" {
            let text = String::from_utf8(data).unwrap().replace("amd64", "arm64");
            Some(text.into_bytes())
        } else {
            Some(data)
        }
    });
    let err = store(dir.path()).import_tarball(&out, None).unwrap_err();
    assert!(matches!(err, ImageError::NoMatchingPlatform(_)), "{err}");
}

#[test]
fn put_blob_verifies_and_blob_paths_are_confined() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let digest = nimbus_image::sha256_digest(b"payload");
    let err = store.put_blob(&b"other"[..], &digest).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(!store.has_blob(&digest));
    store.put_blob(&b"payload"[..], &digest).unwrap();
    assert!(store.has_blob(&digest));
    assert_eq!(fs::read(store.blob_path(&digest)).unwrap(), b"payload");
    assert!(store.put_blob(&b"x"[..], "sha256:../../x").is_err());
    let p: PathBuf = store.blob_path("sha256:../../../etc/passwd");
    assert!(p.starts_with(store.root().join("blobs/sha256")));
    assert!(!store.has_blob("sha256:../../../etc/passwd"));
}

#[test]
fn remove_and_gc() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let a_tar = dir.path().join("a.tar");
    let b_tar = dir.path().join("b.tar");
    testutil::write_oci_layout_tarball_layers(&layers(), &a_tar, &cfg()).unwrap();
    let other = testutil::layer_tar(&[LayerEntry::file("only-b", b"b")]).unwrap();
    testutil::write_oci_layout_tarball_layers(&[layers().remove(0), other], &b_tar, &cfg())
        .unwrap();
    let a = store.import_tarball(&a_tar, Some("a")).unwrap();
    let b = store.import_tarball(&b_tar, Some("b")).unwrap();
    for layer in a.layers.iter().chain(&b.layers) {
        store.unpacked_layer(layer).unwrap();
    }
    assert_eq!(store.list_images().unwrap(), vec![a.clone(), b.clone()]);
    store.remove_image(&b.digest).unwrap();
    store.remove_image(&b.digest).unwrap();
    assert!(matches!(
        store.read_image(&b.digest),
        Err(ImageError::ImageNotFound(_))
    ));
    let stats = store.gc(std::slice::from_ref(&a)).unwrap();
    // b's manifest, config and private layer go; the shared bottom layer stays.
    assert_eq!(stats.blobs_removed, 3);
    assert_eq!(stats.layers_removed, 1);
    assert_eq!(store.read_image(&a.digest).unwrap(), a);
    for layer in &a.layers {
        assert!(store.has_blob(layer));
        assert!(store.root().join("layers").join(&layer[7..]).is_dir());
    }
    assert!(!store.has_blob(&b.layers[1]));
    // a's config survives: re-importing needs nothing new, and gc(a) again removes nothing.
    assert_eq!(
        store.gc(std::slice::from_ref(&a)).unwrap(),
        nimbus_image::GcStats::default()
    );
    let stats = store.gc(&[]).unwrap();
    assert_eq!(stats.records_removed, 1);
    assert!(store.list_images().unwrap().is_empty());
    assert_eq!(
        fs::read_dir(store.root().join("blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn layers_that_escape_the_root_are_refused_at_import() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let ok = testutil::layer_tar(&[LayerEntry::dir("etc/")]).unwrap();
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        (
            "\"..\"",
            vec![testutil::layer_tar(&[LayerEntry::file("../../escape", b"x")]).unwrap()],
        ),
        (
            "absolute",
            vec![testutil::layer_tar(&[LayerEntry::file("/etc/cron.d/x", b"x")]).unwrap()],
        ),
        (
            "outside the root",
            vec![
                testutil::layer_tar(&[LayerEntry::hardlink("shadow", "../../etc/shadow")]).unwrap(),
            ],
        ),
        (
            "below the symlink",
            vec![testutil::layer_tar(&[
                LayerEntry::symlink("etc", "/etc"),
                LayerEntry::file("etc/passwd", b"root::0:0::/:/bin/sh\n"),
            ])
            .unwrap()],
        ),
        (
            // The symlink in the lower layer, the write through it in the upper one.
            "below the symlink",
            vec![
                testutil::layer_tar(&[LayerEntry::symlink("host", "/")]).unwrap(),
                ok.clone(),
                testutil::layer_tar(&[LayerEntry::file("host/root/.ssh/authorized_keys", b"k")])
                    .unwrap(),
            ],
        ),
    ];
    for (i, (why, layers)) in cases.into_iter().enumerate() {
        let tarball = dir.path().join(format!("evil{i}.tar"));
        testutil::write_oci_layout_tarball_layers(&layers, &tarball, &FixtureConfig::default())
            .unwrap();
        let err = store.import_tarball(&tarball, Some("evil")).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, ImageError::UnsafePath { .. }) && text.contains(why),
            "case {i}: {text}"
        );
        // Nothing recorded, nothing left in the staging area.
        assert!(store.list_images().unwrap().is_empty(), "case {i}");
        let tmp: Vec<_> = fs::read_dir(store.root().join("tmp"))
            .map(|d| d.flatten().collect())
            .unwrap_or_default();
        assert!(tmp.is_empty(), "case {i}: {tmp:?}");
    }
    // The same layers without the escape import fine.
    let tarball = dir.path().join("fine.tar");
    testutil::write_oci_layout_tarball_layers(
        &[testutil::layer_tar(&[
            LayerEntry::symlink("etc", "/etc"),
            LayerEntry::hardlink("b", "a"),
        ])
        .unwrap()],
        &tarball,
        &FixtureConfig::default(),
    )
    .unwrap();
    store.import_tarball(&tarball, Some("fine")).unwrap();
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Arbitrary bytes as the outer tarball, and a real tarball with bytes flipped: a clean
        /// error or an image, never a panic, and nothing left in the staging area.
        #[test]
        fn imports_of_any_bytes_fail_cleanly(
            bytes in prop::collection::vec(any::<u8>(), 0..8192),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let store = store(dir.path());
            let junk = dir.path().join("junk.tar");
            fs::write(&junk, &bytes).unwrap();
            // Random bytes are never an image (an OCI layout needs verified digests).
            prop_assert!(store.import_tarball(&junk, Some("junk")).is_err());
            let good = dir.path().join("good.tar");
            testutil::write_oci_layout_tarball_layers(&layers(), &good, &cfg()).unwrap();
            let mut data = fs::read(&good).unwrap();
            for (at, b) in flips {
                let i = at.index(data.len());
                data[i] = b;
            }
            let bent = dir.path().join("bent.tar");
            fs::write(&bent, &data).unwrap();
            let _ = store.import_tarball(&bent, None);
            let tmp: Vec<_> = fs::read_dir(store.root().join("tmp"))
                .map(|d| d.flatten().collect())
                .unwrap_or_default();
            prop_assert!(tmp.is_empty(), "{:?}", tmp);
        }
    }
}
