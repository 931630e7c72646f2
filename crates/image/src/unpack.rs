//! Layer extraction: safe paths, ownership, special files, whiteouts.
//!
//! Entries are never written through a symlink: every parent directory of an entry is checked
//! with `lstat` and must be a real directory inside the destination; `..` components and
//! absolute paths are rejected. Symlink entries themselves may point anywhere (they are resolved
//! inside the container, never by us).

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use flate2::read::MultiGzDecoder;
use nix::sys::stat::{mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use tar::EntryType;

use crate::error::IoContext;
use crate::{parse_digest, set_mode, ImageError, ImageStore};

/// Whiteout file prefix.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Opaque directory marker.
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// The overlayfs xattr marking an opaque directory.
const OVERLAY_OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// How whiteouts are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WhiteoutMode {
    /// Convert to overlayfs whiteouts (char device 0/0, opaque xattr).
    Overlay,
    /// Skip (they were applied by a deletion pass beforehand).
    Flatten,
}

/// Opens a layer blob, decompressing gzip (detected by magic bytes).
pub(crate) fn open_layer(path: &Path, layer: &str) -> Result<Box<dyn Read>, ImageError> {
    let file = File::open(path).at("open layer", path)?;
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let head = reader.fill_buf().at("read layer", path)?;
    let unsupported = |kind| ImageError::UnsupportedCompression {
        digest: layer.to_string(),
        kind,
    };
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(MultiGzDecoder::new(reader)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Err(unsupported("zstd"))
    } else if head.starts_with(b"BZh") {
        Err(unsupported("bzip2"))
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Err(unsupported("xz"))
    } else {
        Ok(Box::new(reader))
    }
}

/// Normalizes an archive path: drops `.` components, rejects `..` and absolute paths.
/// Returns `None` for the root itself.
pub(crate) fn normalize(raw: &Path, layer: &str) -> Result<Option<PathBuf>, ImageError> {
    let mut out = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::CurDir => {}
            Component::Normal(part) => out.push(part),
            Component::ParentDir => {
                return Err(unsafe_path(layer, raw, "contains a \"..\" component"))
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(unsafe_path(layer, raw, "is absolute"))
            }
        }
    }
    Ok(if out.as_os_str().is_empty() {
        None
    } else {
        Some(out)
    })
}

pub(crate) fn unsafe_path(layer: &str, path: &Path, reason: &str) -> ImageError {
    ImageError::UnsafePath {
        layer: layer.to_string(),
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn bad_layer(layer: &str, reason: impl std::fmt::Display) -> ImageError {
    ImageError::BadLayer {
        layer: layer.to_string(),
        reason: reason.to_string(),
    }
}

/// Checks that every parent of `rel` under `root` is a real directory (creating missing ones
/// when `create`), and returns `root/rel`, or `None` when a parent is missing and not created.
fn resolve_parent(
    root: &Path,
    rel: &Path,
    layer: &str,
    create: bool,
) -> Result<Option<PathBuf>, ImageError> {
    let mut cur = root.to_path_buf();
    if let Some(parent) = rel.parent() {
        for part in parent.components() {
            cur.push(part);
            match fs::symlink_metadata(&cur) {
                Ok(meta) if meta.is_dir() => {}
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(unsafe_path(
                        layer,
                        rel,
                        "a parent directory is a symlink (writing through it could escape)",
                    ))
                }
                Ok(_) => {
                    return Err(bad_layer(
                        layer,
                        format!("{}: a parent is not a directory", rel.display()),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(None);
                    }
                    fs::create_dir(&cur).at("create directory", &cur)?;
                    set_mode(&cur, 0o755)?;
                }
                Err(e) => return Err(ImageError::io_path("stat", &cur, e)),
            }
        }
    }
    Ok(Some(root.join(rel)))
}

/// Removes whatever is at `path` (file, symlink, device, or directory tree); absent is fine.
fn remove_any(path: &Path) -> Result<(), ImageError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path).at("remove", path),
        Ok(_) => fs::remove_file(path).at("remove", path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ImageError::io_path("stat", path, e)),
    }
}

