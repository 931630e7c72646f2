//! nimbus image: a local content-addressed (sha256) OCI image store.
//!
//! The control plane imports images from tarballs (`docker save` or OCI image layout); node
//! agents unpack layers for overlayfs root filesystems; the VM driver flattens layers into one
//! directory to build an ext4 disk.
//!
//! Layout under the store root:
//! ```text
//! blobs/sha256/<hex>   every blob (manifests, configs, layers), named by its sha256
//! layers/<hex>/        unpacked layers (overlayfs whiteouts), named by the layer blob digest
//! images/<hex>.json    one record per imported image, named by its manifest digest
//! tmp/                 staging area: files and directories are renamed out of it when complete
//! ```
//! Garbage collection ([`ImageStore::gc`]) must not run concurrently with an import.

mod busybox;
pub use busybox::BUSYBOX_IMAGE;
mod digest;
mod error;
mod import;
mod layer_check;
mod naming;
pub mod oci;
pub mod testutil;
mod unpack;

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use digest::{parse_digest, sha256_digest};
pub use error::ImageError;
pub use naming::{image_name_from_reference, sanitize_image_name};

use error::IoContext;

/// An image in the store, as the rest of nimbus sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedImage {
    /// The image name, a valid DNS label (`busybox`).
    pub name: String,
    /// The manifest digest, `sha256:<hex>`.
    pub digest: String,
    /// Layer blob digests, bottom first.
    pub layers: Vec<String>,
    /// Total size of the uncompressed layer tars in bytes (close to the unpacked size).
    pub size_bytes: u64,
    /// Entrypoint followed by Cmd.
    pub default_command: Vec<String>,
    /// Environment, `KEY=value`.
    pub default_env: Vec<String>,
    /// Working directory (`/` when the image sets none).
    pub working_dir: String,
}

/// What the store keeps per image: the public view plus what GC needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ImageRecord {
    #[serde(flatten)]
    image: ImportedImage,
    #[serde(default)]
    config_digest: String,
}

/// What a [`ImageStore::gc`] run removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Blobs deleted.
    pub blobs_removed: usize,
    /// Unpacked layer directories deleted.
    pub layers_removed: usize,
    /// Image records deleted.
    pub records_removed: usize,
    /// Bytes of blobs deleted (unpacked layers not counted).
    pub bytes_freed: u64,
    /// Leftovers of crashed imports and unpacks (older than a day) deleted from `tmp/`.
    pub tmp_removed: usize,
}

/// Age after which GC treats an entry of `tmp/` as left over by a crash.
#[allow(clippy::duration_suboptimal_units)] // from_hours is newer than the MSRV (1.85)
const TMP_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A content-addressed image store rooted at one directory.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

