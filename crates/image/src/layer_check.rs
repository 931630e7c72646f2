//! Import-time checks of a layer: one pass over its uncompressed tar stream hashes it (its
//! diff id) and refuses an entry that could write outside the root when unpacked: a path with
//! a `..` component or an absolute path, a hardlink whose target is either, and any entry (or
//! hardlink target) below a symlink that an earlier entry of the image made (a symlink to `/etc`
//! followed by `link/passwd`). Symlink entries themselves may point anywhere: they are resolved
//! inside the instance, never by the host. Unpacking checks the same again on disk
//! (`unpack.rs`), so an image stored before these checks still cannot escape.

use std::collections::BTreeSet;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tar::EntryType;

use crate::unpack::{normalize, unsafe_path};
use crate::ImageError;

/// Whiteout file prefix.
const WHITEOUT_PREFIX: &str = ".wh.";
/// Opaque directory marker.
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// The symlinks the image's layers have made so far, in layer order.
#[derive(Debug, Default)]
pub(crate) struct Symlinks(BTreeSet<PathBuf>);

impl Symlinks {
    /// The first proper ancestor of `rel` that is a symlink.
    fn through(&self, rel: &Path) -> Option<&PathBuf> {
        rel.ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty())
            .find_map(|a| self.0.get(a))
    }

    /// Forgets `rel` and everything below it.
    fn remove_tree(&mut self, rel: &Path) {
        self.0.retain(|p| !p.starts_with(rel));
    }
}