/// Owner, mode, time and xattrs of one entry.
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: i64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn read_meta<R: Read>(entry: &mut tar::Entry<R>, layer: &str) -> Result<Meta, ImageError> {
    let header = entry.header();
    let mut meta = Meta {
        uid: header.uid().unwrap_or(0) as u32,
        gid: header.gid().unwrap_or(0) as u32,
        mode: header.mode().unwrap_or(0o644) & 0o7777,
        mtime: header.mtime().unwrap_or(0) as i64,
        xattrs: Vec::new(),
    };
    if let Some(exts) = entry.pax_extensions().map_err(|e| bad_layer(layer, e))? {
        for ext in exts {
            let ext = ext.map_err(|e| bad_layer(layer, e))?;
            let Ok(key) = ext.key() else { continue };
            let value = ext.value_bytes();
            let number = || {
                std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
            };
            if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                // overlayfs's own attributes (redirects, metacopy, opacity) are ours to set;
                // taking them from an archive would let a layer steer overlayfs lookups.
                if name.starts_with("trusted.overlay.") || name.starts_with("user.overlay.") {
                    tracing::warn!(layer, xattr = name, "ignoring overlayfs xattr in layer");
                    continue;
                }
                meta.xattrs.push((name.as_bytes().to_vec(), value.to_vec()));
            } else if key == "uid" {
                meta.uid = number().map_or(meta.uid, |v| v as u32);
            } else if key == "gid" {
                meta.gid = number().map_or(meta.gid, |v| v as u32);
            } else if key == "mtime" {
                let secs = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.split('.').next()?.parse::<i64>().ok());
                meta.mtime = secs.unwrap_or(meta.mtime);
            }
        }
    }
    Ok(meta)
}

/// Extracts layer archives into a directory.
pub(crate) struct Extractor<'a> {
    root: &'a Path,
    layer: &'a str,
    mode: WhiteoutMode,
    chown: bool,
    dir_times: Vec<(PathBuf, i64)>,
}

impl<'a> Extractor<'a> {
    pub(crate) fn new(root: &'a Path, layer: &'a str, mode: WhiteoutMode) -> Self {
        Extractor {
            root,
            layer,
            mode,
            chown: nix::unistd::geteuid().is_root(),
            dir_times: Vec::new(),
        }
    }