impl ImageStore {
    /// Opens (creating if needed) a store at `root`: `blobs/sha256`, `layers`, `images`, `tmp`.
    pub fn open(root: &Path) -> Result<Self, ImageError> {
        let store = ImageStore {
            root: root.to_path_buf(),
        };
        for dir in [
            store.blobs_dir(),
            store.layers_dir(),
            store.images_dir(),
            store.tmp_dir(),
        ] {
            fs::create_dir_all(&dir).at("create directory", &dir)?;
            // Private to the owner (root): the store and every directory down to this one.
            let mut d = dir.as_path();
            loop {
                set_mode(d, 0o700)?;
                match d.parent() {
                    Some(p) if d != root => d = p,
                    _ => break,
                }
            }
        }
        Ok(store)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    pub(crate) fn layers_dir(&self) -> PathBuf {
        self.root.join("layers")
    }

    pub(crate) fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Whether the blob with this digest is in the store (false for a malformed digest).
    pub fn has_blob(&self, digest: &str) -> bool {
        parse_digest(digest).is_ok() && self.blob_path(digest).is_file()
    }

    /// Where the blob with this digest lives (or would live). A malformed digest maps to a
    /// path inside the blob directory that never exists, so this never points elsewhere.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        match parse_digest(digest) {
            Ok(hex) => self.blobs_dir().join(hex),
            Err(_) => self.blobs_dir().join("invalid-digest"),
        }
    }

    /// Stores a blob read from `reader`: written to `tmp/`, verified against `digest`, then
    /// renamed into place. Does not read `reader` when the blob is already present.
    pub fn put_blob(&self, mut reader: impl Read, digest: &str) -> Result<(), ImageError> {
        let hex = parse_digest(digest)?;
        if self.has_blob(digest) {
            return Ok(());
        }
        let tmp_dir = self.tmp_dir();
        let mut tmp = tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(&tmp_dir)
            .at("create temporary file in", &tmp_dir)?;
        let mut writer = digest::HashWriter::new(tmp.as_file_mut());
        std::io::copy(&mut reader, &mut writer)
            .map_err(|e| ImageError::io(format!("write blob {digest}"), e))?;
        let (actual, _) = writer.finish();
        if actual != hex {
            return Err(ImageError::DigestMismatch {
                what: format!("blob {digest}"),
                expected: digest.to_string(),
                actual: format!("sha256:{actual}"),
            });
        }
        self.persist_tmp(tmp, hex)
    }

    /// Stores bytes as a blob and returns its digest.
    pub(crate) fn put_blob_bytes(&self, data: &[u8]) -> Result<String, ImageError> {
        let digest = sha256_digest(data);
        if !self.has_blob(&digest) {
            let tmp_dir = self.tmp_dir();
            let mut tmp = tempfile::Builder::new()
                .prefix("blob-")
                .tempfile_in(&tmp_dir)
                .at("create temporary file in", &tmp_dir)?;
            tmp.write_all(data).at("write", tmp.path())?;
            self.persist_tmp(tmp, &digest["sha256:".len()..])?;
        }
        Ok(digest)
    }

    fn persist_tmp(&self, tmp: tempfile::NamedTempFile, hex: &str) -> Result<(), ImageError> {
        tmp.as_file().sync_all().at("sync", tmp.path())?;
        let dest = self.blobs_dir().join(hex);
        set_mode(tmp.path(), 0o600)?;
        tmp.persist(&dest)
            .map_err(|e| ImageError::io_path("rename blob to", &dest, e.error))?;
        Ok(())
    }

    /// Moves an already verified file (inside `tmp/`) into the blob directory.
    pub(crate) fn adopt_verified_file(&self, file: &Path, hex: &str) -> Result<(), ImageError> {
        let dest = self.blobs_dir().join(hex);
        if dest.is_file() {
            return Ok(());
        }
        set_mode(file, 0o600)?;
        fs::rename(file, &dest).at("rename blob to", &dest)
    }

    /// Reads the record of an imported image.
    pub fn read_image(&self, digest: &str) -> Result<ImportedImage, ImageError> {
        Ok(self.read_record(digest)?.image)
    }

    fn read_record(&self, digest: &str) -> Result<ImageRecord, ImageError> {
        let hex = parse_digest(digest)?;
        let path = self.images_dir().join(format!("{hex}.json"));
        let data = match fs::read(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageError::ImageNotFound(digest.to_string()))
            }
            Err(e) => return Err(ImageError::io_path("read", &path, e)),
        };
        serde_json::from_slice(&data).map_err(|source| ImageError::Json {
            what: path.display().to_string(),
            source,
        })
    }

    /// Every image recorded in the store, sorted by name then digest.
    pub fn list_images(&self) -> Result<Vec<ImportedImage>, ImageError> {
        let dir = self.images_dir();
        let mut images = Vec::new();
        for entry in fs::read_dir(&dir).at("read directory", &dir)? {
            let entry = entry.at("read directory", &dir)?;
            let name = entry.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            match self.read_image(&format!("sha256:{hex}")) {
                Ok(image) => images.push(image),
                Err(e) => {
                    tracing::warn!(file = %entry.path().display(), error = %e, "skipping unreadable image record");
                }
            }
        }
        images.sort_by(|a, b| (&a.name, &a.digest).cmp(&(&b.name, &b.digest)));
        Ok(images)
    }

    pub(crate) fn write_record(
        &self,
        image: &ImportedImage,
        config_digest: &str,
    ) -> Result<(), ImageError> {
        let hex = parse_digest(&image.digest)?;
        let record = ImageRecord {
            image: image.clone(),
            config_digest: config_digest.to_string(),
        };
        let data = serde_json::to_vec_pretty(&record).map_err(|source| ImageError::Json {
            what: "image record".into(),
            source,
        })?;
        let tmp_dir = self.tmp_dir();
        let mut tmp = tempfile::Builder::new()
            .prefix("record-")
            .tempfile_in(&tmp_dir)
            .at("create temporary file in", &tmp_dir)?;
        tmp.write_all(&data).at("write", tmp.path())?;
        tmp.as_file().sync_all().at("sync", tmp.path())?;
        set_mode(tmp.path(), 0o600)?;
        let dest = self.images_dir().join(format!("{hex}.json"));
        tmp.persist(&dest)
            .map_err(|e| ImageError::io_path("rename record to", &dest, e.error))?;
        Ok(())
    }

    /// Removes the record of an image (its blobs and layers stay until [`ImageStore::gc`]).
    /// Removing an image that is not recorded is not an error.
    pub fn remove_image(&self, digest: &str) -> Result<(), ImageError> {
        let hex = parse_digest(digest)?;
        let path = self.images_dir().join(format!("{hex}.json"));
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ImageError::io_path("remove", &path, e)),
        }
    }

    /// Deletes every image record, blob and unpacked layer not reachable from `keep`.
    /// Must not run concurrently with an import or unpack in the same store.
    pub fn gc(&self, keep: &[ImportedImage]) -> Result<GcStats, ImageError> {
        let mut keep_blobs = HashSet::new();
        let mut keep_layers = HashSet::new();
        let mut keep_records = HashSet::new();
        for image in keep {
            let hex = parse_digest(&image.digest)?.to_string();
            keep_blobs.insert(hex.clone());
            keep_records.insert(format!("{hex}.json"));
            // The record knows the config blob; an image that has none recorded keeps nothing more.
            if let Ok(record) = self.read_record(&image.digest) {
                if let Ok(config) = parse_digest(&record.config_digest) {
                    keep_blobs.insert(config.to_string());
                }
            }
            for layer in &image.layers {
                let hex = parse_digest(layer)?.to_string();
                keep_blobs.insert(hex.clone());
                keep_layers.insert(hex);
            }
        }
        let mut stats = GcStats::default();
        for (dir, keep_set, kind) in [
            (self.images_dir(), &keep_records, 0),
            (self.blobs_dir(), &keep_blobs, 1),
            (self.layers_dir(), &keep_layers, 2),
        ] {
            for entry in fs::read_dir(&dir).at("read directory", &dir)? {
                let entry = entry.at("read directory", &dir)?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if keep_set.contains(&name) {
                    continue;
                }
                let path = entry.path();
                let meta = fs::symlink_metadata(&path).at("stat", &path)?;
                if meta.is_dir() {
                    fs::remove_dir_all(&path).at("remove", &path)?;
                } else {
                    fs::remove_file(&path).at("remove", &path)?;
                }
                match kind {
                    0 => stats.records_removed += 1,
                    1 => {
                        stats.blobs_removed += 1;
                        stats.bytes_freed += meta.len();
                    }
                    _ => stats.layers_removed += 1,
                }
                tracing::debug!(path = %path.display(), "gc removed");
            }
        }
        let tmp = self.tmp_dir();
        for entry in fs::read_dir(&tmp).at("read directory", &tmp)? {
            let path = entry.at("read directory", &tmp)?.path();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            let old = meta
                .modified()
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age > TMP_MAX_AGE);
            if old {
                let removed = if meta.is_dir() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
                match removed {
                    Ok(()) => stats.tmp_removed += 1,
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot remove stale tmp entry");
                    }
                }
            }
        }
        tracing::info!(?stats, "image store gc done");
        Ok(stats)
    }
}

pub(crate) fn set_mode(path: &Path, mode: u32) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).at("chmod", path)
}