/// A reader hashing and counting what is read through it.
struct Tee<R> {
    inner: R,
    hasher: Sha256,
    len: u64,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

fn bad(layer: &str, reason: impl std::fmt::Display) -> ImageError {
    ImageError::BadLayer {
        layer: layer.to_string(),
        reason: reason.to_string(),
    }
}

/// Checks the uncompressed tar stream of layer `layer` against escapes (see the module docs),
/// recording its symlinks in `links` for the layers above it. Returns the stream's sha256 hex
/// and size.
pub(crate) fn check_layer(
    reader: impl Read,
    layer: &str,
    links: &mut Symlinks,
) -> Result<(String, u64), ImageError> {
    let mut tee = Tee {
        inner: reader,
        hasher: Sha256::new(),
        len: 0,
    };
    {
        let mut archive = tar::Archive::new(&mut tee);
        let entries = archive
            .entries()
            .map_err(|e| bad(layer, format!("not a tar archive: {e}")))?;
        for entry in entries {
            let entry = entry.map_err(|e| bad(layer, format!("unreadable tar entry: {e}")))?;
            let raw = entry
                .path()
                .map_err(|e| bad(layer, format!("unreadable entry path: {e}")))?
                .into_owned();
            let Some(rel) = normalize(&raw, layer)? else {
                continue;
            };
            if let Some(link) = links.through(&rel) {
                return Err(unsafe_path(
                    layer,
                    &raw,
                    &format!("is below the symlink {}", link.display()),
                ));
            }
            let name = rel
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
            if name == OPAQUE_MARKER {
                let keep_dir = parent.clone();
                links
                    .0
                    .retain(|p| p == &keep_dir || !p.starts_with(&keep_dir));
                continue;
            }
            if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
                links.remove_tree(&parent.join(hidden));
                continue;
            }
            match entry.header().entry_type() {
                EntryType::Symlink => {
                    links.remove_tree(&rel);
                    links.0.insert(rel);
                }
                EntryType::Link => {
                    let raw_target = entry
                        .link_name()
                        .map_err(|e| bad(layer, format!("unreadable hardlink target: {e}")))?
                        .ok_or_else(|| {
                            bad(layer, format!("hardlink {} has no target", raw.display()))
                        })?
                        .into_owned();
                    let target = normalize(&raw_target, layer)
                        .map_err(|_| {
                            unsafe_path(
                                layer,
                                &raw,
                                &format!(
                                    "is a hardlink to {} outside the root",
                                    raw_target.display()
                                ),
                            )
                        })?
                        .ok_or_else(|| unsafe_path(layer, &raw, "is a hardlink to the root"))?;
                    if let Some(link) = links.through(&target) {
                        return Err(unsafe_path(
                            layer,
                            &raw,
                            &format!(
                                "is a hardlink to {} below the symlink {}",
                                raw_target.display(),
                                link.display()
                            ),
                        ));
                    }
                    links.remove_tree(&rel);
                }
                _ => links.remove_tree(&rel),
            }
        }
    }
    // The end-of-archive blocks and any padding belong to the digest too.
    io::copy(&mut tee, &mut io::sink())
        .map_err(|e| bad(layer, format!("cannot decompress: {e}")))?;
    Ok((hex::encode(tee.hasher.finalize()), tee.len))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar with raw (unchecked) names: (path, kind, link target).
    fn tar_of(entries: &[(&str, EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, target) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o755);
            h.set_size(0);
            // Bypass the builder's path checks: a hostile layer is written by anyone.
            let name = &mut h.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            if !target.is_empty() {
                let link = &mut h.as_old_mut().linkname;
                link[..target.len()].copy_from_slice(target.as_bytes());
            }
            h.set_cksum();
            b.append(&h, &[][..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn check(entries: &[(&str, EntryType, &str)]) -> Result<(String, u64), ImageError> {
        check_layer(
            &tar_of(entries)[..],
            "sha256:test",
            &mut Symlinks::default(),
        )
    }

    fn refused(entries: &[(&str, EntryType, &str)], why: &str) {
        match check(entries) {
            Err(ImageError::UnsafePath { reason, .. }) => {
                assert!(reason.contains(why), "{reason:?} lacks {why:?}");
            }
            other => panic!("{entries:?} not refused: {other:?}"),
        }
    }

    #[test]
    fn escapes_are_refused() {
        use EntryType::{Directory, Link, Regular, Symlink};
        refused(&[("../etc/passwd", Regular, "")], "\"..\"");
        refused(&[("a/../../x", Regular, "")], "\"..\"");
        refused(&[("/etc/passwd", Regular, "")], "absolute");
        refused(&[("x", Link, "../../etc/shadow")], "outside the root");
        refused(&[("x", Link, "/etc/shadow")], "outside the root");
        refused(
            &[("etc", Symlink, "/etc"), ("etc/passwd", Regular, "")],
            "below the symlink etc",
        );
        refused(
            &[("l", Symlink, "/"), ("l/root/.ssh", Directory, "")],
            "below the symlink l",
        );
        refused(
            &[("l", Symlink, "/etc"), ("x", Link, "l/shadow")],
            "below the symlink l",
        );
    }

    #[test]
    fn ordinary_layers_pass_and_hash_the_whole_stream() {
        use EntryType::{Directory, Link, Regular, Symlink};
        let entries = [
            ("./", Directory, ""),
            ("bin/", Directory, ""),
            ("bin/busybox", Regular, ""),
            ("bin/sh", Link, "bin/busybox"),
            ("usr/bin/env", Symlink, "/bin/busybox"),
            ("lib", Symlink, "/usr/lib"),
            ("etc/../etc-not", Regular, ""),
        ];
        // `..` anywhere is refused, even when it stays inside.
        assert!(check(&entries).is_err());
        let entries = &entries[..6];
        let tar = tar_of(entries);
        let (hex, size) = check(entries).unwrap();
        assert_eq!(hex, hex::encode(Sha256::digest(&tar)));
        assert_eq!(size, tar.len() as u64);
        // A symlink replaced by a directory (or whited out) is no longer a symlink.
        check(&[
            ("d", Symlink, "/etc"),
            ("d", Directory, ""),
            ("d/f", Regular, ""),
        ])
        .unwrap();
        check(&[
            ("d", Symlink, "/etc"),
            (".wh.d", Regular, ""),
            ("d/f", Regular, ""),
        ])
        .unwrap();
    }

    #[test]
    fn symlinks_of_lower_layers_count() {
        let mut links = Symlinks::default();
        let lower = tar_of(&[("etc", EntryType::Symlink, "/host-etc")]);
        check_layer(&lower[..], "l1", &mut links).unwrap();
        let upper = tar_of(&[("etc/passwd", EntryType::Regular, "")]);
        assert!(matches!(
            check_layer(&upper[..], "l2", &mut links),
            Err(ImageError::UnsafePath { .. })
        ));
    }

    #[test]
    fn garbage_is_a_bad_layer_not_a_panic() {
        let mut links = Symlinks::default();
        assert!(check_layer(&[0xff; 1024][..], "l", &mut links).is_err());
        // Shorter than one tar block: no entries, no panic.
        let _ = check_layer(&b"not a tar at all"[..], "l", &mut links);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn kind() -> impl Strategy<Value = EntryType> {
            prop::sample::select(vec![
                EntryType::Regular,
                EntryType::Directory,
                EntryType::Symlink,
                EntryType::Link,
            ])
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            #[test]
            fn any_bytes_are_refused_or_hashed_without_panic(
                bytes in prop::collection::vec(any::<u8>(), 0..4096),
            ) {
                if let Ok((hex, size)) = check_layer(&bytes[..], "l", &mut Symlinks::default()) {
                    prop_assert_eq!(size, bytes.len() as u64);
                    prop_assert_eq!(hex, hex::encode(Sha256::digest(&bytes)));
                }
            }

            #[test]
            fn accepted_layers_stay_inside_the_root(
                entries in prop::collection::vec(
                    ("[a./]{1,12}", kind(), "[a./]{0,12}"),
                    1..8,
                ),
            ) {
                let entries: Vec<(&str, EntryType, &str)> = entries
                    .iter()
                    .map(|(p, k, t)| (p.as_str(), *k, t.as_str()))
                    .collect();
                let tar = tar_of(&entries);
                if check_layer(&tar[..], "l", &mut Symlinks::default()).is_ok() {
                    let mut links: Vec<PathBuf> = Vec::new();
                    for (path, kind, target) in &entries {
                        let p = Path::new(path);
                        let escapes = |p: &Path| {
                            p.is_absolute()
                                || p.components().any(|c| c == std::path::Component::ParentDir)
                        };
                        prop_assert!(!escapes(p), "{:?} accepted", path);
                        let rel: PathBuf = p.components().filter(|c| *c != std::path::Component::CurDir).collect();
                        if rel.as_os_str().is_empty() {
                            continue; // The root itself: skipped, never a symlink.
                        }
                        if *kind == EntryType::Link {
                            prop_assert!(!escapes(Path::new(target)), "link {:?} accepted", target);
                        }
                        prop_assert!(
                            !links.iter().any(|l| rel.starts_with(l) && rel != *l),
                            "{:?} below a symlink accepted", path
                        );
                        if *kind == EntryType::Symlink {
                            links.push(rel);
                        } else {
                            links.retain(|l| !l.starts_with(&rel));
                        }
                    }
                }
            }
        }
    }
}