    /// Extracts every entry of the archive, then fixes directory times.
    pub(crate) fn extract(mut self, reader: impl Read) -> Result<(), ImageError> {
        let mut archive = tar::Archive::new(reader);
        let entries = archive.entries().map_err(|e| bad_layer(self.layer, e))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| bad_layer(self.layer, e))?;
            self.entry(&mut entry)?;
        }
        for (path, mtime) in self.dir_times.iter().rev() {
            set_mtime(path, *mtime);
        }
        Ok(())
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<R>) -> Result<(), ImageError> {
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            return Ok(());
        }
        let raw = entry
            .path()
            .map_err(|e| bad_layer(self.layer, e))?
            .into_owned();
        let Some(rel) = normalize(&raw, self.layer)? else {
            // The layer root itself.
            if kind == EntryType::Directory {
                let meta = read_meta(entry, self.layer)?;
                self.apply_meta(self.root, &meta, false)?;
                self.dir_times.push((self.root.to_path_buf(), meta.mtime));
            }
            return Ok(());
        };
        let name = rel.file_name().map_or(&b""[..], OsStr::as_bytes);
        if name.starts_with(WHITEOUT_PREFIX) {
            return self.whiteout(&rel, name);
        }
        let path = resolve_parent(self.root, &rel, self.layer, true)?
            .expect("create=true always yields a path");
        let meta = read_meta(entry, self.layer)?;
        match kind {
            EntryType::Directory => {
                match fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_any(&path)?;
                        fs::create_dir(&path).at("create directory", &path)?;
                    }
                    Err(_) => fs::create_dir(&path).at("create directory", &path)?,
                }
                self.apply_meta(&path, &meta, false)?;
                self.dir_times.push((path, meta.mtime));
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                remove_any(&path)?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc_o_nofollow())
                    .open(&path)
                    .at("create file", &path)?;
                io::copy(entry, &mut file).map_err(|e| {
                    bad_layer(self.layer, format!("reading {}: {e}", rel.display()))
                })?;
                drop(file);
                self.apply_meta(&path, &meta, false)?;
                set_mtime(&path, meta.mtime);
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| bad_layer(self.layer, e))?
                    .ok_or_else(|| {
                        bad_layer(
                            self.layer,
                            format!("symlink {} has no target", rel.display()),
                        )
                    })?
                    .into_owned();
                remove_any(&path)?;
                symlink(&target, &path).at("create symlink", &path)?;
                self.apply_meta(&path, &meta, true)?;
                set_mtime(&path, meta.mtime);
            }
            EntryType::Link => {
                let raw_target = entry
                    .link_name()
                    .map_err(|e| bad_layer(self.layer, e))?
                    .ok_or_else(|| {
                        bad_layer(
                            self.layer,
                            format!("hardlink {} has no target", rel.display()),
                        )
                    })?
                    .into_owned();
                let target_rel = normalize(&raw_target, self.layer)?
                    .ok_or_else(|| unsafe_path(self.layer, &raw_target, "hardlink to the root"))?;
                let target = resolve_parent(self.root, &target_rel, self.layer, false)?
                    .ok_or_else(|| {
                        bad_layer(
                            self.layer,
                            format!(
                                "hardlink {} -> {}: target missing",
                                rel.display(),
                                target_rel.display()
                            ),
                        )
                    })?;
                match fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => {
                        return Err(bad_layer(self.layer, format!("hardlink {} -> {}: target is a directory", rel.display(), target_rel.display())))
                    }
                    Ok(_) => {}
                    Err(_) => {
                        return Err(bad_layer(self.layer, format!("hardlink {} -> {}: target missing (hardlinks must point into the same layer)", rel.display(), target_rel.display())))
                    }
                }
                if target != path {
                    remove_any(&path)?;
                    fs::hard_link(&target, &path).at("create hardlink", &path)?;
                }
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                remove_any(&path)?;
                let major = entry.header().device_major().ok().flatten().unwrap_or(0);
                let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
                let sflag = match kind {
                    EntryType::Char => SFlag::S_IFCHR,
                    EntryType::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let dev = nix::sys::stat::makedev(u64::from(major), u64::from(minor));
                match mknod(&path, sflag, Mode::from_bits_truncate(0o600), dev) {
                    Ok(()) => {
                        self.apply_meta(&path, &meta, false)?;
                        set_mtime(&path, meta.mtime);
                    }
                    Err(e) => {
                        tracing::warn!(layer = self.layer, path = %rel.display(), error = %e, "cannot create special file; skipped");
                    }
                }
            }
            other => {
                tracing::warn!(layer = self.layer, path = %rel.display(), kind = ?other, "unsupported tar entry type; skipped");
            }
        }
        Ok(())
    }

    fn whiteout(&mut self, rel: &Path, name: &[u8]) -> Result<(), ImageError> {
        if self.mode == WhiteoutMode::Flatten {
            // Already applied by the deletion pass; only make sure the directory holding the
            // marker exists (and that its path is safe), as in the overlay form.
            if name == OPAQUE_MARKER {
                self.marker_dir(rel)?;
            } else {
                resolve_parent(self.root, rel, self.layer, true)?;
            }
            return Ok(());
        }
        if name == OPAQUE_MARKER {
            let dir = self.marker_dir(rel)?;
            xattr::set(&dir, OVERLAY_OPAQUE_XATTR, b"y")
                .at("set trusted.overlay.opaque on", &dir)?;
            return Ok(());
        }
        if name.starts_with(b".wh..wh.") {
            // AUFS metadata (.wh..wh.plnk etc.): meaningless for overlayfs.
            return Ok(());
        }
        let hidden = OsStr::from_bytes(&name[WHITEOUT_PREFIX.len()..]);
        if hidden.is_empty() {
            return Err(bad_layer(
                self.layer,
                format!("empty whiteout name {}", rel.display()),
            ));
        }
        let target_rel = rel.with_file_name(hidden);
        let path = resolve_parent(self.root, &target_rel, self.layer, true)?
            .expect("create=true always yields a path");
        remove_any(&path)?;
        mknod(&path, SFlag::S_IFCHR, Mode::empty(), 0)
            .map_err(|e| ImageError::io_path("create whiteout device", &path, e.into()))?;
        Ok(())
    }

    /// The directory holding an opaque marker, created if missing. A symlink there is refused
    /// (only a hostile archive puts a marker under a symlink).
    fn marker_dir(&self, marker: &Path) -> Result<PathBuf, ImageError> {
        let Some(parent) = marker.parent().filter(|p| !p.as_os_str().is_empty()) else {
            return Ok(self.root.to_path_buf());
        };
        let dir = resolve_parent(self.root, parent, self.layer, true)?
            .expect("create=true always yields a path");
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => return Ok(dir),
            Ok(m) if m.file_type().is_symlink() => {
                return Err(unsafe_path(
                    self.layer,
                    marker,
                    "opaque marker under a symlink",
                ))
            }
            Ok(_) => remove_any(&dir)?,
            Err(_) => {}
        }
        fs::create_dir(&dir).at("create directory", &dir)?;
        set_mode(&dir, 0o755)?;
        Ok(dir)
    }

    fn apply_meta(&self, path: &Path, meta: &Meta, is_symlink: bool) -> Result<(), ImageError> {
        if self.chown {
            std::os::unix::fs::lchown(path, Some(meta.uid), Some(meta.gid)).at("chown", path)?;
        }
        if !is_symlink {
            set_mode(path, meta.mode)?;
        }
        for (name, value) in &meta.xattrs {
            if let Err(e) = xattr::set(path, OsStr::from_bytes(name), value) {
                tracing::debug!(path = %path.display(), xattr = %String::from_utf8_lossy(name), error = %e, "cannot set xattr; skipped");
            }
        }
        Ok(())
    }
}

fn libc_o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

/// Sets a path's access and modification time without following symlinks (best effort).
fn set_mtime(path: &Path, mtime: i64) {
    let ts = TimeSpec::new(mtime, 0);
    if let Err(e) = utimensat(None, path, &ts, &ts, UtimensatFlags::NoFollowSymlink) {
        tracing::trace!(path = %path.display(), error = %e, "cannot set mtime");
    }
}

/// Applies the whiteouts of one layer to a flattened directory: `.wh.NAME` deletes NAME,
/// `.wh..wh..opq` empties its directory (of what lower layers put there).
fn apply_whiteouts(dest: &Path, reader: impl Read, layer: &str) -> Result<(), ImageError> {
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(|e| bad_layer(layer, e))? {
        let entry = entry.map_err(|e| bad_layer(layer, e))?;
        let raw = entry.path().map_err(|e| bad_layer(layer, e))?.into_owned();
        let Some(rel) = normalize(&raw, layer)? else {
            continue;
        };
        let name = rel.file_name().map_or(&b""[..], OsStr::as_bytes);
        if name == OPAQUE_MARKER {
            let dir_rel = rel.parent().unwrap_or(Path::new(""));
            let dir = if dir_rel.as_os_str().is_empty() {
                Some(dest.to_path_buf())
            } else {
                resolve_parent(dest, dir_rel, layer, false)?
            };
            let Some(dir) = dir else { continue };
            if fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
                for child in fs::read_dir(&dir).at("read directory", &dir)? {
                    remove_any(&child.at("read directory", &dir)?.path())?;
                }
            }
        } else if name.starts_with(WHITEOUT_PREFIX) && !name.starts_with(b".wh..wh.") {
            let target_rel = rel.with_file_name(OsStr::from_bytes(&name[WHITEOUT_PREFIX.len()..]));
            if let Some(path) = resolve_parent(dest, &target_rel, layer, false)? {
                remove_any(&path)?;
            }
        }
    }
    Ok(())
}

impl ImageStore {
    /// Unpacks a layer blob into `layers/<hex>/` (once; later calls return the same path).
    /// Whiteouts become overlayfs whiteouts. The layer is built in `tmp/` and renamed into
    /// place, so a crash never leaves a half-unpacked layer.
    pub fn unpacked_layer(&self, digest: &str) -> Result<PathBuf, ImageError> {
        let hex = parse_digest(digest)?;
        let dest = self.layers_dir().join(hex);
        if dest.is_dir() {
            return Ok(dest);
        }
        let blob = self.blob_path(digest);
        if !blob.is_file() {
            return Err(ImageError::BlobNotFound(digest.to_string()));
        }
        let started = std::time::Instant::now();
        let tmp_root = self.tmp_dir();
        let tmp = tempfile::Builder::new()
            .prefix("layer-")
            .tempdir_in(&tmp_root)
            .at("create temporary directory in", &tmp_root)?;
        set_mode(tmp.path(), 0o755)?;
        let reader = open_layer(&blob, digest)?;
        Extractor::new(tmp.path(), digest, WhiteoutMode::Overlay).extract(reader)?;
        let staged = tmp.keep();
        if let Err(e) = fs::rename(&staged, &dest) {
            let _ = fs::remove_dir_all(&staged);
            if dest.is_dir() {
                // Another unpacker won the race.
                return Ok(dest);
            }
            return Err(ImageError::io_path("rename layer to", &dest, e));
        }
        tracing::info!(
            layer = digest,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "unpacked layer"
        );
        Ok(dest)
    }

    /// Unpacks every layer of an image (see [`ImageStore::unpacked_layer`]) and returns the
    /// layer directories bottom first. overlayfs wants them top first in `lowerdir=`.
    pub fn unpack_image(&self, image: &crate::ImportedImage) -> Result<Vec<PathBuf>, ImageError> {
        image
            .layers
            .iter()
            .map(|layer| self.unpacked_layer(layer))
            .collect()
    }

    /// Applies `layers` (blob digests, bottom first) in order into one plain directory,
    /// honouring whiteouts (deleted paths and opaque directories vanish; no whiteout files are
    /// left). `dest` is created if missing.
    pub fn flatten_to_dir(&self, layers: &[String], dest: &Path) -> Result<(), ImageError> {
        fs::create_dir_all(dest).at("create directory", dest)?;
        for digest in layers {
            parse_digest(digest)?;
            let blob = self.blob_path(digest);
            if !blob.is_file() {
                return Err(ImageError::BlobNotFound(digest.clone()));
            }
            apply_whiteouts(dest, open_layer(&blob, digest)?, digest)?;
            Extractor::new(dest, digest, WhiteoutMode::Flatten)
                .extract(open_layer(&blob, digest)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_rejects_traversal() {
        assert!(normalize(Path::new("../x"), "l").is_err());
        assert!(normalize(Path::new("a/../../x"), "l").is_err());
        assert!(normalize(Path::new("/etc/passwd"), "l").is_err());
        assert_eq!(normalize(Path::new("./"), "l").unwrap(), None);
        assert_eq!(
            normalize(Path::new("./a/./b"), "l").unwrap(),
            Some(PathBuf::from("a/b"))
        );
    }
}
